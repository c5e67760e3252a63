"""Per-layer budgets from a list: each full-attention layer keeps a share of the tokens proportional to its weight,
with the mean over layers n(1-r) (the uniform budget), over any scorer. A generalisation of PyramidKV's linear
schedule (Cai et al. 2024, arXiv 2406.02069) to any profile, e.g. one measured for a model.

A layer's budget is capped at the tokens it holds and floored at its protected tokens; what a capped layer cannot
take is spread over the others in proportion to their weights (`budgets.spread`), so the mean stays n(1-r).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.budgets import spread
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV


@register_method("layer_budgets")
@dataclass
class LayerBudgets(ScorerMethod):
    """Per-layer budgets proportional to a list of weights (one per full-attention layer), mean n(1-r)."""

    needs = ("queries",)

    scorer: ScorerMethod = field(default_factory=SnapKV)
    weights: tuple[float, ...] = ()  # one per full-attention layer, in order; empty = uniform

    def __post_init__(self) -> None:
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        if isinstance(self.weights, (int, float)) or not all(isinstance(w, (int, float)) for w in self.weights):
            raise ValueError(f"weights must be a list of numbers, one per full-attention layer, got {self.weights!r}")
        self.weights = tuple(float(w) for w in self.weights)
        if self.weights and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(self.weights)}")

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        if not self.weights:
            return self.scorer.budget(ctx)
        full = ctx.adapter.full_layers
        if len(self.weights) != len(full):
            raise ValueError(
                f"weights has {len(self.weights)} entries; this model has {len(full)} full-attention layers"
            )
        protected = self.protected(ctx)
        floor = protected.sum(dim=-1).amax(dim=-1).float() if protected is not None else torch.zeros_like(ctx.seen)
        depth = full.index(ctx.layer_idx)
        per_row = [
            spread(float(n) * (1.0 - self.ratio), list(self.weights), float(n), min(float(f), n * (1.0 - self.ratio)))
            for n, f in zip(ctx.seen.tolist(), floor.tolist(), strict=True)
        ]
        keep = torch.tensor([b[depth] for b in per_row], dtype=torch.float64, device=ctx.keys.device)
        keep = (keep + 1e-6).floor().long().clamp(min=1)
        return keep[:, None].expand(-1, ctx.keys.shape[1])
