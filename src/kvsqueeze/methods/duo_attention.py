"""DuoAttention: "retrieval" heads keep the whole context, "streaming" heads keep only the attention sinks and a recent
window (Xiao, Tang, Zuo, Guo, Yang, Tang, Fu, Han 2024, arXiv 2410.10819).

Which KV heads stream is decided once per model. The paper learns a gate per KV head by optimising, on synthetic
passkey data, the distance between the last hidden states of the model with full attention and with each head's
attention mixed between full and streaming (sinks + recent) by its gate. Training is not affordable here, so kvsqueeze
calibrates a training-free proxy of the same question, "how much does this head's output change when it only sees
its sinks and recent window?", on kvsqueeze's generic text (cached on disk):

    for every full-attention layer, calibration chunk (positions 0..C-1) and query position t >= n_sink + window (the
    queries for which streaming attention differs from full attention), with o^full_{g,t} and o^stream_{g,t} the
    attention outputs of query head g under the causal mask and under the streaming mask (key j visible iff j < n_sink
    or t - j < window), written to the residual stream through the head's slice W_O^g of o_proj:
        error(layer, h) = sum_{t, g in h's group} ||(o^stream_{g,t} - o^full_{g,t}) W_O^g||^2
                          / sum_t ||sum_{g'} o^full_{g',t} W_O^{g'}||^2
    i.e. the squared change of the layer's attention output caused by streaming head h alone, relative to that output.

Heads are ranked model-wide by this error; the lowest are the streaming candidates. At compression time, for a row of
n tokens a streaming head keeps s = min(n, n_sink + window) tokens (the first n_sink and the most recent ones) and
evicts n - s, so about ratio x n x (heads) / (n - s) heads are made streaming, nearest integer, capped at all heads: the
cache shrinks by about `ratio` (at most 1 - s/n), not exactly (`budget_kind = "adaptive"`). `streaming_fraction`
instead fixes the share of streaming heads whatever the ratio. Heads of one layer keep different counts, so the layer
is stored ragged (`cache.py`): the memory of the evicted tokens is freed for real, unlike a masked implementation.
The defaults (4 sinks, a 64-token window) are sized for the 1-4k-token contexts kvsqueeze benchmarks; a larger window
brings streaming closer to full attention but evicts less per streaming head, so more heads stream for one ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.calibration import AttentionCall, artifact_path, calibrated, collect_attention, remembered
from kvsqueeze.methods._calibrated import CalibrationOptions, per_layer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import get_adapter
from kvsqueeze.validation import check_float, check_int

KIND = "duo_attention"


def streaming_error(call: AttentionCall, n_sink: int, window: int) -> Tensor:
    """(H + 1,) for one calibration chunk of one layer: the squared output error of each KV head when it streams
    (sinks + recent window), then the squared norm of the layer's full attention output, both summed over the queries
    at positions >= n_sink + window (see the module docstring)."""
    q = call.queries(rope=True)[0].float()  # (H_q, T, D)
    keys, values = call.keys_values()
    h, t = keys.shape[1], keys.shape[2]
    g = q.shape[0] // h
    k = keys[0].float().repeat_interleave(g, dim=0)  # (H_q, T, D)
    v = values[0].float().repeat_interleave(g, dim=0)  # (H_q, T, Dv)
    logits = float(getattr(call.module, "scaling", q.shape[-1] ** -0.5)) * q @ k.transpose(-1, -2)  # (H_q, T, T)
    cap = call.adapter.softcap(call.module)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    i = torch.arange(t, device=q.device)
    causal = i[None, :] <= i[:, None]  # (T, T) [query, key]
    stream = causal & ((i[None, :] < n_sink) | (i[:, None] - i[None, :] < window))
    full = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    streamed = torch.softmax(logits.masked_fill(~stream, float("-inf")), dim=-1)
    rows = i >= n_sink + window  # queries whose visible keys differ
    w = call.adapter.output_projection(call.module).float()  # (H_q, Dv, hidden)
    diff = (streamed[:, rows] - full[:, rows]) @ v  # (H_q, T', Dv)
    error = (diff @ w).square().sum(dim=(-1, -2)).view(h, g).sum(dim=1)  # (H,)
    out = torch.einsum("gtd,gdo->to", full[:, rows] @ v, w)  # (T', hidden) the layer's attention output, no bias
    return torch.cat([error, out.square().sum()[None]]).cpu()


def compute_head_errors(model: Any, ids: Tensor, chunk_size: int, n_sink: int, window: int) -> dict[str, Tensor]:
    """{"error_<l>": (H,)} relative streaming error of each KV head of every full-attention layer l over `ids`."""
    layers = get_adapter(model).full_layers
    parts = collect_attention(
        model, ids, lambda call: streaming_error(call, n_sink, window), chunk_size, layers, desc="DuoAttention"
    )
    out = {}
    for layer in layers:
        total = torch.stack(parts.pop(layer)).double().sum(dim=0)  # (H + 1,)
        out[f"error_{layer}"] = (total[:-1] / total[-1].clamp(min=1e-30)).float()
    return out


def streaming_ranks(errors: dict[int, Tensor]) -> dict[int, Tensor]:
    """{layer: (H,) long} rank of each KV head among all full-attention heads by ascending error (0 = streams first);
    ties go to the earlier layer, then the earlier head."""
    layers = sorted(errors)
    flat = torch.cat([errors[i].double() for i in layers])  # (L H,)
    order = torch.sort(flat, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel())
    return dict(zip(layers, rank.split([errors[i].numel() for i in layers]), strict=True))


def n_streaming(seen: Tensor, ratio: float, n_heads: int, kept: int, fraction: float | None) -> Tensor:
    """(B,) long: how many of the model's `n_heads` KV heads stream for rows of `seen` tokens, when a streaming head
    keeps `kept` (n_sink + window) tokens: a fixed `fraction` of them, or as many as evict about `ratio` of it."""
    if fraction is not None:
        return torch.full_like(seen, math.floor(fraction * n_heads + 0.5), dtype=torch.long)
    n = seen.double()
    evicted = (n - torch.clamp(n, max=kept)).clamp(min=0)  # per streaming head
    want = torch.where(evicted > 0, ratio * n * n_heads / evicted.clamp(min=1), torch.zeros_like(n))
    return torch.floor(want + 0.5).long().clamp(max=n_heads)


@dataclass
class DuoAttentionOptions(ScorerMethod):
    """DuoAttention's own options, before the calibration options (`CalibrationOptions` explains the split)."""

    budget_scope = "layer"  # heads of a layer keep different counts (stored ragged)
    budget_kind = "adaptive"  # the total is about n(1-r), set by how many heads stream

    n_sink: int = 4  # first positions a streaming head keeps
    window: int = 64  # most recent positions a streaming head keeps
    streaming_fraction: float | None = None  # fixed share of streaming heads (the ratio is then not used)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_sink", self.n_sink, 0, 1_000_000)
        check_int("window", self.window, 0, 1_000_000)
        if self.n_sink + self.window < 1:
            raise ValueError("a streaming head must keep a token: n_sink + window must be >= 1, got 0 + 0")
        check_float("streaming_fraction", self.streaming_fraction, 0.0, 1.0, none_ok=True)


