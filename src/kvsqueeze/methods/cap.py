"""CAP / CapKV: capacity-aware eviction (Yang, Tang, Zhen et al. 2026, "Rethinking KV Cache Eviction via a Unified
Information-Theoretic Objective", arXiv 2604.25975).

The paper scores what a retained subset preserves of the attention's predictive signal (an information-bottleneck
objective under a linear-Gaussian surrogate of attention, approximated by a log-determinant through statistical
leverage scores). Only its abstract could be consulted when this was written, so the rule below implements the
one-line description of kvsqueeze's METHODS.md ("cosine to the averaged future query, value-aware leverage") with
these exact choices, per KV head h and valid slot i:

    q_bar  = mean of the post-RoPE queries of the last `window` real context tokens over the G query heads of h
             (the observed stand-in for the future queries)
    cos_i  = cos(k_i, q_bar)                                            relevance, in [-1, 1]
    l_i    = v_i^T (V^T V + lam I)^{-1} v_i,  lam = ridge * tr(V^T V) / D_v    ridge leverage of the value rows
             (V: the head's valid values; adding token i raises log det(V^T V + lam I) by log(1 + l_i^(-i)), the
             log-determinant "capacity" a token brings)
    score_i = cos_i + beta * l_i / max_j l_j                            both terms in comparable ranges

Higher = keep. beta=0 is pure query-key cosine; a large beta is value leverage alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int


def mean_window_query(ctx: ScoreContext, window: int) -> Tensor:
    """(B, H, D) mean post-RoPE query of the last `window` real new tokens over each KV head's query heads."""
    q = ctx.queries(rope=True, last=window).float()  # (B, H_q, w, D)
    b, hq, w, d = q.shape
    h = ctx.keys.shape[1]
    real = (ctx.query_positions[:, -w:] >= 0).float().to(q.device) if w else q.new_zeros(b, 0)  # (B, w)
    summed = torch.einsum("bqwd,bw->bqd", q, real).view(b, h, hq // h, d).sum(dim=2)  # (B, H, D)
    return summed / (real.sum(dim=1) * (hq // h)).clamp(min=1)[:, None, None]


def value_leverage(values: Tensor, valid: Tensor, ridge: float) -> Tensor:
    """(B, H, T) ridge leverage of each valid value row of its head (empty slots 0), in float64."""
    v = torch.where(valid[..., None], values.double(), 0.0)  # (B, H, T, Dv)
    gram = v.transpose(-1, -2) @ v  # (B, H, Dv, Dv)
    d = gram.shape[-1]
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1).clamp(min=1e-12) / d  # (B, H)
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    solved = torch.linalg.solve(gram + lam[..., None, None] * eye, v.transpose(-1, -2))  # (B, H, Dv, T)
    return (v * solved.transpose(-1, -2)).sum(dim=-1)


@register_method("cap")
@dataclass
class CAP(ScorerMethod):
    """Keep keys close (cosine) to the averaged recent query, plus tokens with a large value leverage
    (capacity-aware; formula in the module docstring)."""

    needs = ("queries",)

    window: int = 64  # context queries averaged into the future-query estimate
    beta: float = 1.0  # weight of the normalized value leverage
    ridge: float = 1e-3  # leverage regularization, relative to the mean eigenvalue of V^T V

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 1)
        check_float("beta", self.beta, 0.0)
        check_float("ridge", self.ridge, 0.0, low_open=True)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        q_bar = mean_window_query(ctx, self.window)  # (B, H, D)
        cos = F.cosine_similarity(ctx.keys.float(), q_bar[:, :, None, :], dim=-1, eps=1e-12)
        if self.beta == 0:
            return cos
        lev = value_leverage(ctx.values, ctx.valid, float(self.ridge))
        top = lev.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        return cos + float(self.beta) * (lev / top).float()
