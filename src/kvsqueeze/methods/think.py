"""ThinK: thinner keys by query-driven channel pruning (Xu, Jie, Dong, Wang, Lu, Zhou, Saha, Xiong, Sahoo 2024,
arXiv 2407.21018).

Per (row, KV head), channel c of the keys scores ||Q_w[:, c]|| * ||K[:, c]||, the Frobenius norm of its share
Q_w[:, c] K[:, c]^T of the attention logits: Q_w stacks the post-RoPE queries of the last `window` context tokens of
every query head of the GQA group (pad queries left out), K the keys of the tokens kept by the token plan. The top
D - floor(D * key_channel_ratio) channels are kept, ties to the lower channel; values keep all channels.

Unlike the reference implementation (which zeroes the pruned channels and frees nothing), the layer then stores its
keys with D' < D channels for real (`cache.py`, thin keys), and the tokens appended later (questions, decoding, the
next chunk) are stored with the same channels: channels are chosen once per layer, by the first compressing forward
(for a chunked prefill: the first chunk). Attention uses the matching query channels, scaled by 1/sqrt(D).

Tokens: by default every token is kept (`ratio` must then be 0); with `scorer` (a method or a registered name, e.g.
"snapkv") the scorer's token plan runs first at `ratio`, and the channels are scored on the tokens it keeps. Scorers
with head-adaptive (ragged) budgets such as Ada-KV work; key re-rotation, model-wide budgets and methods that must run
for real (chunked, decoding-time) are refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.methods.base import Method, ModelScopeMethod, ScoreContext, check_ratio
from kvsqueeze.methods.compose import subset_context
from kvsqueeze.methods.registry import get_method, register_method
from kvsqueeze.validation import check_float, check_int


def channel_scores(queries: Tensor, keys: Tensor, valid: Tensor, real_queries: Tensor) -> Tensor:
    """(B, H, D) score of every key channel: ||Q[:, c]|| ||K[:, c]||, higher = keep.

    queries (B, H_q, w, D) post-RoPE; keys (B, H, T, D); valid (B, H, T) real slots; real_queries (B, w) non-pad.
    The G = H_q / H query heads of a KV head pool their w queries (G w rows of Q)."""
    b, hq, w, d = queries.shape
    h = keys.shape[1]
    q = queries.float() * real_queries[:, None, :, None].to(queries.device)  # pads count as zero rows
    q_norm = q.reshape(b, h, (hq // h) * w, d).square().sum(dim=2).sqrt()  # (B, H, D)
    k_norm = (keys.float() * valid[..., None]).square().sum(dim=2).sqrt()  # (B, H, D)
    return q_norm * k_norm


def top_channels(scores: Tensor, n_keep: int) -> Tensor:
    """(B, H, n_keep) the highest-scoring channels per (row, head), ascending; ties keep the lower channel."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    return torch.sort(order, dim=-1).values


def token_scorer(scorer: object, ratio: float) -> Method:
    """The token method ThinK runs first: a Method (or a registered name) carrying ThinK's ratio."""
    if isinstance(scorer, str):
        scorer = get_method(scorer)
    if not isinstance(scorer, Method) or not dataclasses.is_dataclass(scorer) or isinstance(scorer, ThinK):
        raise ValueError(f"scorer must be a token compression method (e.g. 'snapkv') or None, got {scorer!r}")
    if isinstance(scorer, ModelScopeMethod) or type(scorer).budget_scope == "model":
        raise ValueError(f"scorer {scorer!r} shares one budget across layers; ThinK runs layer by layer")
    if type(scorer).rerotates_keys:
        raise ValueError(f"scorer {scorer!r} re-rotates keys, which thin keys (pruned key channels) cannot follow")
    if not type(scorer).shared_prefill:
        raise ValueError(f"scorer {scorer!r} runs while the context streams in or while decoding; ThinK does not")
    return dataclasses.replace(scorer, ratio=ratio)


@register_method("think")
@dataclass
class ThinK(Method):
    """Keep the key channels the recent queries use most (ThinK), stored thinner for real; tokens by an optional scorer.

    See the module docstring for the rule and the storage."""

    needs = ("queries",)

    ratio: float = 0.0  # tokens removed by `scorer` (0 without one)
    key_channel_ratio: float = 0.4  # fraction of each head's key channels removed (floor(D * key_channel_ratio))
    window: int = 32  # recent context queries that score the channels
    scorer: Method | None = None  # token method run first (a method or a registered name); None keeps every token

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_float("key_channel_ratio", self.key_channel_ratio, 0.0, 1.0, high_open=True, note="key channels removed")
        check_int("window", self.window, 1)
        if self.scorer is None:
            if self.ratio != 0.0:
                raise ValueError(
                    f"ratio={self.ratio} is the fraction of tokens a token scorer removes, but no scorer is given: "
                    "ThinK alone keeps every token and prunes key channels (key_channel_ratio). Give scorer=NAME "
                    "(e.g. 'snapkv') or ratio=0 (--ratio 0 on the command line)."
                )
        else:
            self.scorer = token_scorer(self.scorer, self.ratio)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        return None if self.scorer is None else self.scorer.plan(ctx)

    def kept_channels(self, head_dim: int) -> int:
        """D' = D - floor(D * key_channel_ratio) channels kept per head."""
        return head_dim - math.floor(head_dim * self.key_channel_ratio + 1e-6)

    def channel_plan(self, ctx: ScoreContext, plan: tuple[Tensor, Tensor] | None) -> Tensor | None:
        d = ctx.keys.shape[-1]
        n_keep = self.kept_channels(d)
        if n_keep >= d:
            return None
        kept = ctx if plan is None else subset_context(ctx, *plan)  # score the channels on the tokens kept
        queries = ctx.queries(rope=True, last=self.window)  # (B, H_q, w, D)
        real = ctx.query_positions[:, ctx.query_positions.shape[1] - queries.shape[2] :] >= 0  # (B, w)
        return top_channels(channel_scores(queries, kept.keys, kept.valid, real), n_keep)

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path | None:
        return None if self.scorer is None else self.scorer.calibrate(model, tokenizer, force)
