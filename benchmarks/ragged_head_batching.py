"""Attention of one decode step over a ragged prefix: head by head (what `prefix_attention` does) against the heads
batched by `torch.nn.functional.grouped_mm`, and both against a rectangular prefix holding the same bytes.

A ragged prefix keeps a different number of tokens per KV head, each head's keys and values one segment of a flat
buffer. `prefix_attention` attends it head by head: per head one product for the logits, one softmax over the head's
own slots and the prefix's, one product with the values. The batched variant tried here replaces the per-head calls
by a fixed number: one grouped product over the flat keys for every head's logits, a gather into a padded
(rows, heads, width) block so that one softmax serves all heads, a gather back and one grouped product over the flat
values. Both compute exactly the same attention (checked before timing). The rectangular core is the same
computation over equal segments with batched products, the floor a ragged layer is compared against.

Run alone (one thread; about a minute): `.venv/bin/python benchmarks/ragged_head_batching.py`. Writes
benchmarks/results/ragged_head_batching.{md,json}.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from recorded import machine
from torch import Tensor

OUT = Path(__file__).parent / "results" / "ragged_head_batching"
GROUPS, OWN, DIM = 3, 24, 64  # query heads per KV head, the row's own slots (its question and answer so far), head dim
LAYOUTS = {3: [1000, 4000, 1000], 8: [400, 1600, 800, 3000, 200, 1200, 600, 2200]}


def head_by_head(queries: Tensor, heads: list[tuple[Tensor, Tensor]], own_logits: Tensor, own_values: Tensor) -> Tensor:
    """queries (H, G, D) scaled; heads: each head's (keys (L_h, D), values (L_h, D)); own logits (H, G, S) and values
    (H, S, D) -> (H, G, D)."""
    h, g, _ = queries.shape
    s = own_logits.shape[-1]
    logits = queries.new_empty(h, g, s + max(k.shape[0] for k, _ in heads))
    logits[:, :, :s] = own_logits
    outs = []
    for q_h, logits_h, values_h, (keys, values) in zip(queries, logits, own_values, heads, strict=True):
        end = s + keys.shape[0]
        torch.mm(q_h, keys.T, out=logits_h[:, s:end])
        weights = torch.softmax(logits_h[:, :end], dim=-1)
        outs.append(torch.mm(weights[:, :s], values_h).addmm_(weights[:, s:], values))
    return torch.stack(outs)


class Batched:
    """The gathers that batch a ragged prefix of these lengths, computed once."""

    def __init__(self, lengths: list[int]) -> None:
        width, total = max(lengths), sum(lengths)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        column = torch.arange(width)
        self.ends = torch.tensor(lengths).cumsum(0).to(torch.int32)
        self.padded = torch.stack([(start + column).clamp(max=total - 1) for start in starts]).flatten()
        self.empty = torch.stack([column >= n for n in lengths])  # (H, W): past a head's length
        self.flat = torch.cat([i * width + torch.arange(n) for i, n in enumerate(lengths)])
        self.width = width

    def attend(self, queries: Tensor, keys: Tensor, values: Tensor, own_logits: Tensor, own_values: Tensor) -> Tensor:
        h, g, _ = queries.shape
        s = own_logits.shape[-1]
        prefix = F.grouped_mm(queries, keys.T, offs=self.ends)  # (G, T): head h's queries against its segment
        padded = prefix.index_select(1, self.padded).view(g, h, self.width).masked_fill_(self.empty, float("-inf"))
        weights = torch.softmax(torch.cat([own_logits.transpose(0, 1), padded], dim=-1), dim=-1)  # (G, H, S + W)
        flat = weights[:, :, s:].reshape(g, h * self.width).index_select(1, self.flat)  # (G, T)
        out = F.grouped_mm(flat, values, offs=self.ends)  # (H, G, D)
        return out.add_(torch.bmm(weights[:, :, :s].transpose(0, 1), own_values))


def rectangular(queries: Tensor, keys: Tensor, values: Tensor, own_logits: Tensor, own_values: Tensor) -> Tensor:
    """The same over equal segments (keys, values (H, L, D)), batched."""
    s = own_logits.shape[-1]
    logits = queries.new_empty(*own_logits.shape[:2], s + keys.shape[1])
    logits[:, :, :s] = own_logits
    torch.bmm(queries, keys.transpose(1, 2), out=logits[:, :, s:])
    weights = torch.softmax(logits, dim=-1)
    return torch.bmm(weights[:, :, :s], own_values).baddbmm_(weights[:, :, s:], values)


def microseconds(run: Callable[[], Tensor], calls: int = 500) -> float:
    for _ in range(50):
        run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e6


def measure(heads: int, lengths: list[int]) -> dict[str, object]:
    """The three variants on one layout, checked equal, then timed in 5 interleaved rounds."""
    total = sum(lengths)
    keys, values = torch.randn(total, DIM), torch.randn(total, DIM)
    starts = [sum(lengths[:i]) for i in range(heads)]
    segments = [(keys[a : a + n], values[a : a + n]) for a, n in zip(starts, lengths, strict=True)]
    queries = torch.randn(heads, GROUPS, DIM) * DIM**-0.5
    own_logits = torch.bmm(queries, torch.randn(heads, OWN, DIM).transpose(1, 2))
    own_values = torch.randn(heads, OWN, DIM)
    rect_keys, rect_values = torch.randn(heads, total // heads, DIM), torch.randn(heads, total // heads, DIM)
    batched = Batched(lengths)
    runs = {
        "head by head": lambda: head_by_head(queries, segments, own_logits, own_values),
        "grouped_mm": lambda: batched.attend(queries, keys, values, own_logits, own_values),
        "rectangular": lambda: rectangular(queries, rect_keys, rect_values, own_logits, own_values),
    }
    torch.testing.assert_close(runs["grouped_mm"](), runs["head by head"](), rtol=1e-5, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, run in runs.items():
            times[name].append(microseconds(run))
    return {"lengths": lengths, "us": times, "median_us": {n: statistics.median(t) for n, t in times.items()}}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {str(heads): measure(heads, lengths) for heads, lengths in LAYOUTS.items()}
    ran_on = machine()
    lines = [
        "# A ragged prefix's attention: head by head against grouped_mm",
        "",
        f"One decode step's attention core ({GROUPS} query heads per KV head, {OWN} own slots, head dim {DIM}; "
        f"{ran_on}; median of 5 interleaved rounds of 500 calls). "
        "Command: `.venv/bin/python benchmarks/ragged_head_batching.py`.",
        "",
        "| KV heads | tokens per head | head by head (us) | grouped_mm (us) | rectangular, same bytes (us) |",
        "|---|---|---|---|---|",
    ]
    for count, row in result.items():
        m = row["median_us"]
        assert isinstance(m, dict)
        lines.append(f"| {count} | {row['lengths']} | {m['head by head']:.1f} | {m['grouped_mm']:.1f} | "
                     f"{m['rectangular']:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({"machine": ran_on, "layouts": result}, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
