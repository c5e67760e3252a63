"""LU-KV: per-(layer, head) budgets that equalise the marginal long-horizon utility of kept tokens, over any scorer
(Tang, Jiao, Chen, Liu, Li, Chen 2026, arXiv 2602.08585).

A head's scorer ranks its tokens; how much the head loses at a given budget depends on the head: the paper profiles,
offline, each head's eviction loss as a function of its budget (the oracle importance of the tokens its scorer evicts,
oracle importance = the largest attention a token gets from the queries of a future decoding window), convexifies
each loss curve, and allocates the model's total budget greedily by marginal utility; online, only a lookup remains.

Here the profile is computed locally on kvsqueeze's generic text (cached on disk, once per model, scorer and setting):
each calibration chunk of C tokens is split into a context (the first C - horizon tokens) and a "future" (the last
`horizon` tokens, teacher-forced as a decoding window would be). For each full-attention layer and KV head:
    I_j      = max over future queries t and the head's G query heads of the causal attention weight a_{g,t,j}, for
               each context token j (the oracle importance);
    order    = the scorer's keep order on the context (its protected tokens first, then by score, ties to the earlier
               token), computed from a ScoreContext of the context alone, as at compression time;
    L(f)     = sum of I_j over the tokens that keeping the first round(f (C - horizon)) of `order` evicts, for keep
               fractions f = 0, 1/grid, ..., 1; averaged over the chunks.
At compression time each head's curve is replaced by its lower convex hull (decreasing marginal gains, so greedy is
optimal for the relaxed problem) and the model's budget, (layers x heads) x floor(n(1-r)) tokens for a row of n
tokens, is filled by water-filling: every head first gets the tokens its scorer protects (at least 1; this layer's
count is used for every layer), then curve segments (n/grid tokens each) go to the largest marginal gains, the last
one partly; the real-valued shares are rounded by largest remainder, so the model total is exact. The allocation is a
function of n and the calibrated curves only, so each layer computes it and prunes at once (no layer is held back).
Differences from the paper: the curves are averaged over calibration chunks before the greedy (the paper averages
per-query optimal ratios), and the future window is the continuation of generic text rather than generated answers.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.calibration import AttentionCall, artifact_path, calibrated, collect_attention, remembered
from kvsqueeze.methods._calibrated import CalibrationOptions, per_layer
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, uniform_budget
from kvsqueeze.methods.expected_attention import ExpectedAttention
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import get_adapter
from kvsqueeze.validation import check_int

KIND = "lukv"


def keep_order(scores: Tensor, protected: Tensor | None) -> Tensor:
    """(..., T) slot indices in the order a scorer keeps them: protected first, then by score, ties to the earlier."""
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if protected is None:
        return by_score
    tier = protected.long().gather(-1, by_score)
    return by_score.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)


def oracle_importance(q: Tensor, keys: Tensor, scale: float, n_ctx: int, softcap: float | None = None) -> Tensor:
    """(H, n_ctx): the largest causal attention weight each context key gets from the future queries (positions
    n_ctx..T-1) of the G query heads of its KV head. q (H_q, T, D), keys (H, T, D), both post-RoPE."""
    h, t = keys.shape[0], keys.shape[1]
    g = q.shape[0] // h
    k = keys.float().repeat_interleave(g, dim=0)  # (H_q, T, D)
    logits = scale * q[:, n_ctx:].float() @ k.transpose(-1, -2)  # (H_q, F, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    qpos = torch.arange(n_ctx, t, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(t, device=q.device)[None, :] > qpos, float("-inf"))
    attn = torch.softmax(logits, dim=-1)[..., :n_ctx]  # (H_q, F, n_ctx)
    return attn.amax(dim=1).view(h, g, n_ctx).amax(dim=1)


def loss_curve(importance: Tensor, order: Tensor, grid: int) -> Tensor:
    """(H, grid + 1): importance evicted when keeping the first round(f n) of `order`, f = 0, 1/grid, ..., 1."""
    n = importance.shape[-1]
    kept = torch.cumsum(importance.gather(-1, order).double(), dim=-1)  # (H, n) importance of the first k+1 kept
    kept = torch.cat([torch.zeros_like(kept[:, :1]), kept], dim=-1)  # (H, n + 1)
    counts = torch.floor(torch.arange(grid + 1, dtype=torch.float64) * n / grid + 0.5).long()  # (grid + 1,)
    return (kept[:, -1:] - kept[:, counts]).float()


def context_of(call: AttentionCall, n_ctx: int, q: Tensor, keys: Tensor, values: Tensor) -> ScoreContext:
    """A ScoreContext of the first n_ctx tokens of a calibration chunk, as compression would see that context."""
    b, h = keys.shape[0], keys.shape[1]
    positions = torch.arange(n_ctx, dtype=torch.int32, device=keys.device).expand(b, h, n_ctx)
    cos, sin = call.position_embeddings
    return ScoreContext(
        keys=keys[:, :, :n_ctx],
        values=values[:, :, :n_ctx],
        positions=positions,
        hidden_states=call.hidden_states[:, :n_ctx],
        query_positions=torch.arange(n_ctx, device=keys.device)[None].expand(b, n_ctx),
        position_embeddings=(cos[:, :n_ctx], sin[:, :n_ctx]),
        seen=torch.full((b,), n_ctx, dtype=torch.long, device=keys.device),
        layer_idx=call.layer_idx,
        module=call.module,
        adapter=call.adapter,
        captured_queries=q[:, :, :n_ctx],
    )


def chunk_loss(call: AttentionCall, scorer: ScorerMethod, horizon: int, grid: int) -> Tensor:
    """(H, grid + 1) loss curve of each KV head of one layer on one calibration chunk (see the module docstring)."""
    q = call.queries(rope=True)  # (1, H_q, T, D)
    keys, values = call.keys_values()
    n_ctx = keys.shape[2] - horizon
    if n_ctx < 1:
        return torch.zeros(keys.shape[1], grid + 1)
    scale = float(getattr(call.module, "scaling", q.shape[-1] ** -0.5))
    importance = oracle_importance(q[0], keys[0], scale, n_ctx, call.adapter.softcap(call.module))  # (H, n_ctx)
    ctx = context_of(call, n_ctx, q, keys, values)
    protected = scorer.protected(ctx)
    order = keep_order(scorer.score(ctx).float()[0], None if protected is None else protected[0])
    return loss_curve(importance, order, grid).cpu()


def compute_loss_curves(
    model: Any, ids: Tensor, chunk_size: int, scorer: ScorerMethod, horizon: int, grid: int
) -> dict[str, Tensor]:
    """{"loss_<l>": (H, grid + 1)} mean loss curve of each KV head of every full-attention layer l over `ids`."""
    layers = get_adapter(model).full_layers
    parts = collect_attention(
        model, ids, lambda call: chunk_loss(call, scorer, horizon, grid), chunk_size, layers, desc="LU-KV"
    )
    return {f"loss_{layer}": torch.stack(parts.pop(layer)).mean(dim=0) for layer in layers}


def convex_gains(loss: Tensor) -> Tensor:
    """(..., grid) marginal gains L(g) - L(g + 1) of the lower convex hull of each loss curve (..., grid + 1): the
    gains are non-increasing in g, so taking segments by gain fills each curve from its start."""
    flat = loss.double().reshape(-1, loss.shape[-1])
    out = torch.empty(flat.shape[0], flat.shape[1] - 1, dtype=torch.float64)
    for i, y in enumerate(flat.tolist()):
        hull: list[int] = []  # indices of the lower hull's vertices (monotone chain)
        for x in range(len(y)):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (y[b] - y[a]) * (x - a) >= (y[x] - y[a]) * (b - a):  # b is on or above the chord a-x
                    hull.pop()
                else:
                    break
            hull.append(x)
        for a, b in itertools.pairwise(hull):
            out[i, a:b] = (y[a] - y[b]) / (b - a)
    return out.view(*loss.shape[:-1], loss.shape[-1] - 1)


def allocate(gains: Tensor, seen: Tensor, ratio: float, floor: Tensor) -> Tensor:
    """Tokens kept per head, (B, N) long, for N heads with marginal gains (N, grid) per n/grid tokens: each head gets
    `floor` (B,) first, then the best segments model-wide (ties: the earlier segment, then the earlier head), the last
    partly; rounded by largest remainder. Totals are N x floor(n(1-r)) per row (unless the floors exceed it)."""
    n_heads, grid = gains.shape
    total = uniform_budget(seen, ratio, 1)[:, 0].double() * n_heads  # (B,)
    out = []
    for n, t, m in zip(seen.double().tolist(), total.tolist(), floor.double().tolist(), strict=True):
        m = min(m, n)
        rest = t - m * n_heads
        if rest < 0:  # the protected tokens do not fit: the uniform budget (then rejected with a clear error)
            out.append(torch.full((n_heads,), int(t) // n_heads, dtype=torch.long))
            continue
        lo = torch.arange(grid, dtype=torch.float64) * n / grid  # (grid,) segment starts
        free = ((lo + n / grid) - lo.clamp(min=m)).clamp(min=0).expand(n_heads, grid)  # tokens above the floor
        order = torch.sort(-gains.double().T.reshape(-1), stable=True).indices  # segment-major: ties to earlier g
        width = free.T.reshape(-1)[order]
        taken = (rest - (torch.cumsum(width, 0) - width)).clamp(min=0).minimum(width)
        share = torch.zeros(grid * n_heads, dtype=torch.float64)
        share[order] = taken
        alloc = m + share.view(grid, n_heads).sum(dim=0)  # (N,) real-valued, sums to t
        counts = torch.floor(alloc + 1e-6)
        missing = round(t - float(counts.sum()))
        if missing > 0:  # largest remainders first, ties to the earlier head
            counts[torch.sort(-(alloc - counts), stable=True).indices[:missing]] += 1
        out.append(counts.long())
    return torch.stack(out)


@dataclass
class LUKVOptions(ScorerMethod):
    """LU-KV's own options, before the calibration options (`CalibrationOptions` explains the split)."""

    budget_scope = "model"  # one total for the whole model; heads keep different counts (stored ragged)

    scorer: ScorerMethod = field(default_factory=ExpectedAttention)
    horizon: int = 128  # last tokens of each calibration chunk whose attention defines the oracle importance
    grid: int = 32  # keep fractions 0, 1/grid, ..., 1 on each head's loss curve

    def __post_init__(self) -> None:  # the ratio is checked by wrapped_scorer
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        check_int("grid", self.grid, 1, 4096)


