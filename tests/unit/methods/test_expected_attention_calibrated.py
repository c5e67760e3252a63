"""Expected Attention with calibrated statistics: the statistics against a slow float64 reference over the calibration
chunks, the whole score against a slow reference using them, independence from the context's queries, the on-disk
cache (a second calibration loads, no recompute) and option validation."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import forget
from kvsqueeze.methods import expected_attention_calibrated as eac
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.expected_attention_calibrated import ExpectedAttentionCalibrated, compute_query_stats
from tests.helpers import ids_of, prefill, record_scores
from tests.unit.test_expected_attention import rotation_matrix


def _pre_rope_queries(model, chunk: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """(n, H_q, D) float64 pre-RoPE queries of one llama layer for a chunk starting at position 0, written out."""
    attn = model.model.layers[layer_idx].self_attn
    with torch.no_grad():
        hidden = model(chunk[None], output_hidden_states=True).hidden_states[layer_idx]
        x = model.model.layers[layer_idx].input_layernorm(hidden)[0]
        return attn.q_proj(x).view(chunk.numel(), 4, 16).double()


def _reference_stats(model, ids, chunk_size, n_sink, layer_idx):
    qs = torch.cat([_pre_rope_queries(model, c, layer_idx)[n_sink:] for c in ids.split(chunk_size)])  # (N, H_q, D)
    mean = qs.mean(dim=0)
    cov = torch.stack([torch.cov(qs[:, h].T, correction=0) for h in range(qs.shape[1])])
    return mean, cov, qs.shape[0]


def test_statistics_match_a_slow_reference(make_model):
    model = make_model("llama")
    ids = ids_of(150, seed=1)[0]  # chunks of 64, 64 and 22 tokens
    stats = compute_query_stats(model, ids, chunk_size=64, n_sink=4)
    assert sorted(stats) == sorted(f"{k}_{i}" for k in ("mean", "cov", "count") for i in range(4))
    for layer in (0, 3):
        mean, cov, count = _reference_stats(model, ids, 64, 4, layer)
        assert int(stats[f"count_{layer}"]) == count == 150 - 3 * 4
        torch.testing.assert_close(stats[f"mean_{layer}"].double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats[f"cov_{layer}"].double(), cov, atol=1e-5, rtol=1e-4)


def _reference_scores(model, ids, layer_idx, mean, cov, n_sink, n_future, eps) -> torch.Tensor:
    """EA's score of one llama layer in float64 with given (calibrated) query statistics: (H, T)."""
    n = ids.shape[1]
    attn = model.model.layers[layer_idx].self_attn
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer_idx]
        x = model.model.layers[layer_idx].input_layernorm(hidden)[0]
        k = attn.k_proj(x).view(n, 2, 16).double()
        v = attn.v_proj(x).view(n, 2, 16).double()
        cos, sin = model.model.rotary_emb(x[None], torch.arange(n + n_future)[None])
    keys = torch.stack([k[i] @ rotation_matrix(cos[0, i], sin[0, i], 16).T for i in range(n)])  # (n, H, D)
    r = torch.stack([rotation_matrix(cos[0, n + j], sin[0, n + j], 16) for j in range(n_future)]).mean(dim=0)
    out = torch.zeros(2, n, dtype=torch.float64)
    for hq in range(4):
        h = hq // 2
        mu, sigma = r @ mean[hq], r @ cov[hq] @ r.T
        z = torch.tensor([float(keys[i, h] @ mu / 4 + keys[i, h] @ sigma @ keys[i, h] / 32) for i in range(n)])
        a = torch.zeros(n, dtype=torch.float64)
        a[n_sink:] = torch.softmax(z[n_sink:].double(), dim=0)
        out[h] += (a + eps) * v[:, h].norm(dim=-1) / 2
    return out


def test_scores_match_a_slow_reference_with_the_calibrated_statistics(make_model):
    model = make_model("llama")
    method = ExpectedAttentionCalibrated(ratio=0.5, n_future=9, eps=0.05, n_tokens=128, calibration_chunk=64)
    method.calibrate(model, force=True)
    stats = method.calibrated_stats(model)
    seen = record_scores(method)
    ids = ids_of(37, seed=3)
    prefill(model, ids, method)
    for layer_idx in (0, 3):
        mean, cov = stats["mean"][layer_idx].double(), stats["cov"][layer_idx].double()
        expected = _reference_scores(model, ids, layer_idx, mean, cov, 4, 9, 0.05)
        torch.testing.assert_close(seen[layer_idx][0, :, 4:].double(), expected[:, 4:], atol=1e-6, rtol=1e-4)
    forget(model)


def test_the_context_queries_are_not_used(make_model, monkeypatch):
    """Scoring never asks for the context's queries, and its scores differ from EA's with the context's statistics."""
    model = make_model("qwen3")
    calibrated = ExpectedAttentionCalibrated(ratio=0.5, n_tokens=128, calibration_chunk=64)
    calibrated.calibrate(model)
    own = kvs.get_method("expected_attention", ratio=0.5)
    seen_cal, seen_own = record_scores(calibrated), record_scores(own)
    ids = ids_of(40, seed=4)
    prefill(model, ids, own)

    def no_queries(self, *args, **kwargs):
        raise AssertionError("the context's queries were computed")

    monkeypatch.setattr(ScoreContext, "queries", no_queries)
    prefill(model, ids, calibrated)
    assert sorted(seen_cal) == [0, 1, 2, 3]
    assert not torch.allclose(seen_cal[0], seen_own[0])
    forget(model)


def test_second_calibration_loads_from_disk(make_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path))
    calls = []
    original = eac.compute_query_stats
    monkeypatch.setattr(eac, "compute_query_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = make_model("mistral")
    method = ExpectedAttentionCalibrated(n_tokens=128, calibration_chunk=64)
    path = method.calibrate(model)
    assert path.exists() and calls == [1]
    first = method.calibrated_stats(model)
    forget(model)  # a new process: nothing in memory
    again = ExpectedAttentionCalibrated(n_tokens=128, calibration_chunk=64).calibrate(model)
    assert again == path and calls == [1]  # loaded, not recomputed
    for layer in range(4):
        torch.testing.assert_close(method.calibrated_stats(model)["cov"][layer], first["cov"][layer])
    method.calibrate(model, force=True)
    assert calls == [1, 1]
    other = ExpectedAttentionCalibrated(n_tokens=128, calibration_chunk=64, n_sink=2).calibrate(model)
    assert other != path and calls == [1, 1, 1]  # n_sink changes the statistics: another artifact
    forget(model)


def test_needs_calibration_and_listed():
    described = {d["name"]: d for d in kvs.describe_methods()}["expected_attention_calibrated"]
    assert described["needs"] == ["calibration"]
    assert described["options"]["n_tokens"] == 4096


@pytest.mark.parametrize(
    ("option", "value"), [("n_tokens", 8), ("seed", -1), ("calibration_chunk", 0), ("n_future", 0), ("eps", -1.0)]
)
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be .*{value!r}"):
        kvs.get_method("expected_attention_calibrated", **{option: value})
