"""Key re-rotation: after eviction, kept keys move to contiguous positions (StreamingLLM as published, Xiao et al.
2023, arXiv 2309.17453, section 3.2: "positions within the cache rather than those in the original text").

A wrapper: another scoring method decides what is kept (StreamingLLM by default); after every compressed forward,
the kept tokens of each layer are re-rotated to positions P - K .. P - 1, where K is how many the (row, head) keeps
and P the most any full-attention layer keeps (with a uniform budget: 0 .. K - 1), and the next tokens continue at
P instead of the uncompressed length. Relative distances between kept tokens shrink to what the cache holds, so
a model never sees a position beyond its cache size (what lets StreamingLLM stream past the trained context).
The re-rotation itself (RoPE undone and redone with the model's own rotary module) is in `press.rerotate_cache`.

For later compressions (chunked prefill, decoding) the wrapped method scores in the re-rotated frame: its `seen`
is the frame's length (newest position + 1); its budget still follows the uncompressed length, as for any method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.streaming_llm import StreamingLLM


def frame_context(ctx: ScoreContext) -> ScoreContext:
    """The context with `seen` = newest position + 1 per row (the length of the possibly re-rotated frame)."""
    newest = ctx.positions.long().amax(dim=-1).amax(dim=-1)  # (B,)
    return dataclasses.replace(ctx, seen=(newest + 1).clamp(min=0), _cache=ctx._cache)


@register_method("keyrerotation")
@dataclass
class KeyRerotation(ScorerMethod):
    """Another method's selection, then kept keys re-rotated to contiguous positions (StreamingLLM as published)."""

    rerotates_keys = True

    scorer: ScorerMethod = field(default_factory=StreamingLLM)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(frame_context(ctx))

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(frame_context(ctx))

    def budget(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.budget(ctx)
