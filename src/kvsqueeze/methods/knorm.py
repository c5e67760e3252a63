"""KNorm: keep keys with a small L2 norm (Devoto, Zhao, Scardapane, Minervini 2024, arXiv 2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method


@register_method("knorm")
@dataclass
class KNorm(ScorerMethod):
    """Keep the keys with the smallest L2 norm (low key norm goes with high attention)."""

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        return -ctx.keys.float().norm(dim=-1)
