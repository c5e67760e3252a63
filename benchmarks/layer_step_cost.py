"""What one decode step costs per layer: kvsqueeze's cache layer and attention against transformers' own.

transformers' path is what `model.generate` runs on each layer: `DynamicLayer.update` (which copies the layer's keys
and values into a new tensor with `torch.cat`) and its SDPA attention function. kvsqueeze's is `KVLayer.update` and
its SDPA attention function, on the layer itself ("plain") and on a one-row fork of it ("fork", what `generate` and
the server decode from: the context read in place, the new tokens in the fork's own slots). Every layer holds as
many uncompressed tokens as one of `--lengths`, in SmolLM2-135M's shape (3 KV heads, 9 query heads, head_dim 64); a
step goes through `--layers` such layers, each read again only after the others, so its data has left the CPU's
caches as in a model.

At a few tokens the figure is the fixed per-layer cost (bookkeeping, mask, kernel calls), which a model pays in every
layer at every step whatever the context; at thousands, the attention's memory traffic. The paths run interleaved,
`--rounds` times, with torch's default threads (a model's decode uses them too). Run alone:
`.venv/bin/python benchmarks/layer_step_cost.py` (about a minute); writes benchmarks/results/layer_step_cost.{md,json}
(`--name`: another name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ragged_decode_step import SMOLLM2, layer, ms_per_step
from recorded import given_options, machine
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsqueeze.attention import register

RESULTS = Path(__file__).parent / "results"
PATHS = ("transformers", "kvsqueeze plain", "kvsqueeze fork")


def transformers_ms(tokens: int, layers: int, steps: int) -> float:
    """Milliseconds per step of one layer on transformers' path (a DynamicLayer per layer, prefilled with `tokens`)."""
    h, hq, d = SMOLLM2
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = hq // h, True  # what transformers' attention reads off a layer
    caches = []
    for seed in range(layers):
        torch.manual_seed(seed)
        cache = DynamicLayer()
        cache.update(torch.randn(1, h, tokens, d), torch.randn(1, h, tokens, d))
        caches.append(cache)
    query, new = torch.randn(1, hq, 1, d), torch.randn(1, h, 1, d)
    begin = time.perf_counter()
    for _ in range(steps):
        for cache in caches:
            keys, values = cache.update(new, new)
            sdpa_attention_forward(module, query, keys, values, None, scaling=d**-0.5)
    return (time.perf_counter() - begin) / steps / layers * 1e3


def kvsqueeze_ms(tokens: int, layers: int, steps: int, fork: bool) -> float:
    contexts = [layer(tokens, [tokens] * SMOLLM2.kv_heads, seed) for seed in range(layers)]
    return ms_per_step([c.fork([0]) for c in contexts] if fork else contexts, tokens, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="64,1024,4096", help="tokens each layer holds, comma-separated")
    parser.add_argument("--layers", type=int, default=30, help="layers a step goes through (SmolLM2's 30)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--name", default="layer_step_cost", help="results file name in benchmarks/results")
    args = parser.parse_args()
    register()
    lengths = [int(n) for n in args.lengths.split(",")]
    runs: dict[str, Callable[[int], float]] = {
        "transformers": lambda n: transformers_ms(n, args.layers, args.steps),
        "kvsqueeze plain": lambda n: kvsqueeze_ms(n, args.layers, args.steps, fork=False),
        "kvsqueeze fork": lambda n: kvsqueeze_ms(n, args.layers, args.steps, fork=True),
    }
    times: dict[str, dict[str, list[float]]] = {str(n): {path: [] for path in PATHS} for n in lengths}
    for i in range(args.rounds):
        for n in lengths:
            for path in PATHS[i % 3 :] + PATHS[: i % 3]:  # a different path first in each round
                times[str(n)][path].append(runs[path](n) * 1e3)
                print(f"round {i} {n} {path}: {times[str(n)][path][-1]:.1f} us", flush=True)
    medians = {n: {path: statistics.median(t) for path, t in by_path.items()} for n, by_path in times.items()}
    changed, ran_on = given_options(parser, args), machine()
    lines = [
        "# A decode step's cost per layer: kvsqueeze against transformers",
        "",
        f"Update + SDPA attention of one layer (3 KV heads, 9 query heads, head_dim 64), uncompressed, one new token; "
        f"each step through {args.layers} layers, {args.steps} steps, {args.rounds} interleaved rounds, medians in "
        f"microseconds per layer and step ({ran_on}). Command: `.venv/bin/python benchmarks/layer_step_cost.py"
        f"{changed}`.",
        "",
        "| tokens per layer | transformers (us) | kvsqueeze plain (us) | kvsqueeze fork (us) | plain / transformers "
        "| fork / transformers |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in medians.items():
        tf = m["transformers"]
        lines.append(f"| {n} | {tf:.1f} | {m['kvsqueeze plain']:.1f} | {m['kvsqueeze fork']:.1f} | "
                     f"{m['kvsqueeze plain'] / tf:.2f} | {m['kvsqueeze fork'] / tf:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = RESULTS / args.name
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"layers": args.layers, "steps": args.steps, "rounds": args.rounds, "machine": ran_on}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "us": times}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
