"""ThinK: key channels scored by ||Q_w[:, c]|| ||K[:, c]||, stored thinner for real, attention exact over what is kept.

The end-to-end checks compare kvsqueeze's logits after ThinK with a dense reference: plain attention over the whole
sequence where the tokens after the context see only the kept context tokens and only the kept key channels (pruned
channels of keys and queries zeroed by hand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import AttentionInterface

import kvsqueeze as kvs
from kvsqueeze.cachefile import load_cache, save_cache
from kvsqueeze.methods.adakv import AdaKV
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.think import ThinK, channel_scores, top_channels
from tests.helpers import ids_of, kept_counts, kept_total, prefill

N_CTX = 61
HEAD_DIM = 16

# --- the rule on small tensors ----------------------------------------------------------------------------------------


def test_channel_scores_match_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    b, h, g, w, t, d = 2, 2, 3, 4, 7, 6
    queries = torch.randn(b, h * g, w, d, generator=gen)
    keys = torch.randn(b, h, t, d, generator=gen)
    valid = torch.rand(b, h, t, generator=gen) > 0.3
    real = torch.tensor([[True] * w, [False, True, True, True]])
    scores = channel_scores(queries, keys, valid, real)
    for row in range(b):
        for head in range(h):
            q_rows = [queries[row, head * g + j, i] for j in range(g) for i in range(w) if real[row, i]]
            k_rows = [keys[row, head, s] for s in range(t) if valid[row, head, s]]
            for c in range(d):
                q_norm = math.sqrt(sum(float(q[c]) ** 2 for q in q_rows))
                k_norm = math.sqrt(sum(float(k[c]) ** 2 for k in k_rows))
                assert float(scores[row, head, c]) == pytest.approx(q_norm * k_norm, rel=1e-5)


def test_top_channels_are_ascending_and_ties_keep_the_lower_channel():
    scores = torch.tensor([[[1.0, 5.0, 3.0, 5.0, 0.0, 3.0]]])
    assert top_channels(scores, 3).tolist() == [[[1, 2, 3]]]
    assert top_channels(scores, 4).tolist() == [[[1, 2, 3, 5]]]


def _ctx_with_queries(keys: torch.Tensor, queries: torch.Tensor, query_positions: torch.Tensor) -> ScoreContext:
    b, h, t, _ = keys.shape
    q = queries.shape[2]
    none: object = None
    return ScoreContext(
        keys=keys,
        values=keys.clone(),
        positions=torch.arange(t, dtype=torch.int32).expand(b, h, t).clone(),
        hidden_states=torch.zeros(b, q, 8),
        query_positions=query_positions,
        position_embeddings=(torch.zeros(b, q, 8), torch.zeros(b, q, 8)),
        seen=torch.full((b,), t),
        layer_idx=0,
        module=none,  # type: ignore[arg-type]
        adapter=none,  # type: ignore[arg-type]
        captured_queries=queries,
    )


def test_channel_plan_scores_the_window_queries_and_the_kept_tokens():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 10, HEAD_DIM, generator=gen)
    queries = torch.randn(1, 4, 10, HEAD_DIM, generator=gen)
    qpos = torch.arange(10)[None]
    method = ThinK(key_channel_ratio=0.25, window=3)
    kept = torch.tensor([[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]])
    counts = torch.tensor([[5, 4]])
    plan = method.channel_plan(_ctx_with_queries(keys, queries, qpos), (kept, counts))
    assert plan is not None and plan.shape == (1, 2, 12)  # 16 - floor(16 * 0.25)
    for head in range(2):
        slots = kept[0, head, : counts[0, head]]
        q = queries[0, 2 * head : 2 * head + 2, -3:].reshape(-1, HEAD_DIM)
        score = q.norm(dim=0) * keys[0, head, slots].norm(dim=0)
        expected = sorted(sorted(range(HEAD_DIM), key=lambda c, s=score: (-float(s[c]), c))[:12])
        assert plan[0, head].tolist() == expected


def test_zero_key_channel_ratio_keeps_every_channel():
    keys = torch.randn(1, 2, 10, HEAD_DIM)
    ctx = _ctx_with_queries(keys, torch.randn(1, 4, 10, HEAD_DIM), torch.arange(10)[None])
    assert ThinK(key_channel_ratio=0.0).channel_plan(ctx, None) is None
    assert ThinK(key_channel_ratio=0.05).channel_plan(ctx, None) is None  # floor(16 * 0.05) = 0 channels removed
    assert ThinK(key_channel_ratio=0.99).kept_channels(HEAD_DIM) == 1
    assert ThinK(key_channel_ratio=0.3).kept_channels(10) == 7  # 10 * 0.3 is 3.0000000000000004


# --- options ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"key_channel_ratio": 1.0}, r"key_channel_ratio .*\[0, 1\).* 1\.0"),
        ({"key_channel_ratio": -0.1}, r"key_channel_ratio.*-0\.1"),
        ({"key_channel_ratio": "half"}, r"key_channel_ratio.*'half'"),
        ({"key_channel_ratio": True}, r"key_channel_ratio.*True"),
        ({"window": 0}, r"window .*>= 1.* 0"),
        ({"window": 2.5}, r"window.*2\.5"),
        ({"ratio": 0.5}, r"ratio=0\.5 .*no scorer"),
        ({"ratio": 0.5, "scorer": "knrom"}, r"Did you mean 'knorm'"),
        ({"scorer": 3}, r"scorer must be .* got 3"),
        ({"scorer": "global_budget"}, r"shares one budget across layers"),
        ({"scorer": "keyrerotation"}, r"re-rotates keys"),
        ({"scorer": "decoding"}, r"decoding"),
        ({"scorer": ThinK()}, r"scorer must be"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        kvs.get_method("think", **options)


def test_the_scorer_gets_the_ratio_and_the_repr_rebuilds():
    method = kvs.get_method("think", ratio=0.5, scorer="snapkv", key_channel_ratio=0.25)
    assert method.scorer == SnapKV(ratio=0.5)
    assert eval(repr(method), {"ThinK": ThinK, "SnapKV": SnapKV}) == method


# --- end to end on tiny models: the dense reference -------------------------------------------------------------------


@dataclass
class LayerPlan:
    tokens: torch.Tensor  # (H, n_ctx) bool: context tokens kept
    channels: torch.Tensor  # (H, D) float 1 = key channel kept


_PLANS: dict[int, LayerPlan] = {}
_N_CTX = [0]


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense attention over the whole sequence: tokens after the context see the kept context tokens only, with the
    pruned key channels of keys and queries zeroed."""
    plan, n_ctx = _PLANS[module.layer_idx], _N_CTX[0]
    _, hq, n, _ = query.shape
    g = hq // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1).float(), value.repeat_interleave(g, dim=1).float()
    q = query.float()
    ch = plan.channels.repeat_interleave(g, dim=0)[None, :, None, :]  # (1, H_q, 1, D)
    full = q @ k.transpose(-1, -2) * scaling
    thin = (q * ch) @ (k * ch).transpose(-1, -2) * scaling
    late = torch.arange(n) >= n_ctx  # (n,) rows (queries) and columns (keys) after the context
    logits = torch.where(late[:, None], thin, full)
    kept_cols = torch.cat([plan.tokens, torch.ones(plan.tokens.shape[0], n - n_ctx, dtype=torch.bool)], dim=1)
    kept_cols = kept_cols.repeat_interleave(g, dim=0)[None, :, None, :]  # (1, H_q, 1, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal & (~late[:, None] | kept_cols)
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("think_reference", _reference_attention)


