"""Context replay (`kvsqueeze.replay.kvzip_scores`) against a slow reference: one eager forward of the whole sequence
context + prompt + context with its full attention matrix, KVzip's max taken by hand; the cache is left as it was."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze import step
from kvsqueeze.replay import VARIANTS, kvzip_scores
from tests.helpers import ids_of, prefill

FAMILIES = ["llama", "qwen3", "phi3", "gemma2", "gemma3"]
PROMPT = [11, 12, 13, 14, 15]


@torch.no_grad()
def reference_scores(model, ids: torch.Tensor, prompt: list[int], variant: str) -> dict[int, torch.Tensor]:
    """(1, H, n) per full layer from the full (n + L) x (n + L) attention matrix of context + prompt + context."""
    n = ids.shape[1]
    full = torch.cat([ids, torch.tensor([prompt]), ids], dim=1)
    adapter = kvs.get_adapter(model)
    hidden: dict[int, torch.Tensor] = {}
    hooks = [
        adapter.attention_modules[i].register_forward_pre_hook(
            lambda m, a, k, i=i: hidden.__setitem__(i, k["hidden_states"]), with_kwargs=True
        )
        for i in adapter.full_layers
    ]
    model.set_attn_implementation("eager")
    out = model(full, output_attentions=True, use_cache=True)
    for h in hooks:
        h.remove()
    result = {}
    g = adapter.group_size
    for i in adapter.full_layers:
        attn = out.attentions[i][0, :, n:, :n].double()  # (H_q, L, n): replay rows, context columns
        if variant == "kvzip+":
            attn = attn / hidden[i][0, n:].double().norm(dim=-1)[None, :, None]
            values = out.past_key_values.layers[i].values[0, :, :n].double()  # (H, n, D)
            w_o = model.get_decoder().layers[i].self_attn.o_proj.weight.double()  # (hidden, H_q D)
            d = values.shape[-1]
            norms = torch.stack(
                [(values[q // g] @ w_o[:, q * d : (q + 1) * d].T).norm(dim=-1) for q in range(attn.shape[0])]
            )  # (H_q, n): ||v_i W_O^q||, one query head at a time
            attn = attn * norms[:, None, :]
        per_q = attn.amax(dim=1)  # (H_q, n)
        result[i] = per_q.view(-1, g, n).amax(dim=1)[None].float()
    return result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_scores_match_the_full_attention_matrix(family, variant, make_model):
    model = make_model(family)
    ids = ids_of(40, seed=3)
    cache = prefill(model, ids)
    got = kvzip_scores(model, cache, ids, variant, prompt_ids=PROMPT, chunk_size=16)  # 45 replay tokens: 3 chunks
    want = reference_scores(make_model(family, attn_implementation="eager"), ids, PROMPT, variant)
    assert sorted(got) == sorted(want) == kvs.get_adapter(model).full_layers
    for i in want:
        assert got[i].shape == (1, 2, 40)
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-6)
    assert any(bool((got[i] != got[i][..., :1]).any()) for i in got), "scores are not all equal"


def test_chunk_size_does_not_change_the_scores(make_model):
    model = make_model("llama")
    ids = ids_of(50, seed=1)
    cache = prefill(model, ids)
    one = kvzip_scores(model, cache, ids, prompt_ids=PROMPT, chunk_size=1000)
    for chunk in (1, 7, 55):
        other = kvzip_scores(model, cache, ids, prompt_ids=PROMPT, chunk_size=chunk)
        for i in one:
            torch.testing.assert_close(other[i], one[i], rtol=1e-5, atol=1e-7)


def test_cache_is_left_exactly_as_it_was(make_model):
    model = make_model("gemma3")  # sliding layers too: they are trimmed during the replay and must come back
    ids = ids_of(45, seed=2)
    question = ids_of(6, seed=9)
    cache = prefill(model, ids)
    layers = cache.kv_layers()
    before = [(x.keys, x.values, x.positions, x.seen.clone(), x.total_seen, x.lengths) for x in layers]
    current = cache.tracker.current
    kvzip_scores(model, cache, ids, "kvzip+", prompt_ids=PROMPT, chunk_size=8)
    for x, (k, v, p, s, t, n) in zip(layers, before, strict=True):
        assert x.keys is k and x.values is v and x.positions is p and x.lengths is n
        assert torch.equal(x.seen, s) and x.total_seen == t
        assert x.query_positions is None and x.step_view is None and step.take_queries(x) is None
    assert cache.tracker.current == current
    full = prefill(model, ids)  # the same prefill never replayed: a question gets identical logits
    with torch.no_grad(), kvs.attach(model):
        a = model(question, past_key_values=cache).logits
        b = model(question, past_key_values=full).logits
    assert torch.equal(a, b)


def test_peak_bytes_record_the_replay(make_model):
    model = make_model("llama")
    ids = ids_of(30)
    cache = prefill(model, ids)
    dense = kvs.cache_stats(cache).kv_bytes
    kvzip_scores(model, cache, ids, prompt_ids=PROMPT, chunk_size=8)
    assert kvs.cache_stats(cache).kv_bytes == dense
    assert cache.tracker.peak == dense * (30 + 30 + len(PROMPT)) // 30  # context + prompt + context held at once


def test_left_padded_rows_score_as_alone(make_model):
    model = make_model("qwen2")
    rows = [ids_of(37, seed=4)[0], ids_of(22, seed=5)[0]]
    ids = torch.zeros(2, 37, dtype=torch.long)
    mask = torch.zeros(2, 37, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 37 - len(row) :], mask[b, 37 - len(row) :] = row, 1
    cache = prefill(model, ids, mask=mask)
    got = kvzip_scores(model, cache, ids, "kvzip+", attention_mask=mask, prompt_ids=PROMPT, chunk_size=10)
    for b, row in enumerate(rows):
        alone = kvzip_scores(model, prefill(model, row[None]), row[None], "kvzip+", prompt_ids=PROMPT)
        pad = 37 - len(row)
        for i in got:
            assert bool((got[i][b, :, :pad] == 0).all()), "pad slots score 0"
            torch.testing.assert_close(got[i][b, :, pad:], alone[i][0], rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_value_errors(make_model):
    model = make_model("llama")
    ids = ids_of(20)
    cache = prefill(model, ids)
    with pytest.raises(ValueError, match="variant must be one of"):
        kvzip_scores(model, cache, ids, "kvzap")
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 1000000\], got 0"):
        kvzip_scores(model, cache, ids, chunk_size=0)
    with pytest.raises(ValueError, match="must hold exactly the context"):
        kvzip_scores(model, cache, ids_of(25))
    with pytest.raises(ValueError, match="must hold exactly the context"):
        kvzip_scores(model, kvs.KVCache(model.config), ids)
