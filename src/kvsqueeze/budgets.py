"""How many tokens each layer and head keeps: pure tensor functions behind the budget-policy wrappers.

Shapes follow `methods/base.py`; here S counts *segments* that share one pool of tokens: the KV heads of one layer
(Ada-KV, S = H) or every head of every full-attention layer (global budget, S = layers x H).

Pooling budgets only makes sense if scores are comparable across segments. `comparable_scores` puts every segment's
scores on one scale, the log of a distribution over its own slots:
    "softmax"  log_softmax(s) over the segment's real slots: for log-attention-like scores (KNorm's -||k||, logits)
               this is the attention they predict; for scores that already are attention probabilities (SnapKV)
               it is p - logsumexp(p), nearly the raw probabilities shifted per head, i.e. what Ada-KV compares
    "sum"      log(s / sum(s)) for non-negative scores (attention weights): an exact distribution per segment
    "none"     the raw scores, when the scorer already is comparable across heads and layers
    "auto"     per row: "sum" when all its scores are non-negative (taken as attention weights), else "softmax"
The log keeps the order of the probabilities without underflowing to ties at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.validation import check_choice

NORMALIZATIONS = ("auto", "softmax", "sum", "none")


def comparable_scores(scores: Tensor, valid: Tensor, normalize: str) -> Tensor:
    """scores, valid (..., T) -> scores on one scale across segments (see the module docstring); empty = -inf."""
    check_choice("normalize", normalize, NORMALIZATIONS)
    s = scores.float().masked_fill(~valid, float("-inf"))
    if normalize == "auto":
        negative = (scores.float() < 0) & valid
        by_sum = ~negative.flatten(1).any(dim=1)  # (B,) rows of non-negative scores
        shape = (-1,) + (1,) * (scores.dim() - 1)
        both = comparable_scores(scores, valid, "softmax"), comparable_scores(scores.clamp(min=0), valid, "sum")
        return torch.where(by_sum.view(shape), both[1], both[0])
    if normalize == "softmax":
        out = torch.log_softmax(s, dim=-1)
    elif normalize == "sum":
        if bool((scores[valid] < 0).any()):
            raise ValueError("normalize='sum' needs non-negative scores (attention weights); use 'softmax'")
        total = s.clamp(min=0).sum(dim=-1, keepdim=True).clamp(min=1e-30)
        out = torch.log(s.clamp(min=0) / total)
    else:
        out = s
    return out.masked_fill(~valid | torch.isnan(out), float("-inf"))


def pooled_counts(scores: Tensor, valid: Tensor, total: Tensor, safeguard: Tensor) -> Tensor:
    """Tokens kept per segment when S segments share one budget (Ada-KV's allocation, generalised).

    scores, valid: (B, S, T) comparable scores (higher = keep); total: (B,) tokens to keep per row; safeguard:
    (B, S) tokens each segment first keeps from its own top (Ada-KV: alpha x its uniform share). The rest of the
    total goes to the best remaining scores of the row, whatever their segment. Equal scores go to the earlier
    segment, then the segment's earlier rank. Returns counts (B, S) long with counts.sum(-1) == total (capped by the
    real slots) and safeguard <= counts <= real slots.
    """
    b, s, t = scores.shape
    n_valid = valid.sum(dim=-1)  # (B, S)
    safe = torch.minimum(safeguard.long(), n_valid)
    ranked = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).values
    rank = torch.arange(t, device=scores.device)[None, None, :]
    remaining = (rank >= safe[..., None]) & (rank < n_valid[..., None])  # (B, S, T) not yet taken, real
    pool = ranked.masked_fill(~remaining, float("-inf")).reshape(b, s * t)
    extra = (total.long() - safe.sum(dim=-1)).clamp(min=0)
    extra = torch.minimum(extra, remaining.reshape(b, -1).sum(dim=-1))  # (B,)
    order = torch.sort(pool, dim=-1, descending=True, stable=True).indices  # (B, S T)
    chosen = torch.arange(s * t, device=scores.device)[None, :] < extra[:, None]
    segment = order // t
    counts = torch.zeros(b, s, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, segment, chosen.long())
    return safe + counts


def two_stage_order(first: Tensor, second: Tensor, valid: Tensor, n_first: Tensor) -> Tensor:
    """CriticalKV's two-stage ranking as one score (B, H, T): the `n_first` (B, H) best slots by `first` rank
    above all others (in their `first` order), then the rest by `second`. Top-k of it = stage 1 + stage 2."""
    t = first.shape[-1]
    first, second = first.double(), second.double()  # float64: the lifted stage 1 scores stay above stage 2 exactly
    f = first.masked_fill(~valid, float("-inf"))
    order = torch.sort(f, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(t, device=first.device).expand_as(order))  # rank of each slot by `first`
    stage1 = (rank < n_first[..., None]) & valid
    # stage 1 slots get scores above every stage 2 score, ordered among themselves by their `first` rank
    top = second.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True).clamp(min=0)
    lifted = top + 1.0 + (t - rank).double()
    return torch.where(stage1, lifted, second)


def spread(mean: float, weights: list[float], cap: float, floor: float = 0.0) -> list[float]:
    """Per-layer budgets proportional to `weights` with the given mean, each within [floor, cap]: what a capped
    layer cannot take is spread over the others in proportion to their weights (the mean stays exact when
    floor <= mean <= cap)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    n = len(weights)
    budgets = [0.0] * n
    free = list(range(n))
    left = mean * n
    while free:
        total_w = sum(weights[i] for i in free)
        share = {i: left * weights[i] / total_w if total_w > 0 else left / len(free) for i in free}
        over = [i for i in free if share[i] > cap]
        under = [i for i in free if share[i] < floor]
        fixed = over or under
        if not fixed:
            for i in free:
                budgets[i] = share[i]
            break
        for i in fixed:
            budgets[i] = cap if over else floor
            left -= budgets[i]
            free.remove(i)
    return budgets
