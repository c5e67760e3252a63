"""CriticalKV: select critical entries from the output-perturbation view (Feng, Lv, Cao, Xie, Zhou 2025,
arXiv 2502.03805), over any scorer.

Two stages per (row, head) within the uniform budget: the first `first_share` of the budget goes to the best base
scores s (attention-like, made a distribution per head by `budgets.comparable_scores`), the rest to the best
    (s_i + eps) * ||W_O^h v_i||_1
i.e. attention weighted by how much the value moves the layer's output through the output projection. For a KV head
serving G query heads, ||W_O^h v_i||_1 is the mean over those G heads of the L1 norm of v_i through each head's slice
of o_proj (`ModelAdapter.output_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.budgets import NORMALIZATIONS, comparable_scores, two_stage_order
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, checked_protected, select
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_choice, check_float


def projected_value_norms(values: Tensor, w_o: Tensor, chunk: int = 1024) -> Tensor:
    """(B, H, T): mean over each KV head's G query heads of ||v_i W_O^q||_1. values (B, H, T, D); w_o (H_q, D, out)."""
    b, h, t, d = values.shape
    w = w_o.float().reshape(h, -1, d, w_o.shape[-1])  # (H, G, D, out): query heads of a group are consecutive
    out = values.new_zeros(b, h, t, dtype=torch.float32)
    for lo in range(0, t, chunk):  # bounds the (B, H, chunk, out) intermediate
        v = values[:, :, lo : lo + chunk].float()
        out[:, :, lo : lo + chunk] = torch.einsum("bhtd,hgdo->bhgto", v, w).abs().sum(dim=-1).mean(dim=2)
    return out


@register_method("criticalkv")
@dataclass
class CriticalKV(ScorerMethod):
    """Two-stage selection: half the budget by base score, the rest by score x ||W_O v||_1 (CriticalKV)."""

    needs = ("queries",)

    scorer: ScorerMethod = field(default_factory=SnapKV)
    first_share: float = 0.5  # fraction of each head's budget chosen by the base score alone
    eps: float = 1e-4  # added to the (normalized) base score before weighting by the projected value norm
    normalize: str = "auto"  # how base scores become a distribution per head (see kvsqueeze.budgets)

    def __post_init__(self) -> None:
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        check_float("first_share", self.first_share, 0.0, 1.0)
        check_float("eps", self.eps, 0.0)
        check_choice("normalize", self.normalize, NORMALIZATIONS)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T) the stage-2 score
        base = comparable_scores(self.scorer.score(ctx), ctx.valid, self.normalize).exp()
        w_o = ctx.adapter.output_projection(ctx.module)
        return (base + self.eps) * projected_value_norms(ctx.values, w_o)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.budget(ctx)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        valid = ctx.valid
        kept_now = valid.sum(dim=-1)
        budget = torch.minimum(self.budget(ctx).to(kept_now.device), kept_now)
        if bool((budget == kept_now).all()) and bool(valid.all()):
            return None
        protected = checked_protected(self, ctx, budget)
        base = comparable_scores(self.scorer.score(ctx), valid, self.normalize)  # log-distribution per head
        weighted = (base.exp() + self.eps) * projected_value_norms(
            ctx.values, ctx.adapter.output_projection(ctx.module)
        )
        n_first = torch.floor(budget.double() * self.first_share + 1e-6).long()
        return select(two_stage_order(base, weighted, valid, n_first), valid, budget, protected)
