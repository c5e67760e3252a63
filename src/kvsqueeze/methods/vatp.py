"""VATP, Value-Aware Token Pruning: attention received times the value's L1 norm (Guo, Kamigaito, Watanabe 2024,
"Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters",
arXiv 2406.12335).

A slot's importance is the attention it receives, accumulated over the last `window` context queries (the paper's
Scissorhands setting averages the last 400 queries; with a window at least as long as the context this is H2O's
accumulated attention up to a constant), multiplied by the L1 norm of its value vector: tokens that draw attention
but carry near-zero values (typically attention sinks) contribute little to the output. Attention is averaged over
the query heads of each KV head (GQA); the value norm is the KV head's own. Because sinks have tiny value norms, the
paper always keeps the first `n_sink` tokens (its runs use 20); the `n_recent` most recent tokens are kept too
(10 in its Scissorhands setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import window_attention
from kvsqueeze.validation import check_int


@register_method("vatp")
@dataclass
class VATP(ScorerMethod):
    """Attention of the last `window` queries times the value's L1 norm; first `n_sink` and `n_recent` tokens kept."""

    needs = ("queries",)

    window: int = 400
    n_sink: int = 20
    n_recent: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 1, note="queries")
        check_int("n_sink", self.n_sink, 0)
        check_int("n_recent", self.n_recent, 0)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        attn = window_attention(ctx, self.window)  # (B, H_q, T)
        b, hq, t = attn.shape
        h = ctx.keys.shape[1]
        received = attn.view(b, h, hq // h, t).mean(dim=2)  # (B, H, T)
        return received * ctx.values.float().abs().sum(dim=-1)

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, self.n_sink, self.n_recent)
