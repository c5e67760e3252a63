"""Peak memory of chunked vs one-shot prefill on a long context with the embedded SmolLM2-135M model.

For each method (none, knorm, snapkv at --ratio) and chunking (one shot, then each --chunks size), a fresh process
prefills the same ~7k-token context and reports:
* peak KV bytes, tracked by the cache itself (the pass/fail figure): chunked prefill must never hold more than the
  budget of every layer plus one chunk in one layer, i.e. (L * floor(n (1 - r)) + chunk) * bytes per token-layer;
* peak process RSS (ru_maxrss, reported, not checked): the model (touched by a short warm-up forward first), the
  activations and the allocator's slack; "RSS before prefill" is the same figure after the warm-up;
* prefill seconds (compression included).
Each configuration runs in its own process so ru_maxrss (a lifetime maximum) belongs to that configuration only.

Run (about 2-4 minutes on 2 CPU cores):
    PYTHONPATH=src .venv/bin/python benchmarks/chunked_prefill.py
Smoke test: ... --tokens 600 --chunks 128 --out /tmp/chunked
Results: benchmarks/results/chunked_prefill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results"


def context_ids(tokenizer: Any, n: int) -> list[int]:
    """Exactly n token ids of prose: the bundled example document repeated."""
    text = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())["context"]
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
    return ids[:n]


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import torch

    import kvsqueeze as kvs
    from kvsqueeze.pipeline import prefill

    torch.set_num_threads(config["threads"])
    model, tokenizer = kvs.load_model()
    ids = torch.tensor([context_ids(tokenizer, config["tokens"])])
    method = None if config["method"] == "none" else kvs.get_method(config["method"], ratio=config["ratio"])
    with torch.no_grad():
        model(ids[:, :8])  # touch the (memory-mapped) weights, so RSS before the prefill includes the model
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    cache, seconds, compress_s, _ = prefill(model, ids, torch.ones_like(ids), method, config["chunk"])
    wall = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = kvs.cache_stats(cache)
    adapter = kvs.get_adapter(model)
    per_token_layer = 2 * adapter.n_kv_heads * adapter.head_dim * next(model.parameters()).element_size()
    n, layers = config["tokens"], len(adapter.full_layers)
    kept = n if method is None else math.floor(n * (1 - config["ratio"]))
    bound = (layers * kept + (config["chunk"] or n)) * per_token_layer  # budget everywhere + one chunk in one layer
    return {
        **config,
        "repr": repr(method),
        "kv_bytes_after": stats.kv_bytes,
        "peak_kv_bytes": stats.peak_kv_bytes,
        "bound_bytes": bound,
        "within_bound": stats.peak_kv_bytes <= bound,
        "uncompressed_kv_bytes": layers * n * per_token_layer,
        "rss_before_prefill": rss_before,
        "peak_rss": rss_peak,
        "prefill_seconds": seconds,
        "compression_seconds": compress_s,
        "wall_seconds": wall,
    }


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunked_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"Chunked vs one-shot prefill of {meta['tokens']} tokens, {meta['model']}, CPU x{meta['threads']} threads. "
        "Peak KV = most keys+values bytes the cache held at once (its own tracker); bound = every layer at its budget "
        "plus one chunk in one layer; peak RSS = the process's maximum resident memory (model included).",
        "",
        "| method | ratio | chunk | KV after (MiB) | peak KV (MiB) | bound (MiB) | within bound | peak RSS (MiB) "
        "| RSS before prefill (MiB) | prefill s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio'] if r['method'] != 'none' else '-'} | {r['chunk'] or 'one shot'} "
            f"| {_mib(r['kv_bytes_after'])} | {_mib(r['peak_kv_bytes'])} | {_mib(r['bound_bytes'])} "
            f"| {'yes' if r['within_bound'] else 'NO'} | {_mib(r['peak_rss'])} | {_mib(r['rss_before_prefill'])} "
            f"| {r['prefill_seconds']:.2f} |"
        )
    (out / "chunked_prefill.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=7000, help="context length (the model's maximum is 8192)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--methods", nargs="+", default=["none", "knorm", "snapkv"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch
    import transformers

    rows = []
    for method in args.methods:
        for chunk in [None, *args.chunks]:
            config = {"method": method, "ratio": args.ratio, "chunk": chunk, "tokens": args.tokens}
            row = run_child({**config, "threads": args.threads})
            rows.append(row)
            print(
                f"{method:14s} chunk {chunk or '-':>5}  peak KV {_mib(row['peak_kv_bytes'])} MiB "
                f"(bound {_mib(row['bound_bytes'])}, {'ok' if row['within_bound'] else 'EXCEEDED'})  "
                f"peak RSS {_mib(row['peak_rss'])} MiB  prefill {row['prefill_seconds']:.2f} s",
                flush=True,
            )
    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32)", "tokens": args.tokens, "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine()}  # fmt: skip
    write(rows, meta, args.out)
    failed = [r for r in rows if r["chunk"] and r["method"] != "none" and not r["within_bound"]]
    if failed:
        sys.exit(f"{len(failed)} chunked configuration(s) exceeded budget + one chunk")


if __name__ == "__main__":
    main()
