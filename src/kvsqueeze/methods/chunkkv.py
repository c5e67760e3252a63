"""ChunkKV: keep whole chunks of tokens instead of scattered ones (Liu et al. 2025, arXiv 2502.00299).

Tokens are grouped into chunks of `chunk_size` consecutive positions (20 in the paper); a chunk's importance is the
mean of another method's scores over its tokens (SnapKV's observation-window attention by default, as in the paper),
and the most important chunks are kept whole, so the kept context stays made of readable phrases.

How the budget is met exactly: the wrapped method's protected tokens (SnapKV's window) come first; then chunks are
taken whole in decreasing order of mean score (ties: the earlier chunk); the first chunk that no longer fits entirely
contributes its best tokens by their own score until the budget is reached. So every layer and head keeps exactly
the wrapped method's budget (uniform by default, per-layer when wrapping PyramidKV), with at most one partial chunk
beyond the protected tokens. Chunks follow absolute positions, so padding and earlier evictions do not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.methods._segments import gather_segments, segment_ids, segment_reduce
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_int


def chunk_order_scores(scores: Tensor, chunk: Tensor) -> Tensor:
    """(B, H, T) scores that rank slots by (chunk mean desc, chunk id asc, own score desc, slot asc).

    scores (B, H, T) float; chunk (B, H, T) chunk ids, -1 for empty slots (ranked last).
    """
    mean = gather_segments(segment_reduce(torch.where(chunk >= 0, scores, 0.0), chunk, "mean"), chunk, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # own score desc, slot asc
    for key, descending in ((chunk.float(), False), (mean, True)):  # least significant key first, stable sorts
        order = order.gather(-1, torch.sort(key.gather(-1, order), dim=-1, descending=descending, stable=True).indices)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return -rank.float()


@register_method("chunkkv")
@dataclass
class ChunkKV(ScorerMethod):
    """Keep whole chunks of consecutive tokens, ranked by the mean score of another method (SnapKV)."""

    needs = ("queries",)  # those of the default scorer

    scorer: ScorerMethod = field(default_factory=SnapKV)
    chunk_size: int = 20

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("chunk_size", self.chunk_size, 1)
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        chunk = segment_ids(ctx.positions, self.chunk_size)
        return chunk_order_scores(self.scorer.score(ctx).float(), chunk)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        return self.scorer.budget(ctx)
