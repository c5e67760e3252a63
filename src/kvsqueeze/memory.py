"""Measure what a cache holds, from its storages (a slice counts its whole storage, once)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from transformers.cache_utils import Cache

from kvsqueeze.cache import KVCache
from kvsqueeze.layer import KVLayer
from kvsqueeze.storage import storage_bytes

__all__ = ["CacheStats", "cache_bytes", "cache_stats"]


@dataclass
class CacheStats:
    """Bytes actually held by a cache, from its storages (a slice counts its whole storage, once)."""

    kv_bytes: int  # keys + values of the full-attention layers (the layers compression prunes); quantized layers:
    # codes, scales, zero points and the full-precision residual
    sliding_kv_bytes: int  # keys + values of sliding-window layers (never pruned; reported apart)
    metadata_bytes: int  # position bookkeeping
    padding_bytes: int  # part of kv_bytes spent on empty slots (padded rows, heads that keep fewer)
    tokens_kept: list[int]  # per layer: slots filled, averaged over rows and heads, rounded down
    peak_kv_bytes: int  # the most keys+values bytes all layers held at once (tracked by a KVCache; else current)
    kv_bits: int | None = None  # bits per key/value code of a quantized KVCache's full-attention layers, else None


def _metadata(layer: KVLayer) -> list[Tensor]:
    stored = [] if layer.storage is None else layer.storage.metadata_tensors()
    return [t for t in [*stored, layer.seen, layer.key_channels] if t is not None]


def _kv_tensors(layer: object) -> list[Tensor] | None:
    """The tensors holding a layer's keys and values (a KVLayer's storage says which), None if it holds none."""
    if isinstance(layer, KVLayer):
        return None if layer.storage is None else layer.storage.kv_tensors()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return None if keys is None or values is None else [keys, values]


def cache_stats(cache: Cache) -> CacheStats:
    """Measure what a cache holds. Works on any transformers Cache; padding/peaks only for KVCache."""
    seen_ptrs: set[int] = set()
    kv = sliding = meta = padding = 0
    kept: list[int] = []
    for layer in cache.layers:
        tensors = _kv_tensors(layer)
        if tensors is None:
            continue
        nbytes = storage_bytes(tensors, seen_ptrs)
        if getattr(layer, "is_sliding", False):
            sliding += nbytes
            continue
        kv += nbytes
        if isinstance(layer, KVLayer) and layer.storage is not None:
            meta += storage_bytes(_metadata(layer), seen_ptrs)
            empty = layer.storage.padding_slots()  # only layouts that store empty slots (rectangular) have any
            if empty:  # slot sizes from the tensors holding keys and values (a full-precision layout's own)
                keys, values = tensors[0], tensors[1]
                padding += empty * (keys.element_size() * keys.shape[-1] + values.element_size() * values.shape[-1])
            kept.append(int(layer.kept.float().mean()))
        else:
            kept.append(tensors[0].shape[-2])
    peak = cache.tracker.peak if isinstance(cache, KVCache) else kv + sliding
    bits = cache.kv_bits if isinstance(cache, KVCache) else None
    return CacheStats(kv, sliding, meta, padding, kept, peak, bits)


def cache_bytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds, counted from the distinct storages (all layers)."""
    stats = cache_stats(cache)
    return stats.kv_bytes + stats.sliding_kv_bytes
