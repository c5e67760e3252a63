"""CurDKV: value-guided selection by approximate CUR leverage (Sengupta et al. 2025, arXiv 2509.15038).

CUR decompositions sample the rows of a matrix with probability proportional to their leverage; the cheap,
sketch-free approximation is the row's squared norm over the matrix's squared Frobenius norm ("length-squared"
sampling). CurDKV scores a token by the product of its key and value probabilities, so a token is kept when both its
key (how it is addressed) and its value (what it writes) carry weight:
    s_i = ||k_i||^2 / sum_{j in W(i)} ||k_j||^2  *  ||v_i||^2 / sum_{j in W(i)} ||v_j||^2
where W(i) is the local window of `window` positions holding i (the paper's local approximation, which keeps the
selection spread along the context); window=0 normalizes over the whole head (then only the product ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods._segments import gather_segments, segment_ids, segment_reduce
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def local_share(x: Tensor, seg: Tensor) -> Tensor:
    """x (B, H, T) >= 0 divided by its sum over each segment (slots of no segment: 0)."""
    total = gather_segments(segment_reduce(torch.where(seg >= 0, x, 0.0), seg, "sum"), seg, fill=1.0)
    return torch.where(seg >= 0, x / total.clamp(min=1e-30), 0.0)


@register_method("curdkv")
@dataclass
class CurDKV(ScorerMethod):
    """Keep tokens whose key and value both carry a large share of their local window's squared norm."""

    window: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window, 0, note="0 = the whole head")

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        seg = torch.where(ctx.valid, 0, -1) if self.window == 0 else segment_ids(ctx.positions, self.window)
        k2 = ctx.keys.float().pow(2).sum(dim=-1)
        v2 = ctx.values.float().pow(2).sum(dim=-1)
        return local_share(k2, seg) * local_share(v2, seg)
