"""Ada-KV: head-adaptive budgets over any scorer (Feng, Lv, Cao, Xie, Zhou 2024, arXiv 2407.11550).

Per layer and row, the heads pool their uniform budgets (H x floor(n(1-r)) tokens). Each head first keeps a
safeguard share alpha of its own uniform budget from its top tokens; the rest of the pool goes to the best scores
of the layer, whatever their head, so heads with concentrated attention keep fewer tokens and flat heads more.
Scores are made comparable across heads with `budgets.comparable_scores` (default "auto": non-negative scores
such as SnapKV's attention are divided by their head's sum, as the paper compares attention weights; signed scores
such as KNorm's become a distribution by a softmax per head). Protected tokens (e.g. SnapKV's window) are always
kept. The layer is then stored ragged (`cache.py`), so the memory held is the pooled total, not H x the largest head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.budgets import NORMALIZATIONS, comparable_scores, pooled_counts
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, checked_protected, select
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_choice, check_float


@register_method("adakv")
@dataclass
class AdaKV(ScorerMethod):
    """Head-adaptive budgets: the heads of a layer pool their budget, with a safeguard share per head (Ada-KV)."""

    needs = ("queries",)
    budget_scope = "layer"

    scorer: ScorerMethod = field(default_factory=SnapKV)
    alpha: float = 0.2  # safeguard: each head first keeps alpha x its uniform budget of its own best tokens
    normalize: str = "auto"  # how scores are made comparable across heads (see kvsqueeze.budgets)

    def __post_init__(self) -> None:
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        check_float("alpha", self.alpha, 0.0, 1.0)
        check_choice("normalize", self.normalize, NORMALIZATIONS)

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H) the uniform budget each head brings to the pool
        return self.scorer.budget(ctx)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        valid = ctx.valid
        kept_now = valid.sum(dim=-1)  # (B, H)
        uniform = torch.minimum(self.budget(ctx).to(kept_now.device), kept_now)
        if bool((uniform == kept_now).all()) and bool(valid.all()):
            return None
        protected = checked_protected(self, ctx, uniform)
        scores = self.score(ctx).float()
        comparable = comparable_scores(scores, valid, self.normalize)
        if protected is not None:  # protected slots are taken first, inside the pool
            comparable = comparable.masked_fill(protected, float("inf"))
        safeguard = torch.floor(uniform.double() * self.alpha + 1e-6).long()
        counts = pooled_counts(comparable, valid, uniform.sum(dim=-1), safeguard)  # >= each head's protected
        return select(comparable, valid, counts, protected)
