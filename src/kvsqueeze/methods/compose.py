"""Composition: apply scoring methods one after the other, each on what the previous one kept.

Stage 1 scores the whole layer and keeps its share; stage 2 scores only what stage 1 kept (its scores, windows and
sinks are computed on that subset), and so on. The budgets multiply: with stage ratios r_i the composition removes
1 - prod(1 - r_i). The composition is built from its overall ratio r and the stages' `shares` of the compression
(default: equal), 1 - r_i = (1 - r) ** share_i, so the stage ratios are derived (and shown in the repr).

Budgets: stage i keeps floor(n * (1 - r) ** (share_1 + ... + share_i)) tokens (n = the tokens the layer has seen);
the last stage keeps exactly floor(n (1 - r)), the uniform budget, so the composition honours the same contract as a
single method. A stage's own budget policy (e.g. PyramidKV's per-layer budgets) is not used; its protected tokens
are, within its stage (a budget too small for them is an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.methods.base import Method, ScoreContext, ScorerMethod, check_ratio, select, uniform_budget
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV


def subset_context(ctx: ScoreContext, indices: Tensor, counts: Tensor) -> ScoreContext:
    """The context restricted to the slots `indices[b, h, :counts[b, h]]` (the rest become empty slots)."""
    b, h, k = indices.shape
    filled = torch.arange(k, device=indices.device)[None, None, :] < counts[..., None]
    return dataclasses.replace(
        ctx,
        keys=ctx.keys.gather(2, indices[..., None].expand(b, h, k, ctx.keys.shape[-1])),
        values=ctx.values.gather(2, indices[..., None].expand(b, h, k, ctx.values.shape[-1])),
        positions=torch.where(filled, ctx.positions.gather(2, indices), -1),
        _cache=ctx._cache,  # the queries of the new tokens do not depend on the subset
    )


def stage_plan(stage: ScorerMethod, ctx: ScoreContext, budget: Tensor) -> tuple[Tensor, Tensor]:
    """Keep `budget` (B, H) slots of ctx by the stage's scores, its protected tokens first."""
    valid = ctx.valid
    protected = stage.protected(ctx)
    if protected is not None:
        protected = protected & valid
        n_protected = protected.sum(dim=-1)
        if bool((n_protected > budget).any()):
            raise ValueError(
                f"{stage!r}: its budget of {int(budget.min())} tokens in the composition cannot hold its "
                f"{int(n_protected.max())} protected tokens at layer {ctx.layer_idx}; lower the ratio or its protected "
                "tokens."
            )
    return select(stage.score(ctx).float(), valid, budget, protected)


@register_method("compose")
@dataclass
class Compose(Method):
    """Apply scoring methods in sequence, each on what the previous kept; the stage budgets multiply."""

    needs = ("queries",)  # those of the default stages (KNorm, then SnapKV)

    ratio: float = 0.0
    methods: tuple[ScorerMethod, ...] = field(default_factory=lambda: (KNorm(), SnapKV()))
    shares: tuple[float, ...] | None = None  # each stage's share of log(1 - ratio); default equal

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.methods = tuple(self.methods)
        if not self.methods or not all(isinstance(m, ScorerMethod) for m in self.methods):
            raise ValueError(f"methods must be a non-empty tuple of scoring methods, got {self.methods!r}")
        if self.shares is not None:
            self.shares = tuple(float(s) for s in self.shares)
            if len(self.shares) != len(self.methods) or any(s <= 0 for s in self.shares):
                raise ValueError(
                    f"shares must be {len(self.methods)} positive numbers (one per method), got {self.shares}"
                )
            if abs(sum(self.shares) - 1.0) > 1e-9:
                raise ValueError(f"shares must sum to 1, got {self.shares} (sum {sum(self.shares)})")
        self.methods = tuple(
            dataclasses.replace(m, ratio=1.0 - (1.0 - self.ratio) ** s)
            for m, s in zip(self.methods, self._shares(), strict=True)
        )

    def _shares(self) -> tuple[float, ...]:
        return self.shares if self.shares is not None else (1.0 / len(self.methods),) * len(self.methods)

    def stage_budgets(self, seen: Tensor, n_heads: int) -> list[Tensor]:
        """(B, H) budget of every stage: floor(n (1 - r) ** cumulative share), the last one the uniform budget."""
        final = uniform_budget(seen, self.ratio, n_heads)
        budgets, cumulative = [], 0.0
        for share in self._shares()[:-1]:
            cumulative += share
            keep = torch.floor(seen.double() * (1.0 - self.ratio) ** cumulative + 1e-6).long()
            budgets.append(torch.maximum(keep[:, None].expand(-1, n_heads), final))
        return [*budgets, final]

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        valid = ctx.valid
        kept_now = valid.sum(dim=-1)
        budgets = [torch.minimum(b.to(kept_now.device), kept_now) for b in self.stage_budgets(ctx.seen, valid.shape[1])]
        if bool((budgets[-1] == kept_now).all()) and bool(valid.all()):
            return None
        slots = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)  # (B, H, T) into the layer
        counts = kept_now
        sub = ctx
        for stage, budget in zip(self.methods, budgets, strict=True):
            indices, counts = stage_plan(stage, sub, torch.minimum(budget, counts))
            slots = slots.gather(2, indices)
            sub = subset_context(sub, indices, counts)
        return slots, counts
