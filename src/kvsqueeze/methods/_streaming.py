"""Streaming selection inside one compression: walk the forward's new tokens in blocks and evict between blocks.

Shared by the block-wise wrapper (`block`) and FINCH. After a forward appended q tokens to a layer, the walk starts
from the slots the layer already held (an earlier forward's kept tokens), then adds the new tokens `block_size` at a
time in position order. Blocks are counted back from the end of the walk (the first block may be shorter), so that
a left-padded row of a batch is cut exactly as when it runs alone. After each block the candidates (kept so far +
the block) are scored and, where a (row, head) holds more than its budget, cut back to the budget. Only the final
kept set is pruned from the cache; the walk itself allocates at most one (B, H, budget + block) gathered copy at a
time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, select

# (candidates (B, H, T) bool, first new token of the block, one past its last) -> (scores (B, H, T), protected or None)
StepScores = Callable[[Tensor, int, int], tuple[Tensor, Tensor | None]]


def keep_mask(indices: Tensor, counts: Tensor, t: int) -> Tensor:
    """(B, H, T) bool of the slots a plan (indices (B, H, K), counts (B, H)) keeps."""
    k = indices.shape[-1]
    filled = torch.arange(k, device=indices.device)[None, None, :] < counts[..., None]
    out = torch.zeros(*indices.shape[:2], t + 1, dtype=torch.bool, device=indices.device)  # slot t: a dump
    return out.scatter_(-1, torch.where(filled, indices, t), filled)[..., :t]


def stream_keep(
    ctx: ScoreContext, block_size: int, budget: Tensor, step: StepScores, walk: int | None = None
) -> Tensor:
    """(B, H, T) bool: the slots kept after walking the first `walk` (default: all) new tokens in blocks.

    budget (B, H): what each (row, head) may hold after every block. Slots of new tokens beyond `walk` are not
    candidates (never kept by the walk; FINCH's question). `step` scores the candidates of one block.
    """
    valid = ctx.valid
    pos = ctx.positions.long()
    qpos = ctx.query_positions.to(pos.device).long()  # (B, q), -1 = pad
    n = qpos.shape[1] if walk is None else walk
    real = qpos >= 0
    first_new = torch.where(real, qpos, torch.iinfo(torch.long).max).amin(dim=1)  # (B,) no new token: max
    seen_until = torch.where(real.any(dim=1), first_new - 1, pos.amax(dim=(1, 2)))  # (B,) newest old position
    kept = valid & (pos <= seen_until[:, None, None])
    for hi in reversed(range(n, 0, -block_size)):  # blocks end at the walk's end: rows end together (left padding)
        lo = max(0, hi - block_size)
        block_last = torch.where(real[:, lo:hi], qpos[:, lo:hi], -1).amax(dim=1)  # (B,)
        until = torch.maximum(seen_until, block_last)
        block = valid & (pos > seen_until[:, None, None]) & (pos <= until[:, None, None])  # the block's slots
        seen_until = until
        cand = kept = kept | block
        if bool((cand.sum(dim=-1) > budget).any()):
            scores, protected = step(cand, lo, hi)
            kept = keep_mask(*select(scores.float(), cand, budget, protected), cand.shape[-1])
    return kept


def gather_context(ctx: ScoreContext, cand: Tensor, lo: int, hi: int) -> tuple[ScoreContext, Tensor]:
    """A context holding only the candidate slots (left-aligned, empty slots -1) whose new tokens are the forward's
    tokens lo:hi, as if that block had been the forward; and the slot index (B, H, Tc) of each of its slots in ctx."""
    t = cand.shape[-1]
    counts = cand.sum(dim=-1)
    tc = max(int(counts.max()), 1)
    slots = torch.arange(t, device=cand.device).expand_as(cand)
    index = torch.sort(torch.where(cand, slots, slots + t), dim=-1).values[..., :tc] % t  # (B, H, Tc) slot order
    filled = torch.arange(tc, device=cand.device)[None, None, :] < counts[..., None]
    d, dv = ctx.keys.shape[-1], ctx.values.shape[-1]
    qpos = ctx.query_positions[:, lo:hi]
    seen_before = ctx.seen - (ctx.query_positions >= 0).sum(dim=1).to(ctx.seen.device)
    cos, sin = ctx.position_embeddings
    queries = None if ctx.captured_queries is None else ctx.captured_queries[:, :, lo:hi]
    sub = dataclasses.replace(
        ctx,
        keys=ctx.keys.gather(2, index[..., None].expand(*index.shape, d)),
        values=ctx.values.gather(2, index[..., None].expand(*index.shape, dv)),
        positions=torch.where(filled, ctx.positions.gather(2, index), -1),
        hidden_states=ctx.hidden_states[:, lo:hi],
        query_positions=qpos,
        position_embeddings=(cos[:, lo:hi], sin[:, lo:hi]),
        seen=seen_before + (ctx.query_positions[:, :hi] >= 0).sum(dim=1).to(ctx.seen.device),  # up to the block's end
        captured_queries=queries,
        _cache={},
    )
    return sub, torch.where(filled, index, -1)


def scatter_back(sub_scores: Tensor, index: Tensor, t: int) -> Tensor:
    """Scores of a gathered context (B, H, Tc) put back at their slots of the full context (B, H, T); others -inf."""
    out = sub_scores.new_full((*index.shape[:2], t + 1), float("-inf"))  # slot t: a dump for empty slots
    return out.scatter_(-1, torch.where(index >= 0, index, t), sub_scores)[..., :t]
