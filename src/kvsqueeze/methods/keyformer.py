"""Keyformer: key tokens from a Gumbel-regularized score, plus a recent window (Adnan, Arunkumar, Jain, Nair,
Soloveychik, Kamath 2024, "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative
Inference", arXiv 2403.09054).

Each context query adds Gumbel noise to its unnormalized attention logits x and takes a softmax at temperature tau:
    f(x_i) = exp((x_i + g_i) / tau) / sum_j exp((x_j + g_j) / tau),   g ~ Gumbel(0, 1) i.i.d. per query and key,
and a slot's score is f accumulated (summed) over every context query that sees it (causal), then averaged over the
query heads of each KV head (GQA). The paper's prompt phase uses tau = 1 (tau grows only while decoding). The noise
models the distribution of maxima and skews selection towards the key tokens; the most recent `recent_ratio` of the
budget is always kept (the paper recommends 20-30%). The noise comes from a generator seeded with `seed` + the layer
index, so scores are deterministic for a given seed (and device). The attention is computed in blocks of queries as
in `observed_attention` (never the whole matrix at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.observed_attention import received_attention
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int


def gumbel_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard Gumbel samples -log(-log(u)), u ~ U(0, 1) kept away from 0 and 1; computed in the draws' own buffer
    (a block's noise is as large as its logits; a fresh tensor for each of the five steps took about as long again as
    the steps themselves)."""
    u = torch.rand(shape, generator=generator, device=device)
    return u.clamp_(min=torch.finfo(u.dtype).tiny, max=1.0 - 1e-7).log_().neg_().log_().neg_()


@register_method("keyformer")
@dataclass
class Keyformer(ScorerMethod):
    """Accumulated Gumbel-softmax attention (temperature tau) of every context query, plus a recent window."""

    needs = ("queries",)

    tau: float = 1.0  # softmax temperature of the score function (the paper's prompt phase: 1)
    recent_ratio: float = 0.3  # share of the budget kept for the most recent tokens
    seed: int = 0
    block_size: int = 64  # queries per block (memory: a few (B, H_q, block_size, T) fp32 buffers)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("tau", self.tau, 0.0, low_open=True, finite=True, note="a temperature")
        check_float("recent_ratio", self.recent_ratio, 0.0, 1.0, note="a share of the budget")
        check_int("seed", self.seed)
        check_int("block_size", self.block_size, 1)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        q = ctx.queries(rope=True)  # (B, H_q, q, D)
        qpos = ctx.query_positions.to(q.device)
        generator = torch.Generator(device=q.device).manual_seed(self.seed + ctx.layer_idx)

        def regularize(logits: Tensor) -> Tensor:
            return logits.add_(gumbel_noise(logits.shape, generator, logits.device)).div_(self.tau)

        total = received_attention(ctx, q, qpos, self.block_size, regularize)  # (B, H, T)
        return total / (q.shape[1] // ctx.keys.shape[1])  # mean over the GQA group

    def protected(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): the most recent recent_ratio x budget tokens
        budget = self.budget(ctx)[:, 0]  # (B,)
        recent = torch.floor(budget.double() * self.recent_ratio + 1e-6).long().to(ctx.seen.device)
        return (ctx.positions >= 0) & (ctx.positions >= (ctx.seen - recent)[:, None, None])
