"""StreamingLLM: attention sinks plus a recent window (Xiao et al. 2023, arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


@register_method("streaming_llm")
@dataclass
class StreamingLLM(ScorerMethod):
    """Keep the first n_sink tokens and the most recent ones."""

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_sink", self.n_sink, 0)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): newer = higher
        return ctx.positions.float()

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, self.n_sink, 0)
