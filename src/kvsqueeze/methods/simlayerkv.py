"""SimLayerKV: drop most of the cache of "lazy" layers only (Zhang et al. 2024, arXiv 2410.13846).

Some layers barely use the middle of the context: their last queries put almost all their attention on the first
tokens and the most recent ones. SimLayerKV finds these lazy layers from the attention of the last context queries
and trims them to the initial + recent tokens (StreamingLLM); the other layers keep their whole cache.

Here a layer (per batch row) is lazy when the last `window` queries, averaged over them and over all query heads,
put at least `threshold` of their attention on the tokens StreamingLLM would keep at this ratio: the first `n_sink`
tokens and the most recent ones, floor(n (1 - r)) in all. A lazy layer keeps exactly those; any other keeps all n.
The ratio is therefore what a lazy layer drops, not the overall ratio: the memory saved depends on how many layers
the rule finds lazy (measured from the cache, never assumed). `budget_kind = "adaptive"` tells the contract tests so.
The paper tunes the threshold per model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent, uniform_budget
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import window_attention
from kvsqueeze.validation import check_float, check_int


@register_method("simlayerkv")
@dataclass
class SimLayerKV(ScorerMethod):
    """Layers whose last queries attend mostly to the first + recent tokens keep only those; others keep all."""

    needs = ("queries",)
    budget_kind = "adaptive"  # per-layer sizes are decided by the rule (floor(n(1-r)) or n)

    threshold: float = 0.9
    window: int = 1
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("threshold", self.threshold, 0.0, 1.0, note="a share of attention")
        check_int("window", self.window, 1)
        check_int("n_sink", self.n_sink, 0)

    def lazy_mass(self, ctx: ScoreContext) -> Tensor:
        """(B,) attention share the last `window` queries give to the sinks + recent tokens a lazy layer keeps."""
        keep = uniform_budget(ctx.seen, self.ratio, 1)[:, 0]  # (B,)
        attn = window_attention(ctx, self.window)  # (B, H_q, T)
        kept = self._kept(ctx, keep).repeat_interleave(attn.shape[1] // ctx.keys.shape[1], dim=1)  # (B, H_q, T)
        return (attn * kept).sum(dim=-1).mean(dim=1)

    def _kept(self, ctx: ScoreContext, keep: Tensor) -> Tensor:
        """(B, H, T) the first n_sink positions and the most recent ones, `keep` (B,) in all."""
        n_sink = torch.clamp(keep, max=self.n_sink)[:, None, None]
        pos = ctx.positions.long()
        recent_from = (ctx.seen - (keep - n_sink[:, 0, 0]))[:, None, None]
        return (pos >= 0) & ((pos < n_sink) | (pos >= recent_from))

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        keep = uniform_budget(ctx.seen, self.ratio, ctx.keys.shape[1])
        if self.ratio == 0:
            return keep
        lazy = self.lazy_mass(ctx) >= self.threshold  # (B,)
        return torch.where(lazy[:, None], keep, ctx.seen[:, None].expand_as(keep))

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): newer = higher, after the sinks
        return ctx.positions.float()

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, self.n_sink, 0)
