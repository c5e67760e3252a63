"""Attention of one decode step over a ragged prefix by matrix products: head by head (what `prefix_attention` does
where its fused kernel does not run: soft-capped layers, thin keys, a head holding under two slots, other devices)
against ways of batching the heads, and all against a rectangular prefix holding the same bytes.

A ragged prefix keeps a different number of tokens per KV head, each head's keys and values one segment of a flat
buffer. The products attend it head by head: per head one product for the logits and one softmax over the head's own
slots and the prefix's (in place, in one logits buffer), then one product for every head's own slots and one per head
with the prefix's values. The batched variants tried here:

- grouped_mm: one grouped product over the flat keys for every head's logits, a gather into a padded (rows, heads,
  width) block so that one softmax serves all heads, a gather back and one grouped product over the flat values;
- one product: every head's queries against the whole flat buffer in one product, the other heads' segments masked
  by a constant mask (H_kv times the products' work, in a fixed number of calls);
- halves: head by head, each segment read as a batch of its two halves (a view, no copy), so that one call has two
  items for two threads to share.

All compute exactly the same attention (checked before timing). The rectangular core is the same computation over
equal segments with batched products, the floor a ragged layer is compared against.

Run alone (about 15 seconds per thread count): `.venv/bin/python benchmarks/ragged_head_batching.py` (one thread;
`--threads 2 --name ragged_head_batching_2threads` for two). Writes benchmarks/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from recorded import given_options, machine
from torch import Tensor

from kvsqueeze.storage.shared import halves

RESULTS = Path(__file__).parent / "results"
GROUPS, OWN, DIM = 3, 24, 64  # query heads per KV head, the row's own slots (its question and answer so far), head dim
LAYOUTS = {3: [1000, 4000, 1000], 8: [400, 1600, 800, 3000, 200, 1200, 600, 2200]}


def head_by_head(queries: Tensor, heads: list[tuple[Tensor, Tensor]], own_logits: Tensor, own_values: Tensor) -> Tensor:
    """queries (H, G, D) scaled; heads: each head's (keys (L_h, D), values (L_h, D)); own logits (H, G, S) and values
    (H, S, D) -> (H, G, D)."""
    h, g, _ = queries.shape
    s = own_logits.shape[-1]
    logits = queries.new_empty(h, g, s + max(k.shape[0] for k, _ in heads))
    logits[:, :, :s] = own_logits
    for q_h, logits_h, (keys, _) in zip(queries, logits, heads, strict=True):
        used = logits_h[:, : s + keys.shape[0]]
        torch.mm(q_h, keys.T, out=used[:, s:])
        torch.softmax(used, dim=-1, out=used)
    out = torch.bmm(logits[:, :, :s], own_values)
    for out_h, logits_h, (keys, values) in zip(out, logits, heads, strict=True):
        out_h.addmm_(logits_h[:, s : s + keys.shape[0]], values)
    return out


def by_halves(queries: Tensor, heads: list[tuple[Tensor, Tensor]], own_logits: Tensor, own_values: Tensor) -> Tensor:
    """`head_by_head` with each segment taken as a batch of its two halves (the middle row of an odd one masked in the
    second)."""
    h, g, d = queries.shape
    s = own_logits.shape[-1]
    splits = [halves(keys, values) for keys, values in heads]  # views (1, 2, c, D)
    halves_of = [split.keys.shape[2] for split in splits]
    logits = queries.new_empty(h, g, s + 2 * max(halves_of))
    logits[:, :, :s] = own_logits
    for q_h, logits_h, (keys, _), split, c in zip(queries, logits, heads, splits, halves_of, strict=True):
        used = logits_h[:, : s + 2 * c]
        both = torch.bmm(q_h.expand(2, g, d), split.keys[0].transpose(1, 2))  # (2, G, c)
        used[:, s:] = both.transpose(0, 1).reshape(g, 2 * c)
        if keys.shape[0] % 2:
            used[:, s + c] = float("-inf")
        torch.softmax(used, dim=-1, out=used)
    out = torch.bmm(logits[:, :, :s], own_values)
    for out_h, logits_h, split, c in zip(out, logits, splits, halves_of, strict=True):
        weights = logits_h[:, s : s + 2 * c].view(g, 2, c).transpose(0, 1)
        out_h.add_(torch.bmm(weights, split.values[0]).sum(dim=0))
    return out


class OneProduct:
    """Every head's queries against the whole flat buffer, the other heads' segments masked (a constant mask)."""

    def __init__(self, lengths: list[int]) -> None:
        head_of_slot = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        head_of_row = torch.arange(len(lengths)).repeat_interleave(GROUPS)
        self.mask = torch.zeros(len(head_of_row), len(head_of_slot))
        self.mask.masked_fill_(head_of_row[:, None] != head_of_slot[None, :], float("-inf"))

    def attend(self, queries: Tensor, keys: Tensor, values: Tensor, own_logits: Tensor, own_values: Tensor) -> Tensor:
        h, g, d = queries.shape
        s = own_logits.shape[-1]
        logits = queries.new_empty(h * g, s + keys.shape[0])
        logits[:, :s] = own_logits.reshape(h * g, s)
        torch.addmm(self.mask, queries.reshape(h * g, d), keys.T, out=logits[:, s:])
        torch.softmax(logits, dim=-1, out=logits)
        out = torch.mm(logits[:, s:], values).view(h, g, -1)
        return out.baddbmm_(logits[:, :s].view(h, g, s), own_values)


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
    batched, one = Batched(lengths), OneProduct(lengths)
    runs = {
        "head by head": lambda: head_by_head(queries, segments, own_logits, own_values),
        "grouped_mm": lambda: batched.attend(queries, keys, values, own_logits, own_values),
        "one product": lambda: one.attend(queries, keys, values, own_logits, own_values),
        "halves": lambda: by_halves(queries, segments, own_logits, own_values),
        "rectangular, same bytes": lambda: rectangular(queries, rect_keys, rect_values, own_logits, own_values),
    }
    for name in ("grouped_mm", "one product", "halves"):
        torch.testing.assert_close(runs[name](), runs["head by head"](), rtol=1e-5, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, run in runs.items():
            times[name].append(microseconds(run))
    return {"lengths": lengths, "us": times, "median_us": {n: statistics.median(t) for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--name", default="ragged_head_batching", help="results file name (in benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {str(heads): measure(heads, lengths) for heads, lengths in LAYOUTS.items()}
    ran_on = machine()
    given = given_options(parser, args)
    names = list(next(iter(result.values()))["median_us"])  # type: ignore[call-overload]
    lines = [
        "# A ragged prefix's attention: head by head against batched variants",
        "",
        f"One decode step's attention core ({GROUPS} query heads per KV head, {OWN} own slots, head dim {DIM}; "
        f"{ran_on}; median of 5 interleaved rounds of 500 calls). "
        f"Command: `.venv/bin/python benchmarks/ragged_head_batching.py{given}`.",
        "",
        "| KV heads | tokens per head | " + " | ".join(f"{n} (us)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for count, row in result.items():
        m = row["median_us"]
        assert isinstance(m, dict)
        lines.append(f"| {count} | {row['lengths']} | " + " | ".join(f"{m[n]:.1f}" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    out = RESULTS / args.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": ran_on, "layouts": result}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
