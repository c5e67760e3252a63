"""Learned KVzip+ predictors (kvzap_linear, kvzap_mlp, fastkvzip_gates): rank correlation by hand, training recovers
planted relations, calibration on a tiny model (cached, held-out Spearman in the sidecar), one-shot prefill only,
options."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import forget, read_info
from kvsqueeze.methods import _kvzap, get_method
from kvsqueeze.methods._kvzap import Dataset, heldout_spearman, ranks, spearman
from kvsqueeze.methods.fastkvzip_gates import FastKVzipGates, percentile_labels
from kvsqueeze.methods.kvzap_linear import KVzapLinear, ridge_fit
from kvsqueeze.methods.kvzap_mlp import KVzapMLP
from tests.helpers import kept_counts, kept_positions, prefill

NAMES = ["kvzap_linear", "kvzap_mlp", "fastkvzip_gates"]
SMALL = {"n_docs": 3, "doc_tokens": 48, "heldout_docs": 1}
FAST = {"kvzap_linear": {}, "kvzap_mlp": {"steps": 30}, "fastkvzip_gates": {"steps": 30}}


# --- rank correlation -------------------------------------------------------------------------------------------------


def test_ranks_average_ties():
    assert ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 0.0, 1.5, 1.5]


def test_spearman_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotonic, not linear
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.ones(5)) == 0.0  # constant: no correlation defined, 0
    # ties: ranks [0, 1.5, 1.5, 3] vs [0, 1, 2, 3], centered dot 4.5 over sqrt(4.5 * 5)
    ties = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert ties == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_shape_mismatch():
    with pytest.raises(ValueError, match="same length"):
        spearman(torch.zeros(3), torch.zeros(4))


def test_heldout_spearman_uses_only_heldout_documents():
    x = torch.arange(12.0)[:, None]
    y = torch.cat([torch.arange(6.0), -torch.arange(6.0)])[:, None]  # doc 1 is anti-monotonic in x
    data = Dataset({0: x}, {0: y}, torch.tensor([0] * 6 + [1] * 6))
    assert heldout_spearman(lambda i, f: f, data, torch.tensor([0]))[0] == pytest.approx(1.0)
    assert heldout_spearman(lambda i, f: f, data, torch.tensor([1]))[0] == pytest.approx(-1.0)


# --- training recovers planted relations ------------------------------------------------------------------------------


def planted(n: int = 1500, f: int = 12, h: int = 3, noise: float = 0.01, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=gen) * 2 + 1
    w = torch.randn(f, h, generator=gen)
    b = torch.randn(h, generator=gen)
    return x, x @ w + b + noise * torch.randn(n, h, generator=gen), w, b


def test_ridge_recovers_a_planted_linear_map():
    x, y, w, b = planted()
    weight, bias = ridge_fit(x, y, ridge=0.0)
    torch.testing.assert_close(weight, w, atol=2e-3, rtol=0)
    torch.testing.assert_close(bias, b, atol=2e-3, rtol=0)
    shrunk, _ = ridge_fit(x, y, ridge=10.0)
    assert float(shrunk.norm()) < float(weight.norm())  # the penalty shrinks


@pytest.mark.parametrize("cls", [KVzapLinear, KVzapMLP, FastKVzipGates])
def test_predictors_rank_held_out_planted_data(cls):
    x, y, _, _ = planted(n=2000)
    doc = torch.arange(2000) // 500
    method = cls(**({} if cls is KVzapLinear else {"steps": 300}))
    params = method.fit(x[:1500], y[:1500], doc[:1500], seed=0)
    pred = method.predict(params, x[1500:])
    assert pred.shape == (500, 3)
    for h in range(3):
        assert spearman(pred[:, h], y[1500:, h]) > 0.9


def test_mlp_predicts_log_scores_not_standardized_ones():
    x, y, _, _ = planted(n=2000)
    method = KVzapMLP(steps=400)
    params = method.fit(x, y, torch.zeros(2000, dtype=torch.long), seed=0)
    residual = method.predict(params, x) - y
    assert float(residual.pow(2).mean()) < 0.1 * float(y.var())


@pytest.mark.parametrize("cls", [KVzapMLP, FastKVzipGates])
def test_training_is_deterministic_and_seeded(cls):
    x, y, _, _ = planted(n=800)
    doc = torch.zeros(800, dtype=torch.long)
    method = cls(steps=20)
    a, b, c = method.fit(x, y, doc, seed=1), method.fit(x, y, doc, seed=1), method.fit(x, y, doc, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_percentile_labels_per_document():
    y = torch.tensor([[1.0], [3.0], [2.0], [10.0], [-5.0]])
    labels = percentile_labels(y, torch.tensor([0, 0, 0, 1, 1]))
    assert labels[:, 0].tolist() == [0.0, 1.0, 0.5, 1.0, 0.0]


# --- calibration on a tiny model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_stores_heldout_spearman_and_is_reused(name, make_model, monkeypatch):
    model = make_model("llama")
    method = get_method(name, ratio=0.5, **SMALL, **FAST[name])
    path = method.calibrate(model)
    results = read_info(path)["results"]
    per_layer = results["heldout_spearman_per_layer"]
    assert sorted(per_layer) == ["0", "1", "2", "3"]
    assert all(-1.0 <= v <= 1.0 for v in per_layer.values())
    assert results["heldout_spearman_mean"] == pytest.approx(sum(per_layer.values()) / 4, abs=1e-3)
    params = method.parameters_for(model)
    forget(model)

    def fail(*args, **kwargs):
        raise AssertionError("calibration data collected again instead of loading the artifact")

    monkeypatch.setattr(_kvzap, "collect", fail)
    assert method.calibrate(model) == path  # loaded from disk
    again = method.parameters_for(model)
    assert all(torch.equal(params[i][k], again[i][k]) for i in params for k in params[i])
    other = get_method(name, ratio=0.5, **{**SMALL, "seed": 1}, **FAST[name])
    with pytest.raises(AssertionError, match="collected again"):  # other settings: another artifact
        other.calibrate(model)


def test_predictors_share_one_collection_per_process(make_model, monkeypatch, tmp_path):
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path))  # no artifact of an earlier test
    model = make_model("llama")
    calls = []
    real = _kvzap.collect

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_kvzap, "collect", counting)
    for name in NAMES:  # same documents: collected once, each predictor trained and saved
        assert get_method(name, ratio=0.5, **SMALL, **FAST[name]).calibrate(model).exists()
    assert len(calls) == 1
    get_method("kvzap_linear", ratio=0.5, **{**SMALL, "doc_tokens": 40}).calibrate(model)  # other documents
    assert len(calls) == 2
    get_method("kvzap_mlp", ratio=0.5, **SMALL, **FAST["kvzap_mlp"]).calibrate(model, force=True)  # from scratch
    assert len(calls) == 3
    forget(model)


def test_heldout_spearman_matches_a_recomputation(make_model):
    """The stored held-out Spearman equals the one recomputed from the collected data and the loaded predictor."""
    model = make_model("qwen3")
    method = KVzapLinear(ratio=0.5, **SMALL)
    path = method.calibrate(model)
    _, docs = method._settings(model, None)
    data = _kvzap.collect(model, docs)
    params = method.parameters_for(model)
    rho = heldout_spearman(lambda i, x: method.predict(params[i], x), data, torch.tensor([2]))
    stored = read_info(path)["results"]["heldout_spearman_per_layer"]
    for layer, value in rho.items():
        assert stored[str(layer)] == pytest.approx(value, abs=2e-3)


def test_collect_targets_are_log_kvzip_plus(make_model):
    from kvsqueeze.replay import kvzip_scores

    model = make_model("llama")
    ids = torch.randint(5, 400, (40,), generator=torch.Generator().manual_seed(3))
    data = _kvzap.collect(model, [ids])
    cache = prefill(model, ids[None])
    scores = kvzip_scores(model, cache, ids[None], variant="kvzip+")
    for layer, target in data.targets.items():
        assert data.features[layer].shape == (40, model.config.hidden_size)
        torch.testing.assert_close(target, (scores[layer][0].T + 1e-10).log(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_scores_follow_the_predictor_and_refuse_later_forwards(name, make_model):
    model = make_model("llama")
    method = get_method(name, ratio=0.5, **SMALL, **FAST[name])
    ids = torch.randint(5, 400, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = prefill(model, ids, method)
    assert kept_counts(cache) == [[[15, 15]]] * 4
    with pytest.raises(ValueError, match="one-shot prefill"), torch.no_grad(), kvs.compress(model, method):
        model(ids[:, :5], past_key_values=cache)


# --- the threshold rule -----------------------------------------------------------------------------------------------


class PlantedScores(KVzapLinear):
    """kvzap_linear whose predicted log-scores are planted: head h of every layer scores slot i as -(i % (5 + 3 h))
    (the selection rule under test, not the predictor)."""

    def score(self, ctx):
        b, h, t = ctx.valid.shape
        i = torch.arange(t, dtype=torch.float32)
        return torch.stack([-(i % (5 + 3 * k)) for k in range(h)])[None].expand(b, h, t)


def test_threshold_keeps_the_slots_scored_above_it_and_the_recent_window(make_model):
    model = make_model("llama")
    ids = torch.randint(5, 400, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = prefill(model, ids, PlantedScores(threshold=-3.0, window=4))
    for layer in cache.full_layers():
        for head in range(2):
            expected = [p for p in range(30) if p % (5 + 3 * head) <= 3 or p >= 26]
            assert kept_positions(layer, 0, head) == expected
    assert kept_counts(cache)[0] == [[25, 18]]  # each head keeps its own amount (stored ragged)


@pytest.mark.parametrize("name", NAMES)
def test_threshold_on_a_trained_predictor(name, make_model):
    model = make_model("llama")
    ids = torch.randint(5, 400, (1, 30), generator=torch.Generator().manual_seed(4))
    options = {**SMALL, **FAST[name]}
    assert kept_counts(prefill(model, ids, get_method(name, threshold=1e9, window=5, **options))) == [[[5, 5]]] * 4
    everything = prefill(model, ids, get_method(name, threshold=-1e9, window=5, **options))
    assert kept_counts(everything) == [[[30, 30]]] * 4  # nothing below the threshold: nothing pruned


def test_threshold_replaces_the_ratio():
    with pytest.raises(ValueError, match=r"threshold=-4.0 decides how much each head keeps, so the ratio must be 0"):
        get_method("kvzap_mlp", ratio=0.5, threshold=-4.0)


# --- options ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("kvzap_linear", "ridge", -1.0),
        ("kvzap_linear", "n_docs", 1),
        ("kvzap_linear", "doc_tokens", 2),
        ("kvzap_mlp", "width", 0),
        ("kvzap_mlp", "steps", 0),
        ("kvzap_mlp", "lr", 0.0),
        ("fastkvzip_gates", "rank", 0),
        ("fastkvzip_gates", "n_queries", 1.5),
        ("fastkvzip_gates", "seed", -1),
        ("kvzap_mlp", "text", "wiki"),
        ("kvzap_linear", "threshold", float("nan")),
        ("kvzap_linear", "window", 0),
    ],
)
def test_bad_options_raise(name, option, value):
    with pytest.raises(ValueError, match=f"{option} must be .*got {value!r}"):
        get_method(name, **{option: value})


def test_heldout_docs_must_leave_training_documents():
    with pytest.raises(ValueError, match=r"heldout_docs must be in \[1, n_docs - 1\] = \[1, 2\], got 3"):
        KVzapLinear(n_docs=3, heldout_docs=3)


def test_doc_tokens_must_fit_the_replay(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="doc_tokens must leave room for the replay"):
        KVzapLinear(doc_tokens=100_000, n_docs=2, heldout_docs=1).calibrate(model)


@pytest.mark.parametrize("name", NAMES)
def test_listed_as_needing_calibration(name, capsys):
    import json

    from kvsqueeze.cli import main

    assert main(["list", "--json"]) == 0
    entry = next(m for m in json.loads(capsys.readouterr().out) if m["name"] == name)
    assert entry["needs"] == ["calibration"]
