"""Value merging: evicted tokens are folded into the most similar kept token instead of being dropped.

A wrapper over any scorer (KNorm by default; per-layer budgets such as Ada-KV's too): the scorer decides which slots
are kept, exactly as it would alone; then, per (row, KV head), each evicted token j is assigned to the kept token i
whose key is most similar to its key (cosine similarity of the cached, post-RoPE keys; ties go to the earlier kept
slot), and the value of i becomes the equal-weight mean of its own value and of the values assigned to it:

    v_i' = (v_i + sum_{j -> i} v_j) / (1 + n_i),    n_i = number of evicted tokens assigned to i.

Keys are unchanged, so attention still looks a token up by its own key; what it reads back carries the evicted
tokens' values too (the idea behind key-similarity merging, e.g. D2O, Wan et al. 2024, arXiv 2406.13035, which
merges evicted tokens into their most similar kept token above a similarity threshold; this is the plain nearest-key,
equal-weight form). Evicted tokens whose best
cosine is below `min_similarity` are dropped, not merged. Each compression weighs what the slot holds as one token:
a slot that absorbed tokens in an earlier compression (chunked prefill, decoding) does not remember how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float

_CHUNK = 2048  # evicted candidates compared with the kept keys at once (bounds the (T, K) similarity matrix)


def kept_mask(indices: Tensor, counts: Tensor, t: int) -> Tensor:
    """(B, H, T) True at the slots a plan keeps (`indices[..., :counts]`)."""
    filled = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]  # (B, H, K)
    out = torch.zeros(*indices.shape[:2], t + 1, dtype=torch.bool, device=indices.device)
    out.scatter_(-1, torch.where(filled, indices, t), True)  # unfilled entries land in the extra slot T
    return out[..., :t]


def nearest_kept(keys: Tensor, indices: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For every slot, the rank (into `indices`) of the kept slot with the most similar key, and that cosine.

    keys (B, H, T, D); returns best (B, H, T) long and similarity (B, H, T) float (-inf when nothing is kept)."""
    unit = F.normalize(keys.float(), dim=-1)
    kept = unit.gather(2, indices[..., None].expand(*indices.shape, unit.shape[-1]))  # (B, H, K, D)
    filled = torch.arange(indices.shape[-1], device=keys.device) < counts[..., None]  # (B, H, K)
    best, sims = [], []
    for lo in range(0, unit.shape[2], _CHUNK):
        sim = unit[:, :, lo : lo + _CHUNK] @ kept.transpose(-1, -2)  # (B, H, chunk, K)
        sim = sim.masked_fill(~filled[:, :, None, :], float("-inf"))
        value, rank = sim.max(dim=-1)  # the first maximum: ties go to the earlier kept slot
        best.append(rank)
        sims.append(value)
    return torch.cat(best, dim=2), torch.cat(sims, dim=2)


def merge_into_nearest(
    keys: Tensor, values: Tensor, valid: Tensor, indices: Tensor, counts: Tensor, min_similarity: float = -1.0
) -> Tensor:
    """(B, H, K, Dv) the kept slots' values with every evicted slot's value averaged into its nearest kept key's."""
    dv = values.shape[-1]
    kept_values = values.float().gather(2, indices[..., None].expand(*indices.shape, dv))  # (B, H, K, Dv)
    best, sim = nearest_kept(keys, indices, counts)
    merged = valid & ~kept_mask(indices, counts, keys.shape[2]) & (sim >= min_similarity)  # (B, H, T)
    weight = merged.float()
    total = kept_values.scatter_add(2, best[..., None].expand(*best.shape, dv), values.float() * weight[..., None])
    n = torch.ones(indices.shape, device=values.device).scatter_add(2, best, weight)  # (B, H, K): 1 + n_i
    return total / n[..., None]


@register_method("merge")
@dataclass
class Merge(ScorerMethod):
    """Another scorer's eviction (KNorm), each evicted value averaged into the kept token with the most similar key."""

    scorer: ScorerMethod = field(default_factory=KNorm)
    min_similarity: float = -1.0  # evicted tokens whose best cosine is lower are dropped (-1: merge them all)

    def __post_init__(self) -> None:
        check_float("min_similarity", self.min_similarity, -1.0, 1.0, note="a cosine")
        self.scorer = wrapped_scorer(self.scorer, self.ratio, per_head=False)  # per-head or per-layer budgets alike

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def budget(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.budget(ctx)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        return self.scorer.plan(ctx)  # exactly the scorer's kept set

    def merge_values(self, ctx: ScoreContext, indices: Tensor, counts: Tensor) -> Tensor:
        return merge_into_nearest(ctx.keys, ctx.values, ctx.valid, indices, counts, self.min_similarity)
