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
    w = q.shape[2]
    b, hq, _, d = q.shape
    h = ctx.keys.shape[1]
    qw = q[:, :, -w:].float().view(b, h, hq // h, w, d)  # (B, H, G, w, D)
    qpos = ctx.query_positions[:, -w:]  # (B, w)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", qw, ctx.keys.float()) * ctx.scaling  # (B, H, G, w, T)
    softcap = ctx.adapter.softcap(ctx.module)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    pos = ctx.positions[:, :, None, None, :]  # (B, H, 1, 1, T)
    allowed = (pos >= 0) & (pos <= qpos[:, None, None, :, None])
    attn = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return attn, (qpos >= 0).float()
