"""TOVA: the score is the last context token's attention averaged over all query heads, checked by hand and against
the model's own attention probabilities."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.tova import TOVA
from tests.helpers import ids_of, prefill, record_scores


def test_score_is_the_last_tokens_attention_by_hand(make_model):
    model = make_model("llama")
    n = 33
    ids = ids_of(n, seed=1)
    method = TOVA(ratio=0.5)
    seen = record_scores(method)
    prefill(model, ids, method)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        for idx, block in enumerate(model.model.layers):
            attn = block.self_attn
            x = block.input_layernorm(hidden[idx])[0]  # (n, hidden)
            cos, sin = model.model.rotary_emb(x[None], torch.arange(n)[None])
            cos, sin = cos[0, :, None], sin[0, :, None]  # (n, 1, D)

            def rope(t, cos=cos, sin=sin):
                return t * cos + torch.cat([-t[..., 8:], t[..., :8]], dim=-1) * sin

            q = rope(attn.q_proj(x).view(n, 4, 16))[-1]  # (H_q, D) the last token, at its own position
            k = rope(attn.k_proj(x).view(n, 2, 16))  # (n, H, D)
            probs = torch.stack([torch.softmax(k[:, hq // 2] @ q[hq] / 4.0, dim=0) for hq in range(4)])  # (H_q, n)
            expected = probs.mean(dim=0)
            for h in range(2):
                torch.testing.assert_close(seen[idx][0, h], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3", "mistral", "gemma2"])
def test_score_matches_the_models_own_attention(family, make_model):
    """Eager attention probabilities of the model itself: q-norms, fused qkv, partial rotary, Gemma's scaling and
    Gemma2's logit soft-capping."""
    model = make_model(family, attn_implementation="eager")
    ids = ids_of(45, seed=4)
    method = TOVA(ratio=0.5)
    seen = record_scores(method)
    cache = prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert seen, "TOVA scored nothing"
    for idx, scores in seen.items():
        expected = attentions[idx][0, :, -1].mean(dim=0)  # (T,) mean over every query head
        torch.testing.assert_close(scores[0], expected[None].expand(2, -1), atol=1e-6, rtol=1e-4)
        layer = cache.layer(idx)  # one selection for every KV head
        assert torch.equal(layer.positions[0, 0], layer.positions[0, 1])


def test_score_does_not_depend_on_left_padding(make_model):
    model = make_model("llama")
    row = ids_of(31, seed=6)[0]
    ids = torch.cat([torch.zeros(19, dtype=torch.long), row])[None].repeat(2, 1)
    ids[0] = ids_of(50, seed=7)[0]
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :19] = 0
    batched, alone = TOVA(ratio=0.5), TOVA(ratio=0.5)
    seen_batched, seen_alone = record_scores(batched), record_scores(alone)
    prefill(model, ids, batched, mask)
    prefill(model, row[None], alone)
    for idx, scores in seen_alone.items():
        torch.testing.assert_close(seen_batched[idx][1, :, 19:], scores[0], atol=1e-6, rtol=1e-4)
        assert float(seen_batched[idx][1, :, :19].abs().max()) == 0.0  # pads get no attention
