"""Random eviction: the baseline every method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


@register_method("random")
@dataclass
class Random(ScorerMethod):
    """Keep a uniformly random subset (seeded per layer, reproducible)."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        return torch.rand(ctx.positions.shape, generator=gen).to(ctx.keys.device)
