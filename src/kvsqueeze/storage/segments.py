"""Index arithmetic over items stored segment after segment in one flat buffer (a segment = one (row, head) of a
layer; `counts` (S,) long gives the items of each), as the ragged and quantized layouts store tokens and groups."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_order", "offsets", "segment_ids", "take_segments"]


def segment_ids(counts: Tensor) -> Tensor:
    """(n,) the segment of each item."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def offsets(counts: Tensor) -> Tensor:
    """(n,) each item's offset within its segment."""
    starts = counts.cumsum(0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(starts, counts)


def take_segments(counts: Tensor, segments: Tensor) -> Tensor:
    """Flat indices of the items of `segments` (S',) long, segment after segment in that order (they may repeat)."""
    starts = counts.cumsum(0) - counts
    n = counts[segments]
    return torch.repeat_interleave(starts[segments], n) + offsets(n)


def merge_order(old: Tensor, new: Tensor) -> Tensor:
    """Indices into cat(old items, new items), given their segment ids (each ascending), that put every segment's
    items together, its old ones first."""
    return torch.sort(torch.cat([old, new]), stable=True).indices
