"""CAP: cosine to the averaged window query + beta * normalized ridge leverage of the values, against loops."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.cap import CAP
from tests.helpers import ids_of, prefill
from tests.unit.methods.helpers import budget, fake_ctx


def _ctx(t: int, n_q: int, seed: int, pad_queries: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, t, 6, generator=gen), torch.randn(1, 2, t, 5, generator=gen)
    ctx = fake_ctx(keys, values)
    qpos = torch.arange(t - n_q, t)[None].clone()
    qpos[:, :pad_queries] = -1
    ctx.query_positions = qpos
    ctx.hidden_states = torch.zeros(1, n_q, 8)
    ctx.position_embeddings = (torch.zeros(1, n_q, 6), torch.zeros(1, n_q, 6))
    ctx.captured_queries = torch.randn(1, 4, n_q, 6, generator=gen)  # 4 query heads, G = 2
    return ctx


def _reference(ctx, window: int, beta: float, ridge: float) -> list[list[float]]:
    out = []
    n_q = ctx.captured_queries.shape[2]
    for h in range(2):
        rows = [i for i in range(max(0, n_q - window), n_q) if int(ctx.query_positions[0, i]) >= 0]
        qs = [ctx.captured_queries[0, g, i].double() for g in (2 * h, 2 * h + 1) for i in rows]
        q_bar = sum(qs) / len(qs)
        v = ctx.values[0, h].double()
        gram = sum(torch.outer(v[i], v[i]) for i in range(v.shape[0]))
        lam = ridge * float(torch.trace(gram)) / v.shape[1]
        inv = torch.linalg.inv(gram + lam * torch.eye(v.shape[1], dtype=torch.float64))
        lev = [float(v[i] @ inv @ v[i]) for i in range(v.shape[0])]
        scores = []
        for i in range(v.shape[0]):
            k = ctx.keys[0, h, i].double()
            cos = float(k @ q_bar / (k.norm() * q_bar.norm()))
            scores.append(cos + beta * lev[i] / max(lev))
        out.append(scores)
    return out


@pytest.mark.parametrize(("window", "beta", "ridge", "pads"), [(3, 1.0, 1e-3, 0), (10, 0.5, 0.1, 2), (2, 0.0, 1e-3, 0)])
def test_cap_matches_a_loop(window, beta, ridge, pads):
    ctx = _ctx(12, 5, seed=window, pad_queries=pads)
    got = CAP(window=window, beta=beta, ridge=ridge).score(ctx)
    torch.testing.assert_close(
        got[0].double(), torch.tensor(_reference(ctx, window, beta, ridge), dtype=torch.float64), rtol=1e-4, atol=1e-5
    )


def test_cap_on_a_tiny_model_reaches_the_budget(make_model):
    model = make_model("qwen3")
    cache = prefill(model, ids_of(40), CAP(0.5, window=8))
    assert all(layer.kept.tolist() == [[budget(40, 0.5)] * 2] for layer in cache.full_layers())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"window": 0}, "window must be an integer >= 1, got 0"),
        ({"beta": -1.0}, "beta must be a number >= 0, got -1.0"),
        ({"ridge": 0.0}, "ridge must be a number > 0, got 0.0"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        CAP(**options)
