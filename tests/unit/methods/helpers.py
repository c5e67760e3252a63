"""Helpers for the per-method rule tests: fake score contexts from plain tensors, prefills, kept positions."""

from __future__ import annotations

import math
from typing import Any

import torch

import kvsqueeze as kvs
from kvsqueeze.methods.base import ScoreContext


def ids_of(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(5, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def fake_ctx(
    keys: torch.Tensor, values: torch.Tensor | None = None, positions: torch.Tensor | None = None, layer_idx: int = 0
) -> ScoreContext:
    """A ScoreContext for rules that only read keys, values and positions (no model: module/adapter are None)."""
    b, h, t, _ = keys.shape
    if positions is None:
        positions = torch.arange(t, dtype=torch.int32).expand(b, h, t).clone()
    seen = (positions[:, 0] >= 0).sum(dim=-1).long()
    none: Any = None
    return ScoreContext(
        keys=keys,
        values=keys.clone() if values is None else values,
        positions=positions,
        hidden_states=torch.zeros(b, 0, 8),
        query_positions=torch.zeros(b, 0, dtype=torch.long),
        position_embeddings=(torch.zeros(b, 0, 8), torch.zeros(b, 0, 8)),
        seen=seen,
        layer_idx=layer_idx,
        module=none,
        adapter=none,
    )


def prefill(model, ids, method, mask=None) -> kvs.KVCache:
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method):
        model(ids, attention_mask=mask, past_key_values=cache)
    return cache


def kept_positions(layer, row: int, head: int) -> list[int]:
    pos = layer.positions[row, head]
    return sorted(pos[pos >= 0].tolist())


def top_positions(scores: list[float], k: int, protected: set[int] | None = None) -> list[int]:
    """The k positions a rule keeps: protected ones first, then the highest scores, ties to the earlier position."""
    protected = protected or set()
    rest = sorted((p for p in range(len(scores)) if p not in protected), key=lambda p: (-scores[p], p))
    return sorted([*protected, *rest[: k - len(protected)]])


def budget(n: int, ratio: float) -> int:
    return max(1, math.floor(n * (1 - ratio) + 1e-6))
