"""DuoAttention: the calibration error against a slow float64 reference, the head ranking, how many heads stream for a
ratio, what streaming and retrieval heads keep (stored ragged), the fixed streaming fraction, the on-disk cache and
option validation."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import AttentionCall, collect_attention, forget, remembered
from kvsqueeze.methods import duo_attention as duo
from kvsqueeze.methods.duo_attention import DuoAttention, n_streaming, streaming_error, streaming_ranks
from tests.helpers import ids_of, kept_positions, kept_total, prefill
from tests.unit.test_expected_attention import rotation_matrix


def _reference_error(model, ids: torch.Tensor, layer_idx: int, n_sink: int, window: int) -> torch.Tensor:
    """(H + 1,) streaming error of each KV head and the layer's output norm, one llama layer, in float64 loops."""
    n = ids.numel()
    attn = model.model.layers[layer_idx].self_attn
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states[layer_idx]
        x = model.model.layers[layer_idx].input_layernorm(hidden)[0]
        q = attn.q_proj(x).view(n, 4, 16).double()
        k = attn.k_proj(x).view(n, 2, 16).double()
        v = attn.v_proj(x).view(n, 2, 16).double()
        cos, sin = model.model.rotary_emb(x[None], torch.arange(n)[None])
    rot = [rotation_matrix(cos[0, i], sin[0, i], 16) for i in range(n)]
    q = torch.stack([q[i] @ rot[i].T for i in range(n)])
    k = torch.stack([k[i] @ rot[i].T for i in range(n)])
    wo = attn.o_proj.weight.double()  # (hidden, H_q D)
    error = torch.zeros(2, dtype=torch.float64)
    norm = torch.tensor(0.0, dtype=torch.float64)
    for t in range(n_sink + window, n):
        layer_out = torch.zeros(wo.shape[0], dtype=torch.float64)
        for g in range(4):
            h = g // 2
            logits = torch.tensor([float(q[t, g] @ k[j, h]) / 4 for j in range(t + 1)], dtype=torch.float64)
            visible = [j for j in range(t + 1) if j < n_sink or t - j < window]
            full = torch.softmax(logits, dim=0) @ v[: t + 1, h]
            stream = torch.softmax(logits[visible], dim=0) @ v[visible, h]
            w = wo[:, g * 16 : (g + 1) * 16]
            error[h] += ((stream - full) @ w.T).square().sum()
            layer_out += full @ w.T
        norm += layer_out.square().sum()
    return torch.cat([error, norm[None]])


def test_streaming_error_matches_a_slow_reference(make_model):
    model = make_model("llama")
    ids = ids_of(30, seed=2)[0]
    got = collect_attention(model, ids, lambda call: streaming_error(call, 3, 5), chunk_size=30)
    for layer in (0, 3):
        expected = _reference_error(model, ids, layer, 3, 5)
        torch.testing.assert_close(got[layer][0].double(), expected, atol=1e-6, rtol=1e-4)
        assert bool((expected[:2] > 0).all())


def test_streaming_error_is_zero_when_the_window_covers_the_chunk(make_model):
    model = make_model("qwen3")
    ids = ids_of(20, seed=3)[0]
    got = collect_attention(model, ids, lambda c: streaming_error(c, 4, 10), 20)[0][0]
    assert bool((got[:2] > 0).all())  # 6 queries see more than their sinks and window
    captured: list[AttentionCall] = []
    collect_attention(model, ids, lambda c: captured.append(c) or torch.zeros(1), 20, layers=[0])
    assert torch.equal(streaming_error(captured[0], 4, 16), torch.zeros(3))  # no query past sinks + window


def test_ranks_are_model_wide_ascending_errors():
    errors = {0: torch.tensor([0.5, 0.1]), 2: torch.tensor([0.3, 0.1])}
    ranks = streaming_ranks(errors)
    assert ranks[0].tolist() == [3, 0] and ranks[2].tolist() == [2, 1]  # tie 0.1: the earlier layer first


