"""Scissorhands: keep the tokens whose importance persists (Liu, Desai, Liao, Wang, Xie, Xu, Kyrillidis, Shrivastava
2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at Test Time",
arXiv 2305.17118).

The persistence-of-importance hypothesis: a token that was pivotal for recent queries stays pivotal. Over a history
window of the last `window` context queries, the paper counts for each token how often its attention falls below
the average 1/t (t = the tokens the query attends to) and drops the tokens with the highest counts, never the recent
ones. Equivalently, here a slot's score is how many of those queries give it at least 1/t (each query head of the
KV head's group votes), and the `window` most recent tokens (whose counts are incomplete under the causal mask) are
always kept. Equal counts keep the earlier slot (kvsqueeze's deterministic tie-break).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods._window import window_probs
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


@register_method("scissorhands")
@dataclass
class Scissorhands(ScorerMethod):
    """How often each token gets at least the average attention 1/t from the last `window` queries, plus that
    window."""

    needs = ("queries",)

    window: int = 64  # history window (queries) and the recent tokens always kept

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 1)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        attn, real = window_probs(ctx, self.window)  # (B, H, G, w, T), (B, w)
        qpos = ctx.query_positions[:, -attn.shape[3] :]  # (B, w)
        pos = ctx.positions[:, :, None, :]  # (B, H, 1, T)
        allowed = (pos >= 0) & (pos <= qpos[:, None, :, None])  # (B, H, w, T) what each query attends to
        t = allowed.sum(dim=-1).clamp(min=1)[:, :, None, :, None]  # (B, H, 1, w, 1)
        pivotal = allowed[:, :, None] & (attn * t >= 1.0)  # attention >= 1/t
        return torch.einsum("bhgwt,bw->bht", pivotal.float(), real)

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, 0, self.window)
