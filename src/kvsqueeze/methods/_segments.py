"""Reductions over groups of slots that share a segment of positions (partitions, windows, chunks).

Segments are defined by absolute position, not by slot, so a row's segments do not depend on its left padding or on
what earlier compressions evicted: segment s of a row holds positions [offset + s * size, offset + (s + 1) * size).
Empty slots (position -1) and positions before `offset` belong to no segment (id -1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_ids(positions: Tensor, size: int, offset: int = 0) -> Tensor:
    """(B, H, T) long segment id of every slot, -1 for empty slots and positions before `offset`."""
    pos = positions.long()
    seg = torch.div(pos - offset, size, rounding_mode="floor")
    return torch.where((pos >= 0) & (pos >= offset), seg, -1)


def segment_reduce(x: Tensor, seg: Tensor, reduce: str) -> Tensor:
    """Reduce x (B, H, T) or (B, H, T, D) over the slots of each segment -> (B, H, S) or (B, H, S, D).

    reduce: "sum", "mean", "amin" or "amax". S = 1 + the largest id; slots with id -1 are ignored; an empty segment
    gives 0 (sum, mean), +inf (amin) or -inf (amax).
    """
    n_seg = int(seg.max()) + 1 if seg.numel() else 0
    index = torch.where(seg >= 0, seg, n_seg)  # a spare bucket for the slots of no segment
    if x.dim() == 4:
        index = index[..., None].expand_as(x)
    shape = (*x.shape[:2], n_seg + 1, *x.shape[3:])
    fill = {"sum": 0.0, "mean": 0.0, "amin": float("inf"), "amax": float("-inf")}[reduce]
    out = torch.full(shape, fill, dtype=x.dtype, device=x.device)
    if reduce == "mean":
        total = out.scatter_add(2, index, x)
        count = torch.zeros(shape, dtype=x.dtype, device=x.device).scatter_add(2, index, torch.ones_like(x))
        return (total / count.clamp(min=1))[:, :, :n_seg]
    op = "sum" if reduce == "sum" else reduce
    return out.scatter_reduce(2, index, x, op, include_self=reduce == "sum")[:, :, :n_seg]


def gather_segments(per_segment: Tensor, seg: Tensor, fill: float = 0.0) -> Tensor:
    """Broadcast per-segment values (B, H, S[, D]) back to slots (B, H, T[, D]); slots of no segment get `fill`."""
    index = seg.clamp(min=0)
    if per_segment.dim() == 4:
        index = index[..., None].expand(*seg.shape, per_segment.shape[-1])
        out = per_segment.gather(2, index)
        return torch.where((seg >= 0)[..., None], out, fill)
    if per_segment.shape[-1] == 0:
        return torch.full(seg.shape, fill, dtype=per_segment.dtype, device=per_segment.device)
    return torch.where(seg >= 0, per_segment.gather(2, index), fill)


def segment_softmax(x: Tensor, seg: Tensor) -> Tensor:
    """Softmax of x (B, H, T) over the slots of each segment; slots of no segment get 0."""
    if not bool((seg >= 0).any()):
        return torch.zeros_like(x)
    top = gather_segments(segment_reduce(torch.where(seg >= 0, x, float("-inf")), seg, "amax"), seg)
    e = torch.where(seg >= 0, torch.exp(x - top), 0.0)
    return e / gather_segments(segment_reduce(e, seg, "sum"), seg, fill=1.0)
