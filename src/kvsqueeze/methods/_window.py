"""Attention of the last context queries to every cached slot, per query: the shared core of the window-based scorers
(SnapKV's mean, Scissorhands' persistence counts, CAKE's mean and variance, VATP's accumulated attention)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext


def window_probs(ctx: ScoreContext, window: int) -> tuple[Tensor, Tensor]:
    """Attention probabilities of the last `window` new queries, each at its own position, and which queries are real.

    Returns probs (B, H, G, w, T) (query heads grouped by KV head, G = H_q / H) and real (B, w) float (1 = a real
    query). Queries are recomputed with RoPE at their own absolute positions and are causal: a query sees the slots at
    or before its position. A pad query (position -1) sees nothing: its row of probabilities is all zero.
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
        # a large finite fill instead of -inf: a pad query that sees nothing gets a uniform row (zeroed below), no NaN
        logits[..., c0:].masked_fill_(hidden, torch.finfo(logits.dtype).min)
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    probs = logits.div_(logits.sum(dim=-1, keepdim=True))
    real = (qpos >= 0).float()  # (B, w)
    if not bool(real.all()):
        probs.mul_(real[:, None, None, :, None])  # pad queries' rows are all zero
    return probs, real
