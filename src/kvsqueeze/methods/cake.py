"""CAKE: cascading and adaptive KV cache eviction with layer preferences (Qin, Cao, Lin, Hu, Fan, Cheng, Lin, Li 2025,
"CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", arXiv 2503.12491).

From the attention A of the last `window` context queries (each at its own position) to the earlier slots, each layer
gets a preference score P = H^(1/tau1) * V^(1/tau2) per row:
    H (spatial dispersion)  the entropy -sum A log A over the query heads, window queries and earlier slots;
    V (temporal shift)      the variance of A across the window queries, summed over query heads and earlier slots.
Layers whose attention is spread out or shifts over time get more of the model's budget: every full-attention layer
keeps its window, and the rest of the model's total (L x (floor(n(1-r)) - window)) is split in proportion to P,
capped at what a layer holds (the overflow goes to the others in proportion; whole tokens by largest
remainder, so the model total is exact). Within a layer the slots kept are the best by CAKE's eviction indicator,
mean + gamma * variance of A across the window queries (a token whose importance shifts is kept), average-pooled over
`kernel` neighbouring slots as in SnapKV, averaged over the query heads of each KV head. The heads of a layer keep the
same count (as in the paper); layers differ, so the cache holds exactly the model's budget.

CAKE's cascading (re-allocating after each layer during prefill, which bounds peak memory) is not reproduced: every
layer is scored first and all are pruned when the forward ends, like the global budget (peak = the uncompressed
cache); the final allocation is the paper's proportional one. Defaults follow the paper's code (window 32, kernel 5,
gamma 200, tau1 = tau2 = 1; the paper tunes tau per model and budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods._shares import capped_shares, integer_shares
from kvsqueeze.methods._window import window_probs
from kvsqueeze.methods.base import (
    LayerScores,
    ModelScopeMethod,
    ScoreContext,
    check_ratio,
    select,
    sinks_and_recent,
    uniform_budget,
)
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int


@dataclass
class CakeLayer(LayerScores):
    """A layer's eviction indicator (`scores`) with its preference score."""

    preference: Tensor  # (B,) P = H^(1/tau1) V^(1/tau2)


def _window_size(layer: LayerScores, row: int) -> int:
    """The protected (window) tokens of one row of a layer."""
    return int(layer.protected[row].sum(-1).max()) if layer.protected is not None else 0


@register_method("cake")
@dataclass
class CAKE(ModelScopeMethod):
    """Layer budgets from attention dispersion and shift (preference H^(1/tau1) V^(1/tau2)); tokens by mean + gamma
    variance of the window's attention."""

    needs = ("queries",)

    ratio: float = 0.0
    window: int = 32
    kernel: int = 5
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1, note="odd")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {self.kernel!r}")
        check_float("gamma", self.gamma, 0.0, finite=True)
        check_float("tau1", self.tau1, 0.0, low_open=True, finite=True)
        check_float("tau2", self.tau2, 0.0, low_open=True, finite=True)

    def layer_scores(self, ctx: ScoreContext) -> CakeLayer:
        valid = ctx.valid
        budget = torch.minimum(uniform_budget(ctx.seen, self.ratio, valid.shape[1]).to(valid.device), valid.sum(-1))
        protected = sinks_and_recent(ctx, 0, self.window)  # the window is always kept
        if bool((protected.sum(dim=-1) > budget).any()):
            raise ValueError(
                f"{self!r}: the budget of {int(budget.min())} tokens cannot hold the window of {self.window} tokens "
                f"at layer {ctx.layer_idx}; lower the ratio or the window."
            )
        attn, real = window_probs(ctx, self.window)  # (B, H, G, w, T), (B, w)
        r = real[:, None, None, :, None]  # (B, 1, 1, w, 1)
        n_real = real.sum(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
        mean = (attn * r).sum(dim=3) / n_real.clamp(min=1)  # (B, H, G, T)
        var = ((attn - mean[:, :, :, None]) ** 2 * r).sum(dim=3) / (n_real - 1).clamp(min=1)
        earlier = (valid & ~protected)[:, :, None, :]  # (B, H, 1, T) the slots outside the window
        a = attn * earlier[:, :, :, None] * r
        dispersion = -(a * torch.log(a + 1e-10)).sum(dim=(1, 2, 3, 4))  # (B,)
        shift = (var * earlier).sum(dim=(1, 2, 3))  # (B,)
        preference = dispersion.clamp(min=0) ** (1 / self.tau1) * shift ** (1 / self.tau2)
        return CakeLayer(self._indicator(mean + self.gamma * var, valid), valid, protected, budget, preference)

    def _indicator(self, x: Tensor, valid: Tensor) -> Tensor:
        """(B, H, G, T) -> (B, H, T): average-pooled over `kernel` real slots, then averaged over the group."""
        b, h, g, t = x.shape
        real = valid[:, :, None, :].expand(-1, -1, g, -1).reshape(b * h * g, 1, t).float()
        pool = lambda y: F.avg_pool1d(y, self.kernel, 1, self.kernel // 2)  # noqa: E731
        pooled = pool(x.reshape(b * h * g, 1, t) * real) / pool(real).clamp(min=1e-9)
        return pooled.view(b, h, g, t).mean(dim=2)

    def layer_counts(self, layers: dict[int, CakeLayer]) -> dict[int, Tensor]:
        """(B, H) tokens each layer keeps: its window plus its share of the rest, in proportion to its preference."""
        order = sorted(layers)
        rows = layers[order[0]].budget.shape[0]
        counts = {i: torch.zeros_like(layers[i].budget) for i in order}
        for b in range(rows):
            window = [_window_size(layers[i], b) for i in order]
            held = [int(layers[i].valid[b].sum(-1).min()) for i in order]
            rest = [int(layers[i].budget[b].min()) - w for i, w in zip(order, window, strict=True)]
            weights = [float(layers[i].preference[b]) for i in order]
            if not all(math.isfinite(x) for x in weights) or sum(weights) <= 0:
                weights = [1.0] * len(order)  # no signal (e.g. a window of one query): uniform
            caps = [n - w for n, w in zip(held, window, strict=True)]
            shares = capped_shares(float(sum(rest)), weights, caps)
            whole = integer_shares(shares, sum(rest), caps)
            for i, w, k in zip(order, window, whole, strict=True):
                counts[i][b] = w + k
        return counts

    def plan_model(self, layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
        cake = {i: layer for i, layer in layers.items() if isinstance(layer, CakeLayer)}
        if not cake:
            return {}
        plans: dict[int, tuple[Tensor, Tensor] | None] = {}
        for i, counts in self.layer_counts(cake).items():
            layer = cake[i]
            keep_all = bool(layer.valid.all()) and bool((counts >= layer.valid.sum(dim=-1)).all())
            plans[i] = None if keep_all else select(layer.scores, layer.valid, counts, layer.protected)
        return plans
