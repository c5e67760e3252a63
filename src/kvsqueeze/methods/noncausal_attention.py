"""Non-causal chunked attention, the attention half of Compactor (Chari & Van Durme 2025, arXiv 2507.08143).

The context is cut into chunks of `chunk_size` consecutive positions; inside a chunk every query attends to every key
of the chunk, earlier or later (no causal mask), and a key's score is the attention it receives, averaged over the
chunk's queries and the query heads of its GQA group. Letting later tokens vote approximates how useful a token is
to the text around it whatever comes after, at O(n * chunk_size) cost instead of O(n^2).

Only the queries of the current forward are known: slots whose chunk holds none of them (tokens of earlier forwards,
e.g. in chunked prefill or decoding) get the mean score of the scored slots of their head, a neutral value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def _by_position(x: Tensor, slot: Tensor, width: int) -> Tensor:
    """Scatter x (B, H, T, D) into (B, H, width, D) at `slot` (B, H, T); slots == width are dropped."""
    b, h, _, d = x.shape
    out = x.new_zeros(b, h, width + 1, d)
    return out.scatter(2, slot[..., None].expand(-1, -1, -1, d), x)[:, :, :width]


def chunk_attention(ctx: ScoreContext, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Mean non-causal attention (B, H, T) each slot gets from the new queries of its chunk; (B, H, T) bool scored."""
    qpos = ctx.query_positions.long()  # (B, q)
    valid = ctx.valid
    if not bool((qpos >= 0).any()):
        return torch.zeros(valid.shape, device=valid.device), torch.zeros_like(valid)
    first = int(qpos[qpos >= 0].min()) // chunk_size * chunk_size  # the first position of the first chunk
    n_chunks = int(qpos.max()) // chunk_size - first // chunk_size + 1
    width = n_chunks * chunk_size
    q = ctx.queries(rope=True).float()  # (B, H_q, q, D)
    b, hq, _, d = q.shape
    h = ctx.keys.shape[1]
    q_slot = torch.where(qpos >= 0, qpos - first, width)[:, None].expand(b, hq, -1)  # (B, H_q, q)
    queries = _by_position(q, q_slot, width).view(b, h, hq // h, n_chunks, chunk_size, d)
    has_query = _by_position((qpos >= 0).float()[:, None, :, None], q_slot[:, :1], width)[:, 0, :, 0] > 0  # (B, W)
    kpos = ctx.positions.long()
    in_range = valid & (kpos >= first) & (kpos < first + width)
    k_slot = torch.where(in_range, kpos - first, width)  # (B, H, T)
    keys = _by_position(ctx.keys.float(), k_slot, width).view(b, h, n_chunks, chunk_size, d)
    has_key = _by_position(in_range.float()[..., None], k_slot, width)[..., 0] > 0  # (B, H, W)
    logits = torch.einsum("bhgncd,bhnkd->bhgnck", queries, keys) * ctx.scaling  # (B, H, G, n, C, C)
    softcap = ctx.adapter.softcap(ctx.module)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    key_mask = has_key.view(b, h, 1, n_chunks, 1, chunk_size)
    attn = torch.softmax(logits.masked_fill(~key_mask, float("-inf")), dim=-1).nan_to_num(0.0)
    q_mask = has_query.view(b, 1, 1, n_chunks, chunk_size, 1).float()
    n_q = q_mask.sum(dim=4).clamp(min=1)  # (B, 1, 1, n, 1)
    per_key = ((attn * q_mask).sum(dim=4) / n_q).mean(dim=2).reshape(b, h, width)  # (B, H, W)
    chunk_has_query = has_query.view(b, n_chunks, chunk_size).any(dim=-1)  # (B, n)
    scored_pos = chunk_has_query.repeat_interleave(chunk_size, dim=1)[:, None].expand(b, h, width)
    gathered = per_key.gather(2, k_slot.clamp(max=width - 1))
    scored = in_range & scored_pos.gather(2, k_slot.clamp(max=width - 1))
    return torch.where(scored, gathered, 0.0), scored


def impute_mean(scores: Tensor, scored: Tensor) -> Tensor:
    """Unscored slots get the mean of the scored slots of their (row, head); 0 where none is scored."""
    mean = (scores * scored).sum(dim=-1, keepdim=True) / scored.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(scored, scores, mean)


@register_method("noncausal_attention")
@dataclass
class NonCausalAttention(ScorerMethod):
    """Keep the keys most attended inside their chunk of the context, with later tokens voting too (no causal mask)."""

    needs = ("queries",)

    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        return impute_mean(*chunk_attention(ctx, self.chunk_size))
