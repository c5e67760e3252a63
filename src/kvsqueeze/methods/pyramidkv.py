"""PyramidKV: per-layer budgets that shrink with depth (Cai et al. 2024, arXiv 2406.02069)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_float


def pyramid_budgets(n: float, ratio: float, n_layers: int, slope: float, floor: float) -> list[float]:
    """Per-layer budgets, linear in depth, mean n(1-r); the slope is reduced so no layer exceeds n or drops below
    `floor` (the protected tokens), which keeps the mean exact."""
    mean = n * (1.0 - ratio)
    if n_layers == 1 or mean <= 0:
        return [mean] * n_layers
    s = min(slope, n / mean - 1.0, max(0.0, 1.0 - floor / mean))
    return [mean * (1.0 + s * (1.0 - 2.0 * layer / (n_layers - 1))) for layer in range(n_layers)]


@register_method("pyramidkv")
@dataclass
class PyramidKV(ScorerMethod):
    """Layer-wise budgets decreasing linearly with depth (mean n(1-r)) over another scorer's scores (SnapKV)."""

    needs = ("queries",)

    scorer: ScorerMethod = field(default_factory=SnapKV)
    slope: float = 0.95  # last layer keeps (1 - slope) of the mean, the first (1 + slope); PyramidKV's beta=20

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_float("slope", self.slope, 0.0, 1.0)
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        protected = self.protected(ctx)
        floor = protected.sum(dim=-1).amax(dim=-1).float() if protected is not None else torch.zeros_like(ctx.seen)
        full = ctx.adapter.full_layers  # sliding layers are never pruned: spread the budget over the others
        depth = full.index(ctx.layer_idx)
        per_row = [
            pyramid_budgets(float(n), self.ratio, len(full), self.slope, float(f))[depth]
            for n, f in zip(ctx.seen.tolist(), floor.tolist(), strict=True)
        ]
        keep = (torch.tensor(per_row, dtype=torch.float64, device=ctx.keys.device) + 1e-6).floor().long().clamp(min=1)
        return keep[:, None].expand(-1, ctx.keys.shape[1])
