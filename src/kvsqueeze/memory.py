"""Measure what a cache holds, from its storages (a slice counts its whole storage, once)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.cache_utils import Cache

from kvsqueeze.cache import KVCache
from kvsqueeze.layer import KVLayer
from kvsqueeze.storage import storage_bytes

__all__ = ["CacheStats", "cache_bytes", "cache_stats"]


@dataclass
class CacheStats:
    """Bytes actually held by a cache, from its storages (a slice counts its whole storage, once)."""

    kv_bytes: int  # keys + values of the full-attention layers (the layers compression prunes)
    sliding_kv_bytes: int  # keys + values of sliding-window layers (never pruned; reported apart)
    metadata_bytes: int  # position bookkeeping
    padding_bytes: int  # part of kv_bytes spent on empty slots (padded rows, heads that keep fewer)
    tokens_kept: list[int]  # per layer: slots filled, averaged over rows and heads, rounded down
    peak_kv_bytes: int  # the most keys+values bytes all layers held at once (tracked by a KVCache; else current)


def _metadata(layer: KVLayer) -> list:
    tensors = [layer.positions, layer.seen, layer.lengths, layer.key_channels]
    return [t for t in tensors if t is not None]


def cache_stats(cache: Cache) -> CacheStats:
    """Measure what a cache holds. Works on any transformers Cache; padding/peaks only for KVCache."""
    seen_ptrs: set[int] = set()
    kv = sliding = meta = padding = 0
    kept: list[int] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            continue
        nbytes = storage_bytes([keys, values], seen_ptrs)
        if getattr(layer, "is_sliding", False):
            sliding += nbytes
            continue
        kv += nbytes
        if isinstance(layer, KVLayer) and layer.storage is not None:
            meta += storage_bytes(_metadata(layer), seen_ptrs)
            per_slot = keys.element_size() * keys.shape[-1] + values.element_size() * values.shape[-1]
            padding += layer.storage.padding_slots() * per_slot
            kept.append(int(layer.kept.float().mean()))
        else:
            kept.append(keys.shape[-2])
    peak = cache.tracker.peak if isinstance(cache, KVCache) else kv + sliding
    return CacheStats(kv, sliding, meta, padding, kept, peak)


def cache_bytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds, counted from the distinct storages (all layers)."""
    stats = cache_stats(cache)
    return stats.kv_bytes + stats.sliding_kv_bytes
