"""KeyDiff: keep the keys that differ most from the others (Park, Jones, Morse, Goel, Lee, Ko 2025, arXiv 2504.15364).

The anchor is the mean of the L2-normalized keys of a head; a key's score is minus its cosine similarity to the
anchor, so distinctive keys are kept and redundant ones (pointing where most keys point) are evicted. No attention
weights are needed (FlashAttention compatible). The paper evicts block by block as the prompt streams in; here the
rule is applied to whatever the layer holds when it is compressed (one-shot, chunked prefill or decoding alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method


@register_method("keydiff")
@dataclass
class KeyDiff(ScorerMethod):
    """Keep the keys least similar (cosine) to the mean normalized key of their head."""

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        valid = ctx.valid[..., None].float()  # (B, H, T, 1)
        unit = F.normalize(ctx.keys.float(), dim=-1) * valid  # (B, H, T, D), empty slots zeroed
        anchor = unit.sum(dim=2) / valid.sum(dim=2).clamp(min=1)  # (B, H, D)
        return -F.cosine_similarity(ctx.keys.float(), anchor[:, :, None, :], dim=-1, eps=1e-12)
