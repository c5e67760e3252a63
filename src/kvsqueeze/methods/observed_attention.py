"""Observed attention: one-shot H2O, the attention each pair received from the context's own queries, averaged over
the queries that can see it (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv 2306.14048; one-shot prefill
variant as in kvpress's ObservedAttentionPress).

The attention matrix is never materialized whole: queries are processed in blocks of `block_size`, each block's
softmax computed in place in one (B, H_q, block, T) buffer, and keys no query of the block can see are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method


@register_method("observed_attention")
@dataclass
class ObservedAttention(ScorerMethod):
    """Keep the pairs with the highest attention received from the context's queries (summed, divided by how many
    queries can see the pair), averaged over the GQA group."""

    needs = ("queries",)

    block_size: int = 256  # queries per block: the extra memory is one (B, H_q, block_size, T) fp32 buffer
    query_stride: int = 1  # use every query_stride-th query counted back from the last one (1: all queries)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.query_stride, int) or self.query_stride < 1:
            raise ValueError(f"query_stride must be an integer >= 1, got {self.query_stride!r}")

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        q = ctx.queries(rope=True)  # (B, H_q, q, D)
        qpos = ctx.query_positions.to(q.device)
        take = torch.arange(q.shape[2] - 1, -1, -self.query_stride, device=q.device).flip(0)  # the last one included
        q, qpos = q[:, :, take], qpos[:, take]
        received = torch.zeros(q.shape[0], q.shape[1], ctx.keys.shape[2], device=q.device)  # (B, H_q, T)
        for lo in range(0, q.shape[2], self.block_size):
            received += received_attention(ctx, q[:, :, lo : lo + self.block_size], qpos[:, lo : lo + self.block_size])
        b, hq, t = received.shape
        h = ctx.keys.shape[1]
        return received.view(b, h, hq // h, t).mean(dim=2) / seers(ctx.positions, qpos).clamp(min=1)


def seers(positions: Tensor, qpos: Tensor) -> Tensor:
    """(B, H, T) how many of the queries at qpos (B, n) see each slot at `positions` (B, H, T): qpos >= position
    (pad queries, -1, see no real slot)."""
    ordered = qpos.sort(dim=1).values.contiguous()  # (B, n)
    b, h, t = positions.shape
    before = torch.searchsorted(ordered, positions.reshape(b, h * t).contiguous(), side="left")
    return (qpos.shape[1] - before).view(b, h, t)


def received_attention(ctx: ScoreContext, q: Tensor, qpos: Tensor) -> Tensor:
    """(B, H_q, T) attention each slot receives, summed over the queries q (B, H_q, n, D) at positions qpos (B, n)
    (causal: a query sees slots at or before its position; pad queries, position -1, add nothing)."""
    b, hq, n, d = q.shape
    keys, pos = ctx.keys, ctx.positions  # (B, H, T, D), (B, H, T)
    h = keys.shape[1]
    seen = (pos >= 0) & (pos <= qpos.amax())  # skip the slots after every query of the block
    t = int(seen.flatten(0, 1).any(dim=0).nonzero().max()) + 1 if bool(seen.any()) else 1
    keys, pos = keys[:, :, :t].float(), pos[:, :, :t]
    logits = torch.einsum("bhgnd,bhtd->bhgnt", q.float().view(b, h, hq // h, n, d), keys)  # (B, H, G, n, t)
    logits.mul_(ctx.scaling)
    softcap = ctx.adapter.softcap(ctx.module)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    hidden = (pos[:, :, None, None, :] < 0) | (pos[:, :, None, None, :] > qpos[:, None, None, :, None])  # (B,H,1,n,t)
    logits.masked_fill_(hidden, float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    logits.sub_(torch.where(torch.isfinite(top), top, 0.0)).exp_()  # softmax in place: one buffer for the block
    logits.div_(logits.sum(dim=-1, keepdim=True).clamp(min=1e-30))
    out = torch.zeros(b, h, hq // h, ctx.keys.shape[2], device=q.device)
    out[..., :t] = logits.sum(dim=-2)
    return out.view(b, hq, -1)
