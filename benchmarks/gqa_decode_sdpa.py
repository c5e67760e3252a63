"""One decode step's attention under grouped-query attention: PyTorch's SDPA with `enable_gqa` against the grouped
layout kvsqueeze runs (`kvsqueeze.attention.grouped_sdpa`: each KV head's query heads as the rows of one query).

A single new token of H_q query heads attends T cached slots of H_kv heads (float32, no mask, as transformers'
`sdpa_attention_forward` calls it when nothing is padded). Three ways:

    enable_gqa   F.scaled_dot_product_attention(query, key, value, enable_gqa=True)   (transformers, no mask)
    grouped      query viewed as (B, H_kv, H_q / H_kv, D) over the same keys
    repeated     keys and values repeated to H_q heads first (transformers' path when there is a mask)
    kvsqueeze    `grouped_sdpa`, which takes the grouped layout when its B x H_kv work items divide evenly over the
                 threads and enable_gqa otherwise

The shapes are SmolLM2-135M's (3 KV heads, 9 query heads, dim 64) and Llama-3.1-8B's (8, 32, 128) at a few lengths.
Each cell is the median of `--rounds` interleaved rounds of `--calls` calls (the best of 3 repeats per round), on
`--threads` threads. Run alone: `.venv/bin/python benchmarks/gqa_decode_sdpa.py` (about a minute); writes
benchmarks/results/gqa_decode_sdpa.{json,md} (`--name`: another name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from recorded import given_options, machine

from kvsqueeze.attention import grouped_sdpa

RESULTS = Path(__file__).parent / "results"
SHAPES = {"SmolLM2-135M": (3, 9, 64), "Llama-3.1-8B": (8, 32, 128)}


def variants(kv_heads: int, q_heads: int, dim: int, slots: int) -> dict[str, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    query = torch.randn(1, q_heads, 1, dim)
    key, value = torch.randn(1, kv_heads, slots, dim), torch.randn(1, kv_heads, slots, dim)
    groups = q_heads // kv_heads
    return {
        "enable_gqa": lambda: F.scaled_dot_product_attention(query, key, value, enable_gqa=True),
        "grouped": lambda: F.scaled_dot_product_attention(query.view(1, kv_heads, groups, dim), key, value).view(
            query.shape
        ),
        "kvsqueeze": lambda: grouped_sdpa(query, key, value, None, 0.0, None),
        "repeated": lambda: F.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2000,4123,8000", help="cached slots, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls timed per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--name", default="gqa_decode_sdpa", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for model, (kv_heads, q_heads, dim) in SHAPES.items():
        for slots in lengths:
            calls = variants(kv_heads, q_heads, dim, slots)
            reference = calls["enable_gqa"]()
            for call in calls.values():
                torch.testing.assert_close(call(), reference, atol=1e-5, rtol=1e-5)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    times[name].append(min(timeit.repeat(call, number=args.calls, repeat=3)) / args.calls * 1e6)
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"model": model, "kv_heads": kv_heads, "query_heads": q_heads, "dim": dim, "slots": slots,
                         "us": times, "median_us": medians})  # fmt: skip
            print(model, slots, {k: round(v) for k, v in medians.items()}, flush=True)
    ran_on = machine()
    lines = [
        "# One decode step's attention under GQA: SDPA with enable_gqa vs the grouped layout",
        "",
        f"One token, float32, no mask; median us per call over {args.rounds} interleaved rounds ({ran_on}). "
        f"Command: `.venv/bin/python benchmarks/gqa_decode_sdpa.py{given_options(parser, args)}`.",
        "",
        "| model shape | KV / query heads, dim | slots | enable_gqa | grouped | repeated | kvsqueeze "
        "| enable_gqa / grouped | kvsqueeze / enable_gqa |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["median_us"]
        ratio = m["enable_gqa"] / m["grouped"]
        lines.append(
            f"| {row['model']} | {row['kv_heads']} / {row['query_heads']}, {row['dim']} | {row['slots']} | "
            f"{m['enable_gqa']:.0f} | {m['grouped']:.0f} | {m['repeated']:.0f} | {m['kvsqueeze']:.0f} | {ratio:.2f}x | "
            f"{m['kvsqueeze'] / m['enable_gqa']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    out = RESULTS / args.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": ran_on, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
