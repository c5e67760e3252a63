"""Block-wise streaming prefill: score and evict block by block as the prompt streams in (the block/chunked-prefill
eviction of streaming methods, e.g. Xiao et al. 2023 arXiv 2309.17453 and FINCH, Corallo & Papotti 2024, TACL,
arXiv 2408.00167, applied to any scorer).

A wrapper: while one forward's layer is compressed, its new tokens are walked in blocks of `block_size` (see
`_streaming.stream_keep`). At each block the candidates are the tokens kept so far plus the block; the wrapped scorer
scores them with only those keys and values visible and the block's tokens as its queries (SnapKV's window is the
end of the block, TOVA's last token is the block's last token), as if the block had been the forward; the
candidates are cut back to the budget (the final one, floor(n (1 - ratio)) of the whole forward's tokens) and the
walk goes on. What is kept at the end is pruned.

Difference with `generate(chunk_size=...)` (chunked prefill): there the forward itself is cut in chunks, so each
chunk's hidden states are computed over the already compressed cache and the peak memory is bounded by the budget
plus one chunk. Here the forward runs once over the whole prompt (every hidden state sees the full context, the
peak memory is that of the uncompressed layer); only the eviction decisions stream, which makes the result
independent of the forward's chunking and lets a one-shot (shared) prefill reproduce streaming selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvsqueeze.methods._streaming import gather_context, scatter_back, stream_keep
from kvsqueeze.methods._wrappers import wrapped_scorer
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio, checked_protected
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


@register_method("block")
@dataclass
class BlockWise(ScorerMethod):
    """Walk the prompt in blocks, scoring kept tokens + the next block with another scorer (KNorm) and evicting back
    to the budget after each block."""

    scorer: ScorerMethod = field(default_factory=KNorm)
    block_size: int = 256

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("block_size", self.block_size, 1)
        self.scorer = wrapped_scorer(self.scorer, self.ratio)  # a method or a registered name

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): 1 for the slots the walk keeps, 0 otherwise
        budget = self.budget(ctx).to(ctx.keys.device)

        def step(cand: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor | None]:
            sub, index = gather_context(ctx, cand, lo, hi)
            t = cand.shape[-1]
            sub_budget = budget.minimum(sub.valid.sum(dim=-1))
            protected = checked_protected(self.scorer, sub, sub_budget)
            scores = scatter_back(self.scorer.score(sub).float(), index, t)
            return scores, None if protected is None else scatter_back(protected.float(), index, t) > 0

        return stream_keep(ctx, self.block_size, budget, step).float()

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        return self.scorer.budget(ctx)
