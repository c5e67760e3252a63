"""FINCH: prompt-guided compression, the question's attention picks the context tokens chunk by chunk (Corallo &
Papotti 2024, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models", TACL 12,
arXiv 2408.00167).

Query-aware: the compressed prompt ends with the question (`pipeline.encode_query_aware`; the benchmark does this by
itself for methods that need the question). The question's last `question_tokens` tokens play SnapKV's window: the
score of a context token is the attention the question's queries (at their own positions, causal) pay to it,
averaged over the question's tokens and the query heads of its KV head, the softmax running over the tokens
visible at that point. The context is processed in chunks of `chunk_size` tokens as the paper does: the candidates
are the tokens kept so far plus the next chunk, the question attends to them (and to itself), and the candidates
are cut back to the budget before the next chunk (`_streaming.stream_keep`). The question's tokens are always kept
(inside the budget, floor(n (1 - ratio)) of the whole prompt). After compression the kept keys are re-rotated to
contiguous positions (`rerotates_keys`, `press.rerotate_cache`), as FINCH does.

One-shot approximation: the paper runs the model on each chunk + question over the compressed cache; here the
prompt's forward runs once (hidden states see the full context) and the chunk-wise selection is replayed on each
layer, so a shared one-shot prefill gives the same result.

Without a question (`question_tokens=None`: a query-agnostic prompt, e.g. `kvsqueeze.generate` or the method
contract tests), the last `window` tokens of the forward play the question: FINCH then degrades to chunked SnapKV
without pooling, with re-rotation. A `question_tokens` larger than the forward raises ValueError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods._streaming import stream_keep
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.methods.snapkv import window_attention
from kvsqueeze.validation import check_int


@register_method("finch")
@dataclass
class Finch(ScorerMethod):
    """Keep the context tokens the question attends to most, chunk by chunk, then re-rotate the kept keys
    (query-aware; without a question the last `window` tokens stand in for it)."""

    needs = ("queries", "question")
    rerotates_keys = True

    question_tokens: int | None = None  # the last tokens of the compressed prompt that are the question
    window: int = 64  # stand-in question length when question_tokens is None (query-agnostic use)
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("question_tokens", self.question_tokens, 1, none_ok=True)
        check_int("window", self.window, 1)
        check_int("chunk_size", self.chunk_size, 1)

    def question_length(self, ctx: ScoreContext) -> int:
        """How many of the forward's last tokens are the question (or stand in for it)."""
        q = ctx.query_positions.shape[1]
        if self.question_tokens is None:
            return min(self.window, q)
        if self.question_tokens > q:
            raise ValueError(
                f"finch: question_tokens={self.question_tokens} but this forward has only {q} tokens; the question "
                "must end the compressed prompt (query-aware prompts, one-shot prefill)"
            )
        return self.question_tokens

    def protected(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): the question's slots
        n = self.question_length(ctx)
        qpos = ctx.query_positions.to(ctx.positions.device).long()
        if n == 0:
            return torch.zeros_like(ctx.valid)
        start = qpos[:, -n]  # (B,) the question's first position in each row (rows end together: left padding)
        if bool((start < 0).any()):
            raise ValueError(f"finch: a row of the batch is shorter than the question ({n} tokens)")
        return ctx.valid & (ctx.positions.long() >= start[:, None, None])

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): 1 for the slots kept, 0 otherwise
        n = self.question_length(ctx)
        question = self.protected(ctx)
        budget = (self.budget(ctx).to(question.device) - question.sum(dim=-1)).clamp(min=0)  # (B, H) for the context
        b, h, t = question.shape

        def step(cand: Tensor, lo: int, hi: int) -> tuple[Tensor, None]:
            visible = cand | question
            sub = dataclasses.replace(ctx, positions=torch.where(visible, ctx.positions, -1), _cache=ctx._cache)
            attn = window_attention(sub, n)  # (B, H_q, T), the question's queries computed once (shared cache)
            return attn.view(b, h, -1, t).mean(dim=2), None

        kept = stream_keep(ctx, self.chunk_size, budget, step, walk=ctx.query_positions.shape[1] - n)
        return (kept | question).float()
