"""Global budget: one pool of tokens for all full-attention layers and KV heads, as KVzip allocates it
(Kim, Kim, Kwon et al. 2025, arXiv 2505.23416: "bottom-k across all layers and heads"), over any scorer.

Every (layer, head) brings its uniform budget floor(n(1-r)) to one pool per row; the pool goes to the best scores of
the whole model, so layers and heads that matter keep more. Scores are made comparable with
`budgets.comparable_scores` (default "auto", as for Ada-KV); protected tokens are always kept. This needs every
layer's scores before any is pruned: `press` scores each layer as the forward fills it and prunes all of them when
the forward ends (the uncompressed cache is held until then), or all at once in `compress_recording`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.budgets import NORMALIZATIONS, comparable_scores, pooled_counts
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import LayerScores, ModelScopeMethod, ScoreContext, ScorerMethod, checked_protected, select
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_choice


@register_method("global_budget")
@dataclass
class GlobalBudget(ModelScopeMethod):
    """One budget shared by all layers and heads, filled with the model's best scores (KVzip's allocation)."""

    needs = ("queries",)

    ratio: float = 0.0
    scorer: ScorerMethod = field(default_factory=SnapKV)
    normalize: str = "auto"  # how scores are made comparable across layers and heads (see kvsqueeze.budgets)

    def __post_init__(self) -> None:
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        check_choice("normalize", self.normalize, NORMALIZATIONS)

    def layer_scores(self, ctx: ScoreContext) -> LayerScores:
        valid = ctx.valid
        budget = torch.minimum(self.scorer.budget(ctx).to(valid.device), valid.sum(dim=-1))
        protected = checked_protected(self.scorer, ctx, budget)
        scores = comparable_scores(self.scorer.score(ctx).float(), valid, self.normalize)
        if protected is not None:
            scores = scores.masked_fill(protected, float("inf"))
        return LayerScores(scores, valid, protected, budget)

    def plan_model(self, layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
        return pooled_plans(layers)


def pooled_plans(layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
    """Keep plans per layer for one pool per row: the sum of the layers' budgets goes to the best comparable scores
    of all layers and heads (protected slots first); None for a layer that keeps every real slot."""
    if not layers:
        return {}
    order = sorted(layers)
    t = max(layers[i].scores.shape[-1] for i in order)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, t - x.shape[-1]), value=v)  # noqa: E731
    scores = torch.cat([pad(layers[i].scores, float("-inf")) for i in order], dim=1)  # (B, L H, T)
    valid = torch.cat([pad(layers[i].valid, False) for i in order], dim=1)
    total = sum(layers[i].budget.sum(dim=-1) for i in order)  # (B,)
    assert isinstance(total, Tensor)
    protected = [layers[i].protected for i in order]
    safeguard = torch.cat(
        [
            p.sum(dim=-1) if p is not None else torch.zeros_like(layers[i].budget)
            for i, p in zip(order, protected, strict=True)
        ],
        dim=1,
    )
    counts = pooled_counts(scores, valid, total, safeguard).split([layers[i].budget.shape[1] for i in order], 1)
    plans: dict[int, tuple[Tensor, Tensor] | None] = {}
    for i, c, p in zip(order, counts, protected, strict=True):
        layer = layers[i]
        keep_all = bool(layer.valid.all()) and bool((c == layer.valid.sum(dim=-1)).all())
        plans[i] = None if keep_all else select(layer.scores, layer.valid, c, p)
    return plans
