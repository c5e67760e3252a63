"""Prefill + compression cost of each method relative to an uncompressed SDPA prefill (embedded SmolLM2-135M, CPU).

Every measurement runs in a fresh Python process (`--worker`): load the model, one short warm-up prefill, then one
timed prefill of `--tokens` context tokens (the bundled example text repeated). Methods and the baseline (plain
transformers SDPA prefill, DynamicCache, no kvsqueeze) alternate in pairs; each round visits the methods in a new
order and flips which of the pair runs first. Reported per method: median of the paired time ratios with min-max,
peak extra memory (VmHWM after the prefill minus VmRSS before it, the peak reset through /proc/self/clear_refs after
`malloc_trim` returned the warm-up's free heap to the OS) relative to the baseline's, and, as the noise floor, the
spread of the ratios between consecutive baseline runs.

The processes use glibc's default allocator settings, as a user's would. (Runs before 2026-11-23 set
MALLOC_MMAP_THRESHOLD_=131072, which made every allocation above 128 KiB a fresh mmap: each temporary was
page-faulted anew, which charged allocation-heavy scorers several seconds that users never pay.)

With glibc's defaults the peak also counts the heap's free holes, which vary from run to run by a hundred MiB or more.
`--live-memory` measures the memory actually in use instead: every allocation of 64 KiB or more is its own mapping,
returned to the OS when freed (MALLOC_MMAP_THRESHOLD_=65536), so the peak is that of live tensors, the same to about a
MiB on every run. Its times are not a user's (see above): read only its memory columns.

Run (about 20-25 minutes on 2 CPU cores at 4096 tokens, 5 rounds):
    .venv/bin/python benchmarks/prefill_cost.py --tokens 4096 --pairs 5
    .venv/bin/python benchmarks/prefill_cost.py --live-memory --pairs 2 --name prefill_cost_live
Results: benchmarks/results/prefill_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"
BASELINE = "sdpa"
# label -> (method name or None for kvsqueeze without compression, options); BASELINE is plain transformers
VARIANTS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "attach": (None, {}),
    "knorm": ("knorm", {}),
    "snapkv": ("snapkv", {}),
    "tova": ("tova", {}),
    "expected_attention": ("expected_attention", {}),
    "qfilters": ("qfilters", {}),  # calibrated beforehand (`kvsqueeze calibrate qfilters`); loading is warm-up
    "observed_attention": ("observed_attention", {}),
    "observed_attention_stride8": ("observed_attention", {"query_stride": 8}),
    "h2o": ("h2o", {}),
    "keyformer": ("keyformer", {}),
}
RATIO = 0.5
WARMUP = 256  # tokens of the warm-up prefill (SnapKV needs 2 x its window at ratio 0.5)
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # --live-memory: the peak of live allocations (see above)


# --- worker: one measurement in this (fresh) process -----------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak then includes its free heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _context_ids(tokenizer: Any, n: int) -> list[int]:
    example = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(example["context"] + "\n\n", add_special_tokens=False)["input_ids"]
    return ids[:n]


def worker(label: str, tokens: int, threads: int) -> dict[str, Any]:
    import torch

    import kvsqueeze as kvs
    from kvsqueeze.pipeline import prefill

    torch.set_num_threads(threads)
    model, tokenizer = kvs.load_model()
    name, options = (None, {}) if label == BASELINE else VARIANTS[label]
    method = kvs.get_method(name, ratio=RATIO, **options) if name is not None else None
    ids = torch.tensor([_context_ids(tokenizer, tokens)])
    mask = torch.ones_like(ids)

    def run(n: int) -> None:
        if label == BASELINE:
            with torch.no_grad():
                model(input_ids=ids[:, :n], attention_mask=mask[:, :n], use_cache=True, logits_to_keep=1)
        else:
            prefill(model, ids[:, :n], mask[:, :n], method)

    run(WARMUP)  # lazy initialisations of torch and the model
    _malloc_trim()  # the warm-up's freed heap back to the OS, so the peak below counts this prefill's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    run(tokens)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"label": label, "seconds": seconds, "peak_extra_mib": (peak - rss_before) / 1024, "repr": repr(method)}


# --- driver -----------------------------------------------------------------------------------------------------------


def measure(label: str, tokens: int, threads: int, env_extra: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", label, "--tokens", str(tokens), "--threads", str(threads)]
    env = {**os.environ, **ENV, **env_extra}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {label} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_all(labels: list[str], tokens: int, pairs: int, threads: int, seed: int, env: dict[str, str]) -> dict[str, Any]:
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    for r in range(pairs):
        order = labels[:]
        rng.shuffle(order)
        for label in order:
            first, second = (BASELINE, label) if r % 2 == 0 else (label, BASELINE)
            pair = {
                x["label"]: x for x in (measure(first, tokens, threads, env), measure(second, tokens, threads, env))
            }
            runs.append({"round": r, "label": label, "first": first, "method": pair[label], "baseline": pair[BASELINE]})
            m, b = pair[label], pair[BASELINE]
            ratio = m["seconds"] / b["seconds"]
            print(f"round {r} {label:28s} {m['seconds']:7.2f}s vs {b['seconds']:7.2f}s  ratio {ratio:.3f}  "
                  f"peak +{m['peak_extra_mib']:.0f} vs +{b['peak_extra_mib']:.0f} MiB", flush=True)  # fmt: skip
    rows = []
    for label in labels:
        mine = [x for x in runs if x["label"] == label]
        time_ratio = [x["method"]["seconds"] / x["baseline"]["seconds"] for x in mine]
        mem_ratio = [x["method"]["peak_extra_mib"] / max(x["baseline"]["peak_extra_mib"], 1e-9) for x in mine]
        rows.append({"label": label, "repr": mine[0]["method"]["repr"], "time_ratio": summary(time_ratio),
                     "peak_extra_mib": summary([x["method"]["peak_extra_mib"] for x in mine]),
                     "peak_ratio": summary(mem_ratio),
                     "seconds": summary([x["method"]["seconds"] for x in mine])})  # fmt: skip
    baselines = [x["baseline"] for x in runs]  # in run order
    noise = [b["seconds"] / a["seconds"] for a, b in itertools.pairwise(baselines)]
    return {"runs": runs, "rows": rows, "baseline": {
        "seconds": summary([b["seconds"] for b in baselines]),
        "peak_extra_mib": summary([b["peak_extra_mib"] for b in baselines]),
        "consecutive_ratio": summary(noise) if noise else None}}  # fmt: skip


def write(result: dict[str, Any], meta: dict[str, Any], name: str = "prefill_cost") -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    base = result["baseline"]

    def rng(s: dict[str, float], fmt: str = ".3f") -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    lines = [
        f"Prefill + compression of {meta['tokens']} tokens at ratio {RATIO}, {meta['model']}, CPU x{meta['threads']} "
        f"threads, {meta['pairs']} paired runs per method, each run in a fresh process.",
        f"Baseline `{BASELINE}` (transformers SDPA, no kvsqueeze): {rng(base['seconds'], '.2f')} s, peak extra "
        f"{rng(base['peak_extra_mib'], '.0f')} MiB; consecutive baseline/baseline time ratio: "
        + (rng(base["consecutive_ratio"]) if base["consecutive_ratio"] else "n/a (one run)")
        + ".",
        "",
        *(
            [
                "Live memory (`--live-memory`: MALLOC_MMAP_THRESHOLD_=65536): the peaks are those of live allocations; "
                "the times are not a user's (every large temporary is a fresh mapping).",
                "",
            ]
            if meta.get("live_memory")
            else []
        ),
        "| variant | time / baseline, median (min-max) | peak extra MiB | peak / baseline | method |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {rng(r['time_ratio'])} | {rng(r['peak_extra_mib'], '.0f')} | "
                     f"{rng(r['peak_ratio'], '.2f')} | `{r['repr']}` |")  # fmt: skip
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="prefill_cost", help="results file name (a subset run: a name of its own)")
    parser.add_argument("--live-memory", action="store_true", help="peak of live allocations (times are not a user's)")
    parser.add_argument("--worker", choices=[BASELINE, *VARIANTS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.threads)))
        return
    if args.tokens < WARMUP or args.pairs < 1:
        raise SystemExit(f"--tokens must be >= {WARMUP} and --pairs >= 1, got {args.tokens} and {args.pairs}")
    import torch
    import transformers

    env = LIVE_MEMORY_ENV if args.live_memory else {}
    result = run_all(args.methods, args.tokens, args.pairs, args.threads, args.seed, env)
    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32)", "tokens": args.tokens, "pairs": args.pairs,
            "ratio": RATIO, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "env": {**ENV, **env},
            "live_memory": args.live_memory}  # fmt: skip
    write(result, meta, args.name)


if __name__ == "__main__":
    main()