def _plans_of(cache: kvs.KVCache) -> dict[int, LayerPlan]:
    plans = {}
    for idx, layer in enumerate(cache.kv_layers()):
        keys, _, pos = layer.view()
        tokens = torch.zeros(pos.shape[1], N_CTX, dtype=torch.bool)
        for h in range(pos.shape[1]):
            tokens[h, pos[0, h][pos[0, h] >= 0].long()] = True
        channels = torch.ones(pos.shape[1], keys.shape[-1])
        if layer.key_channels is not None:
            channels = torch.zeros_like(channels).scatter_(-1, layer.key_channels[0], 1.0)
        plans[idx] = LayerPlan(tokens, channels)
    return plans


def _reference_logits(model, ids: torch.Tensor, plans: dict[int, LayerPlan]) -> torch.Tensor:
    _PLANS.clear()
    _PLANS.update(plans)
    _N_CTX[0] = N_CTX
    previous = model.config._attn_implementation
    model.set_attn_implementation("think_reference")
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def _run(model, method, backend: str, decode_under_compress: bool) -> tuple[torch.Tensor, torch.Tensor, kvs.KVCache]:
    """Prefill the context compressed, then a 9-token question and 3 greedy steps. Returns (the tokens after the
    context, their logits, the cache as it was right after the prefill)."""
    ids, question = ids_of(N_CTX), ids_of(9, seed=3)
    cache = kvs.KVCache(model.config)
    with torch.no_grad():
        with kvs.compress(model, method, backend=backend):
            model(ids, past_key_values=cache)
        after_prefill = cache.select_rows(torch.tensor([0]))
        tokens, logits = [question], []
        with kvs.compress(model, method, backend=backend) if decode_under_compress else kvs.attach(model, backend):
            for _ in range(4):
                out = model(tokens[-1], past_key_values=cache).logits
                logits.append(out)
                tokens.append(out[:, -1:].argmax(-1))
    return torch.cat(tokens[:-1], dim=1), torch.cat(logits, dim=1), after_prefill


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("ratio", "scorer", "under_compress"),
    [
        (0.0, None, True),
        (0.0, None, False),
        (0.5, SnapKV(window=8), False),
        (0.5, AdaKV(scorer=SnapKV(window=8)), False),
    ],
    ids=["channels-decoding-compressed", "channels", "snapkv", "adakv-ragged"],
)
def test_logits_equal_the_dense_reference(family, backend, ratio, scorer, under_compress, make_model):
    model = make_model(family)
    method = ThinK(ratio=ratio, key_channel_ratio=0.5, window=8, scorer=scorer)
    new_ids, logits, after_prefill = _run(model, method, backend, under_compress)
    plans = _plans_of(after_prefill)
    for layer in after_prefill.full_layers():
        assert layer.keys.shape[-1] == HEAD_DIM // 2
        assert layer.key_channels is not None and layer.key_channels.shape == (1, 2, HEAD_DIM // 2)
    if isinstance(scorer, AdaKV):
        assert any(layer.is_ragged for layer in after_prefill.full_layers())
    reference = _reference_logits(model, torch.cat([ids_of(N_CTX), new_ids], dim=1), plans)[:, N_CTX:]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # and the pruning matters: without it the reference differs
    plain = {i: LayerPlan(p.tokens, torch.ones_like(p.channels)) for i, p in plans.items()}
    unpruned = _reference_logits(model, torch.cat([ids_of(N_CTX), new_ids], dim=1), plain)[:, N_CTX:]
    assert (logits - unpruned).abs().max() > 1e-3


def test_new_tokens_are_stored_with_the_kept_channels(make_model):
    model = make_model("llama")
    method = ThinK(key_channel_ratio=0.5, window=8)
    _, _, after_prefill = _run(model, method, "sdpa", decode_under_compress=True)
    dense = prefill(model, ids_of(N_CTX))
    for layer, ref in zip(after_prefill.full_layers(), dense.full_layers(), strict=True):
        channels = layer.key_channels
        assert channels is not None
        thin = ref.keys.gather(-1, channels[:, :, None, :].expand(1, 2, N_CTX, -1))
        assert torch.equal(layer.keys, thin)  # the stored keys are the kept channels of the dense ones
        keys, values, _ = layer.view()  # full width again, zeros in the pruned channels
        mask = torch.zeros(1, 2, 1, HEAD_DIM).scatter_(-1, channels[:, :, None, :], 1.0)
        assert torch.equal(keys, ref.keys * mask)
        assert torch.equal(values, ref.values)


# --- bytes ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_channel_ratio", [0.25, 0.5, 0.75])
def test_key_bytes_shrink_by_exactly_the_channel_ratio(key_channel_ratio, make_model):
    model = make_model("qwen2")
    ids = ids_of(N_CTX)
    dense, thin = kvs.KVCache(model.config), kvs.KVCache(model.config)
    with torch.no_grad():
        with kvs.attach(model):
            model(ids, past_key_values=dense)
        with kvs.compress(model, ThinK(key_channel_ratio=key_channel_ratio)) as log:
            model(ids, past_key_values=thin)
    kept = 1 - key_channel_ratio
    for layer, ref in zip(thin.full_layers(), dense.full_layers(), strict=True):
        assert layer.keys.untyped_storage().nbytes() == ref.keys.untyped_storage().nbytes() * kept
        assert layer.values.untyped_storage().nbytes() == ref.values.untyped_storage().nbytes()
    before, after = kvs.cache_stats(dense), kvs.cache_stats(thin)
    per_token = 2 * 2 * HEAD_DIM * 4 * 4  # keys+values, 2 KV heads, fp32, 4 layers
    assert before.kv_bytes == N_CTX * per_token
    assert after.kv_bytes == N_CTX * per_token * (1 + kept) / 2
    assert log.kv_bytes_before == before.kv_bytes and log.kv_bytes_after == after.kv_bytes
    assert after.padding_bytes == 0
    assert after.metadata_bytes == before.metadata_bytes + 4 * 2 * int(HEAD_DIM * kept) * 8  # the int64 channels


def test_tokens_and_channels_compose_in_bytes(make_model):
    model = make_model("llama")
    cache = prefill(model, ids_of(N_CTX), ThinK(ratio=0.5, key_channel_ratio=0.5, scorer=SnapKV(window=8)))
    kept = N_CTX // 2
    assert kept_counts(cache) == [[[kept, kept]]] * 4
    assert kvs.cache_stats(cache).kv_bytes == kept * 2 * (HEAD_DIM // 2 + HEAD_DIM) * 4 * 4


# --- nothing changes at zero ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_ratios_change_nothing(family, make_model):
    model = make_model(family)
    ids, question = ids_of(N_CTX), ids_of(7, seed=1)

    def run(method):
        cache = kvs.KVCache(model.config)
        with torch.no_grad(), kvs.compress(model, method) if method is not None else kvs.attach(model):
            logits = torch.cat(
                [model(ids, past_key_values=cache).logits, model(question, past_key_values=cache).logits], 1
            )
        return logits, cache

    base, base_cache = run(None)
    for method in (ThinK(key_channel_ratio=0.0), ThinK(key_channel_ratio=0.0, scorer="snapkv")):
        logits, cache = run(method)
        assert torch.equal(logits, base)
        for layer, ref in zip(cache.kv_layers(), base_cache.kv_layers(), strict=True):
            assert layer.key_channels is None and torch.equal(layer.keys, ref.keys)
    # key_channel_ratio 0 with a scorer is the scorer alone
    snap = SnapKV(ratio=0.5, window=8)
    logits, cache = run(ThinK(ratio=0.5, key_channel_ratio=0.0, scorer=snap))
    alone, alone_cache = run(snap)
    assert torch.equal(logits, alone)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.kv_layers(), alone_cache.kv_layers(), strict=True))