@register_method("duo_attention")
@dataclass
class DuoAttention(CalibrationOptions, DuoAttentionOptions):
    """Streaming heads (lowest calibrated error when restricted to sinks + recent window) keep only those, the
    others keep everything; as many streaming heads as evict about the ratio (DuoAttention)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_chunk <= self.n_sink + self.window:
            raise ValueError(
                f"calibration_chunk must exceed n_sink + window = {self.n_sink + self.window} (else streaming changes "
                f"nothing to measure), got {self.calibration_chunk}"
            )

    def _key(self) -> tuple[Any, ...]:
        return (KIND, *self.calibration_key(), self.n_sink, self.window)

    def _calibrate(self, model: Any, tokenizer: Any, force: bool) -> tuple[Path, dict[int, Tensor]]:
        ids, chunk, settings = self.calibration_setup(model, tokenizer)
        settings.update(n_sink=self.n_sink, window=self.window)
        compute = lambda: compute_head_errors(model, ids, chunk, self.n_sink, self.window)  # noqa: E731
        tensors = calibrated(KIND, model, settings, compute, force=force)
        return artifact_path(KIND, model, settings), per_layer(tensors, "error")

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path:
        path, errors = self._calibrate(model, tokenizer, force)
        remembered(model, self._key(), lambda: errors, refresh=True)
        return path

    def head_errors(self, model: Any) -> dict[int, Tensor]:
        """{layer: (H,) relative streaming error}, calibrated (or loaded from disk) on first use for this model."""
        return remembered(model, self._key(), lambda: self._calibrate(model, None, False)[1])

    def streaming(self, ctx: ScoreContext) -> Tensor:
        """(B, H) bool: which KV heads of this layer stream, per row."""
        errors = self.head_errors(ctx.adapter.model)
        rank = streaming_ranks(errors)[ctx.layer_idx].to(ctx.keys.device)  # (H,)
        n_heads = sum(e.numel() for e in errors.values())
        k = n_streaming(ctx.seen, self.ratio, n_heads, self.n_sink + self.window, self.streaming_fraction)
        return rank[None, :] < k.to(ctx.keys.device)[:, None]

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H): n_sink + window for streaming heads, all for the others
        seen = ctx.seen.to(ctx.keys.device)[:, None].expand(-1, ctx.keys.shape[1])
        return torch.where(self.streaming(ctx), seen.clamp(max=self.n_sink + self.window), seen)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): newer = higher (the sinks are protected)
        return ctx.positions.float()

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return sinks_and_recent(ctx, self.n_sink, 0) if self.n_sink else None
