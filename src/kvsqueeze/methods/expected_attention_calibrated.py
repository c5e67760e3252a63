"""Expected Attention with calibrated query statistics (Devoto, Jeblick, Jegou 2025, arXiv 2510.00636, the "with
stats" variant).

Everything is Expected Attention's rule (`expected_attention.ExpectedAttention.score`: averaged RoPE over the next
`n_future` positions, closed-form expected attention of a Gaussian query, softmax over the non-sink keys, GQA mean,
value-norm rescaling), except where the Gaussian comes from: the per-layer, per-query-head mean and covariance of
pre-RoPE queries are computed once per model over kvsqueeze's generic text (each calibration chunk starts at position 0;
its first `n_sink` queries are left out, as EA leaves out the context's sinks) and cached on disk, instead of being
taken from the context's own queries. The context's queries are never computed, so scoring costs no q_proj, and the
statistics do not depend on the context (one prompt's unusual queries cannot skew them).
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
from kvsqueeze.methods.expected_attention import ExpectedAttention, QueryStats, query_stats
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import get_adapter

KIND = "expected_attention_stats"


def compute_query_stats(model: Any, ids: Tensor, chunk_size: int, n_sink: int) -> dict[str, Tensor]:
    """{"mean_<l>": (H_q, D), "cov_<l>": (H_q, D, D), "count_<l>": ()} of the pre-RoPE queries of every full-attention
    layer l over `ids`, in chunks of `chunk_size` (the first `n_sink` queries of each chunk left out)."""
    layers = get_adapter(model).full_layers

    def reduce(call: Any) -> QueryStats:
        q = call.queries(rope=False).float()  # (1, H_q, T, D)
        weight = (torch.arange(q.shape[2], device=q.device) >= n_sink)[None]  # (1, T)
        return query_stats(q, weight)

    chunks = collect_attention(model, ids, reduce, chunk_size, layers, desc="EA statistics")  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    for layer in layers:
        parts: list[QueryStats] = chunks.pop(layer)  # type: ignore[assignment]
        total = parts[0]
        for part in parts[1:]:
            total = total.merge(part)
        if float(total.count[0]) < 2:
            raise ValueError(f"too few calibration queries after the {n_sink} sinks; raise n_tokens")
        out[f"mean_{layer}"] = total.mean[0].cpu()
        out[f"cov_{layer}"] = total.covariance()[0].cpu()
        out[f"count_{layer}"] = total.count[0].cpu()
    return out


@register_method("expected_attention_calibrated")
@dataclass
class ExpectedAttentionCalibrated(CalibrationOptions, ExpectedAttention):
    """Expected Attention whose query mean and covariance come from a calibration on generic text (cached on disk)."""

    def _key(self) -> tuple[Any, ...]:
        return (KIND, *self.calibration_key(), self.n_sink)

    def _calibrate(self, model: Any, tokenizer: Any, force: bool) -> tuple[Path, dict[str, dict[int, Tensor]]]:
        ids, chunk, settings = self.calibration_setup(model, tokenizer)
        settings["n_sink"] = self.n_sink
        tensors = calibrated(KIND, model, settings, lambda: compute_query_stats(model, ids, chunk, self.n_sink), force)
        stats = {name: per_layer(tensors, name) for name in ("mean", "cov", "count")}
        return artifact_path(KIND, model, settings), stats

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path:
        path, stats = self._calibrate(model, tokenizer, force)
        remembered(model, self._key(), lambda: stats, refresh=True)
        return path

    def calibrated_stats(self, model: Any) -> dict[str, dict[int, Tensor]]:
        """{"mean"|"cov"|"count": {layer: tensor}}, calibrated (or loaded from disk) on first use for this model."""
        return remembered(model, self._key(), lambda: self._calibrate(model, None, False)[1])

    def stats(self, ctx: ScoreContext) -> QueryStats:
        """The calibrated statistics of this layer, the same for every row (the context's queries are not used)."""
        stats = self.calibrated_stats(ctx.adapter.model)
        b, device = ctx.keys.shape[0], ctx.keys.device
        count = stats["count"][ctx.layer_idx].to(device).expand(b)  # (B,)
        mean = stats["mean"][ctx.layer_idx].to(device).expand(b, -1, -1)  # (B, H_q, D)
        cov = stats["cov"][ctx.layer_idx].to(device).expand(b, -1, -1, -1)  # (B, H_q, D, D)
        return QueryStats(count, mean, cov * count[:, None, None, None])
