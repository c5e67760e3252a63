"""One decoding step of one layer (its cache update and its attention): a ragged layer against a rectangular one
holding the same bytes, as a plain cache and as a fork of the context (`KVCache.fork`, what `generate` decodes from).

A layer shaped like one of SmolLM2-135M's (3 KV heads, head_dim 64, 9 query heads; `--kv-heads`, `--query-heads`,
`--dim` give other shapes: 8, 32, 128 are Llama-3.1-8B's) holds `--tokens` prefilled tokens, pruned to half per head
(rectangular) or to 1/4, 1, 1/4 of them (ragged: the same token-heads; with an even number of KV heads, 1/4 and 3/4
in turn); then `--steps` single-token steps each append a token and run kvsqueeze's SDPA attention over the layer, as
a decode step does. With `--layers N` a step goes through N such layers, each read again only after the others, so
its cache has left the CPU's caches as in a model (where the weights also stream through); with 1 it stays in them.

- plain: the layer itself decodes (a ragged layer's first single-token step turns it into rows reading their own
  segments as prefixes, `SharedStorage.decoding`, so it then decodes as a fork does; before 2026-12-04 it repacked
  its flat buffers and unpacked a rectangle at every step: 9.29x the rectangular step);
- fork: a one-row fork of the layer decodes: the context is read in place (a ragged one head by head from its
  segments, each head's in one call of the fused kernel that takes it as two halves) and the new tokens go to the
  fork's own dense suffix.

The variants run interleaved, `--rounds` times, on one thread (`--threads N`: N); the median ms per step and the
ratios are printed and saved. Run alone: `.venv/bin/python benchmarks/ragged_decode_step.py` (under a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from recorded import given_options, machine
from transformers import AttentionInterface

from kvsqueeze import step
from kvsqueeze.attention import implementation_name, register
from kvsqueeze.layer import KVLayer, StepTokens


class Shape(NamedTuple):
    kv_heads: int
    query_heads: int
    dim: int


SMOLLM2 = Shape(3, 9, 64)
RESULTS = Path(__file__).parent / "results"


def layer(tokens: int, counts: list[int], seed: int = 0, shape: Shape = SMOLLM2) -> KVLayer:
    """A layer of `shape` holding `tokens` random tokens, pruned to `counts` (one per KV head) of them."""
    torch.manual_seed(seed)
    out = KVLayer()
    out.query_positions = torch.arange(tokens)[None]
    h, d = shape.kv_heads, shape.dim
    out.update(torch.randn(1, h, tokens, d), torch.randn(1, h, tokens, d))
    out.finish_step()
    step.clear_updated()
    out.prune(torch.arange(max(counts)).expand(1, h, max(counts)).contiguous(), torch.tensor([counts]))
    out.query_positions = None
    return out


def ragged_counts(tokens: int, heads: int) -> list[int]:
    """Per-head counts holding as many token-heads as `tokens` // 2 per head: 1/4, 1, 1/4 of the tokens for 3 heads,
    else 1/4 and 3/4 in turn (an even number of heads)."""
    if heads == 3:
        return [tokens // 4, tokens, tokens // 4]
    if heads % 2:
        raise SystemExit(f"--kv-heads must be 3 or even, got {heads}")
    return [tokens // 4 if h % 2 == 0 else tokens - tokens // 4 for h in range(heads)]


def ms_per_step(targets: list[KVLayer], start: int, steps: int, shape: Shape = SMOLLM2) -> float:
    """Milliseconds per step of one layer: each step goes through every layer of `targets` once, as a model does."""
    attention = AttentionInterface()[implementation_name("sdpa")]
    module = torch.nn.Module().eval()
    query = torch.randn(1, shape.query_heads, 1, shape.dim)
    new = torch.randn(1, shape.kv_heads, 1, shape.dim)
    begin = time.perf_counter()
    for i in range(steps):
        tokens = StepTokens.of(torch.tensor([[start + i]]))  # once per step, as `KVCache.begin_step` does
        for target in targets:
            target.tokens = tokens
            keys, values = target.update(new, new)
            attention(module, query, keys, values, None, scaling=shape.dim**-0.5)
    return (time.perf_counter() - begin) / steps / len(targets) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000, help="prefilled tokens before pruning")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="layers a step goes through (30, as SmolLM2's: each layer's cache is cold when read again, as in a model, "
        "where the weights stream through between two reads; 1: it stays in cache)",
    )
    parser.add_argument("--kv-heads", type=int, default=SMOLLM2.kv_heads, help="KV heads (3, or an even number)")
    parser.add_argument("--query-heads", type=int, default=SMOLLM2.query_heads, help="query heads")
    parser.add_argument("--dim", type=int, default=SMOLLM2.dim, help="head dim")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--name", default="ragged_decode_step", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register()
    n, dims = args.tokens, Shape(args.kv_heads, args.query_heads, args.dim)
    if dims.query_heads % dims.kv_heads:
        raise SystemExit(f"--query-heads ({dims.query_heads}) must be a multiple of --kv-heads ({dims.kv_heads})")
    shapes = {"rectangular": [n // 2] * dims.kv_heads, "ragged": ragged_counts(n, dims.kv_heads)}
    kept = dims.kv_heads * (n // 2)
    times: dict[str, list[float]] = {f"{kind}, {shape}": [] for kind in ("plain", "fork") for shape in shapes}
    for _ in range(args.rounds):
        for shape, counts in shapes.items():
            contexts = [layer(n, counts, seed, dims) for seed in range(args.layers)]
            assert contexts[0].is_ragged == (shape == "ragged") and int(contexts[0].kept.sum()) == kept
            times[f"plain, {shape}"].append(ms_per_step(contexts, n, args.steps, dims))
            contexts = [layer(n, counts, seed, dims).fork([0]) for seed in range(args.layers)]
            times[f"fork, {shape}"].append(ms_per_step(contexts, n, args.steps, dims))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ran_on = machine()
    settings = {"tokens": n, "steps": args.steps, "rounds": args.rounds, "layers": args.layers}
    settings |= {"heads": dims.kv_heads, "query_heads": dims.query_heads, "dim": dims.dim, "machine": ran_on}
    result = {
        "settings": settings,
        "ms_per_step": times,
        "median_ms": medians,
        "ragged_over_rectangular": {
            k: medians[f"{k}, ragged"] / medians[f"{k}, rectangular"] for k in ("plain", "fork")
        },
        "fork_over_plain": {s: medians[f"fork, {s}"] / medians[f"plain, {s}"] for s in shapes},
    }
    command = given_options(parser, args)  # so the results name the command that reproduces them
    lines = [
        "# One decode step of one layer: ragged vs rectangular at equal bytes",
        "",
        f"{n} tokens prefilled, {kept} token-heads kept ({dims.kv_heads} KV heads x {dims.dim}, {dims.query_heads} "
        f"query heads): rectangular "
        f"{shapes['rectangular']}, ragged {shapes['ragged']}; {args.steps} steps of update + kvsqueeze SDPA "
        f"attention, each step through {args.layers} layer(s) of that shape (times per layer), {args.rounds} "
        f"interleaved rounds ({result['settings']['machine']}). Command: `.venv/bin/python "
        f"benchmarks/ragged_decode_step.py{command}`.",
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
    out = RESULTS / args.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
