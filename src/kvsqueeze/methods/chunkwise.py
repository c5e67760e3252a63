"""Chunk-wise selection: compress every chunk of the context on its own (Corallo & Papotti 2024, FINCH, TACL).

The context is cut into chunks of `chunk_size` consecutive positions and another method's scores pick the kept
tokens inside each chunk separately, each chunk keeping its share of the budget. Kept tokens therefore stay spread
along the whole context instead of piling up where the wrapped scores are large (e.g. near the end for SnapKV).

How the budget is met exactly: the wrapped method's protected tokens are kept first (P of them); the rest of the
budget, R = K - P, is shared among chunks in proportion to their unprotected tokens m_c: floor(R m_c / M) each,
plus one for the chunks with the largest remainders (ties: the earlier chunk) until R is reached. Chunks follow
absolute positions, so padding and earlier evictions do not shift them.
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


def chunk_quotas(members: Tensor, total: Tensor) -> Tensor:
    """(B, H, S) quotas summing to `total` (B, H), proportional to `members` (B, H, S) by largest remainder."""
    m = members.sum(dim=-1, keepdim=True).clamp(min=1)
    share = members * total[..., None]
    quota, rest = share // m, share % m
    missing = total - quota.sum(dim=-1)  # (B, H), fewer than S
    by_rest = torch.sort(rest, dim=-1, descending=True, stable=True).indices  # ties: the earlier chunk
    extra = (torch.arange(members.shape[-1], device=members.device) < missing[..., None]).long()
    return quota + torch.zeros_like(quota).scatter(-1, by_rest, extra)


def rank_in_segment(scores: Tensor, seg: Tensor) -> Tensor:
    """(B, H, T) rank of each slot among the slots of its segment by score (desc; ties: the earlier slot)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(seg.gather(-1, order), dim=-1, stable=True).indices)  # by segment, then score
    t = scores.shape[-1]
    sorted_seg = seg.gather(-1, order)
    first = torch.searchsorted(sorted_seg.contiguous(), sorted_seg.contiguous(), right=False)  # start of each segment
    rank_sorted = torch.arange(t, device=scores.device).expand_as(order) - first
    return torch.empty_like(order).scatter_(-1, order, rank_sorted)


@register_method("chunkwise")
@dataclass
class ChunkWise(ScorerMethod):
    """Compress each chunk of the context on its own with another method's scores (SnapKV); kept tokens stay spread."""

    needs = ("queries",)  # those of the default scorer

    scorer: ScorerMethod = field(default_factory=SnapKV)
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("chunk_size", self.chunk_size, 1)
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): 1 for the slots each chunk keeps, 0 otherwise
        valid = ctx.valid
        protected = self.protected(ctx)
        free = valid if protected is None else valid & ~protected
        budget = torch.minimum(self.budget(ctx).to(valid.device), valid.sum(dim=-1))
        rest = (budget - (valid & ~free).sum(dim=-1)).clamp(min=0)  # (B, H) R = K - P
        seg = torch.where(free, segment_ids(ctx.positions, self.chunk_size), -1)
        members = segment_reduce(free.long(), seg, "sum")  # (B, H, S)
        quota = gather_segments(chunk_quotas(members, rest), seg, fill=0)  # (B, H, T)
        inner = torch.where(free, self.scorer.score(ctx).float(), float("-inf"))
        big = torch.where(seg >= 0, seg, seg.max() + 1)  # slots of no chunk sort last
        return (free & (rank_in_segment(inner, big) < quota)).float()

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        return self.scorer.budget(ctx)
