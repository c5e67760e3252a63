"""Q-Filters: the calibration direction (uncentered SVD, majority orientation, GQA mean), the score <f, k>, lazy
calibration on first use and its options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import forget, read_info, remembered
from kvsqueeze.methods.qfilters import QFilters, compute_filters, query_directions
from tests.helpers import prefill


def planted(n: int, d: int, direction: torch.Tensor, coef: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return coef[:, None] * direction[None, :] + noise * torch.randn(n, d, generator=gen)


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_recovers_a_planted_direction_with_its_orientation(sign):
    d, n = 32, 2000
    u = unit(d, 1)
    coef = sign * (3.0 + torch.randn(n, generator=torch.Generator().manual_seed(2)).abs())
    f = query_directions(planted(n, d, u, coef, noise=0.7))
    assert f.shape == (d,)
    assert torch.isclose(f.norm(), torch.tensor(1.0), atol=1e-5)
    assert float(f @ u) * sign > 0.99  # the direction, pointing where the queries point


def test_uncentered_finds_the_common_offset():
    """Queries = a constant offset along u plus larger isotropic-free noise along w: a centered PCA would return w;
    the uncentered SVD returns u (the direction the queries actually share)."""
    d, n = 16, 1000
    u, w = unit(d, 3), unit(d, 4)
    w = w - (w @ u) * u
    w = w / w.norm()
    gen = torch.Generator().manual_seed(5)
    queries = 4.0 * u[None] + 2.0 * torch.randn(n, 1, generator=gen) * w[None]
    f = query_directions(queries)
    assert float(f @ u) > 0.99


def test_orientation_follows_the_majority_not_the_mean():
    d = 8
    u = unit(d, 6)
    coef = torch.cat([torch.full((70,), 1.0), torch.full((30,), -5.0)])  # mean is negative, most are positive
    f = query_directions(planted(100, d, u, coef, noise=0.01))
    assert float(f @ u) > 0.99


def test_batched_over_heads_equals_one_by_one():
    d, n = 16, 300
    heads = torch.stack([planted(n, d, unit(d, s), 2.0 + torch.rand(n), 0.5, seed=s) for s in range(4)])
    batched = query_directions(heads)  # (4, D)
    for h in range(4):
        torch.testing.assert_close(batched[h], query_directions(heads[h]), rtol=1e-5, atol=1e-5)


def test_filters_are_the_mean_of_the_group(make_model):
    """compute_filters against a slow reference built from the same collected queries, head by head."""
    from kvsqueeze.calibration import collect_attention

    model = make_model("llama")  # 4 query heads, 2 KV heads: G = 2
    ids = torch.randint(5, 400, (200,), generator=torch.Generator().manual_seed(0))
    filters = compute_filters(model, ids, chunk_size=128)
    queries = collect_attention(model, ids, lambda c: c.queries(rope=True)[0], chunk_size=128)
    assert sorted(filters) == [f"layer_{i}" for i in range(4)]
    for layer in range(4):
        q = torch.cat(queries[layer], dim=1)  # (4, N, D)
        reference = torch.stack([(query_directions(q[2 * h]) + query_directions(q[2 * h + 1])) / 2 for h in range(2)])
        torch.testing.assert_close(filters[f"layer_{layer}"], reference, rtol=1e-5, atol=1e-5)


def test_score_is_the_projection_on_the_filter():
    model = torch.nn.Linear(1, 1)  # any module: filters are looked up per model object
    method = QFilters(ratio=0.5)
    filters = {3: torch.randn(2, 8)}
    remembered(model, ("qfilters", *method.calibration_key()), lambda: filters)
    keys = torch.randn(2, 2, 5, 8)  # (B, H, T, D)
    ctx = SimpleNamespace(keys=keys, layer_idx=3, adapter=SimpleNamespace(model=model))
    scores = method.score(ctx)  # type: ignore[arg-type]
    for b in range(2):
        for h in range(2):
            for t in range(5):
                assert torch.isclose(scores[b, h, t], keys[b, h, t] @ filters[3][h], atol=1e-6)
    forget(model)


def test_lazy_calibration_matches_calibrating_ahead(make_model, tmp_path, monkeypatch):
    """Calibrating inside `compress` (first use, kvsqueeze's attention active) computes the same filters as
    calibrating ahead of time with the model's own attention."""
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path))  # empty: the first use must compute
    ids = torch.randint(5, 400, (1, 61), generator=torch.Generator().manual_seed(0))
    method = kvs.get_method("qfilters", ratio=0.5, n_tokens=256, calibration_chunk=128)
    kept, models = [], []
    for ahead in (False, True):
        model = make_model("mistral")
        models.append(model)
        if ahead:
            assert method.calibrate(model, force=True).exists()
        cache = prefill(model, ids, method)
        kept.append([layer.positions.tolist() for layer in cache.full_layers()])
    assert kept[0] == kept[1]
    lazy, early = (method.filters(m) for m in models)
    for layer in range(4):
        torch.testing.assert_close(lazy[layer], early[layer], rtol=1e-5, atol=1e-6)


def test_calibrate_returns_the_artifact(make_model, tokenizer):
    model = make_model("qwen2")
    method = QFilters(n_tokens=128, calibration_chunk=64)
    path = method.calibrate(model, tokenizer=tokenizer)
    info = read_info(path)
    assert info["settings"]["text"] == "text" and info["settings"]["n_tokens"] == 128
    assert sorted(method.filters(model)) == [0, 1, 2, 3]
    assert method.filters(model)[0].shape == (2, 16)
    assert kvs.get_method("knorm").calibrate(model) is None  # methods without calibration: no-op


def test_needs_calibration():
    assert QFilters.needs == ("calibration",)
    described = {d["name"]: d for d in kvs.describe_methods()}["qfilters"]
    assert described["needs"] == ["calibration"]
    assert described["options"] == {
        "ratio": 0.0, "n_tokens": 4096, "seed": 0, "calibration_chunk": 1024, "text": "generic"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value"),
    [("n_tokens", 8), ("n_tokens", 2.5), ("seed", -1), ("calibration_chunk", 0), ("calibration_chunk", True)],
)
def test_bad_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be an integer( in \[.*)?, got {value!r}"):
        kvs.get_method("qfilters", **{option: value})
