"""LU-KV: oracle importance, keep order, loss curves, convex hulls and the greedy allocation against slow references;
one calibration chunk end to end against a hand-written reference; the exact model total with different counts per
head; the on-disk cache and option validation."""

from __future__ import annotations

import itertools

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import collect_attention, forget, remembered
from kvsqueeze.methods import lukv as lu
from kvsqueeze.methods.lukv import (
    LUKV,
    allocate,
    chunk_loss,
    convex_gains,
    keep_order,
    loss_curve,
    oracle_importance,
)
from tests.helpers import ids_of, kept_positions, kept_total, prefill


def test_oracle_importance_matches_loops():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 9, 8, generator=gen), torch.randn(2, 9, 8, generator=gen)  # H_q 4, H 2, T 9
    got = oracle_importance(q, k, 0.3, n_ctx=6)
    for h, j in itertools.product(range(2), range(6)):
        best = 0.0
        for g, t in itertools.product((2 * h, 2 * h + 1), range(6, 9)):
            weights = torch.softmax(torch.stack([0.3 * q[g, t] @ k[h, i] for i in range(t + 1)]), dim=0)
            best = max(best, float(weights[j]))
        assert abs(float(got[h, j]) - best) < 1e-6


def test_keep_order_puts_protected_first_then_scores_then_earlier():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]])
    protected = torch.tensor([[False, False, False, True, False]])
    assert keep_order(scores, protected).tolist() == [[3, 1, 4, 0, 2]]
    assert keep_order(scores, None).tolist() == [[1, 4, 0, 2, 3]]


def test_loss_curve_is_the_evicted_importance():
    importance = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0, 0.5]])
    order = torch.tensor([[5, 1, 3, 2, 0, 4]])
    curve = loss_curve(importance, order, grid=3)  # keep 0, 2, 4, 6 of the 6 tokens
    expected = [1.5, 1.5 - 0.9, 1.5 - 0.9 - 0.5, 0.0]
    torch.testing.assert_close(curve[0], torch.tensor(expected), atol=1e-6, rtol=0)


def _slow_hull(y: list[float]) -> list[float]:
    """The lower convex hull at each x: the lowest chord through points a <= x <= b."""
    out = []
    for x in range(len(y)):
        best = y[x]
        for a in range(x + 1):
            for b in range(x, len(y)):
                if a < b:
                    best = min(best, y[a] + (y[b] - y[a]) * (x - a) / (b - a))
        out.append(best)
    return out


def test_convex_gains_match_a_brute_force_hull():
    gen = torch.Generator().manual_seed(1)
    loss = torch.cat([torch.rand(5, 10, generator=gen).sort(dim=-1, descending=True).values, torch.zeros(5, 1)], -1)
    gains = convex_gains(loss)
    for i in range(5):
        hull = _slow_hull(loss[i].double().tolist())
        expected = [hull[g] - hull[g + 1] for g in range(10)]
        torch.testing.assert_close(gains[i], torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)
        assert bool((gains[i][:-1] >= gains[i][1:] - 1e-12).all())  # non-increasing


