"""SnapKV: keep what the last context queries attend to (Li et al. 2024, arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods._window import window_probs
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def window_attention(ctx: ScoreContext, window: int) -> Tensor:
    """Mean attention (B, H_q, T) paid to each slot by the last `window` new queries, each at its own position.

    Queries are recomputed with RoPE at their own absolute positions and are causal: a query sees the slots at or
    before its position. Pad queries are left out of the mean.
    """
    attn, real = window_probs(ctx, window)  # (B, H, G, w, T), (B, w)
    b, h, g = attn.shape[:3]
    weight = (real / real.sum(dim=1, keepdim=True).clamp(min=1))[:, None, None, None, :]  # (B, 1, 1, 1, w)
    return (weight @ attn).reshape(b, h * g, -1)  # the mean over the window's real queries


@register_method("snapkv")
@dataclass
class SnapKV(ScorerMethod):
    """Keep the tokens most attended by the last `window` context queries (pooled), plus that window."""

    needs = ("queries",)

    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1, note="odd")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        attn = window_attention(ctx, self.window)  # (B, H_q, T)
        b, hq, t = attn.shape
        h = ctx.keys.shape[1]
        real = ctx.valid.repeat_interleave(hq // h, dim=1).float()  # (B, H_q, T): pool over real slots only
        pool = lambda x: F.avg_pool1d(x.reshape(b * hq, 1, t), self.kernel, 1, self.kernel // 2)  # noqa: E731
        pooled = pool(attn * real) / pool(real).clamp(min=1e-9)
        return pooled.view(b, h, hq // h, t).mean(dim=2)

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, 0, self.window)
