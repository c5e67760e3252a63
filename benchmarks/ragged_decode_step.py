"""One decoding step of one layer (its cache update and its attention): a ragged layer against a rectangular one
holding the same bytes, as a plain cache and as a fork of the context (`KVCache.fork`, what `generate` decodes from).

A layer shaped like one of SmolLM2-135M's (3 KV heads, head_dim 64, 9 query heads) holds `--tokens` prefilled tokens,
pruned to half per head (rectangular) or to 1/4, 1, 1/4 of them (ragged: the same token-heads); then `--steps`
single-token steps each append a token and run kvsqueeze's SDPA attention over the layer, as a decode step does.

- plain: the layer itself decodes (a ragged layer's first single-token step turns it into rows reading their own
  segments as prefixes, `SharedStorage.decoding`, so it then decodes as a fork does; before 2026-12-04 it repacked
  its flat buffers and unpacked a rectangle at every step: 9.29x the rectangular step);
- fork: a one-row fork of the layer decodes: the context is read in place (a ragged one head by head from its
  segments) and the new tokens go to the fork's own dense suffix.

The variants run interleaved, `--rounds` times, on one thread; the median ms per step and the ratios are printed and
saved. Run alone: `.venv/bin/python benchmarks/ragged_decode_step.py` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface

from kvsqueeze import step
from kvsqueeze.attention import implementation_name, register
from kvsqueeze.cache import KVLayer

HEADS, QUERY_HEADS, DIM = 3, 9, 64
OUT = Path(__file__).parent / "results" / "ragged_decode_step"


def layer(tokens: int, counts: list[int]) -> KVLayer:
    torch.manual_seed(0)
    out = KVLayer()
    out.query_positions = torch.arange(tokens)[None]
    out.update(torch.randn(1, HEADS, tokens, DIM), torch.randn(1, HEADS, tokens, DIM))
    out.finish_step()
    step.clear_updated()
    out.prune(torch.arange(max(counts)).expand(1, HEADS, max(counts)).contiguous(), torch.tensor([counts]))
    out.query_positions = None
    return out


def ms_per_step(target: KVLayer, start: int, steps: int) -> float:
    attention = AttentionInterface()[implementation_name("sdpa")]
    module = torch.nn.Module().eval()
    query = torch.randn(1, QUERY_HEADS, 1, DIM)
    begin = time.perf_counter()
    for i in range(steps):
        target.query_positions = torch.tensor([[start + i]])
        keys, values = target.update(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM))
        attention(module, query, keys, values, None, scaling=DIM**-0.5)
    return (time.perf_counter() - begin) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000, help="prefilled tokens before pruning")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register()
    n = args.tokens
    shapes = {"rectangular": [n // 2] * 3, "ragged": [n // 4, n, n // 4]}
    times: dict[str, list[float]] = {f"{kind}, {shape}": [] for kind in ("plain", "fork") for shape in shapes}
    for _ in range(args.rounds):
        for shape, counts in shapes.items():
            context = layer(n, counts)
            assert context.is_ragged == (shape == "ragged") and int(context.kept.sum()) == 3 * n // 2
            times[f"plain, {shape}"].append(ms_per_step(context, n, args.steps))
            context = layer(n, counts)
            times[f"fork, {shape}"].append(ms_per_step(context.fork([0]), n, args.steps))
    medians = {name: statistics.median(t) for name, t in times.items()}
    machine = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    settings = {"tokens": n, "steps": args.steps, "rounds": args.rounds, "heads": HEADS, "dim": DIM, "machine": machine}
    result = {
        "settings": settings,
        "ms_per_step": times,
        "median_ms": medians,
        "ragged_over_rectangular": {
            k: medians[f"{k}, ragged"] / medians[f"{k}, rectangular"] for k in ("plain", "fork")
        },
        "fork_over_plain": {s: medians[f"fork, {s}"] / medians[f"plain, {s}"] for s in shapes},
    }
    lines = [
        "# One decode step of one layer: ragged vs rectangular at equal bytes",
        "",
        f"{n} tokens prefilled, {3 * n // 2} token-heads kept ({HEADS} KV heads x {DIM}): rectangular "
        f"{shapes['rectangular']}, ragged {shapes['ragged']}; {args.steps} steps of update + kvsqueeze SDPA "
        f"attention, {args.rounds} interleaved rounds, 1 thread ({result['settings']['machine']}). "
        "Command: `.venv/bin/python benchmarks/ragged_decode_step.py`.",
        "",
        "| cache | layout | median ms per step | min | max |",
        "|---|---|---|---|---|",
    ]
    for name, t in times.items():
        kind, shape = name.split(", ")
        lines.append(f"| {kind} | {shape} | {medians[name]:.3f} | {min(t):.3f} | {max(t):.3f} |")
    lines += [""]
    for kind, ratio in result["ragged_over_rectangular"].items():
        lines.append(f"- {kind}: ragged / rectangular = {ratio:.2f}x")
    for shape, ratio in result["fork_over_plain"].items():
        lines.append(f"- {shape}: fork / plain = {ratio:.2f}x")
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
