"""Wall time of a benchmark grid run serially against the same grid on Ray actors (`kvsqueeze bench --executor ray`).

Each run is a fresh `kvsqueeze bench` process writing into a fresh folder, timed end to end (model load, Ray start,
every row, the report), so the Ray figure includes what Ray costs. Runs are interleaved (serial, Ray, Ray, serial,
...) so that a slow phase of the machine does not land on one executor only. The serial run uses torch's default
threads (every core); the Ray run uses `--actors` actors of `--actor-threads` threads each. Both write the same rows;
the script counts the rows whose prediction or score differs from the first run's (other thread counts sum floats
in another order, which can flip a greedy token).

Run it alone on the machine (other jobs change the times):
    .venv/bin/python benchmarks/bench_ray.py                 # the default suite, twice each way
    .venv/bin/python benchmarks/bench_ray.py --quick         # a tiny grid, once each way: checks that it works
    .venv/bin/python benchmarks/bench_ray.py --grid "--methods none,knorm,expected_attention --ratios 0.5 --tasks
        passkey,niah_single --samples 4"                     # a smaller grid than the default suite
Writes benchmarks/results/<--save>.json and .md (default bench_ray; with --quick: only prints). A serial run also
logs how long each work unit took; the script replays those unit times in plan order on 1, 2, 4 and 8 workers (how
the Ray executor hands units out), an estimate of what more actors would give at the same per-unit speed.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvsqueeze.bench.results import RESULTS, read_jsonl, row_key

RESULTS_DIR = Path(__file__).parent / "results"
UNIT_LINE = re.compile(r"work unit \d+ \((?P<group>[^,]+), (?P<tokens>\d+) tokens, \d+ jobs\) took (?P<s>[0-9.]+) s")
QUICK = ["--methods", "none,knorm", "--ratios", "0.5", "--tasks", "passkey", "--lengths", "256", "--samples", "2"]


def bench(out: Path, grid: list[str], extra: list[str]) -> tuple[float, list[float]]:
    """(seconds one `kvsqueeze bench` process takes end to end, the seconds of each work unit in plan order: a serial
    run logs them at debug level; a Ray run gives none)."""
    command = [sys.executable, "-m", "kvsqueeze", "bench", "--out", str(out), "--no-progress", "-v", *grid, *extra]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    return seconds, [float(m["s"]) for m in UNIT_LINE.finditer(done.stderr)]


def makespan(units: list[float], workers: int) -> float:
    """Wall time of `units` (seconds each, in plan order) handed in that order to whichever of `workers` frees first,
    as the Ray executor hands them out."""
    free = [0.0] * workers
    for seconds in units:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def answers(out: Path) -> dict[tuple, tuple]:
    """Each row's prediction and score, by row key (the run id is the same for both executors)."""
    return {row_key(r): (r["prediction"], r["score"]) for r in read_jsonl(out / RESULTS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid, once each way, nothing written")
    parser.add_argument("--rounds", type=int, default=None, help="runs per executor (default: 2, 1 with --quick)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--actor-threads", type=int, default=1)
    parser.add_argument("--save", default="bench_ray", help="file stem of the results in benchmarks/results")
    parser.add_argument(
        "--grid",
        default=None,
        help="bench options choosing a smaller grid than the default suite, "
        "e.g. '--methods none,knorm --tasks passkey --samples 4' (recorded with the results)",
    )
    args = parser.parse_args()
    grid = QUICK if args.quick else (args.grid.split() if args.grid else [])  # [] = the default suite
    rounds = args.rounds or (1 if args.quick else 2)
    ray = ["--executor", "ray", "--actors", str(args.actors), "--actor-threads", str(args.actor_threads)]
    times: dict[str, list[float]] = {"serial": [], "ray": []}
    reference: dict[tuple, tuple] | None = None
    differ: dict[str, int] = {}
    units: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = ["serial", "ray"] if i % 2 == 0 else ["ray", "serial"]
            for name in order:
                out = Path(tmp) / f"{name}-{i}"
                seconds, unit_seconds = bench(out, grid, ray if name == "ray" else [])
                units = units or unit_seconds
                times[name].append(seconds)
                got = answers(out)
                reference = reference or got
                if got.keys() != reference.keys():
                    raise SystemExit(f"{name} run {i} wrote other rows than the first run")
                differ[f"{name}-{i}"] = sum(got[k] != reference[k] for k in got)
                print(
                    f"round {i} {name}: {seconds:.1f} s, {len(got)} rows, {differ[f'{name}-{i}']} differ from the "
                    "first run's",
                    flush=True,
                )
    best = {name: min(values) for name, values in times.items()}
    ratio = best["serial"] / best["ray"]
    print(f"best of {rounds}: serial {best['serial']:.1f} s, ray {best['ray']:.1f} s, speed-up {ratio:.2f}x")
    schedule = {n: makespan(units, n) for n in (1, 2, 4, 8)}
    if units:
        print(
            f"{len(units)} work units, {sum(units):.1f} s of unit time serially (longest {max(units):.1f} s); "
            "handed out in plan order: " + ", ".join(f"{n} workers {s:.1f} s" for n, s in schedule.items())
        )
    if args.quick:
        return
    record = {"grid": args.grid or "default suite", "rounds": rounds, "actors": args.actors,
              "actor_threads": args.actor_threads,
              "seconds": times, "best": best, "speedup": ratio, "rows": len(reference or {}), "rows_differing": differ,
              "unit_seconds": units, "schedule_seconds": schedule,
              "machine": f"{platform.processor() or platform.machine()}, {platform.system()}"}  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.save}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# {args.grid or 'The default suite'}: serial against Ray",
        "",
        f"{args.actors} Ray actors of {args.actor_threads} thread(s) each against one serial process (torch's "
        f"default threads); wall time end to end, {rounds} interleaved runs each, best shown.",
        "",
        "| executor | seconds (each run) | best |",
        "|---|---|---|",
        *(f"| {n} | {', '.join(f'{s:.1f}' for s in times[n])} | {best[n]:.1f} |" for n in times),
        "",
        f"Speed-up (best serial / best Ray): {ratio:.2f}x. Every run wrote the same {record['rows']} rows; rows "
        f"whose answer differs from the first run's: {differ}.",
        "",
        f"Work units of the first serial run: {len(units)}, {sum(units):.1f} s in all, the longest "
        f"{max(units, default=0):.1f} s. Handed out in plan order to whichever worker frees first (as the Ray "
        "executor does), at the serial run's per-unit speed: "
        + ", ".join(f"{n} worker(s) {t:.1f} s ({schedule[1] / t:.2f}x)" for n, t in schedule.items() if t)
        + ".",
    ]
    (RESULTS_DIR / f"{args.save}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
