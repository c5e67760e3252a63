"""kvsqueeze's attention over a pruned cache equals dense attention over the full sequence with the evicted context
tokens masked out; padded rows equal the same rows run alone; without pruning it equals transformers itself."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface, DynamicCache

import kvsqueeze as kvs
from kvsqueeze.attention import balanced, expand_heads, grouped_sdpa, implementation_name, layer_mask
from kvsqueeze.cache import KVLayer
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.storage import DenseStorage
from tests.helpers import full_layer_positions, ids_of, layer_types, prefill

N_CTX, N_Q = 50, 6
ATOL = 1e-4


def compressed_question_logits(model, ctx, question, method):
    """Prefill + compress the context, then run the question over the pruned cache (kvsqueeze attention)."""
    cache = prefill(model, ctx, method)
    kept = full_layer_positions(cache)
    with torch.no_grad(), kvs.attach(model):
        logits = model(question, past_key_values=cache).logits
    return logits, kept


def allowed_mask(kept_positions: torch.Tensor | None, n_ctx: int, total: int, window: int | None) -> torch.Tensor:
    """(B, H, total, total) bool: causal; question queries see only the kept context slots (full layers); sliding
    layers see the last `window` positions. Context queries see the whole (causal) context: they ran uncompressed."""
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    allowed = j <= i
    if window is not None:
        return (allowed & (i - j < window))[None, None]
    assert kept_positions is not None
    b, h, _ = kept_positions.shape
    kept = torch.zeros(b, h, total, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            pos = kept_positions[bi, hi]
            kept[bi, hi, pos[pos >= 0].long()] = True
    kept[..., n_ctx:] = True  # question tokens
    question_query = (i >= n_ctx)[None, None]
    return allowed[None, None] & (~question_query | kept[:, :, None, :])


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


# --- against transformers' own attention with a 4D mask (same eviction in every layer and head) ----------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "phi3"])
def test_pruned_attention_equals_dense_4d_mask(family, make_model):
    model = make_model(family)
    ctx, question = ids_of(N_CTX), ids_of(N_Q, seed=1)
    # StreamingLLM evicts the same positions in every layer and head, so one 4D mask describes the whole model
    got, kept = compressed_question_logits(model, ctx, question, kvs.get_method("streaming_llm", ratio=0.5))
    first = next(iter(kept.values()))
    assert all(torch.equal(k, first) for k in kept.values())
    assert int((first >= 0).sum()) == 2 * 25
    total = N_CTX + N_Q
    full = additive(allowed_mask(first[:, :1], N_CTX, total, None))
    mask = full
    if "sliding_attention" in layer_types(model):
        mask = {"full_attention": full, "sliding_attention": additive(allowed_mask(None, N_CTX, total, 16))}
    with torch.no_grad():
        expected = model(torch.cat([ctx, question], dim=1), attention_mask=mask, use_cache=False).logits[:, N_CTX:]
        unmasked = model(torch.cat([ctx, question], dim=1), use_cache=False).logits[:, N_CTX:]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert (got - unmasked).abs().max() > 1e-2, "eviction must matter, else this test proves nothing"


# --- against a hand-built dense reference with per-layer, per-head masks ---------------------------------------------

_REFERENCE_MASKS: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """Dense attention over the full sequence with this layer's own boolean mask, through the model's eager code."""
    allowed = _REFERENCE_MASKS[module.layer_idx]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, additive(allowed).to(query.dtype), **kwargs)


AttentionInterface.register("kvsqueeze_test_reference", _reference_attention)


def reference_question_logits(model, ctx, question, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    total = ctx.shape[1] + question.shape[1]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    _REFERENCE_MASKS.clear()
    for idx, kind in enumerate(layer_types(model)):
        if kind == "sliding_attention":
            _REFERENCE_MASKS[idx] = allowed_mask(None, ctx.shape[1], total, model.config.sliding_window)
        else:
            _REFERENCE_MASKS[idx] = allowed_mask(kept[idx], ctx.shape[1], total, None).repeat_interleave(groups, 1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvsqueeze_test_reference")
    try:
        with torch.no_grad():
            return model(torch.cat([ctx, question], dim=1), use_cache=False).logits[:, ctx.shape[1] :]
    finally:
        model.set_attn_implementation(previous)
        _REFERENCE_MASKS.clear()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "qwen3", "phi3"])
@pytest.mark.parametrize(
    "method",
    [
        kvs.get_method("knorm", ratio=0.5),
        kvs.get_method("random", ratio=0.7, seed=1),
        kvs.get_method("pyramidkv", ratio=0.5, scorer=SnapKV(window=8)),
    ],
    ids=["knorm", "random", "pyramidkv"],
)
def test_pruned_attention_equals_per_layer_dense_reference(family, method, make_model):
    model = make_model(family)
    ctx, question = ids_of(N_CTX, seed=2), ids_of(N_Q, seed=3)
    got, kept = compressed_question_logits(model, ctx, question, method)
    heads_differ = any(not torch.equal(k[:, 0], k[:, 1]) for k in kept.values())
    layers_differ = len({tuple(k[0, 0].tolist()) for k in kept.values()}) > 1
    assert layers_differ and (heads_differ or method.name == "pyramidkv"), "the masks must differ to test anything"
    expected = reference_question_logits(model, ctx, question, kept)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_reference_is_sensitive(make_model):
    """The hand-built reference is not trivially equal: a wrong kept set gives different logits."""
    model = make_model("llama")
    ctx, question = ids_of(N_CTX, seed=2), ids_of(N_Q, seed=3)
    got, kept = compressed_question_logits(model, ctx, question, kvs.get_method("knorm", ratio=0.5))
    shifted = {i: torch.where(k >= 0, (k + 1) % N_CTX, k) for i, k in kept.items()}
    wrong = reference_question_logits(model, ctx, question, shifted)
    assert (got - wrong).abs().max() > 1e-3


# --- padded batches ---------------------------------------------------------------------------------------------------


# KNorm is not used on qwen3/gemma3: their k_norm gives every key (almost) the same norm, so float noise decides.
@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("llama", None),
        ("llama", "knorm"),
        ("qwen2", "knorm"),
        ("gemma2", "knorm"),
        ("gemma3", None),
        ("gemma3", "streaming_llm"),
        ("phi3", "streaming_llm"),
        ("gemma3", "snapkv"),
        ("llama", "snapkv"),
    ],
)
def test_padded_rows_equal_rows_alone(family, method, make_model):
    model = make_model(family)
    lengths = [N_CTX, 31]
    rows = [ids_of(n, seed=5 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(2, N_CTX, dtype=torch.long)
    mask = torch.zeros(2, N_CTX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, N_CTX - len(row) :], mask[i, N_CTX - len(row) :] = row, 1
    question = ids_of(N_Q, seed=9, batch=2)
    options = {"window": 8} if method == "snapkv" else {}
    build = (lambda: kvs.get_method(method, ratio=0.5, **options)) if method else (lambda: None)

    def run(ids_, mask_, question_):
        cache = kvs.KVCache(model.config)
        with torch.no_grad():
            with kvs.compress(model, build()):
                ctx_logits = model(ids_, attention_mask=mask_, past_key_values=cache).logits[:, -1]
            with kvs.attach(model):
                q_logits = model(question_, past_key_values=cache).logits
                step = model(q_logits[:, -1:].argmax(-1), past_key_values=cache).logits[:, -1]
        return ctx_logits, q_logits, step

    batched = run(ids, mask, question)
    for b, row in enumerate(rows):
        alone = run(row[None], None, question[b : b + 1])
        for got, expected in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[b : b + 1], expected, atol=ATOL, rtol=1e-4)


# --- without pruning: identical to transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_attach_equals_transformers(family, make_model):
    """Prefill (padded batch), a multi-token step and a decoding step: kvsqueeze's attention and cache give the logits
    of transformers' own attention and DynamicCache (fed the same positions)."""
    model = make_model(family)
    ids = ids_of(40, batch=2)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :12] = 0
    steps = [ids_of(5, seed=1, batch=2), ids_of(1, seed=2, batch=2)]
    with torch.no_grad():
        cache = kvs.KVCache(model.config)
        with kvs.attach(model):
            got = [model(ids, attention_mask=mask, past_key_values=cache).logits]
            got += [model(s, past_key_values=cache).logits for s in steps]
        ref_cache = DynamicCache(config=model.config)
        full_mask, positions = mask, (mask.cumsum(1) - 1).clamp(min=0)
        expected = [model(ids, attention_mask=mask, position_ids=positions, past_key_values=ref_cache).logits]
        for s in steps:
            start = positions[:, -1:] + 1
            positions = start + torch.arange(s.shape[1])[None]
            full_mask = torch.cat([full_mask, torch.ones_like(s)], dim=1)
            expected.append(
                model(s, attention_mask=full_mask, position_ids=positions, past_key_values=ref_cache).logits
            )
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], atol=ATOL, rtol=1e-4)  # pad logits are meaningless
    for g, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_attach_keeps_a_global_sliding_window(family, make_model):
    model = make_model(family, sliding_window=16)
    ids = ids_of(40)
    with torch.no_grad():
        expected = model(ids).logits
        with kvs.attach(model):
            got = model(ids, past_key_values=kvs.KVCache(model.config)).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_attach_restores_the_attention_implementation(make_model):
    model = make_model("gemma2")
    with kvs.attach(model):
        assert model.config._attn_implementation == "kvsqueeze_eager"
    assert model.config._attn_implementation == "eager"
    model = make_model("llama")
    with kvs.attach(model, backend="eager"):
        assert model.config._attn_implementation == "kvsqueeze_eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="flash"):
        implementation_name("flash")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_backends_agree_over_a_pruned_cache(backend, make_model):
    model = make_model("phi3")
    ctx, question = ids_of(N_CTX), ids_of(N_Q, seed=1)
    results = []
    for inner in ("sdpa", backend):
        cache = kvs.KVCache(model.config)
        with torch.no_grad():
            with kvs.compress(model, kvs.get_method("knorm", ratio=0.6), backend=inner):
                model(ctx, past_key_values=cache)
            with kvs.attach(model, backend=inner):
                results.append(model(question, past_key_values=cache).logits)
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=1e-4)


