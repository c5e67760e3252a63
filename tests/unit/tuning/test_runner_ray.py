"""A tune whose probes run on a real local Ray (2 CPUs): the choice and the rows of a serial tune, prefills kept by
the actors across probes, and a probe that fails in an actor leaving the actors working for the next one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from kvsqueeze.bench.ray_executor import RayOptions
from kvsqueeze.bench.results import RESULTS, read_jsonl, row_key
from kvsqueeze.tuning import TuneSpec, tune

COMPUTED = ("prediction", "score", "kv_bytes_before", "kv_bytes_after")


def spec(**kw: Any) -> TuneSpec:
    base: dict[str, Any] = {"tasks": ("passkey",), "lengths": (160,), "samples": 6, "methods": ("knorm", "tova"),
                            "grid": (0.25, 0.5, 0.75)}  # fmt: skip
    return TuneSpec(**{**base, **kw})


def _rows(out: Path) -> dict[tuple, tuple]:
    return {row_key(r): tuple(r[k] for k in COMPUTED) for r in read_jsonl(out / RESULTS)}


def test_a_ray_tune_gives_the_serial_choice_and_rows(ray_session, saved_llama, one_thread, tmp_path: Path) -> None:
    path, model, tok = saved_llama
    serial = tune(model, tok, spec(), tmp_path / "serial", model_name=path, progress=False)
    on_ray = tune(model, tok, spec(), tmp_path / "ray", model_name=path, progress=False, executor="ray",
                  ray=RayOptions(actors=2, threads=1))  # fmt: skip
    assert serial.choice is not None and on_ray.choice is not None
    assert (on_ray.choice.method, on_ray.choice.ratio) == (serial.choice.method, serial.choice.ratio)
    for method, search in serial.searches.items():
        theirs = on_ray.searches[method]
        assert [(r, p.scores, ok) for r, p, ok in theirs.probes] == [(r, p.scores, ok) for r, p, ok in search.probes]
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "serial")
    assert (
        on_ray.forwards.answers == serial.forwards.answers
        and on_ray.forwards.cost_passes == serial.forwards.cost_passes
    )
    # 6 contexts, 3 per part; each probe answers one context by its cost pass and the other two from recordings.
    # Serially each of those is recorded once (2 per part); the actors keep theirs across probes, so a context is
    # recorded at most once per actor, where without kept recordings every probe would record its two again
    probes = 1 + sum(s.evaluations for s in serial.searches.values()) + 2  # the tune part's, then the held-out's
    assert serial.forwards.prefills == 2 + 2
    assert on_ray.forwards.prefills <= 2 * serial.forwards.prefills < 2 * probes
    assert not ray.util.list_named_actors()  # the tune's actors are gone


def test_a_probe_failing_in_an_actor_leaves_the_pool_working(ray_session, saved_llama, tmp_path: Path) -> None:
    path, model, tok = saved_llama
    # SnapKV protects its 120-token window: on 160-token contexts ratio 0.5 leaves no room for it (the probe fails in
    # an actor); the next candidate's probes still run on the same actors
    odd = spec(methods=("snapkv", "knorm"), options={"snapkv": {"window": 120}})
    result = tune(model, tok, odd, tmp_path, model_name=path, progress=False, executor="ray",
                  ray=RayOptions(actors=2, threads=1))  # fmt: skip
    snap = result.searches["snapkv"].probes
    error = snap[0][1].error if snap else None
    assert snap[0][0] == 0.5 and error is not None and "protected" in error
    assert error.startswith("on tune_split sample")  # the actor evaluator's own error, not Ray's wrapping of it
    assert result.choice is not None and result.choice.method == "knorm"
    assert all(p.error is None for _, p, _ in result.searches["knorm"].probes)