@register_method("lukv")
@dataclass
class LUKV(CalibrationOptions, LUKVOptions):
    """Per-head budgets from calibrated loss-versus-budget curves, filled greedily by marginal utility, over any
    scorer (LU-KV)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        note = f"below calibration_chunk={self.calibration_chunk}: each chunk needs context before its horizon"
        check_int("horizon", self.horizon, 1, self.calibration_chunk - 1, note=note)

    def _key(self) -> tuple[Any, ...]:
        scorer = repr(dataclasses.replace(self.scorer, ratio=0.0))
        return (KIND, scorer, self.horizon, self.grid, *self.calibration_key())

    def _calibrate(self, model: Any, tokenizer: Any, force: bool) -> tuple[Path, dict[int, Tensor]]:
        ids, chunk, settings = self.calibration_setup(model, tokenizer)
        if chunk <= self.horizon:
            raise ValueError(f"horizon must be below the calibration chunk of {chunk} tokens, got {self.horizon}")
        self.scorer.calibrate(model, tokenizer)  # a calibrated scorer must not calibrate inside LU-KV's forwards
        settings.update(scorer=self._key()[1], horizon=self.horizon, grid=self.grid)
        compute = lambda: compute_loss_curves(model, ids, chunk, self.scorer, self.horizon, self.grid)  # noqa: E731
        tensors = calibrated(KIND, model, settings, compute, force=force)
        return artifact_path(KIND, model, settings), per_layer(tensors, "loss")

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path:
        path, curves = self._calibrate(model, tokenizer, force)
        remembered(model, self._key(), lambda: curves, refresh=True)
        return path

    def loss_curves(self, model: Any) -> dict[int, Tensor]:
        """{layer: (H, grid + 1) mean evicted importance per keep fraction}, calibrated (or loaded) on first use."""
        return remembered(model, self._key(), lambda: self._calibrate(model, None, False)[1])

    def gains(self, model: Any) -> tuple[list[int], Tensor]:
        """(full layers in order, (L H, grid) convexified marginal gains), computed once per model."""
        curves = self.loss_curves(model)
        layers = sorted(curves)
        stacked = lambda: (layers, convex_gains(torch.cat([curves[i] for i in layers])))  # noqa: E731
        return remembered(model, (*self._key(), "gains"), stacked)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H): this layer's share of the model's allocation
        layers, gains = self.gains(ctx.adapter.model)
        h = ctx.keys.shape[1]
        protected = self.scorer.protected(ctx)
        floor = torch.ones_like(ctx.seen)
        if protected is not None:
            floor = (protected & ctx.valid).sum(dim=-1).amax(dim=-1).clamp(min=1).to(ctx.seen.device)
        counts = allocate(gains, ctx.seen.cpu(), self.ratio, floor.cpu())  # (B, L H)
        at = layers.index(ctx.layer_idx) * h
        return counts[:, at : at + h].to(ctx.keys.device)

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)