# --- chunked prefill, padding, save/load, re-rotation -----------------------------------------------------------------


def test_channels_are_chosen_once_by_the_first_chunk(make_model):
    model = make_model("llama")
    ids = ids_of(N_CTX)
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, ThinK(ratio=0.5, key_channel_ratio=0.5, scorer=SnapKV(window=8))):
        model(ids[:, :30], past_key_values=cache)
        first = [layer.key_channels.clone() for layer in cache.full_layers()]
        model(ids[:, 30:], past_key_values=cache)
    for layer, channels in zip(cache.full_layers(), first, strict=True):
        assert torch.equal(layer.key_channels, channels)
        assert layer.keys.shape == (1, 2, N_CTX // 2, HEAD_DIM // 2)


def test_padded_rows_are_stored_ragged_with_thin_keys(make_model):
    model = make_model("mistral")
    lengths = [N_CTX, 40]
    rows = [ids_of(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(2, N_CTX, dtype=torch.long)
    mask = torch.zeros(2, N_CTX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, N_CTX - len(row) :], mask[i, N_CTX - len(row) :] = row, 1
    method = ThinK(ratio=0.5, key_channel_ratio=0.5, window=8, scorer=SnapKV(window=8))
    cache = prefill(model, ids, method, mask)
    alone = [prefill(model, row[None], method) for row in rows]
    for idx, layer in enumerate(cache.kv_layers()):
        assert layer.is_ragged and layer.keys.shape[-1] == HEAD_DIM // 2
        keys, _, pos = layer.view()
        for b in range(2):  # each row is pruned as when it runs alone: same tokens, same channels, same keys
            ref_keys, _, ref_pos = alone[b].layer(idx).view()
            assert torch.equal(layer.key_channels[b], alone[b].layer(idx).key_channels[0])
            for h in range(2):
                filled = pos[b, h] >= 0
                assert pos[b, h][filled].tolist() == ref_pos[0, h].tolist()
                torch.testing.assert_close(keys[b, h][filled], ref_keys[0, h])
    stats = kvs.cache_stats(cache)
    kept = kept_total(cache)
    assert stats.kv_bytes == kept * (HEAD_DIM // 2 + HEAD_DIM) * 4
    with torch.no_grad(), kvs.attach(model):  # a question appended to both rows is stored thin too
        logits = model(ids_of(5, seed=4).expand(2, -1), past_key_values=cache).logits
    assert torch.isfinite(logits).all()
    assert all(layer.keys.shape[-1] == HEAD_DIM // 2 for layer in cache.full_layers())
    assert cache.full_layers()[0].kept.tolist() == [[35, 35], [25, 25]]


def test_save_and_load_keep_thin_keys(make_model, tmp_path):
    model = make_model("llama")
    method = ThinK(ratio=0.5, key_channel_ratio=0.5, window=8, scorer=AdaKV(scorer=SnapKV(window=8)))
    cache = prefill(model, ids_of(N_CTX), method)
    path = save_cache(tmp_path / "thin.safetensors", cache, model, method)
    loaded = load_cache(path, model).cache
    for a, b in zip(loaded.kv_layers(), cache.kv_layers(), strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.key_channels, b.key_channels) and a.thin.dim == b.thin.dim
    assert kvs.cache_stats(loaded).kv_bytes == kvs.cache_stats(cache).kv_bytes
    question = ids_of(6, seed=5)
    with torch.no_grad(), kvs.attach(model):
        torch.testing.assert_close(
            model(question, past_key_values=loaded).logits, model(question, past_key_values=cache).logits
        )


def test_generate_answers_with_thin_keys(make_model, tokenizer):
    model = make_model("llama")
    method = ThinK(ratio=0.5, key_channel_ratio=0.5, window=8, scorer=SnapKV(window=8))
    out = kvs.generate(model, tokenizer, "some context " * 20, ["a?", "b?"], method=method, max_new_tokens=3)
    assert len(out.answers) == 2
    assert out.stats.kv_bytes_after < out.stats.kv_bytes_before * 0.4  # half the tokens, 3/4 of the bytes per token
    assert all(layer.keys.shape[-1] == HEAD_DIM // 2 for layer in out.cache.full_layers())


def test_thin_keys_cannot_be_rerotated_or_pruned_twice(make_model):
    model = make_model("llama")
    cache = prefill(model, ids_of(N_CTX), ThinK(key_channel_ratio=0.5))
    layer = cache.layer(0)
    keys, _, pos = layer.view()
    with pytest.raises(ValueError, match="re-rotation cannot move thin keys"):
        layer.replace_keys(keys, pos)
    with pytest.raises(ValueError, match="already pruned"):
        layer.prune_key_channels(layer.key_channels)
