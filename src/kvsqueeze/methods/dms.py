"""DMS-style delayed eviction: a token is judged when it leaves a sliding window of recent tokens (the rule of
Dynamic Memory Sparsification, Łańcucki, Staniszewski, Nawrot, Ponti 2025, arXiv 2506.05345).

DMS retrofits a model with a learned per-head eviction decision for every token (read from its own hidden state,
trained for ~1K steps to a target compression), and executes it late: a token marked for eviction stays in the cache
until it leaves a sliding window of the `window` most recent tokens, so the model can still read it meanwhile (the
paper's "delayed eviction"). Training the predictor is out of scope here, so its decision is replaced by a proxy from
any scorer (KNorm by default), made once per token, per (row, KV head), at the moment the token leaves the window:

    the token is evicted when its score ranks in the lowest fraction `ratio` of the tokens of the window it leaves
    (the `window` tokens that were the most recent before this forward, plus the tokens this forward appended).

Precisely, with R = those tokens and k = |R| - floor(|R| (1 - ratio)), the k lowest scores of R (ties: the later
slot counts as lower, as `select` keeps the earlier one) are "below the threshold"; the tokens of R that are now
outside the window (position < seen - window) and below it are evicted. So the threshold is the ratio-quantile of the
recent scores: a one-shot prefill of n tokens evicts about ratio (n - window) of them, and while decoding each token
that leaves the window is evicted with probability about `ratio` when scores are stationary. Ranking inside each head
normalizes the scores per head (a learned predictor uses one threshold on calibrated logits); scores are rounded to
1e-5 of the head's largest |score| first, so float noise never reorders tokens. Tokens are never judged twice; heads
keep different counts (ragged layout) and the rule, not a budget, decides the size (`budget_kind = "adaptive"`). It
acts on every forward, prefill, questions and decoding (`acts_while_decoding = True`), and needs no state, so a
cache may be copied into several rows (one per question) between forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio, select
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def leaving_and_reference(positions: Tensor, seen: Tensor, new: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(leaving, reference), both (B, H, T) bool: the real tokens that left the window during this forward, and the
    tokens the quantile is taken over (the window before the forward plus the new tokens). seen, new: (B,)."""
    pos = positions.long()
    valid = pos >= 0
    seen = seen.to(pos.device)[:, None, None]
    before = seen - new.to(pos.device)[:, None, None]
    reference = valid & (pos >= before - window)
    return reference & (pos < seen - window), reference


def rounded(scores: Tensor, reference: Tensor, digits: float = 1e-5) -> Tensor:
    """Scores rounded to steps of `digits` times the largest |score| of R per (row, head): float noise (a padded batch
    against one row alone; keys of equal norm, as Qwen3's normalized keys) cannot reorder tokens, ties stay ties."""
    scale = torch.where(reference, scores.abs(), 0.0).amax(dim=-1, keepdim=True) * digits  # (B, H, 1)
    return torch.round(scores / scale.clamp(min=torch.finfo(torch.float32).tiny))


def below_quantile(scores: Tensor, reference: Tensor, ratio: float) -> Tensor:
    """(B, H, T) bool: per (row, head) the |R| - floor(|R| (1 - ratio)) lowest scores among `reference` R."""
    n = reference.sum(dim=-1)  # (B, H)
    scores = rounded(scores, reference)
    high = torch.floor(n.double() * (1.0 - ratio) + 1e-6).long()
    indices, counts = select(scores, reference, high)
    filled = torch.arange(indices.shape[-1], device=scores.device) < counts[..., None]
    is_high = torch.zeros(*scores.shape[:2], scores.shape[-1] + 1, dtype=torch.bool, device=scores.device)
    is_high.scatter_(-1, torch.where(filled, indices, scores.shape[-1]), True)
    return reference & ~is_high[..., :-1]


@register_method("dms")
@dataclass
class DMS(ScorerMethod):
    """Delayed eviction: a token leaving the recent window is evicted if its score (KNorm) is in the lowest `ratio`."""

    shared_prefill = False  # acts while answering: the benchmark runs it for real
    acts_while_decoding = True
    budget_scope = "layer"  # heads keep different counts
    budget_kind = "adaptive"  # the rule decides the size, not floor(n (1 - r))

    scorer: ScorerMethod = field(default_factory=KNorm)
    window: int = 256  # recent tokens always kept; a token is judged when it leaves them

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("window", self.window, 1, note="recent tokens kept")
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def evicted(self, ctx: ScoreContext) -> Tensor:
        """(B, H, T) bool: the slots this forward evicts."""
        new = (ctx.query_positions >= 0).sum(dim=1)
        leaving, reference = leaving_and_reference(ctx.positions, ctx.seen, new, self.window)
        if not bool(leaving.any()):
            return leaving
        return leaving & below_quantile(self.score(ctx).float(), reference, self.ratio)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        if self.ratio == 0:
            return None
        keep = ctx.valid & ~self.evicted(ctx)
        if bool((keep == ctx.valid).all()):
            return None
        return select(keep.float(), keep, keep.sum(dim=-1))
