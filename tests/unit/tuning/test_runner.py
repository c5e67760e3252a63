"""A whole tune on a tiny random model and the fake task: files written, passes counted, resumed, interrupted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvsqueeze.bench.results import RESULTS
from kvsqueeze.bench.statistics import Interval
from kvsqueeze.tuning import TUNE_FILE, TuneSpec, read_choice, tune
from kvsqueeze.tuning.report import REPORT_FILE, write_tune_report
from kvsqueeze.tuning.runner import Probe, choose, keeps, meets
from kvsqueeze.tuning.search import SearchResult
from tests.unit.bench.runner_fakes import Interrupt

pytestmark = pytest.mark.usefixtures("fakes")


def spec(**kw: Any) -> TuneSpec:
    base: dict[str, Any] = {"tasks": ("fake",), "lengths": (48,), "samples": 4, "methods": ("knorm", "tova"),
                            "grid": (0.25, 0.5, 0.75), "target": 0.95}  # fmt: skip
    return TuneSpec(**{**base, **kw})


def test_tune_writes_a_config_and_resumes(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    # a random model scores 0 everywhere: the threshold (0.95 x 0) is met by every ratio, so each search climbs to 0.75
    result = tune(model, tok, spec(), tmp_path, model_name="tiny", progress=False)
    assert result.threshold == 0.0
    assert all(s.best == 0.75 for s in result.searches.values())
    assert all(s.evaluations == 2 for s in result.searches.values())  # 3 grid points: 2 probes (0.5, then 0.75)
    assert result.choice is not None and result.choice.ratio == 0.75
    assert result.choice.method in ("knorm", "tova")
    back = read_choice(tmp_path / TUNE_FILE)
    assert back == result.choice and back.provenance["model"] == "tiny"
    assert result.tune_questions + result.heldout_questions == 8  # 4 samples x 2 questions
    # each probe's first context is answered by its cost pass (a real run); the other context of each part is
    # recorded once for all 7 probes (without the shared store: once per probe, 7 times)
    assert result.forwards.prefills == 2 and result.forwards.cost_passes == 7
    assert result.forwards.answers == 28  # 7 probes x 4 questions
    assert result.search_forwards < result.grid_forwards
    assert result.paired is not None and result.paired.pairs == result.heldout_questions
    text = write_tune_report(result).read_text()
    assert "## Chosen" in text and f"`{result.choice.method}` at ratio 0.75" in text
    assert (tmp_path / REPORT_FILE).is_file()
    again = tune(model, tok, spec(), tmp_path, model_name="tiny", progress=False)  # resumed: nothing computed
    assert again.forwards.total == 0 and again.choice == result.choice


def test_no_candidate_meets_an_unreachable_target(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    result = tune(model, tok, spec(methods=("knorm",), target_score=0.5), tmp_path, progress=False)
    assert result.choice is None and not (tmp_path / TUNE_FILE).exists()
    assert result.searches["knorm"].evaluations == 2  # 0.5 fails, then 0.25 fails too: nothing left to try
    assert "No candidate met the target" in write_tune_report(result).read_text()


def test_a_method_that_cannot_run_at_a_ratio_does_not_meet_it(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    # SnapKV protects a 64-token window: on ~50-token contexts no ratio leaves room for it
    result = tune(model, tok, spec(methods=("snapkv",)), tmp_path, progress=False)
    probes = result.searches["snapkv"].probes
    assert result.choice is None and [r for r, _, _ in probes] == [0.5, 0.25]
    assert all(p.error is not None and "protected" in p.error and not ok for _, p, ok in probes)
    assert "cannot run:" in write_tune_report(result).read_text()


def test_interrupted_tune_keeps_rows_and_resumes(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    Interrupt.after = 4 * 3  # the method's warm-up and a few compressions, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        tune(model, tok, spec(methods=("fake_interrupt",)), tmp_path, progress=False)
    kept = len((tmp_path / RESULTS).read_text().splitlines())
    assert kept > 0
    Interrupt.after = None
    result = tune(model, tok, spec(methods=("fake_interrupt",)), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert len(rows) == kept + result.forwards.answers  # finished rows were not computed again
    assert result.choice is not None


def probe(score: float, low: float, kv: float, method: str = "m") -> Probe:
    return Probe(method, 0.5, [score], ["c"], score, Interval(low, 1.0, "wilson"), kv)


def test_meets_uses_the_lower_bound_and_choose_the_fewest_bytes() -> None:
    assert meets(probe(0.9, 0.8, 1), 0.8) and not meets(probe(0.99, 0.79, 1), 0.8)
    a, b = probe(0.9, 0.8, 100, "a"), probe(0.8, 0.7, 50, "b")
    searches = {"a": SearchResult(0.5, [(0.5, a, True)]), "b": SearchResult(0.5, [(0.5, b, True)]),
                "c": SearchResult(None, [(0.5, probe(0, 0, 1, "c"), False)])}  # fmt: skip
    assert choose(searches) is b
    assert choose({"c": searches["c"]}) is None


def test_bad_specs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        spec(methods=("nosuch",))
    with pytest.raises(ValueError, match="target"):
        spec(target=0.0)
    with pytest.raises(ValueError, match="not among the methods"):
        spec(options={"snapkv": {}})
    with pytest.raises(ValueError, match="dataset"):
        TuneSpec(methods=("knorm",))


def test_chunk_sizes_are_candidates_of_their_own(llama: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = llama
    result = tune(model, tok, spec(methods=("knorm",), chunk_sizes=(None, 16)), tmp_path, progress=False)
    assert list(result.searches) == ["knorm (one forward)", "knorm (chunks of 16)"]
    chunked = result.searches["knorm (chunks of 16)"]
    assert chunked.evaluations == 2 and all(p.chunk_size == 16 for _, p, _ in chunked.probes)
    rows = [json.loads(line) for line in (tmp_path / "chunks-16" / RESULTS).read_text().splitlines()]
    assert rows and all(r["chunk_size"] == 16 for r in rows)  # a run of its own: the chunk size is in its identity
    assert result.choice is not None and result.choice.chunk_size in (None, 16)
    assert read_choice(tmp_path / TUNE_FILE).chunk_size == result.choice.chunk_size
    assert "prefill in" in write_tune_report(result).read_text()
    with pytest.raises(ValueError, match="chunk size must be"):
        spec(chunk_sizes=(0,))


def test_keeps_decides_on_the_paired_share_of_the_uncompressed_score() -> None:
    contents = [f"q{i}" for i in range(200)]
    base = probe(0.9, 0.85, 0.0, "none")
    base.contents, base.scores = contents, [1.0] * 180 + [0.0] * 20
    same = probe(0.9, 0.85, 0.0)
    same.contents, same.scores = list(reversed(contents)), list(reversed(base.scores))  # paired by content
    assert keeps(same, base, 0.95) and same.kept is not None and same.kept[0] == 1.0
    worse = probe(0.6, 0.5, 0.0)
    worse.contents, worse.scores = contents, [1.0] * 120 + [0.0] * 80
    assert not keeps(worse, base, 0.95) and worse.kept is not None and worse.kept[1].high < 0.95
    broken = probe(0.0, 0.0, 0.0)
    broken.error = "cannot run"
    assert not keeps(broken, base, 0.5)
    stray = probe(0.9, 0.85, 0.0)
    stray.contents, stray.scores = ["elsewhere"], [1.0]
    with pytest.raises(ValueError, match="no uncompressed score"):
        keeps(stray, base, 0.95)
