"""Key re-rotation: after pruning, move the kept tokens to contiguous positions (StreamingLLM as published).

Full layers: the kept tokens of each (row, head), in order, take positions P - K .. P - 1, where K is how many it keeps
and P the most tokens any full-attention layer keeps for the row (with a uniform budget: 0 .. K - 1). Sliding layers
(never pruned) shift by the same amount as the row's newest position. Keys are re-rotated with the model's own RoPE
(`ModelAdapter.rerotate`); values are unchanged; the next tokens continue at P (`KVCache.next_positions`), while
`seen` keeps the uncompressed length for budgets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvsqueeze.cache import KVCache
from kvsqueeze.hooks import forward_cache
from kvsqueeze.models import ModelAdapter
from kvsqueeze.step import is_paused

__all__ = ["rerotate_after_forward", "rerotate_cache"]


def rerotate_cache(cache: KVCache, adapter: ModelAdapter) -> None:
    """Re-rotate every layer of `cache` to contiguous positions (see the module docstring)."""
    full = [i for i, layer in enumerate(cache.kv_layers()) if not layer.is_sliding and layer.storage is not None]
    nxt = cache.next_positions()
    if not full or nxt is None:
        return
    kept = {i: cache.layer(i).kept for i in full}  # (B, H)
    target = torch.stack([k.amax(dim=1) for k in kept.values()]).amax(dim=0)  # (B,) P
    for i, layer in enumerate(cache.kv_layers()):
        if layer.storage is None:
            continue
        keys, _, pos = layer.view()  # rectangular, also for a ragged layer
        valid = pos >= 0
        if layer.is_sliding:
            new = torch.where(valid, pos - (nxt - target).to(pos.device)[:, None, None], -1)
            if bool((valid & (new < 0)).any()):
                raise ValueError(
                    f"key re-rotation: sliding-window layer {i} holds more tokens than the {int(target.min())} "
                    "positions of the re-rotated context; lower the ratio."
                )
        else:
            rank = valid.long().cumsum(dim=-1) - 1  # slots are in position order
            start = target.to(pos.device)[:, None, None] - kept[i][..., None]
            new = torch.where(valid, start + rank, -1)
        if not torch.equal(new.to(pos.dtype), pos):
            layer.replace_keys(adapter.rerotate(i, keys, pos, new), new)
    seen = cache.real_tokens_seen()
    assert seen is not None
    cache.position_offset = seen - target.to(seen.device)


def rerotate_after_forward(adapter: ModelAdapter):
    """A model forward hook that re-rotates the forward's cache (skipped while paused)."""

    def hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = forward_cache(kwargs, output)
        if isinstance(cache, KVCache) and not is_paused():
            rerotate_cache(cache, adapter)

    return hook
