"""Helpers for the per-method rule tests: fake score contexts from plain tensors, the positions a top-k rule keeps,
the replay methods' global-top check and a SnapKV score spy (ids, prefills and kept positions: tests/helpers.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import kvsqueeze as kvs
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import ids_of, prefill, prefill_with_log


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


def top_positions(scores: list[float], k: int, protected: set[int] | None = None) -> list[int]:
    """The k positions a rule keeps: protected ones first, then the highest scores, ties to the earlier position."""
    protected = protected or set()
    rest = sorted((p for p in range(len(scores)) if p not in protected), key=lambda p: (-scores[p], p))
    return sorted([*protected, *rest[: k - len(protected)]])


def budget(n: int, ratio: float) -> int:
    return max(1, math.floor(n * (1 - ratio) + 1e-6))


def assert_global_top_of_replay(model: Any, name: str, variant: str, ratio: float, n: int = 57) -> Any:
    """A replay method (KVzip, KVzip+, KVgrad) keeps exactly the model-wide top floor(n(1-r)) x heads x layers of its
    replay scores (computed on an uncompressed prefill), and heads/layers keep different counts. Returns the log."""
    from kvsqueeze.replay import kvzip_scores

    ids = ids_of(n, seed=7)
    cache, log = prefill_with_log(model, ids, kvs.get_method(name, ratio=ratio, chunk_size=20))
    dense = prefill(model, ids)
    scores = kvzip_scores(model, dense, ids, variant, prompt_ids=[], chunk_size=20)  # no tokenizer: no prompt
    layers = kvs.get_adapter(model).full_layers
    heads = dense.layer(layers[0]).view()[2].shape[1]
    budget = math.floor(n * (1 - ratio)) * heads * len(layers)  # floor(n(1-r)) per (layer, head), pooled
    kept = {i: cache.layer(i).view()[2][0] for i in layers}  # (H, T) positions kept
    assert sum(int((p >= 0).sum()) for p in kept.values()) == budget
    counts = [int((kept[i][h] >= 0).sum()) for i in layers for h in range(heads)]
    assert len(set(counts)) > 1, "one pool: heads and layers keep different counts"
    flat = torch.cat([scores[i][0].flatten() for i in layers])
    threshold = flat.sort(descending=True).values[budget - 1]
    for i in layers:
        for h in range(heads):
            pos = kept[i][h][kept[i][h] >= 0].long()
            want = torch.nonzero(scores[i][0, h] >= threshold).flatten()
            assert pos.tolist() == want.tolist(), (i, h)
    return log


@dataclass
class SpySnapKV(SnapKV):
    """SnapKV that records, per layer, the scores it returned."""

    seen_scores: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        scores = super().score(ctx)
        self.seen_scores[ctx.layer_idx] = scores.clone()
        return scores
