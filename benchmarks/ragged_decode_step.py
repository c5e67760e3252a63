"""Cost of one decoding step's cache update for a ragged layer vs a rectangular one (CPU micro-benchmark).

A layer shaped like one of SmolLM2-135M's (3 KV heads, head_dim 64) holds 1,000 prefilled tokens, pruned to 500 per
head (rectangular) or to 300/900/300 (ragged, the same 1,500 token-heads); then 200 single-token steps append to it.
The ragged step builds the transient rectangular tensors attention reads and repacks the flat buffers.
Run: `.venv/bin/python benchmarks/ragged_decode_step.py` (a few seconds).
"""

from __future__ import annotations

import time

import torch

from kvsqueeze import step
from kvsqueeze.cache import KVLayer

STEPS = 200


def layer(counts: list[int]) -> KVLayer:
    torch.manual_seed(0)
    out = KVLayer()
    out.query_positions = torch.arange(1000)[None]
    out.update(torch.randn(1, 3, 1000, 64), torch.randn(1, 3, 1000, 64))
    out.finish_step()
    step.clear_updated()
    out.prune(torch.arange(max(counts)).expand(1, 3, max(counts)).contiguous(), torch.tensor([counts]))
    return out


def ms_per_step(target: KVLayer) -> float:
    start = time.perf_counter()
    for i in range(STEPS):
        target.query_positions = torch.tensor([[1000 + i]])
        target.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
        target.finish_step()
        step.clear_updated()
    return (time.perf_counter() - start) / STEPS * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for name, counts in (("rectangular 500/500/500", [500, 500, 500]), ("ragged 300/900/300", [300, 900, 300])):
        target = layer(counts)
        print(f"{name:24s} {ms_per_step(target):.2f} ms per step (one layer), ragged={target.is_ragged}")


if __name__ == "__main__":
    main()