def _greedy_tokens(gains: torch.Tensor, n: int, ratio: float, floor: int) -> list[int]:
    """Token by token: the next token goes to the head whose next token has the largest marginal gain (its segment's
    gain), ties to the earlier segment, then the earlier head."""
    n_heads, grid = gains.shape
    width = n // grid
    counts = [floor] * n_heads
    total = n_heads * int(n * (1 - ratio) + 1e-6)
    for _ in range(total - floor * n_heads):
        options = [
            (-float(gains[h, counts[h] // width]), counts[h] // width, h) for h in range(n_heads) if counts[h] < n
        ]
        counts[min(options)[2]] += 1
    return counts


@pytest.mark.parametrize(("ratio", "floor"), [(0.5, 1), (0.75, 3), (0.2, 7), (0.9, 2)])
def test_allocation_is_the_token_by_token_greedy(ratio, floor):
    gen = torch.Generator().manual_seed(2)
    loss = torch.cat([torch.rand(6, 8, generator=gen).sort(dim=-1, descending=True).values, torch.zeros(6, 1)], -1)
    gains = convex_gains(loss)
    n = 40  # 8 segments of 5 tokens: the water-filling shares are whole tokens
    got = allocate(gains, torch.tensor([n]), ratio, torch.tensor([floor]))
    assert got[0].tolist() == _greedy_tokens(gains, n, ratio, floor)


def test_allocation_rounds_to_the_exact_total_per_row():
    gains = convex_gains(torch.cat([torch.rand(5, 7).sort(dim=-1, descending=True).values, torch.zeros(5, 1)], -1))
    seen = torch.tensor([61, 33, 100])
    got = allocate(gains, seen, 0.375, torch.tensor([4, 4, 1]))
    for row, n in enumerate(seen.tolist()):
        assert int(got[row].sum()) == 5 * int(n * 0.625)
        assert int(got[row].min()) >= (4 if row < 2 else 1) and int(got[row].max()) <= n


def test_chunk_loss_matches_a_reference_on_a_tiny_model(make_model):
    model = make_model("llama")
    ids = ids_of(40, seed=3)[0]
    scorer = kvs.get_method("knorm")
    got = collect_attention(model, ids, lambda call: chunk_loss(call, scorer, 10, 6), 40)
    keys = collect_attention(model, ids, lambda call: (call.queries()[0], call.keys_values()[0][0]), 40)
    for layer in (0, 3):
        q, k = keys[layer][0]
        importance = oracle_importance(q, k, 0.25, 30)  # checked against loops above
        for h in range(2):
            order = sorted(range(30), key=lambda j, h=h: (float(k[h, j].norm()), j))  # KNorm keeps small norms
            curve = []
            for f in range(7):
                kept = set(order[: int(f * 30 / 6 + 0.5)])
                curve.append(sum(float(importance[h, j]) for j in range(30) if j not in kept))
            torch.testing.assert_close(got[layer][0][h].double(), torch.tensor(curve, dtype=torch.float64), atol=1e-5,
                                       rtol=1e-5)  # fmt: skip


def _with_curves(model, method: LUKV, curves: dict[int, torch.Tensor]) -> None:
    remembered(model, method._key(), lambda: curves, refresh=True)


def test_heads_keep_their_allocation_of_their_scorers_best_tokens(make_model):
    model = make_model("qwen2")
    method = LUKV(ratio=0.5, scorer="knorm", grid=4)
    gen = torch.Generator().manual_seed(4)
    curves = {i: torch.cat([torch.rand(2, 4, generator=gen).sort(-1, True).values, torch.zeros(2, 1)], -1) for i in
              range(4)}  # fmt: skip
    _with_curves(model, method, curves)
    n = 61
    ids = ids_of(n, seed=5)
    cache = prefill(model, ids, method)
    dense = prefill(model, ids, None)
    expected = allocate(convex_gains(torch.cat([curves[i] for i in range(4)])), torch.tensor([n]), 0.5,
                        torch.tensor([1]))[0].view(4, 2)  # fmt: skip
    assert kept_total(cache) == 8 * 30  # the model total is exact
    assert len({int(c) for c in expected.flatten()}) > 1  # heads keep different counts
    for idx, layer in enumerate(cache.full_layers()):
        assert layer.kept[0].tolist() == expected[idx].tolist()
        for h in range(2):
            norms = dense.layer(idx).keys[0, h].norm(dim=-1)
            best = sorted(range(n), key=lambda j, norms=norms: (float(norms[j]), j))[: int(expected[idx, h])]
            assert kept_positions(layer, 0, h) == sorted(best)
    assert kvs.cache_stats(cache).kv_bytes == 8 * 30 * 2 * 16 * 4  # ragged: only the kept tokens are stored
    forget(model)


def test_second_calibration_loads_from_disk(make_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path))
    calls = []
    original = lu.compute_loss_curves
    monkeypatch.setattr(lu, "compute_loss_curves", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = make_model("phi3")
    options = {"scorer": "knorm", "horizon": 16, "grid": 8, "n_tokens": 128, "calibration_chunk": 64}
    method = LUKV(**options)
    path = method.calibrate(model)
    first = method.loss_curves(model)
    assert path.exists() and calls == [1] and first[0].shape == (2, 9)
    forget(model)
    assert LUKV(**options).calibrate(model) == path and calls == [1]
    assert all(torch.equal(method.loss_curves(model)[i], first[i]) for i in first)
    assert LUKV(**{**options, "scorer": "keydiff"}).calibrate(model) != path  # another scorer, another profile
    assert calls == [1, 1]
    forget(model)


def test_needs_calibration_and_listed():
    described = {d["name"]: d for d in kvs.describe_methods()}["lukv"]
    assert described["needs"] == ["calibration"]


@pytest.mark.parametrize(
    ("option", "value"), [("grid", 0), ("horizon", 0), ("horizon", 1024), ("n_tokens", 3), ("calibration_chunk", -1)]
)
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be .*{value!r}"):
        kvs.get_method("lukv", **{option: value})


def test_a_chunk_too_short_for_the_horizon_is_named():
    """A calibration chunk no longer than the (default) horizon: the message names both options and both values."""
    with pytest.raises(ValueError, match=r"horizon must be an integer in \[1, 15\] \(below calibration_chunk=16.*128"):
        kvs.get_method("lukv", calibration_chunk=16)


def test_bad_scorer():
    with pytest.raises(ValueError, match="scorer must be a scoring method"):
        kvs.get_method("lukv", scorer="adakv")
