"""SnapKV: keep what the last context queries attend to (Li et al. 2024, arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method


def window_attention(ctx: ScoreContext, window: int) -> Tensor:
    """Mean attention (B, H_q, T) paid to each slot by the last `window` new queries, each at its own position.

    Queries are recomputed with RoPE at their own absolute positions and are causal: a query sees the slots at or
    before its position. Pad queries are left out of the mean.
    """
    q = ctx.queries(rope=True, last=window)  # (B, H_q, w, D): only the window's queries are computed
    b, hq, w, d = q.shape
    h = ctx.keys.shape[1]
    softcap = ctx.adapter.softcap(ctx.module)
    scale = ctx.scaling if softcap is None else ctx.scaling / softcap
    qw = (q.float() * scale).reshape(b, h, (hq // h) * w, d)  # (B, H, G*w, D), the logit scale folded into the queries
    qpos = ctx.query_positions[:, -w:].to(ctx.positions.device)  # (B, w)
    # every temporary of size (B, H, G, w, T) is this one buffer, updated in place
    logits = (qw @ ctx.keys.float().transpose(-1, -2)).view(b, h, hq // h, w, -1)  # (B, H, G, w, T)
    if softcap is not None:
        logits.tanh_().mul_(softcap)
    # only slots from the earliest one some window query cannot see need a mask (usually the window itself)
    pos = ctx.positions  # (B, H, T)
    earliest = torch.where(qpos >= 0, qpos, qpos.amax(dim=1, keepdim=True)).amin(dim=1)  # (B,) first real query
    cols = ((pos < 0) | (pos > earliest[:, None, None])).flatten(end_dim=-2).any(dim=0).nonzero()
    if cols.numel():
        c0 = int(cols[0])
        tail = pos[:, :, None, None, c0:]  # (B, H, 1, 1, T - c0)
        hidden = (tail < 0) | (tail > qpos[:, None, None, :, None])  # (B, H, 1, w, T - c0)
        # a large finite fill instead of -inf: a pad query that sees nothing gets a uniform row (weighted 0 below)
        logits[..., c0:].masked_fill_(hidden, torch.finfo(logits.dtype).min)
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    attn = logits.div_(logits.sum(dim=-1, keepdim=True))
    real = (qpos >= 0).to(attn.dtype)  # (B, w)
    real = (real / real.sum(dim=1, keepdim=True).clamp(min=1))[:, None, None, None, :]  # (B, 1, 1, 1, w)
    mean = real @ attn  # (B, H, G, 1, T): the mean over the window's real queries
    return mean.reshape(b, hq, -1)


@register_method("snapkv")
@dataclass
class SnapKV(ScorerMethod):
    """Keep the tokens most attended by the last `window` context queries (pooled), plus that window."""

    needs = ("queries",)

    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
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
