"""Helpers shared by the test tiers: deterministic token ids, a prefill of a tiny model into a fresh `KVCache`, and
reads of what a compressed cache kept.

The reads go through the cache's public verbs only (`KVCache.full_layers()`, `kv_layers()`, `layer(i)`;
`KVLayer.view()`, `kept`, `is_sliding`), never through a layer's stored tensors, so they read a rectangular layer and
a ragged one (heads or rows keeping different counts, `layer.is_ragged`) alike and do not depend on how a storage
lays its tokens out. `view()` gives the rectangular (B, H, T) positions in either layout, an empty slot at -1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import kvsqueeze as kvs
from kvsqueeze.cache import KVLayer
from kvsqueeze.press import CompressionLog

__all__ = [
    "full_layer_indices",
    "full_layer_positions",
    "ids_of",
    "kept_by_layer",
    "kept_counts",
    "kept_positions",
    "kept_total",
    "layer_types",
    "prefill",
    "prefill_with_log",
    "record_scores",
]


# --- inputs -----------------------------------------------------------------------------------------------------------


def ids_of(n: int, seed: int = 0, batch: int = 1) -> Tensor:
    """(batch, n) token ids drawn uniformly from [5, 500), the same for the same `seed`: clear of the tiny tokenizer's
    special tokens (ids 0-4) and inside its vocabulary."""
    return torch.randint(5, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def layer_types(model: Any) -> list[str]:
    """Each layer's attention kind from the model's config ("full_attention" or "sliding_attention"); a config that
    does not list them has only full-attention layers."""
    types = getattr(model.config, "layer_types", None)
    return list(types or ["full_attention"] * model.config.num_hidden_layers)


def full_layer_indices(model: Any) -> list[int]:
    """Indices of the full-attention layers (the ones a method prunes), read from the config."""
    return [i for i, kind in enumerate(layer_types(model)) if kind == "full_attention"]


# --- prefill ----------------------------------------------------------------------------------------------------------


def prefill_with_log(
    model: Any, ids: Tensor, method: kvs.Method | None = None, mask: Tensor | None = None
) -> tuple[kvs.KVCache, CompressionLog]:
    """One forward of `ids` (attention mask `mask`) into a fresh `KVCache` inside `compress(model, method)`, without
    gradients: (cache, compression log). `method=None` fills the cache uncompressed through kvsqueeze's attention."""
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method) as log:
        model(ids, attention_mask=mask, past_key_values=cache)
    return cache, log


def prefill(model: Any, ids: Tensor, method: kvs.Method | None = None, mask: Tensor | None = None) -> kvs.KVCache:
    """The cache of `prefill_with_log`: `ids` prefilled into a fresh `KVCache`, compressed with `method` (None: not)."""
    return prefill_with_log(model, ids, method, mask)[0]


# --- what a cache kept ------------------------------------------------------------------------------------------------


def kept_positions(layer: KVLayer, row: int, head: int) -> list[int]:
    """The positions `layer` holds for (`row`, `head`), ascending, empty slots left out; any layout."""
    pos = layer.view()[2][row, head]  # (T,) rectangular positions, also for a ragged layer
    return sorted(pos[pos >= 0].tolist())


def kept_by_layer(cache: kvs.KVCache, row: int = 0) -> list[list[list[int]]]:
    """`kept_positions` of `row` for every full-attention layer (outer list) and KV head (inner list)."""
    return [
        [kept_positions(layer, row, head) for head in range(int(layer.kept.shape[1]))] for layer in cache.full_layers()
    ]


def full_layer_positions(cache: kvs.KVCache) -> dict[int, Tensor]:
    """{layer index: (B, H, T) positions} for every full-attention layer, a copy in the rectangular form of
    `KVLayer.view()` (-1 = empty slot) whatever the layout; sliding layers are left out."""
    return {i: layer.view()[2].clone() for i, layer in enumerate(cache.kv_layers()) if not layer.is_sliding}


def kept_counts(cache: kvs.KVCache) -> list[list[list[int]]]:
    """Per full-attention layer, the number of tokens each (row, head) holds: `layer.kept` as [row][head] lists."""
    return [layer.kept.tolist() for layer in cache.full_layers()]


def kept_total(cache: kvs.KVCache) -> int:
    """(token, head) pairs held by all full-attention layers together, every row."""
    return sum(int(layer.kept.sum()) for layer in cache.full_layers())


# --- spies ------------------------------------------------------------------------------------------------------------


def record_scores(method: Any) -> dict[int, Tensor]:
    """Make `method` record the scores (B, H, T) its `score` returns, per layer index (the last call per layer wins);
    returns the dict it fills."""
    seen: dict[int, Tensor] = {}
    original = method.score

    def score(ctx):
        out = original(ctx)
        seen[ctx.layer_idx] = out.clone()
        return out

    method.score = score
    return seen
