"""SqueezeAttention: layer budgets from how much each attention layer changes the hidden states, over any scorer
(Wang, Gan 2024, "SqueezeAttention: 2D Management of KV-Cache in LLM Inference via Layer-wise Optimal Budget",
arXiv 2404.04793).

A layer's importance is measured during prefill as the cosine similarity between each token's hidden state before
the self-attention block (the decoder layer's input, the residual stream) and after it (input + what the block adds),
averaged over the tokens: a high similarity means the layer changes little and needs less KV cache. The
full-attention layers are clustered by this similarity with 1-D k-means into 3 clusters (the authors' code squeezes
"class 3"); the cluster with the highest similarity is the unimportant group and each of its layers keeps `squeeze` x
its uniform budget floor(n(1-r)) (at least its protected tokens); what they free is split evenly over the other layers
(capped at what a layer holds; what they cannot hold goes back to the squeezed layers), so the model total stays
L x floor(n(1-r)) (whole tokens by largest remainder). Within a layer the wrapped scorer picks the tokens (the paper
pairs the allocation with H2O, a sliding window and StreamingLLM; the default here is SnapKV, as for the other budget
wrappers). The heads of a layer keep the same count. `squeeze` is tuned per model and task (the authors' examples
keep 38% and 63% of the initial budget).

The similarity needs the residual stream, which `kvsqueeze.compress` hands to methods that declare
`needs = ("residual",)`; a recorded prefill (`compress_recording`) does not keep it, so the benchmark runs this method
for real (`shared_prefill = False`). Every layer is scored before any is pruned (peak = the uncompressed cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods._shares import capped_shares, integer_shares
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import LayerScores, ModelScopeMethod, ScoreContext, ScorerMethod, checked_protected, select
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.validation import check_float


@dataclass
class SqueezeLayer(LayerScores):
    """A layer's token scores with its mean cosine similarity before/after attention."""

    similarity: Tensor  # (B,)


def kmeans_1d(values: list[float], k: int = 3, iterations: int = 100) -> list[int]:
    """Cluster labels of 1-D values by Lloyd's k-means, centroids started at evenly spaced order statistics (min,
    median, max for k = 3); ties go to the lower centroid; an empty cluster keeps its centroid."""
    ordered = sorted(values)
    n = len(values)
    centroids = [ordered[round(j * (n - 1) / max(k - 1, 1))] for j in range(k)]
    labels = [0] * n
    for _ in range(iterations):
        labels = [min(range(k), key=lambda j: (abs(v - centroids[j]), j)) for v in values]
        new = [
            sum(v for v, c in zip(values, labels, strict=True) if c == j) / labels.count(j)
            if j in labels
            else centroids[j]
            for j in range(k)
        ]
        if new == centroids:
            break
        centroids = new
    return labels


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def unimportant_layers(similarity: list[float]) -> list[bool]:
    """True for the layers of the highest-similarity cluster, unless that would be every layer (then none)."""
    labels = kmeans_1d(similarity)
    means = {
        c: sum(s for s, x in zip(similarity, labels, strict=True) if x == c) / labels.count(c) for c in set(labels)
    }
    top = max(means, key=lambda c: (means[c], c))
    flags = [c == top for c in labels]
    return [False] * len(flags) if all(flags) else flags


@register_method("squeezeattention")
@dataclass
class SqueezeAttention(ModelScopeMethod):
    """Layers that change the hidden states least (highest cosine similarity cluster) keep `squeeze` x their budget;
    the others share what they free; tokens chosen by another scorer."""

    needs = ("queries", "residual")
    shared_prefill = False

    ratio: float = 0.0
    scorer: ScorerMethod = field(default_factory=SnapKV)
    squeeze: float = 0.4  # share of its uniform budget an unimportant layer keeps

    def __post_init__(self) -> None:
        self.scorer = wrapped_scorer(self.scorer, self.ratio)
        check_float("squeeze", self.squeeze, 0.0, 1.0, note="a share of the uniform budget")

    def layer_scores(self, ctx: ScoreContext) -> SqueezeLayer:
        if ctx.layer_input is None or ctx.attention_update is None:
            raise ValueError(
                "squeezeattention needs the residual stream around each attention block: run it through "
                "kvsqueeze.compress (a recorded prefill, compress_recording, does not keep it)."
            )
        valid = ctx.valid
        budget = torch.minimum(self.scorer.budget(ctx).to(valid.device), valid.sum(dim=-1))
        protected = checked_protected(self.scorer, ctx, budget)
        x = ctx.layer_input.float()
        cos = F.cosine_similarity(x, x + ctx.attention_update.float(), dim=-1)  # (B, q)
        real = (ctx.query_positions >= 0).to(cos.device).float()
        similarity = (cos * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return SqueezeLayer(self.scorer.score(ctx).float(), valid, protected, budget, similarity)

    def layer_counts(self, layers: dict[int, SqueezeLayer]) -> dict[int, Tensor]:
        """(B, H) tokens each layer keeps (see the module docstring)."""
        order = sorted(layers)
        counts = {i: torch.zeros_like(layers[i].budget) for i in order}
        for b in range(layers[order[0]].budget.shape[0]):
            uniform = [int(layers[i].budget[b].min()) for i in order]
            held = [int(layers[i].valid[b].sum(-1).min()) for i in order]
            floor = [_protected_count(layers[i], b) for i in order]
            squeezed = unimportant_layers([float(layers[i].similarity[b]) for i in order])
            low = [max(int(u * self.squeeze + 1e-6), f) for u, f in zip(uniform, floor, strict=True)]
            fixed = [lo if s else 0 for lo, s in zip(low, squeezed, strict=True)]
            rest = sum(uniform) - sum(fixed)
            caps = [0 if s else n for n, s in zip(held, squeezed, strict=True)]
            whole = integer_shares(capped_shares(float(rest), [1.0] * len(order), caps), rest, caps)
            # what the other layers cannot hold (low ratios) goes back to the squeezed ones: the total stays exact
            left = rest - sum(whole)
            back = [n - f if s else 0 for n, f, s in zip(held, fixed, squeezed, strict=True)]
            extra = integer_shares(capped_shares(float(left), [1.0] * len(order), back), left, back)
            for i, f, w, e in zip(order, fixed, whole, extra, strict=True):
                counts[i][b] = f + w + e
        return counts

    def plan_model(self, layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
        squeeze = {i: layer for i, layer in layers.items() if isinstance(layer, SqueezeLayer)}
        if not squeeze:
            return {}
        plans: dict[int, tuple[Tensor, Tensor] | None] = {}
        for i, counts in self.layer_counts(squeeze).items():
            layer = squeeze[i]
            keep_all = bool(layer.valid.all()) and bool((counts >= layer.valid.sum(dim=-1)).all())
            plans[i] = None if keep_all else select(layer.scores, layer.valid, counts, layer.protected)
        return plans


def _protected_count(layer: LayerScores, row: int) -> int:
    return int(layer.protected[row].sum(-1).max()) if layer.protected is not None else 0
