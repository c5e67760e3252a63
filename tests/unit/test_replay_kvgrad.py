"""KVgrad's replay (`kvzip_scores(..., "kvgrad")`) against a slow reference: dense eager forwards of context + prompt +
context with autograd on the whole sequence, the objective Phi taken per replay chunk, KVgrad's max taken by hand."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze import step
from kvsqueeze.replay import KVGRAD, kvzip_scores
from tests.helpers import ids_of, prefill
from tests.unit.test_replay import PROMPT

FAMILIES = ["llama", "qwen3", "phi3", "gemma2", "gemma3"]


def reference_scores(model, ids: torch.Tensor, prompt: list[int], chunk: int) -> dict[int, torch.Tensor]:
    """(1, H, n) per full layer: max over replay tokens j and query heads q of a_qji ||v_i W_O^q|| ||dPhi/do_j||,
    Phi = sum over j's chunk of ||x^L_j||^2, from one dense forward of the sequence up to the chunk's end."""
    n = ids.shape[1]
    seq = torch.cat([ids, torch.tensor([prompt]), ids], dim=1)
    adapter = kvs.get_adapter(model)
    g = adapter.group_size
    layers = model.get_decoder().layers
    best: dict[int, torch.Tensor] = {}
    for lo in range(0, seq.shape[1] - n, chunk):
        hi = min(lo + chunk, seq.shape[1] - n)
        outs: dict[int, torch.Tensor] = {}
        last: list[torch.Tensor] = []
        hooks = [
            adapter.attention_modules[i].register_forward_hook(
                lambda m, a, o, i=i, outs=outs: outs.__setitem__(i, o[0])
            )
            for i in adapter.full_layers
        ]
        hooks.append(
            layers[-1].register_forward_hook(
                lambda m, a, o, last=last: last.append(o[0] if isinstance(o, tuple) else o)
            )
        )
        out = model(seq[:, : n + hi], output_attentions=True, use_cache=True)
        for h in hooks:
            h.remove()
        phi = last[0][0, n + lo : n + hi].double().pow(2).sum()
        grads = torch.autograd.grad(phi, [outs[i] for i in adapter.full_layers])
        for i, grad in zip(adapter.full_layers, grads, strict=True):
            weight = grad[0, n + lo : n + hi].double().norm(dim=-1)  # (c,) ||dPhi/do_j||
            attn = out.attentions[i][0, :, n + lo : n + hi, :n].detach().double()  # (H_q, c, n)
            values = out.past_key_values.layers[i].values[0, :, :n].detach().double()  # (H, n, D)
            w_o = layers[i].self_attn.o_proj.weight.detach().double()  # (hidden, H_q D)
            d = values.shape[-1]
            norms = torch.stack(
                [(values[q // g] @ w_o[:, q * d : (q + 1) * d].T).norm(dim=-1) for q in range(attn.shape[0])]
            )  # (H_q, n)
            score = (attn * weight[None, :, None] * norms[:, None, :]).amax(dim=1)  # (H_q, n)
            score = score.view(-1, g, n).amax(dim=1)[None].float()
            best[i] = score if i not in best else torch.maximum(best[i], score)
    return best


@pytest.mark.parametrize("family", FAMILIES)
def test_kvgrad_scores_match_dense_autograd(family, make_model):
    model = make_model(family)
    ids = ids_of(40, seed=3)
    cache = prefill(model, ids)
    with torch.no_grad():  # as inside compress: the replay turns gradients on for itself
        got = kvzip_scores(model, cache, ids, KVGRAD, prompt_ids=PROMPT, chunk_size=16)  # 45 replay tokens: 3 chunks
    want = reference_scores(make_model(family, attn_implementation="eager"), ids, PROMPT, 16)
    assert sorted(got) == sorted(want) == kvs.get_adapter(model).full_layers
    for i in want:
        assert got[i].shape == (1, 2, 40)
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-7)
    assert any(bool((got[i] != got[i][..., :1]).any()) for i in got), "scores are not all equal"


def test_one_chunk_is_the_gradient_of_the_whole_replay(make_model):
    model = make_model("llama")
    ids = ids_of(30, seed=5)
    cache = prefill(model, ids)
    got = kvzip_scores(model, cache, ids, KVGRAD, prompt_ids=PROMPT, chunk_size=1000)
    want = reference_scores(make_model("llama", attn_implementation="eager"), ids, PROMPT, 1000)
    chunked = kvzip_scores(model, cache, ids, KVGRAD, prompt_ids=PROMPT, chunk_size=7)
    for i in want:
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(chunked[i], got[i]) for i in got), "the gradient stops at chunk boundaries"
    plain = kvzip_scores(model, cache, ids, "kvzip+", prompt_ids=PROMPT, chunk_size=1000)
    assert any(not torch.equal(plain[i].argsort(), got[i].argsort()) for i in got), "the gradient reweighs"


def test_cache_and_model_are_left_as_they_were(make_model):
    model = make_model("gemma3")  # sliding layers too: they are trimmed during the replay and must come back
    model.get_decoder().layers[0].mlp.requires_grad_(False)  # a user's frozen part stays frozen, the rest trainable
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = ids_of(45, seed=2)
    question = ids_of(6, seed=9)
    cache = prefill(model, ids)
    layers = cache.kv_layers()
    before = [(x.keys, x.values, x.positions, x.seen.clone(), x.total_seen, x.keys.clone()) for x in layers]
    current = cache.tracker.current
    with torch.no_grad():
        kvzip_scores(model, cache, ids, KVGRAD, prompt_ids=PROMPT, chunk_size=8)
    for x, (k, v, p, s, t, copy) in zip(layers, before, strict=True):
        assert x.keys is k and x.values is v and x.positions is p and torch.equal(x.keys, copy)
        assert not x.keys.requires_grad and not x.values.requires_grad and x.keys.grad_fn is None
        assert torch.equal(x.seen, s) and x.total_seen == t
        assert x.query_positions is None and x.step_view is None and step.take_queries(x) is None
    assert cache.tracker.current == current
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()), "no parameter gradient is accumulated"
    full = prefill(model, ids)  # the same prefill never replayed: a question gets identical logits
    with torch.no_grad(), kvs.attach(model):
        a = model(question, past_key_values=cache).logits
        b = model(question, past_key_values=full).logits
    assert torch.equal(a, b)


def test_left_padded_rows_score_as_alone(make_model):
    model = make_model("qwen2")
    rows = [ids_of(33, seed=4)[0], ids_of(20, seed=5)[0]]
    ids = torch.zeros(2, 33, dtype=torch.long)
    mask = torch.zeros(2, 33, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 33 - len(row) :], mask[b, 33 - len(row) :] = row, 1
    cache = prefill(model, ids, mask=mask)
    got = kvzip_scores(model, cache, ids, KVGRAD, attention_mask=mask, prompt_ids=PROMPT, chunk_size=8)
    for b, row in enumerate(rows):  # the same chunks as alone: the replay is padded on the right
        alone = kvzip_scores(model, prefill(model, row[None]), row[None], KVGRAD, prompt_ids=PROMPT, chunk_size=8)
        pad = 33 - len(row)
        for i in got:
            assert bool((got[i][b, :, :pad] == 0).all()), "pad slots score 0"
            torch.testing.assert_close(got[i][b, :, pad:], alone[i][0], rtol=1e-4, atol=1e-7)


def test_inference_mode_cannot_differentiate(make_model):
    model = make_model("llama")
    ids = ids_of(20)
    with torch.inference_mode():
        cache = prefill(model, ids)
    with pytest.raises(ValueError, match=r"outside torch.inference_mode\(\)"):
        kvzip_scores(model, cache, ids, KVGRAD)
    with pytest.raises(ValueError, match=r"variant must be one of .*'kvgrad'.*got 'kvgrads'"):
        kvzip_scores(model, cache, ids, "kvgrads")