@pytest.mark.parametrize(
    ("seen", "ratio", "kept", "fraction", "expected"),
    [
        (100, 0.5, 20, None, 5),  # 0.5 x 100 x 8 / 80 = 5 heads evict 400 of 800 tokens
        (61, 0.5, 12, None, 5),  # 0.5 x 61 x 8 / 49 = 4.98
        (100, 0.9, 20, None, 8),  # 9 heads wanted, only 8 exist
        (10, 0.5, 20, None, 0),  # the window holds everything: nothing to evict
        (100, 0.0, 20, None, 0),
        (100, 0.0, 20, 0.5, 4),  # a fixed share of the 8 heads, whatever the ratio
        (100, 0.9, 20, 0.0, 0),
    ],
)
def test_number_of_streaming_heads(seen, ratio, kept, fraction, expected):
    assert n_streaming(torch.tensor([seen]), ratio, 8, kept, fraction).tolist() == [expected]


def _with_errors(model, method: DuoAttention, errors: dict[int, torch.Tensor]) -> None:
    remembered(model, method._key(), lambda: errors, refresh=True)


@pytest.mark.parametrize(("ratio", "fraction", "n_stream"), [(0.5, None, 5), (0.25, None, 2), (0.0, 0.75, 6)])
def test_streaming_heads_keep_sinks_and_window_the_others_everything(ratio, fraction, n_stream, make_model):
    model = make_model("llama")
    method = DuoAttention(ratio=ratio, n_sink=4, window=8, streaming_fraction=fraction)
    errors = {layer: torch.tensor([0.1 * layer + 0.05, 0.4 - 0.1 * layer]) for layer in range(4)}
    _with_errors(model, method, errors)
    ranks = streaming_ranks(errors)
    n = 61
    cache = prefill(model, ids_of(n, seed=1), method)
    streamed = 0
    for idx, layer in enumerate(cache.full_layers()):
        for h in range(2):
            kept = kept_positions(layer, 0, h)
            if int(ranks[idx][h]) < n_stream:
                streamed += 1
                assert kept == [0, 1, 2, 3, *range(n - 8, n)]
            else:
                assert kept == list(range(n))
    assert streamed == n_stream
    stats = kvs.cache_stats(cache)
    total = kept_total(cache)
    assert total == n_stream * 12 + (8 - n_stream) * n
    assert stats.kv_bytes == total * 2 * 16 * 4  # ragged: only the kept tokens are stored
    forget(model)


def test_ratio_sets_about_the_evicted_share(make_model):
    model = make_model("mistral")
    method = DuoAttention(ratio=0.5, n_sink=4, window=8, n_tokens=256, calibration_chunk=64)
    n = 200
    cache = prefill(model, ids_of(n, seed=4), method)
    kept = kept_total(cache)
    per_stream = n - 12
    assert abs((8 * n - kept) - 0.5 * 8 * n) <= per_stream / 2  # within half a head of the target
    forget(model)


def test_second_calibration_loads_from_disk(make_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path))
    calls = []
    original = duo.compute_head_errors
    monkeypatch.setattr(duo, "compute_head_errors", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = make_model("qwen2")
    method = DuoAttention(window=8, n_tokens=128, calibration_chunk=64)
    path = method.calibrate(model)
    first = method.head_errors(model)
    assert path.exists() and calls == [1] and sorted(first) == [0, 1, 2, 3]
    forget(model)
    assert DuoAttention(window=8, n_tokens=128, calibration_chunk=64).calibrate(model) == path
    assert calls == [1]
    assert all(torch.equal(method.head_errors(model)[i], first[i]) for i in range(4))
    assert DuoAttention(window=16, n_tokens=128, calibration_chunk=64).calibrate(model) != path  # other window
    assert calls == [1, 1]
    forget(model)


def test_needs_calibration_and_listed():
    described = {d["name"]: d for d in kvs.describe_methods()}["duo_attention"]
    assert described["needs"] == ["calibration"]
    assert described["options"]["streaming_fraction"] is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("window", -1), ("n_sink", 1.5), ("streaming_fraction", 1.5), ("streaming_fraction", "half"), ("seed", -2)],
)
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be .*{value!r}"):
        kvs.get_method("duo_attention", **{option: value})


def test_calibration_chunk_must_exceed_the_streaming_span():
    with pytest.raises(ValueError, match=r"calibration_chunk must exceed n_sink \+ window = 68.*got 64"):
        DuoAttention(calibration_chunk=64)
    with pytest.raises(ValueError, match="n_sink \\+ window must be >= 1"):
        DuoAttention(n_sink=0, window=0)