# --- layer masks ------------------------------------------------------------------------------------------------------


def _layer(positions: list[list[int]], query: list[int], window: int | None = None) -> KVLayer:
    layer = KVLayer(window)
    pos = torch.tensor([positions], dtype=torch.int32)  # (1, H, T)
    layer.storage = DenseStorage(torch.zeros(*pos.shape, 1), torch.zeros(*pos.shape, 1), pos)
    layer.query_positions = torch.tensor([query])
    return layer


def test_layer_mask_fast_paths():
    assert layer_mask(_layer([[0, 1, 2]] * 2, [0, 1, 2]), 3) == "causal"
    assert layer_mask(_layer([[0, 1, 2, 3]] * 2, [3]), 1) is None
    assert layer_mask(_layer([[0]] * 2, [0]), 1) is None


def test_layer_mask_over_empty_slots_and_heads():
    # head 0 kept positions 0, 3; head 1 kept 1 and has an empty slot; then two new tokens at 5 and 6
    mask = layer_mask(_layer([[0, 3, 5, 6], [1, -1, 5, 6]], [5, 6]), 2)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert mask.shape == (1, 2, 2, 4)
    assert mask[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert mask[0, 1].tolist() == [[True, False, True, False], [True, False, True, True]]
    assert expand_heads(mask, 4).shape == (1, 4, 2, 4)
    assert torch.equal(expand_heads(mask, 4)[:, 1], mask[:, 0])


def test_layer_mask_pad_queries_attend_to_themselves():
    mask = layer_mask(_layer([[0, 1, -1, 2]] * 2, [-1, 2]), 2)
    assert mask.shape[1] == 1  # the same for every head
    assert mask[0, 0].tolist() == [[True, True, True, False], [True, True, False, True]]


def test_layer_mask_sliding_window():
    positions = list(range(10))
    assert layer_mask(_layer([positions] * 2, [9], window=16), 1) is None  # the window cuts nothing yet
    mask = layer_mask(_layer([positions] * 2, [8, 9], window=4), 2)
    assert mask[0, 0].tolist() == [[False] * 5 + [True] * 4 + [False], [False] * 6 + [True] * 4]


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 4]),
    slots=st.integers(1, 40),
    rows=st.integers(1, 3),
    mask_kind=st.sampled_from(["none", "row", "per_head", "additive"]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_grouped_sdpa_equals_a_float64_reference(kv_heads, groups, slots, rows, mask_kind, threads, seed):
    """A one-token step through `grouped_sdpa` (each KV head's query heads as rows of one query, or `enable_gqa` where
    the threads do not divide the rows' KV heads) gives what softmax attention in float64 gives, under no mask, a mask
    per row, a mask per KV head, and an additive mask."""
    gen = torch.Generator().manual_seed(seed)
    q_heads, d = kv_heads * groups, 8
    query = torch.randn(rows, q_heads, 1, d, generator=gen)
    key, value = (torch.randn(rows, kv_heads, slots, d, generator=gen) for _ in range(2))
    visible = torch.rand(rows, kv_heads if mask_kind == "per_head" else 1, 1, slots, generator=gen) < 0.7
    visible[..., 0] = True  # no query sees nothing
    mask = {"none": None, "row": visible, "per_head": visible}.get(mask_kind)
    if mask_kind == "additive":
        mask = torch.where(visible, 0.0, float("-inf"))
    with _threads(threads):
        out = grouped_sdpa(query, key, value, mask, 0.0, None)
    logits = query.double() @ key.double().repeat_interleave(groups, 1).transpose(-1, -2) * d**-0.5
    if mask is not None:
        logits = logits.masked_fill(~expand_heads(visible, q_heads), float("-inf"))
    expected = torch.softmax(logits, -1) @ value.double().repeat_interleave(groups, 1)
    assert out.shape == (rows, q_heads, 1, d)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


REAL_SDPA = torch.nn.functional.scaled_dot_product_attention


def _spy_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], bool]]:
    """Record each SDPA call's query shape and `enable_gqa` (the calls still run)."""
    calls: list[tuple[tuple[int, ...], bool]] = []

    def spy(query, key, value, **kwargs):
        calls.append((tuple(query.shape), kwargs.get("enable_gqa", False)))
        return REAL_SDPA(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize(("threads", "rows", "grouped"), [(1, 1, True), (2, 1, False), (2, 2, True), (4, 2, False)])
def test_grouped_sdpa_groups_a_step_whose_kv_heads_the_threads_divide(monkeypatch, threads, rows, grouped):
    """One token over 3 KV heads per row: the grouped call on the CPU when the threads divide the rows x KV heads
    (PyTorch's kernel gives each thread whole (row, head) items), `enable_gqa` otherwise; the same output."""
    calls = _spy_sdpa(monkeypatch)
    query, key = torch.randn(rows, 9, 1, 8), torch.randn(rows, 3, 5, 8)
    with _threads(threads):
        out = grouped_sdpa(query, key, key, None, 0.0, None)
        assert balanced(torch.device("cpu"), 3 * rows) is grouped
    assert calls == [((rows, 3, 3, 8), False) if grouped else ((rows, 9, 1, 8), True)]
    torch.testing.assert_close(out, REAL_SDPA(query, key, key, enable_gqa=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("q_len", [1, 3])
def test_grouped_sdpa_reads_each_kv_head_once_for_one_token(monkeypatch, q_len):
    """A one-token step reaches SDPA as (B, H_kv, H_q / H_kv, D) queries without `enable_gqa` (2 rows x 2 KV heads:
    any of 1, 2 or 4 threads divides them); a longer step keeps the query heads and `enable_gqa` (the grouped rows
    would need a causal mask per group)."""
    calls = _spy_sdpa(monkeypatch)
    query, key = torch.randn(2, 6, q_len, 8), torch.randn(2, 2, 5, 8)
    with _threads(2):
        out = grouped_sdpa(query, key, key, None if q_len == 1 else "causal", 0.0, None)
    assert out.shape == (2, 6, q_len, 8)
    assert calls == ([((2, 2, 3, 8), False)] if q_len == 1 else [((2, 6, 3, 8), True)])
