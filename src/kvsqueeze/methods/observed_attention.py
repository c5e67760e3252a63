"""Observed attention: one-shot H2O, the attention each pair received from the context's own queries, averaged over
the queries that can see it (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv 2306.14048; one-shot prefill
variant as in kvpress's ObservedAttentionPress).

The attention matrix is never materialized whole: queries are processed in blocks of `block_size`, each block's
logits and softmax held in one (B, H_q, block, T) buffer; slots no query of the block can see are skipped and only
the columns some query of the block cannot see are masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import Need, ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


@register_method("observed_attention")
@dataclass
class ObservedAttention(ScorerMethod):
    """Keep the pairs with the highest attention received from the context's queries (summed, divided by how many
    queries can see the pair), averaged over the GQA group."""

    needs = ("queries", "received_attention")

    block_size: int = 64  # queries per block: the extra memory is one (B, H_q, block_size, T) fp32 buffer
    query_stride: int = 1  # use every query_stride-th query counted back from the last one (1: all queries)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("block_size", self.block_size, 1)
        check_int("query_stride", self.query_stride, 1)

    def uses(self, need: Need) -> bool:
        """The forward's sums are those of every query: a query stride recomputes its own instead, and at ratio 0
        nothing is scored (the forward then stays plain attention, bit for bit)."""
        if need == "received_attention":
            return super().uses(need) and self.query_stride == 1 and self.ratio > 0
        return super().uses(need)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        q = ctx.queries(rope=True)  # (B, H_q, q, D): the captured ones inside `compress`, no computation
        qpos = ctx.query_positions.to(q.device)
        group = q.shape[1] // ctx.keys.shape[1]
        received = forward_received(ctx) if self.query_stride == 1 else None  # summed by the forward's attention
        if received is None:
            take = torch.arange(q.shape[2] - 1, -1, -self.query_stride, device=q.device).flip(0)  # the last included
            q, qpos = q[:, :, take], qpos[:, take]
            received = received_attention(ctx, q, qpos, self.block_size)  # (B, H, T)
        return received / group / seers(ctx.positions, qpos).clamp(min=1)  # mean over the group


def forward_received(ctx: ScoreContext) -> Tensor | None:
    """(B, H, T) the attention each slot received in this forward as its attention function summed it (all the real
    new queries, causal; `kvsqueeze.received`), or None where it did not."""
    received = ctx.received
    if received is None or received.shape != ctx.positions.shape:
        return None
    return received


def seers(positions: Tensor, qpos: Tensor) -> Tensor:
    """(B, H, T) how many of the queries at qpos (B, n) see each slot at `positions` (B, H, T): qpos >= position
    (pad queries, -1, see no real slot)."""
    ordered = qpos.sort(dim=1).values.contiguous()  # (B, n)
    b, h, t = positions.shape
    before = torch.searchsorted(ordered, positions.reshape(b, h * t).contiguous(), side="left")
    return (qpos.shape[1] - before).view(b, h, t)


def received_attention(
    ctx: ScoreContext,
    q: Tensor,
    qpos: Tensor,
    block_size: int,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(B, H, T) attention each slot receives from the queries q (B, H_q, n, D) at positions qpos (B, n), summed over
    the queries and over the query heads of each KV head (causal: a query sees slots at or before its position; pad
    queries, position -1, add nothing).

    Queries go in blocks of `block_size`; every block's logits live in one buffer allocated once per call (a fresh
    multi-MiB allocation per block costs page faults that can exceed the arithmetic on CPU).
    transform: applied to the (B, H, G*n, t) logits (after the softcap, before the causal mask and the softmax), e.g.
    Keyformer's Gumbel noise and temperature; it returns the new logits (it may modify them in place)."""
    b, hq, n, _ = q.shape
    h, t_all = ctx.positions.shape[1], ctx.positions.shape[2]
    g = hq // h
    keys = ctx.keys.float()
    logits_buf = torch.empty(b * h * g * min(block_size, n) * t_all, device=q.device)
    mask_buf = torch.empty(b * h * min(block_size, n) * t_all, dtype=torch.bool, device=q.device)
    out = torch.zeros(b, h, t_all, device=q.device)
    for lo in range(0, n, block_size):
        block = slice(lo, lo + block_size)
        _add_block(ctx, keys, q[:, :, block], qpos[:, block], transform, out, logits_buf, mask_buf)
    return out


def _add_block(
    ctx: ScoreContext,
    keys: Tensor,
    q: Tensor,
    qpos: Tensor,
    transform: Callable[[Tensor], Tensor] | None,
    out: Tensor,
    logits_buf: Tensor,
    mask_buf: Tensor,
) -> None:
    """Add one block's received attention to out (B, H, T), with its logits and mask in views of the buffers."""
    b, hq, n, d = q.shape
    pos = ctx.positions  # (B, H, T)
    h, g = pos.shape[1], hq // pos.shape[1]
    real = qpos >= 0
    qpos = torch.where(real, qpos, qpos.amax())  # pad queries attend like the latest query, with weight 0
    visible = (pos >= 0) & (pos <= qpos.amax())
    t = int(visible.flatten(0, 1).any(dim=0).nonzero().max()) + 1 if bool(visible.any()) else 1  # later slots: unseen
    pos = pos[:, :, :t]
    softcap = ctx.adapter.softcap(ctx.module)
    scale = ctx.scaling / softcap if softcap is not None else ctx.scaling
    qs = (q.float() * scale).reshape(b, h, g * n, d)  # (B, H, G*n, D), grouped by KV head
    logits = logits_buf[: b * h * g * n * t].view(b, h, g * n, t)
    torch.matmul(qs, keys[:, :, :t].transpose(-1, -2), out=logits)
    if softcap is not None:
        logits.tanh_().mul_(softcap)
    if transform is not None:
        logits = transform(logits)
    blocked = ((pos < 0) | (pos > qpos.amin())).flatten(0, 1).any(dim=0)  # (t,) slots some query may not see
    first = int(blocked.int().argmax()) if bool(blocked.any()) else t
    if first < t:
        tail = pos[:, :, None, None, first:]  # (B, H, 1, 1, t - first)
        hidden = mask_buf[: b * h * n * (t - first)].view(b, h, 1, n, t - first)
        torch.gt(tail, qpos[:, None, None, :, None], out=hidden)
        hidden |= tail < 0
        # finite, so a pad query of a row whose real tokens come later gives no NaN (weight 0)
        logits.view(b, h, g, n, t)[..., first:].masked_fill_(hidden, torch.finfo(logits.dtype).min)
    # softmax in place, its normalisation folded into the weights of the sum over queries: no second buffer
    exp = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # (B, H, G*n, t)
    weight = real.float()[:, None, None, :].expand(b, 1, g, n).reshape(b, 1, 1, g * n) / exp.sum(dim=-1)[:, :, None]
    out[..., :t] += (weight @ exp)[:, :, 0]  # sum over the block's real queries and the group
