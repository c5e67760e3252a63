"""TOVA: keep the tokens the last token attends to, averaged over heads (Oren, Hassid, Yarden, Adi, Schwartz 2024,
arXiv 2401.06104, "Transformers are Multi-State RNNs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import apply_rope


@register_method("tova")
@dataclass
class TOVA(ScorerMethod):
    """Keep the tokens the last context token attends to most, averaged over all query heads (one selection shared
    by every KV head)."""

    needs = ("queries",)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        last = ctx.query_positions.argmax(dim=1).to(ctx.hidden_states.device)  # (B,) the latest token of each row
        rows = torch.arange(last.shape[0], device=last.device)
        hidden = ctx.hidden_states[rows, last][:, None]  # (B, 1, hidden): only this token's query is computed
        cos, sin = (x[rows, last][:, None] for x in ctx.position_embeddings)  # (B, 1, R), its own position
        q = apply_rope(ctx.adapter.pre_rope_queries(ctx.module, hidden), cos, sin).float()  # (B, H_q, 1, D)
        b, hq, _, d = q.shape
        h = ctx.keys.shape[1]
        logits = torch.einsum("bhgd,bhtd->bhgt", q.view(b, h, hq // h, d), ctx.keys.float()) * ctx.scaling
        softcap = ctx.adapter.softcap(ctx.module)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        qpos = ctx.query_positions.to(ctx.positions.device)[rows, last]  # (B,)
        allowed = (ctx.positions >= 0) & (ctx.positions <= qpos[:, None, None])  # (B, H, T)
        attn = torch.softmax(logits.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
        return attn.mean(dim=(1, 2))[:, None, :].expand(-1, h, -1)  # (B, H, T)
