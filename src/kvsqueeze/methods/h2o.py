"""H2O as published: keep the heavy hitters and a recent window while decoding, one eviction per step (Zhang, Sheng,
Zhou, Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang, Chen 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv 2306.14048, Algorithm 1).

Each cached token carries the attention it has received so far, summed over every query that saw it (the prompt's
queries, then each generated token's) and over the query heads of its KV head. The sum lives in the cache as
per-slot state (`KVLayer.slot_state`), so it follows pruning and row selection (`pipeline.answer` copies rows). After
each forward the new queries' attention (the one the step computed: captured post-RoPE queries, causal) is added,
and where a (row, head) holds more than its budget K it keeps the `recent` most recent tokens plus the K - recent
tokens with the largest sums. Once the cache is full, each decoding step adds one token and evicts one: the cache
holds K tokens between steps and K + 1 while the step attends.

Budget K per row: `budget_tokens` if given; else floor(n (1 - ratio)) with n the tokens the row had seen when it was
first compressed (the prompt, in one forward; a chunked prefill fixes it at the first chunk, so give budget_tokens
there). After the first eviction the budget stays fixed for the rest of the generation (read back from the cache's
size, so nothing per row is remembered outside the cache). recent = floor(K * recent_share) (the paper splits the
budget evenly between heavy hitters and recent tokens).

Stateful and acting while answering (`acts_while_decoding`): `kvsqueeze.generate` and the benchmark apply it to the
question and to every generated token (`shared_prefill = False`). Outside `compress` (a ScoreContext without a slot
store) only the current forward's attention is summed. `observed_attention` is the one-shot prefill variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import Need, ScoreContext, ScorerMethod, checked_protected, select
from kvsqueeze.methods.observed_attention import forward_received, received_attention
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int

STATE = "h2o_accumulated_attention"


@register_method("h2o")
@dataclass
class H2O(ScorerMethod):
    """Keep the tokens with the largest attention accumulated over all queries so far plus a recent window, evicting
    one token per decoding step (H2O as published)."""

    needs = ("queries", "received_attention")
    shared_prefill = False  # stateful, acts while answering: the benchmark runs it for real
    acts_while_decoding = True

    budget_tokens: int | None = None  # fixed cache size per head; else floor(n (1 - ratio)) of the first compression
    recent_share: float = 0.5  # part of the budget kept for the most recent tokens
    block_size: int = 64  # queries per block when summing a long forward's attention (memory only)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("budget_tokens", self.budget_tokens, 1, none_ok=True)
        if self.budget_tokens is not None and self.ratio != 0.0:
            raise ValueError(f"give either budget_tokens ({self.budget_tokens}) or ratio ({self.ratio}), not both")
        check_float("recent_share", self.recent_share, 0.0, 1.0)
        check_int("block_size", self.block_size, 1)

    def uses(self, need: Need) -> bool:
        """At ratio 0 without a fixed budget nothing is evicted: the forward stays plain attention, bit for bit."""
        if need == "received_attention":
            return super().uses(need) and (self.ratio > 0 or self.budget_tokens is not None)
        return super().uses(need)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        kept = ctx.valid.sum(dim=-1)  # (B, H) after this forward's tokens were appended
        if self.budget_tokens is not None:
            return torch.full_like(kept, self.budget_tokens)
        new = (ctx.query_positions >= 0).sum(dim=1).to(kept.device)  # (B,)
        kept_before = kept - new[:, None]
        seen_before = (ctx.seen.to(kept.device) - new)[:, None]
        first = torch.floor(ctx.seen.double() * (1.0 - self.ratio) + 1e-6).long().clamp(min=1).to(kept.device)
        return torch.where(kept_before < seen_before, kept_before, first[:, None])  # fixed once something was evicted

    def protected(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): the `recent` most recent tokens
        recent = torch.floor(self.budget(ctx).double() * self.recent_share + 1e-6).long()  # (B, H)
        pos = ctx.positions.long()
        newest = pos.amax(dim=-1, keepdim=True)  # (B, H, 1)
        return ctx.valid & (pos > newest - recent[..., None])

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T): the accumulated attention, this forward's included
        received = forward_received(ctx)  # summed by the step's attention inside `compress`
        if received is None:
            q = ctx.queries(rope=True)  # (B, H_q, q, D): the ones the step's attention used (captured inside compress)
            received = received_attention(ctx, q, ctx.query_positions.to(q.device), self.block_size)
        previous = None if ctx.slot_store is None else ctx.slot_store.read_slot_state(STATE)
        return received if previous is None else received + previous.to(received.device)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        valid = ctx.valid
        scores = self.score(ctx).float()
        if ctx.slot_store is not None:
            ctx.slot_store.write_slot_state(STATE, torch.where(valid, scores, 0.0))  # accumulated on every forward
        kept_now = valid.sum(dim=-1)
        budget = torch.minimum(self.budget(ctx).to(kept_now.device), kept_now)
        if bool((budget == kept_now).all()) and bool(valid.all()):
            return None
        return select(scores, valid, budget, checked_protected(self, ctx, budget))
