"""How long each calibrated or learned method takes to calibrate on the embedded model, from scratch.

For every registered method whose `needs` include "calibration", build it with its default options and time
`method.calibrate(model, tokenizer, force=True)`: wall clock and process CPU time, recomputed even when the
calibration cache already holds the artifact (which every later run then reuses). One process, the model loaded once
(its load is timed separately).

Run (minutes on 2 CPU cores):
    .venv/bin/python benchmarks/calibration_times.py
Results: benchmarks/results/calibration_times.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import kvsqueeze as kvs
from kvsqueeze.methods import METHODS

OUT = Path(__file__).parent / "results"


def calibrated_methods() -> list[str]:
    return [name for name in kvs.list_methods() if "calibration" in METHODS.get(name).needs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: every calibrated method)")
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else calibrated_methods()
    start = time.perf_counter()
    model, tokenizer = kvs.load_model()
    load_s = time.perf_counter() - start
    rows = []
    for name in names:
        method = kvs.get_method(name, ratio=0.5)
        t0, c0 = time.perf_counter(), time.process_time()
        path = method.calibrate(model, tokenizer, force=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = path.stat().st_size if path is not None and path.is_file() else None
        rows.append({"method": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                     "artifact": str(path) if path else None,
                     "artifact_bytes": size})  # fmt: skip
        print(f"{name:32s} {seconds:8.1f} s wall {cpu:8.1f} s CPU  {path}", flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (embedded)", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "model_load_seconds": round(load_s, 2), "kvsqueeze": kvs.__version__,
            "torch": torch.__version__}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "calibration_times.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Calibration from scratch on SmolLM2-135M-Instruct (embedded), CPU x{meta['threads']} threads "
        f"(`python benchmarks/calibration_times.py`; model load {load_s:.1f} s, not included).",
        "",
        "| method | wall (s) | CPU, all threads (s) | artifact size |",
        "|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['artifact_bytes'] / 1024:.1f} KiB" if r["artifact_bytes"] else "-"
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {size} |")
    (OUT / "calibration_times.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
