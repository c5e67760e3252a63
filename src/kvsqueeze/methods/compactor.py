"""Compactor: leverage scores blended with non-causal chunked attention (Chari & Van Durme 2025, arXiv 2507.08143).

Two query-agnostic views of a token's importance are combined: its key's approximate statistical leverage (a
geometric outlier among the head's keys, see `leverage.py`) and the attention it receives inside its chunk of the
context when every token of the chunk may attend to it (see `noncausal_attention.py`). Each score is standardized
over the valid slots of its head (zero mean, unit variance) and the two are blended:
    s_i = (1 - blend) * z(leverage)_i + blend * z(attention)_i.
The first `n_sink` tokens are always kept. (The paper's context-calibrated choice of the ratio is not part of this
rule: the ratio is given, as for every method.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.leverage import leverage_scores
from kvsqueeze.methods.noncausal_attention import chunk_attention, impute_mean
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int


def standardize(x: Tensor, valid: Tensor) -> Tensor:
    """(x - mean) / std over the valid slots of each (row, head); empty slots get 0."""
    n = valid.sum(dim=-1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(dim=-1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(dim=-1, keepdim=True) / n
    return ((x - mean) / var.sqrt().clamp(min=1e-12)) * valid


@register_method("compactor")
@dataclass
class Compactor(ScorerMethod):
    """Blend of standardized key leverage scores and non-causal chunked attention; sinks kept."""

    needs = ("queries",)

    blend: float = 0.5  # weight of the attention score
    chunk_size: int = 256
    sketch_rows: int = 256  # 0: exact leverage scores
    n_sink: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("blend", self.blend, 0.0, 1.0, note="the weight of the attention score")
        check_int("chunk_size", self.chunk_size, 1)
        check_int("sketch_rows", self.sketch_rows, 0, note="0 = exact scores")
        check_int("n_sink", self.n_sink, 0)
        check_int("seed", self.seed)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        valid = ctx.valid
        seed = self.seed * 1_000_003 + ctx.layer_idx
        lev = leverage_scores(ctx.keys, ctx.positions, self.sketch_rows, seed).float()
        attn = impute_mean(*chunk_attention(ctx, self.chunk_size))
        return (1 - self.blend) * standardize(lev, valid) + self.blend * standardize(attn, valid)

    def protected(self, ctx: ScoreContext) -> Tensor:
        return sinks_and_recent(ctx, self.n_sink, 0)
