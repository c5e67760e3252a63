"""Leverage scores of the key matrix (Chari & Van Durme 2025, Compactor, arXiv 2507.08143).

The statistical leverage of token i in a head's key matrix K (n x d) is l_i = k_i^T (K^T K)^+ k_i, the squared norm
of row i of an orthonormal basis of K's column space: how much that key sticks out of the directions the other keys
span. High-leverage keys are geometric outliers that a low-rank view of the cache would lose, so they are kept.

Compactor approximates the scores with a random sketch (Drineas et al. 2012): with S a seeded Gaussian
(`sketch_rows` x n, entries N(0, 1/sketch_rows)), (SK)^T (SK) approximates K^T K and l_i ~ k_i^T ((SK)^T SK)^+ k_i;
the cost is O(n d * sketch_rows) instead of a QR of K. sketch_rows=0 computes the exact scores. The sketch's columns
are drawn per absolute position (and seeded per layer), so padding and evictions do not change a token's column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int


def gaussian_sketch(positions: Tensor, rows: int, seed: int) -> Tensor:
    """(B, H, rows, T) sketch columns N(0, 1/rows) per absolute position; empty slots get a zero column."""
    n_pos = int(positions.max()) + 1 if positions.numel() else 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randn(rows, max(n_pos, 1), generator=gen, dtype=torch.float64) / rows**0.5  # (rows, positions)
    table = table.to(positions.device)
    cols = table[:, positions.long().clamp(min=0)]  # (rows, B, H, T)
    return torch.where(positions >= 0, cols, 0.0).permute(1, 2, 0, 3)


def leverage_scores(keys: Tensor, positions: Tensor, sketch_rows: int = 0, seed: int = 0) -> Tensor:
    """(B, H, T) leverage of every key among the valid slots of its head (empty slots: 0), in float64."""
    k = torch.where((positions >= 0)[..., None], keys.double(), 0.0)  # (B, H, T, D)
    sk = k if sketch_rows == 0 else gaussian_sketch(positions, sketch_rows, seed) @ k  # (B, H, s, D)
    gram_pinv = torch.linalg.pinv(sk.transpose(-1, -2) @ sk, hermitian=True)  # (B, H, D, D)
    return torch.einsum("bhtd,bhde,bhte->bht", k, gram_pinv, k)


@register_method("leverage")
@dataclass
class Leverage(ScorerMethod):
    """Keep the keys with the largest (approximate, sketched) statistical leverage in their head's key matrix."""

    sketch_rows: int = 256  # 0: exact leverage scores
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sketch_rows", self.sketch_rows, 0, note="0 = exact scores")
        check_int("seed", self.seed)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        seed = self.seed * 1_000_003 + ctx.layer_idx
        return leverage_scores(ctx.keys, ctx.positions, self.sketch_rows, seed).float()
