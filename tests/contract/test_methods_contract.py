"""Every registered method, on tiny random models of each family, honours the compression contract.

The contract (README "Methods"): ratio r removes a fraction r of the context; each KV head of each full-attention
layer keeps floor(n(1-r)) tokens (PyramidKV: per-layer budgets whose mean is n(1-r)); the bytes are freed for real;
sliding-window layers are never pruned; pad tokens are never kept (and a kept slot holds its token's key and value;
methods that merge values, `Method.merges_values`, hold the values they hold for the row alone); ratio 0 changes
nothing; methods are dataclasses whose repr rebuilds them; bad ratios and unknown options raise ValueError with a
useful message.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods import METHODS
from kvsqueeze.methods.base import ModelScopeMethod
from kvsqueeze.methods.pyramidkv import pyramid_budgets
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import full_layer_indices, ids_of, kept_counts, kept_total, prefill, prefill_with_log

METHOD_NAMES = kvs.list_methods()
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
N_CTX = 61  # odd, so floor(n * 0.5) actually floors
SMALL_WINDOW = 8

# --- helpers ----------------------------------------------------------------------------------------------------------


# Size options a ~60-token context can afford, capped at these values wherever a method has them (also inside a
# wrapped scorer or a tuple of methods): windows, partitions and chunks of 8 tokens, at most 4 sinks.
SMALL_SIZES: dict[str, int] = {
    "window": SMALL_WINDOW,
    "partition_size": 8,
    "chunk_size": 8,
    "n_sink": 4,
    # learned predictors (KVzap, gates): a small calibration on the tiny models
    "n_docs": 3,
    "heldout_docs": 1,
    "doc_tokens": 64,
    "steps": 20,
}


def _shrink(value: object) -> object:
    """A method with its size options capped (a tuple of methods: each of them), else the value unchanged."""
    if isinstance(value, tuple):
        return tuple(_shrink(v) for v in value)
    if isinstance(value, kvs.Method):
        changes = _small_changes(type(value).options(), value)
        return dataclasses.replace(value, **changes) if changes else value  # type: ignore[type-var]
    return value


def _small_changes(defaults: dict[str, object], current: object) -> dict[str, object]:
    changes: dict[str, object] = {}
    for key, default in defaults.items():
        value = getattr(current, key, default)
        if key in SMALL_SIZES and isinstance(value, int) and value > SMALL_SIZES[key]:
            changes[key] = SMALL_SIZES[key]
        elif (shrunk := _shrink(value)) != value:
            changes[key] = shrunk
    return changes


def small_options(name: str) -> dict[str, object]:
    """Options that make a method usable on ~60-token contexts: the size options in SMALL_SIZES are capped (also
    inside a wrapped scorer, e.g. PyramidKV's SnapKV); only options that differ from the defaults are returned."""
    defaults = METHODS.get(name).options()
    return _small_changes(defaults, None)


def budget_kind(name: str) -> str:
    """ "uniform" (floor(n(1-r)) per head; PyramidKV: per-layer budgets averaging it) or "adaptive": the rule decides
    each layer's size (e.g. SimLayerKV keeps all of a non-lazy layer), so only the bounds and the bytes are checked.
    Read from the method class's `budget_kind` attribute (`Method.budget_kind`, default "uniform")."""
    return METHODS.get(name).budget_kind


def scope(name: str) -> str:
    """Who shares a budget (`Method.budget_scope`): "head" (each head keeps the target), "layer" (the heads of a layer
    pool theirs: per-layer totals are checked), "model" (one pool for all layers and heads: the model total)."""
    return METHODS.get(name).budget_scope


def per_head_counts(kept: list[list[int]], name: str, n_heads: int = 2) -> list[list[int]]:
    """Per-layer kept counts [row][head], with pooled heads replaced by their mean (exact when the total is)."""
    if scope(name) == "head":
        return kept
    return [[sum(row) / n_heads] * n_heads for row in kept]


# Options a method needs to honour the token contract at all: ThinK prunes key channels, not tokens, so it runs here
# with a token scorer and without channel pruning (its channels are tested in tests/unit/methods/test_think.py).
CONTRACT_OPTIONS: dict[str, dict[str, object]] = {
    "think": {"scorer": SnapKV(window=SMALL_WINDOW), "key_channel_ratio": 0.0}
}


def build(name: str, ratio: float) -> kvs.Method:
    return kvs.get_method(name, ratio=ratio, **{**small_options(name), **CONTRACT_OPTIONS.get(name, {})})


def expected_keep(name: str, n: int, ratio: float, layer_idx: int, n_layers: int) -> int:
    if name == "pyramidkv":
        return max(1, math.floor(pyramid_budgets(n, ratio, n_layers, 0.95, SMALL_WINDOW)[layer_idx]))
    return max(1, math.floor(n * (1 - ratio)))


def params(names=METHOD_NAMES, families=FAMILIES):
    return [pytest.param(name, family, id=f"{name}-{family}") for name in names for family in families]


def forward_tolerance(method) -> float:
    """0 (bit for bit) against an uncompressed forward, except for a method whose forward's attention also sums what
    each slot received (`kvsqueeze.received`: SDPA's softmax up to float32 rounding, which later layers carry; one
    layer's output is as far from a float64 one as SDPA's, about 2e-6 at most, and the keys of later layers of the
    tiny models drift up to about 1.2e-5)."""
    return 3e-5 if method.uses("received_attention") else 0.0


def assert_sliding_layer_untouched(layer, dense_layer, n: int, window: int, atol: float = 0.0) -> None:
    """A sliding layer is never pruned by a method: it holds what it holds without compression, the most recent
    positions (at least window - 1 of them)."""
    assert layer.is_sliding
    assert torch.equal(layer.positions, dense_layer.positions)
    torch.testing.assert_close(layer.keys, dense_layer.keys, rtol=atol, atol=atol)
    held = layer.positions.shape[-1]
    assert min(n, window - 1) <= held <= n
    assert layer.positions.tolist() == [[list(range(n - held, n))] * 2]


def assert_sliding_layer_shifted(model, idx: int, layer, dense_layer, shift: int) -> None:
    """With key re-rotation (`Method.rerotates_keys`), a sliding layer holds the same tokens, `shift` positions
    earlier, with its keys re-rotated there."""
    assert torch.equal(layer.values, dense_layer.values)
    assert torch.equal(layer.positions, dense_layer.positions - shift)
    expected = kvs.get_adapter(model).rerotate(idx, dense_layer.keys, dense_layer.positions, layer.positions)
    torch.testing.assert_close(layer.keys, expected, rtol=0, atol=0)


# --- (a) target size --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "family"), params())
def test_target_size_is_reached(name, family, make_model):
    model = make_model(family)
    ratio = 0.5
    dense = prefill(model, ids_of(N_CTX), None)
    method = build(name, ratio)
    cache = prefill(model, ids_of(N_CTX), method)
    full = full_layer_indices(model)
    kept_per_layer = []
    for idx, layer in enumerate(cache.kv_layers()):
        assert layer.seen.tolist() == [N_CTX]
        if idx not in full and METHODS.get(name).rerotates_keys:  # never pruned, but moved with the others
            assert_sliding_layer_shifted(model, idx, layer, dense.layer(idx), N_CTX - math.floor(N_CTX * (1 - ratio)))
            continue
        if idx not in full:  # sliding layers are never pruned
            window = model.config.sliding_window
            assert_sliding_layer_untouched(layer, dense.layer(idx), N_CTX, window, forward_tolerance(method))
            continue
        kept = layer.kept
        assert kept.shape == (1, 2)
        if scope(name) == "head":
            assert kept.min() == kept.max(), "every head of a layer keeps the same number of tokens"
        assert layer.keys.numel() == int(kept.sum()) * 16, "storage holds exactly the kept slots (no empty ones)"
        kept_per_layer.append(int(kept.sum()) / 2)
    target = math.floor(N_CTX * (1 - ratio))
    if budget_kind(name) == "adaptive":
        assert all(1 <= kept <= N_CTX for kept in kept_per_layer)
    elif scope(name) == "model":  # one pool: the model total is exact, layers may differ
        assert sum(kept_per_layer) == target * len(full)
    elif name == "pyramidkv":
        assert len(set(kept_per_layer)) == len(kept_per_layer), "PyramidKV budgets differ per layer"
        # each layer floors its own budget: the sum is within one token per layer of n(1-r) per layer
        exact = N_CTX * (1 - ratio) * len(full)
        assert exact - len(full) <= sum(kept_per_layer) <= exact
    else:
        assert kept_per_layer == [target] * len(full)


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_target_size_other_ratios(name, ratio, make_model):
    model = make_model("llama")
    n = 100  # 0.25 and 0.75 are exact in binary, so floor(n(1-r)) has no rounding ambiguity
    cache = prefill(model, ids_of(n), build(name, ratio))
    kept = [per_head_counts(layer.kept.tolist(), name) for layer in cache.full_layers()]
    if budget_kind(name) == "adaptive":
        assert all(k[0][0] == k[0][1] and 1 <= k[0][0] <= n for k in kept)
        return
    expected = [[[expected_keep(name, n, ratio, i, 4)] * 2] for i in range(4)]
    if scope(name) == "model":
        assert sum(sum(row[0]) for row in kept) == sum(sum(row[0]) for row in expected)
    else:
        assert kept == expected


@pytest.mark.parametrize(("n", "ratio", "keep"), [(100, 0.8, 20), (100, 0.9, 10), (90, 0.3, 63)])
def test_target_size_is_exact_for_decimal_ratios(n, ratio, keep, make_model):
    model = make_model("llama")
    cache = prefill(model, ids_of(n), build("knorm", ratio))
    assert kept_counts(cache) == [[[keep, keep]]] * 4


# --- (b) bytes drop ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "family"), params())
def test_bytes_drop_by_the_ratio(name, family, make_model):
    model = make_model(family)
    ids = ids_of(N_CTX)
    dense = prefill(model, ids, None)
    cache, log = prefill_with_log(model, ids, build(name, 0.5))
    before, after = kvs.cache_stats(dense), kvs.cache_stats(cache)
    n_full = len(full_layer_indices(model))
    per_token = 2 * 2 * 16 * 4 * n_full  # keys+values, 2 KV heads, head_dim 16, fp32, over the full layers
    assert before.kv_bytes == N_CTX * per_token
    assert log.kv_bytes_before == before.kv_bytes
    assert log.kv_bytes_after == after.kv_bytes
    assert after.padding_bytes == 0
    assert after.sliding_kv_bytes == before.sliding_kv_bytes  # sliding layers are never pruned
    if budget_kind(name) == "adaptive":  # the bytes held are those of the kept tokens (per head: ragged layers)
        kept = kept_total(cache)
        assert after.kv_bytes == kept * per_token // n_full // 2 <= before.kv_bytes
    elif name == "pyramidkv":  # per-layer floors: at most one token per layer under half
        assert before.kv_bytes * 0.5 - per_token <= after.kv_bytes <= before.kv_bytes * 0.5
    else:
        assert after.kv_bytes == math.floor(N_CTX * 0.5) * per_token
    assert kvs.cache_bytes(cache) == after.kv_bytes + after.sliding_kv_bytes
    if issubclass(METHODS.get(name), ModelScopeMethod):  # every layer is scored before any is pruned
        dense = before.kv_bytes + before.sliding_kv_bytes
        if METHODS.get(name).shared_prefill:
            assert after.peak_kv_bytes == dense
        else:  # extra forwards over the uncompressed cache (KVzip's context replay) hold their tokens meanwhile
            assert after.peak_kv_bytes >= dense
    elif any(int(cache.layer(i).kept.sum()) < 2 * N_CTX for i in full_layer_indices(model)[:-1]):
        # a layer before the last one was pruned (an adaptive rule may keep all of some layers, or of all of them on
        # a tiny random model): all layers were never held uncompressed at once
        assert after.peak_kv_bytes < before.kv_bytes + before.sliding_kv_bytes


# --- (c) ratio 0 changes nothing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "family"), params())
def test_ratio_zero_is_identical_to_attach(name, family, make_model):
    model = make_model(family)
    ids = ids_of(N_CTX)
    question = ids_of(7, seed=1)
    results = []
    for method in (None, build(name, 0.0)):
        cache = kvs.KVCache(model.config)
        with torch.no_grad(), kvs.compress(model, method) if method is not None else kvs.attach(model):
            ctx_logits = model(ids, past_key_values=cache).logits
            q_logits = model(question, past_key_values=cache).logits
        results.append((ctx_logits, q_logits, [layer.kept.tolist() for layer in cache.kv_layers()]))
    (ctx_a, q_a, kept_a), (ctx_b, q_b, kept_b) = results
    assert torch.equal(ctx_a, ctx_b)
    assert torch.equal(q_a, q_b)
    assert kept_a == kept_b


# --- (d) repr round-trip ----------------------------------------------------------------------------------------------


def _namespace() -> dict[str, type]:
    return {METHODS.get(n).__name__: METHODS.get(n) for n in METHOD_NAMES}


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("ratio", [0.0, 0.375])
def test_repr_rebuilds_the_method(name, ratio):
    method = build(name, ratio)
    assert dataclasses.is_dataclass(method)
    rebuilt = eval(repr(method), _namespace())
    assert type(rebuilt) is type(method)
    assert rebuilt == method
    assert repr(rebuilt) == repr(method)
    default = kvs.get_method(name)
    assert eval(repr(default), _namespace()) == default
    if small_options(name):
        assert default != method  # the options are part of equality, so the round trip above is meaningful


def test_list_and_describe_agree():
    described = kvs.describe_methods()
    assert [d["name"] for d in described] == METHOD_NAMES
    assert {"knorm", "pyramidkv", "random", "snapkv", "streaming_llm"} <= set(METHOD_NAMES)
    for entry in described:
        assert entry["description"]
        assert entry["options"]["ratio"] == 0.0
        assert type(kvs.get_method(entry["name"])).name == entry["name"]


# --- (e) padding is never kept ----------------------------------------------------------------------------------------


def _padded_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rows = [ids_of(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask, rows


@pytest.mark.parametrize(("name", "family"), params())
def test_padding_is_never_kept(name, family, make_model):
    model = make_model(family)
    lengths = [N_CTX, 40]
    ratio = 0.5
    ids, mask, rows = _padded_batch(lengths)
    method = build(name, ratio)
    dense = prefill(model, ids, None, mask)  # uncompressed, for the slot contents
    cache = prefill(model, ids, method, mask)
    alone = [prefill(model, row[None], method) for row in rows]
    full = full_layer_indices(model)
    assert cache.real_tokens_seen().tolist() == lengths
    for idx in full:
        layer, ref = cache.layer(idx), dense.layer(idx)
        keys, values, positions = layer.view()  # rectangular (B, H, T, ...) also when the layer is stored ragged
        for b, n in enumerate(lengths):
            pad = ids.shape[1] - n
            pos = positions[b]  # (H, T)
            filled = pos >= 0
            # exactly the budget of this row's own length, as when the row runs alone
            assert filled.sum(-1).tolist() == alone[b].layer(idx).kept[0].tolist()
            if name != "pyramidkv" and scope(name) != "model" and budget_kind(name) == "uniform":
                expected = [math.floor(n * (1 - ratio))] * 2
                assert per_head_counts([filled.sum(-1).tolist()], name)[0] == expected
            for h in range(2):
                kept_pos = pos[h][filled[h]].long()
                assert kept_pos.unique().numel() == kept_pos.numel()
                assert int(kept_pos.min()) >= 0 and int(kept_pos.max()) < n
                # each kept slot holds the key/value of the token at that position (pads sit at the left)
                if METHODS.get(name).rerotates_keys:  # moved to contiguous positions: the same as the row alone
                    mk, mv, mp = alone[b].layer(idx).view()
                    own = mp[0, h] >= 0
                    assert kept_pos.tolist() == mp[0, h][own].tolist()
                    top = int(kept_pos.max()) + 1
                    assert kept_pos.tolist() == list(range(top - kept_pos.numel(), top))
                    torch.testing.assert_close(keys[b, h][filled[h]], mk[0, h][own])
                    torch.testing.assert_close(values[b, h][filled[h]], mv[0, h][own])
                    continue
                tol = forward_tolerance(method)
                torch.testing.assert_close(keys[b, h][filled[h]], ref.keys[b, h, pad + kept_pos], rtol=tol, atol=tol)
                if METHODS.get(name).merges_values:  # values rewritten (`Method.merges_values`): as for the row alone
                    mv, mp = alone[b].layer(idx).view()[1:]  # (when it keeps the same tokens: scores may tie, e.g.
                    if mp[0, h][mp[0, h] >= 0].tolist() == kept_pos.tolist():  # Qwen3's normalized key norms)
                        torch.testing.assert_close(values[b, h][filled[h]], mv[0, h][mp[0, h] >= 0])
                    continue
                torch.testing.assert_close(
                    values[b, h][filled[h]], ref.values[b, h, pad + kept_pos], rtol=tol, atol=tol
                )
    # rows keeping different counts are stored ragged, without empty slots (one key and value of 16 fp32 per kept
    # token and head)
    assert any(cache.layer(i).is_ragged for i in full)
    stats = kvs.cache_stats(cache)
    assert stats.padding_bytes == 0
    kept = sum(int(cache.layer(i).kept.sum()) for i in full)
    assert stats.kv_bytes == kept * 2 * 16 * 4


# --- (f) questions after compression ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "family"), params())
def test_question_after_compression(name, family, make_model):
    model = make_model(family)
    ids = ids_of(N_CTX)
    question = ids_of(9, seed=2)
    cache = prefill(model, ids, build(name, 0.5))
    kept_before = [layer.kept.clone() for layer in cache.full_layers()]
    with torch.no_grad(), kvs.attach(model):
        logits = model(question, past_key_values=cache).logits
        step = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    assert logits.shape == (1, 9, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(step).all()
    assert cache.real_tokens_seen().tolist() == [N_CTX + 10]
    assert all(torch.equal(layer.kept, k + 10) for layer, k in zip(cache.full_layers(), kept_before, strict=True))
    rerotated = METHODS.get(name).rerotates_keys
    for layer in cache.full_layers():  # questions continue from the uncompressed length (re-rotated: the cache size)
        pos = layer.view()[2][0]  # (H, T), empty slots -1 at the end of shorter heads of a ragged layer
        start = int(layer.kept.max()) - 10 if rerotated else N_CTX
        assert [p[p >= 0][-10:].tolist() for p in pos] == [list(range(start, start + 10))] * 2


# --- (g) validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio_raises(name, ratio):
    with pytest.raises(ValueError, match=str(ratio).replace(".", r"\.")):
        kvs.get_method(name, ratio=ratio)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_unknown_option_suggests(name):
    with pytest.raises(ValueError, match=r"Unknown option 'ratoi'.*Did you mean 'ratio'"):
        kvs.get_method(name, ratoi=0.5)
    with pytest.raises(ValueError, match="Unknown option 'zzzzzz'"):
        kvs.get_method(name, zzzzzz=1)


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match=r"Did you mean 'knorm'"):
        kvs.get_method("knrom")
    assert type(kvs.get_method("Streaming-LLM")).name == "streaming_llm"
