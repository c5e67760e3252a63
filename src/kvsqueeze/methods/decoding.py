"""Decoding-time compression: keep the cache near a target size during long generations, with any scorer.

Compression at prefill alone leaves a long generation free to grow the cache without bound (reasoning models,
long answers). This wrapper compresses back to a target every `every` steps, with another method's scores
(the "decoding press" idea of kvpress; positions here are absolute, see below).

Rule, per row, after each forward that appended q real tokens:
* target = `target_tokens`, or floor(seen (1 - ratio)) when only `ratio` is given (seen = tokens the row has seen);
* a forward of several tokens (prefill, a chunk, a question) that leaves more than the target is compressed to the
  target right away, so prefilling through this wrapper reaches the target like any method;
* single decoding steps are batched: the row is compressed to the target once it holds target + every tokens.
Once a row has reached the target, every forward of one token therefore leaves between target and
target + every - 1 tokens in each head, and compression runs once every `every` steps.

Scores use absolute positions: `ScoreContext.positions` holds each slot's original position, and query-based
scorers (SnapKV, PyramidKV) see the last `query_window` tokens this layer processed -- across decoding steps --
with their queries rotated at their own positions. The wrapper remembers the attention input (hidden state),
position and rotary cos/sin of those tokens per layer (a small ring buffer, only for scorers that need queries).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, check_ratio, select
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_int

DEFAULT_QUERY_WINDOW = 64


@dataclass
class _Recent:
    """The last few tokens one layer processed: attention inputs (B, w, hidden), positions (B, w), cos/sin."""

    hidden_states: Tensor
    query_positions: Tensor
    cos: Tensor
    sin: Tensor
    seen: Tensor  # (B,) tokens the layer had seen after the last of them (to detect a new sequence)


@register_method("decoding")
@dataclass
class DecodingCompression(ScorerMethod):
    """Compress back to a target size every `every` steps during generation, with another scorer (KNorm)."""

    shared_prefill = False  # it acts while answering: the benchmark runs it for real, not on a recorded prefill
    acts_while_decoding = True

    scorer: ScorerMethod = field(default_factory=KNorm)
    target_tokens: int | None = None  # fixed target per (row, head); else floor(seen (1 - ratio))
    every: int = 32
    query_window: int | None = None  # recent tokens whose queries query-based scorers see; default: their window
    _recent: dict[int, _Recent] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not isinstance(self.scorer, ScorerMethod) or isinstance(self.scorer, DecodingCompression):
            raise ValueError(f"scorer must be a scoring method (not a DecodingCompression), got {self.scorer!r}")
        check_int("target_tokens", self.target_tokens, 1, none_ok=True)
        if self.target_tokens is not None and self.ratio != 0.0:
            raise ValueError(f"give either target_tokens ({self.target_tokens}) or ratio ({self.ratio}), not both")
        check_int("every", self.every, 1)
        check_int("query_window", self.query_window, 1, none_ok=True)

    @property
    def remembered(self) -> int:
        """How many recent tokens per layer are remembered for the scorer's queries (0: it uses none)."""
        if "queries" not in self.scorer.needs:
            return 0
        if self.query_window is not None:
            return self.query_window
        inner = getattr(self.scorer, "scorer", self.scorer)  # wrappers such as PyramidKV hold the query scorer
        return int(getattr(self.scorer, "window", getattr(inner, "window", DEFAULT_QUERY_WINDOW)))

    def reset(self) -> None:
        """Forget the remembered tokens (done automatically when a new sequence is detected)."""
        self._recent.clear()

    def target(self, seen: Tensor) -> Tensor:
        """(B,) target tokens per row."""
        if self.target_tokens is not None:
            return torch.full_like(seen, self.target_tokens)
        return torch.floor(seen.double() * (1.0 - self.ratio) + 1e-6).long().clamp(min=1)

    def budget(self, ctx: ScoreContext) -> Tensor:  # (B, H)
        """The target for the rows that are due (see the module docstring), what they hold for the others."""
        kept = ctx.valid.sum(dim=-1)  # (B, H)
        target = self.target(ctx.seen).to(kept.device)
        most = kept.amax(dim=-1)  # (B,)
        new = (ctx.query_positions >= 0).sum(dim=1).to(kept.device)  # (B,) real tokens this forward appended
        due = (most >= target + self.every) | ((new > 1) & (most > target))
        return torch.where(due[:, None], torch.minimum(target[:, None], kept), kept)

    def score(self, ctx: ScoreContext) -> Tensor:
        return self.scorer.score(ctx)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return self.scorer.protected(ctx)

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        budget = self.budget(ctx)  # decided on this forward's own tokens
        valid = ctx.valid
        ctx = self._with_recent_queries(ctx)  # remembered on every forward, due or not
        if bool((budget == valid.sum(dim=-1)).all()):
            return None  # no row is due: leave the layer as it is
        protected = self.protected(ctx)
        if protected is not None:
            protected = protected & valid
            over = protected.sum(dim=-1) > budget
            if bool(over.any()):
                raise ValueError(
                    f"{self!r}: the target of {int(budget[over].min())} tokens cannot hold the "
                    f"{int(protected.sum(dim=-1)[over].max())} protected tokens (sinks/window) of the scorer at layer "
                    f"{ctx.layer_idx}; raise the target or lower the scorer's number of protected tokens."
                )
        return select(self.score(ctx).float(), valid, budget, protected)

    def _with_recent_queries(self, ctx: ScoreContext) -> ScoreContext:
        """Remember this forward's tokens and return a context whose queries are the last `remembered` tokens."""
        w = self.remembered
        if w == 0:
            return ctx
        cos, sin = ctx.position_embeddings
        qpos = ctx.query_positions.to(ctx.seen.device)
        parts = [ctx.hidden_states, qpos, cos, sin]
        prev = self._recent.get(ctx.layer_idx)
        seen_before = ctx.seen - (qpos >= 0).sum(dim=1)
        if prev is not None and prev.seen.shape == seen_before.shape and bool((prev.seen == seen_before).all()):
            old = [prev.hidden_states, prev.query_positions, prev.cos, prev.sin]
            parts = [torch.cat([a, b], dim=1) for a, b in zip(old, parts, strict=True)]
        h, p, c, s = (t[:, -w:].clone() for t in parts)  # clone: a slice would hold the whole prefill's storage
        self._recent[ctx.layer_idx] = _Recent(h, p, c, s, ctx.seen.clone())
        return dataclasses.replace(
            ctx, hidden_states=h, query_positions=p, position_embeddings=(c, s), captured_queries=None, _cache={}
        )
