"""The Ray executor on a real local Ray (2 CPUs, started once for the module): the same rows as a serial run, an actor
killed mid-run, a Ray run interrupted and finished serially. The actors load a tiny random Llama saved_llama on disk, by
its path, as they would load a real model by name."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.folder import identity_id, run_identity
from kvsqueeze.bench.ray_executor import ACTOR_PREFIX, RayOptions
from kvsqueeze.bench.report import write_report
from kvsqueeze.bench.results import COSTS, FAILED, RESULTS, read_jsonl, row_key
from kvsqueeze.bench.runner import BenchInterrupted, run_bench

COMPUTED = ("prediction", "score", "kv_bytes_before", "kv_bytes_after")  # what must match; timings may not


def _config(samples: int = 3) -> BenchConfig:
    return BenchConfig(methods=("none", "knorm", "snapkv"), ratios=(0.25, 0.5), tasks=("passkey",), lengths=(160,),
                       samples=samples)  # fmt: skip


def _keys(out: Path) -> list[tuple]:
    return sorted(map(row_key, read_jsonl(out / RESULTS)))


def _when_rows(out: Path, n: int, action: Callable[[], None]) -> threading.Thread:
    """A thread that runs `action` once results.jsonl holds `n` rows (or after 120 s)."""

    def wait() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / RESULTS).exists() and len((out / RESULTS).read_text().splitlines()) >= n:
                break
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _kill_an_actor(run_prefix: str) -> Callable[[], None]:
    def kill() -> None:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(run_prefix)]  # fmt: skip
        actor = ray.get_actor(sorted(names)[0])
        pid = ray.get(actor.pid.options(concurrency_group="control").remote())
        os.kill(pid, signal.SIGKILL)

    return kill


def test_ray_gives_the_rows_of_a_serial_run(ray_session, saved_llama, one_thread, tmp_path: Path) -> None:
    path, model, tok = saved_llama
    serial = run_bench(model, tok, _config(), tmp_path / "serial", model_name=path, progress=False)
    on_ray = run_bench(model, tok, _config(), tmp_path / "ray", model_name=path, progress=False, executor="ray",
                       ray=RayOptions(actors=2, threads=1))  # fmt: skip
    assert on_ray.computed_rows == serial.computed_rows == 3 * 5  # 3 passkey samples x (none + 2 methods x 2 ratios)
    assert on_ray.cost_passes == serial.cost_passes == 5 and on_ray.run_id == serial.run_id
    a = {row_key(r): tuple(r[k] for k in COMPUTED) for r in read_jsonl(tmp_path / "serial" / RESULTS)}
    b = {row_key(r): tuple(r[k] for k in COMPUTED) for r in read_jsonl(tmp_path / "ray" / RESULTS)}
    assert a == b
    assert len(read_jsonl(tmp_path / "ray" / COSTS)) == 5
    assert not ray.util.list_named_actors()  # the run's actors are gone


def test_an_actor_killed_mid_run_loses_no_row(ray_session, saved_llama, tmp_path: Path) -> None:
    path, model, tok = saved_llama
    config = _config(samples=8)
    run_id = identity_id(run_identity(model, tok, config, path))
    killer = _when_rows(tmp_path / "ray", 2, _kill_an_actor(f"{ACTOR_PREFIX}-{run_id}-"))
    run = run_bench(model, tok, config, tmp_path / "ray", model_name=path, progress=False, executor="ray",
                    ray=RayOptions(actors=2, threads=1))  # fmt: skip
    killer.join()
    keys = _keys(tmp_path / "ray")
    assert len(keys) == len(set(keys)) == 8 * 5 == run.computed_rows  # every row, once
    assert run.retried_units >= 1 and run.failed_rows == 0
    assert not (tmp_path / "ray" / FAILED).exists()


def test_interrupted_ray_run_finishes_serially_once_per_row(ray_session, saved_llama, tmp_path: Path) -> None:
    path, model, tok = saved_llama
    config = _config(samples=8)
    interrupter = _when_rows(tmp_path, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(BenchInterrupted) as caught:
        run_bench(model, tok, config, tmp_path, model_name=path, progress=False, executor="ray",
                  ray=RayOptions(actors=2, threads=1))  # fmt: skip
    interrupter.join()
    written = _keys(tmp_path)
    assert 3 <= len(written) < 8 * 5 and len(written) == len(set(written)) == caught.value.run.computed_rows
    assert not ray.util.list_named_actors()  # Ctrl-C stopped the actors
    rest = run_bench(model, tok, config, tmp_path, model_name=path, progress=False)
    assert rest.skipped_rows == len(written) and rest.computed_rows == 8 * 5 - len(written)
    keys = _keys(tmp_path)
    assert len(keys) == len(set(keys)) == 8 * 5


def test_a_unit_out_of_retries_becomes_failed_rows_that_a_rerun_computes(
    ray_session, saved_llama, tmp_path: Path
) -> None:
    path, model, tok = saved_llama
    config = _config(samples=8)
    run_id = identity_id(run_identity(model, tok, config, path))
    killer = _when_rows(tmp_path, 2, _kill_an_actor(f"{ACTOR_PREFIX}-{run_id}-"))
    run = run_bench(model, tok, config, tmp_path, model_name=path, progress=False, executor="ray",
                    ray=RayOptions(actors=2, threads=1, retries=0))  # fmt: skip
    killer.join()
    failed = read_jsonl(tmp_path / FAILED)
    assert run.failed_rows == len(failed) >= 1 and all("ActorDiedError" in r["error"] for r in failed)
    written, lost = _keys(tmp_path), sorted(map(row_key, failed))
    assert len(set(written) | set(lost)) == len(written) + len(lost) == 8 * 5  # each row once, in one file or other
    files = write_report(tmp_path)
    assert files.failed_rows == len(failed) and FAILED in files.markdown.read_text()
    rest = run_bench(model, tok, config, tmp_path, model_name=path, progress=False)
    assert rest.computed_rows == len(failed) and rest.failed_rows == 0 and not (tmp_path / FAILED).exists()
    keys = _keys(tmp_path)
    assert len(keys) == len(set(keys)) == 8 * 5
