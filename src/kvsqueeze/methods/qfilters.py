"""Q-Filters: keep the keys that project most on their head's typical query direction (Godey, Devoto, Zhao,
Scardapane, Minervini, de la Clergerie, Sagot 2025, arXiv 2503.02812).

Queries of a head concentrate along one direction. Calibration, once per model and cached on disk
(`kvsqueeze.calibration`): post-RoPE queries of every query head over kvsqueeze's generic text, uncentered SVD, top
right singular vector v1 oriented so that most queries have a positive coefficient on it; the filter f of a KV head is
the mean of the v1 of its G query heads. Online: s_i = <f, k_i>, higher = keep.

Sign: the queries point along +f, so a key with a large projection on f gets large logits <q, k_i> from most queries:
keep the largest <f, k_i>. Checked on SmolLM2-135M (tests/integration/test_qfilters_smollm2.py): over held-out text,
the keys ranked by +<f, k> receive more attention than those ranked by -<f, k> (README, "Q-Filters").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.calibration import artifact_path, calibrated, collect_attention, remembered
from kvsqueeze.methods._calibrated import CalibrationOptions, per_layer
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import get_adapter


def query_directions(queries: Tensor) -> Tensor:
    """(..., D) unit top right singular vector of each (..., N, D) set of queries (uncentered), oriented so that most
    queries have a positive coefficient on it (ties: the sign of the mean coefficient)."""
    q = queries.double()
    v = torch.linalg.svd(q, full_matrices=False).Vh[..., 0, :]  # (..., D)
    coef = torch.einsum("...nd,...d->...n", q, v)  # (..., N)
    votes = (coef > 0).sum(-1) - (coef < 0).sum(-1)
    votes = torch.where(votes == 0, torch.sign(coef.sum(-1)), torch.sign(votes))
    return (v * torch.where(votes < 0, -1.0, 1.0)[..., None]).float()


def compute_filters(model: Any, ids: Tensor, chunk_size: int) -> dict[str, Tensor]:
    """{"layer_<l>": (H, D) filter of each KV head} for every full-attention layer l of `model`, from its post-RoPE
    queries over `ids`."""
    adapter = get_adapter(model)
    h, g, d = adapter.n_kv_heads, adapter.group_size, adapter.head_dim
    layers = adapter.full_layers  # sliding layers are never pruned: no filter needed
    queries = collect_attention(
        model, ids, lambda call: call.queries(rope=True)[0].float().cpu(), chunk_size, layers, desc="Q-Filters"
    )
    out = {}
    for layer in layers:
        q = torch.cat(queries.pop(layer), dim=1)  # (H_q, N, D)
        out[f"layer_{layer}"] = query_directions(q).view(h, g, d).mean(dim=1)  # (H, D)
    return out


@register_method("qfilters")
@dataclass
class QFilters(CalibrationOptions):
    """Keep keys projecting most on the head's main query direction (calibrated once per model, cached on disk)."""

    def _calibrate(self, model: Any, tokenizer: Any, force: bool) -> tuple[Path, dict[int, Tensor]]:
        ids, chunk, settings = self.calibration_setup(model, tokenizer)
        tensors = calibrated("qfilters", model, settings, lambda: compute_filters(model, ids, chunk), force=force)
        return artifact_path("qfilters", model, settings), per_layer(tensors, "layer")

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path:
        path, filters = self._calibrate(model, tokenizer, force)
        remembered(model, ("qfilters", *self.calibration_key()), lambda: filters, refresh=True)
        return path

    def filters(self, model: Any) -> dict[int, Tensor]:
        """{layer: (H, D) filter}, calibrated (or loaded from disk) on first use for this model."""
        return remembered(model, ("qfilters", *self.calibration_key()), lambda: self._calibrate(model, None, False)[1])

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        f = self.filters(ctx.adapter.model)[ctx.layer_idx].to(ctx.keys.device)  # (H, D)
        return torch.einsum("bhtd,hd->bht", ctx.keys.float(), f)
