"""LagKV: score tokens against the next ("lag") partition (Liang et al. 2025, arXiv 2504.04704).

After `n_sink` sink tokens, a row's positions are cut into partitions of `partition_size` tokens. Partition j is
judged by the partition after it: its keys are min-max normalized per channel with partition j+1's per-channel
minimum and maximum, a token's key score is the standard deviation of its normalized key over channels, turned into
a distribution by a softmax inside the partition; values get the same treatment and the score is the mean of the key
and value scores. Attention weights are never needed.

Protected (kept, counted in the budget), as in the paper: the sinks, and the tokens that have no complete partition
after them to compare with, i.e. the last complete partition and the incomplete tail (between `partition_size` and
2 * `partition_size` - 1 recent tokens). A budget too small for them is an error. The paper keeps a fixed share of
every partition; here the softmax-normalized scores of all partitions compete in one top-k per head (same budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods._segments import gather_segments, segment_ids, segment_reduce, segment_softmax
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def lag_scores(x: Tensor, seg: Tensor, scored: Tensor) -> Tensor:
    """Softmax over each partition of std_channels((x - min_next) / (max_next - min_next)); x (B, H, T, D).

    seg (B, H, T) partition ids (-1 none); scored (B, H, T) the slots that have a complete next partition.
    """
    lo = segment_reduce(torch.where((seg >= 0)[..., None], x, float("inf")), seg, "amin")  # (B, H, S, D)
    hi = segment_reduce(torch.where((seg >= 0)[..., None], x, float("-inf")), seg, "amax")
    nxt = torch.where(scored, seg + 1, -1)  # the reference partition of each scored slot
    lo_ref, hi_ref = gather_segments(lo, nxt), gather_segments(hi, nxt)  # (B, H, T, D)
    normed = (x - lo_ref) / (hi_ref - lo_ref).clamp(min=1e-6)
    spread = normed.std(dim=-1)  # (B, H, T)
    return segment_softmax(torch.where(scored, spread, 0.0), torch.where(scored, seg, -1))


@register_method("lagkv")
@dataclass
class LagKV(ScorerMethod):
    """Per partition, keep tokens whose keys/values vary most relative to the next partition's range."""

    n_sink: int = 16
    partition_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_sink", self.n_sink, 0)
        check_int("partition_size", self.partition_size, 2, note="a std over tokens needs two")

    def _partitions(self, ctx: ScoreContext) -> tuple[Tensor, Tensor]:
        """Partition id of every slot (B, H, T) and whether it has a complete next partition (B, H, T)."""
        seg = segment_ids(ctx.positions, self.partition_size, self.n_sink)
        complete = torch.div(ctx.seen - self.n_sink, self.partition_size, rounding_mode="floor")  # (B,)
        return seg, (seg >= 0) & (seg + 1 < complete[:, None, None])

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        seg, scored = self._partitions(ctx)
        keys = lag_scores(ctx.keys.float(), seg, scored)
        values = lag_scores(ctx.values.float(), seg, scored)
        return (keys + values) / 2

    def protected(self, ctx: ScoreContext) -> Tensor:
        _, scored = self._partitions(ctx)
        return ctx.valid & ~scored
