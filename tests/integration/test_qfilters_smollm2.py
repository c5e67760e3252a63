"""Q-Filters on the embedded SmolLM2-135M: the sign of the score. Keys ranked by +<f, k> must receive most of the
attention that later queries pay (held-out generic text, attention sinks left out), far more than -<f, k> or chance."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.text import generic_text

pytestmark = pytest.mark.slow


def attention_mass_kept(model, tokenizer, filters, n: int = 1024, tail: int = 128, sinks: int = 4) -> dict[str, float]:
    """Mean over full layers and KV heads of the share of attention from the last `tail` queries that lands on the
    half of the earlier keys (sinks excluded) with the best score, for +<f, k>, -<f, k> and a random ranking."""
    text = generic_text(tokenizer, n, seed=12345)  # not the calibration text (seed 0)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n]
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=True)
    gen = torch.Generator().manual_seed(0)
    kept: dict[str, list[float]] = {"+": [], "-": [], "random": []}
    ctx = n - tail
    for layer, f in filters.items():
        keys = out.past_key_values.layers[layer].keys[0, :, sinks:ctx].float()  # (H, T, D)
        h = keys.shape[0]
        attn = out.attentions[layer][0, :, ctx:, sinks:ctx]  # (H_q, tail, T)
        mass = attn.sum(1).view(h, -1, attn.shape[-1]).mean(1)  # (H, T)
        score = torch.einsum("htd,hd->ht", keys, f)
        for name, ranking in (("+", score), ("-", -score), ("random", torch.rand(score.shape, generator=gen))):
            top = ranking.topk(score.shape[-1] // 2, dim=-1).indices
            kept[name].append(float((mass.gather(-1, top).sum(-1) / mass.sum(-1)).mean()))
    return {name: sum(v) / len(v) for name, v in kept.items()}


def test_keys_along_the_filter_get_the_attention():
    model, tokenizer = kvs.load_model(attn_implementation="eager")
    method = kvs.get_method("qfilters", n_tokens=2048)
    method.calibrate(model, tokenizer=tokenizer)
    kept = attention_mass_kept(model, tokenizer, method.filters(model))
    print(f"attention mass kept by the top half of the keys: {kept}")  # shown with -s
    assert kept["+"] > 0.75, kept  # measured 0.85 (n_tokens=4096)
    assert kept["-"] < 0.25, kept
    assert abs(kept["random"] - 0.5) < 0.1, kept
