"""What a compression method is, what it sees, and the plumbing every scorer shares.

Shape legend (used in comments across kvsqueeze):

    B      batch rows                  T    cached slots of one layer (kept tokens + new tokens)
    H      KV heads (H_kv)             q    tokens added by the current forward
    H_q    query heads, G = H_q / H    D    head dim

A method looks at one layer right after a forward appended q tokens to it and returns which slots to keep. Most
methods only *score* slots (`ScorerMethod.score`, higher = keep); the base class turns scores into a keep plan once:
fp32, padding and empty slots never kept, protected tokens (sinks, windows) always kept, deterministic tie-breaking
(equal scores keep the earlier slot), top-k per (row, head), at least one token kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

from kvsqueeze.models import ModelAdapter, apply_rope
from kvsqueeze.registry import first_paragraph
from kvsqueeze.validation import check_ratio  # re-exported: methods import it from here too

Need = Literal["queries", "question", "calibration", "residual", "model", "received_attention"]
BudgetScope = Literal["head", "layer", "model"]
BudgetKind = Literal["uniform", "adaptive"]


class SlotStore(Protocol):
    """Per-slot state a stateful method keeps with the cached tokens (the layer's `slot_state`, see cache.py): read
    and written as (B, H, T) tensors in the layout of `ScoreContext.keys`; pruning keeps the kept slots' values."""

    def read_slot_state(self, name: str) -> Tensor | None: ...

    def write_slot_state(self, name: str, value: Tensor) -> None: ...


@dataclass
class ScoreContext:
    """Everything a method may look at for one layer. Queries are computed lazily, only if asked for."""

    keys: Tensor  # (B, H, T, D) post-RoPE, as cached
    values: Tensor  # (B, H, T, Dv)
    positions: Tensor  # (B, H, T) absolute position of each slot, -1 = empty slot (padding)
    hidden_states: Tensor  # (B, q, hidden) input of the attention block for the q new tokens
    query_positions: Tensor  # (B, q) positions of the new tokens, -1 = pad
    position_embeddings: tuple[Tensor, Tensor]  # cos, sin (B, q, R) the model used for the new tokens
    seen: Tensor  # (B,) real tokens this layer has seen per row (the uncompressed length)
    layer_idx: int
    module: nn.Module = field(repr=False)
    adapter: ModelAdapter = field(repr=False)
    # (B, H_q, q, D) post-RoPE queries the attention function received in this forward, when they were captured
    # (inside `compress`); else queries are recomputed from the hidden states
    captured_queries: Tensor | None = field(default=None, repr=False)
    # For methods that need ("residual",), inside `compress`: the decoder layer's input (B, q, hidden) (the residual
    # stream before this attention block) and what the block adds to it (B, q, hidden); else None
    layer_input: Tensor | None = field(default=None, repr=False)
    attention_update: Tensor | None = field(default=None, repr=False)
    # For methods that need ("received_attention",), inside `compress` on a rectangular layer: (B, H, T) the attention
    # each slot received from this forward's real queries, summed over them and over the query heads of its KV head,
    # as the attention function computed it (`kvsqueeze.received`); else None (the method computes it)
    received: Tensor | None = field(default=None, repr=False)
    # per-slot state that follows the tokens through pruning (stateful methods, e.g. H2O); None outside `compress`
    slot_store: SlotStore | None = field(default=None, repr=False)
    # True on a chunk of a chunked prefill that more context follows: the budget of the tokens seen so far may be
    # smaller than the protected tokens (a window), which are then capped to it rather than refused
    more_context: bool = False
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def valid(self) -> Tensor:
        """(B, H, T) True where a slot holds a real token."""
        return self.positions >= 0

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def scaling(self) -> float:
        return float(getattr(self.module, "scaling", self.keys.shape[-1] ** -0.5))

    def queries(self, rope: bool = True, last: int | None = None) -> Tensor:
        """Queries of the new tokens, (B, H_q, q, D), after RoPE (at their own positions) or before it.

        last: only the last `last` new tokens (SnapKV's window), without computing the others. Captured queries are
        reused as they are (post-RoPE) or rotated back (pre-RoPE: RoPE is a rotation, its inverse uses -sin)."""
        n = self.hidden_states.shape[1]
        last = n if last is None else max(0, min(int(last), n))
        key = f"{'post' if rope else 'pre'}:{last}"
        if key in self._cache:
            return self._cache[key]
        cos, sin = (t[:, n - last :] for t in self.position_embeddings)
        if self.captured_queries is not None:
            post = self.captured_queries[:, :, n - last :]
            out = post if rope else apply_rope(post.float(), cos, -sin)
        else:
            pre_key = f"pre:{last}"
            if pre_key not in self._cache:
                self._cache[pre_key] = self.adapter.pre_rope_queries(self.module, self.hidden_states[:, n - last :])
            out = apply_rope(self._cache[pre_key], cos, sin) if rope else self._cache[pre_key]
        self._cache[key] = out
        return out


class Method:
    """Base of all methods: given a layer's context, return a keep plan or None (keep everything)."""

    name: ClassVar[str] = ""
    # What the method needs beyond the cached keys/values: "queries" (of the new tokens), "question" (query-aware:
    # the question joins the context's forward), "calibration" (statistics computed once per model), "residual"
    # (the residual stream around the attention block), "model" (extra forwards of its own), "received_attention" (the
    # attention each slot received in the forward, summed by the attention function)
    needs: ClassVar[tuple[Need, ...]] = ()
    # True when compressing a copy of a recorded one-shot prefill (`recording.compress_recording`) gives what
    # compressing in the forward gives; chunked or decoding-time methods set False and the benchmark runs them for real.
    shared_prefill: ClassVar[bool] = True
    # Who shares a budget: "head" = every KV head keeps its own count (equal across the heads of a layer);
    # "layer" = the heads of a layer pool theirs (counts differ per head, the layer's total is fixed: Ada-KV);
    # "model" = all full-attention layers and heads share one total (per-layer plans from a model-wide curve, LU-KV;
    # or a `ModelScopeMethod`, which `press` lets score every layer before it prunes any).
    budget_scope: ClassVar[BudgetScope] = "head"
    # "uniform": the cache keeps exactly the budget (floor(n (1 - r)) per head, pooled by `budget_scope`);
    # "adaptive": the method's rule decides the size and the ratio is a target (SimLayerKV, DuoAttention, DMS)
    budget_kind: ClassVar[BudgetKind] = "uniform"
    rerotates_keys: ClassVar[bool] = False  # after pruning, kept keys are moved to contiguous positions (rerotation.py)
    # True: the method also runs on the question and decoding forwards of `pipeline.generate` (H2O, DMS, every
    # `DecodingCompression`), not only on the context's prefill
    acts_while_decoding: ClassVar[bool] = False
    # Derived, never declared: True when the class overrides `merge_values` (evicted values folded into kept ones)
    merges_values: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.merges_values = cls.merge_values is not Method.merge_values

    ratio: float

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        """(indices (B, H, K), counts (B, H)) of the slots to keep, in slot order; None keeps everything."""
        raise NotImplementedError

    def uses(self, need: Need) -> bool:
        """Whether this instance, with its options, uses `need` (by default: whether it is in `needs`). `compress`
        asks before preparing what costs the forward something (the attention each slot received)."""
        return need in self.needs

    def channel_plan(self, ctx: ScoreContext, plan: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """Key channels to keep, (B or 1, H, D') distinct ascending indices with D' < D the same for every (row,
        head), given the token plan `plan` returned by `plan(ctx)`; None (the default) keeps all channels. Called once
        per layer, when its keys still have all their channels; later tokens are stored with the same channels
        (thin keys, see `cache.py`)."""
        return None

    def merge_values(self, ctx: ScoreContext, indices: Tensor, counts: Tensor) -> Tensor | None:
        """New values (B, H, K, Dv) for the kept slots of a plan (`indices`, `counts` as `plan` returns them, in that
        order), or None to keep them as cached (the default). Called by `press` before pruning; never in place."""
        return None

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path | None:
        """Compute (or load from the calibration cache) what this method needs from `model`, ahead of first use.

        Returns the artifact's path; None for methods that need no calibration (the default). `force` recomputes.
        """
        return None

    @classmethod
    def description(cls) -> str:
        return first_paragraph(cls.__doc__) or cls.__name__

    @classmethod
    def options(cls) -> dict[str, object]:
        """Hyper-parameters and their defaults."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


def uniform_budget(seen: Tensor, ratio: float, n_heads: int) -> Tensor:
    """floor(n (1 - r)) tokens per (row, head), at least 1: (B, H) long."""
    keep = torch.floor(seen.double() * (1.0 - ratio) + 1e-6).long().clamp(min=1)  # 1e-6: 100 * (1 - 0.8) is 20
    return keep[:, None].expand(-1, n_heads)


@dataclass
class ScorerMethod(Method):
    """A method that scores slots; subclasses implement `score` (and optionally `protected`, `budget`)."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def score(self, ctx: ScoreContext) -> Tensor:
        """(B, H, T) scores, higher = keep."""
        raise NotImplementedError

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        """(B, H, T) bool of slots that must be kept (counted inside the budget), or None."""
        return None

    def budget(self, ctx: ScoreContext) -> Tensor:
        """(B, H) how many slots each row and head keeps."""
        return uniform_budget(ctx.seen, self.ratio, ctx.keys.shape[1])

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        valid = ctx.valid
        kept_now = valid.sum(dim=-1)  # (B, H)
        budget = torch.minimum(self.budget(ctx).to(kept_now.device), kept_now)
        if bool((budget == kept_now).all()) and bool(valid.all()):
            return None
        protected = checked_protected(self, ctx, budget)
        scores = self.score(ctx).float()
        if scores.shape != valid.shape:
            raise RuntimeError(f"{type(self).__name__}.score returned {tuple(scores.shape)}, expected {valid.shape}")
        return select(scores, valid, budget, protected)


def checked_protected(method: ScorerMethod, ctx: ScoreContext, budget: Tensor) -> Tensor | None:
    """`method.protected(ctx)` restricted to real slots; a ValueError if some (row, head) budget cannot hold them,
    unless more context follows (`ctx.more_context`: an early chunk of a chunked prefill), where `select` keeps the
    best-scored protected slots that fit and the final chunk's budget decides."""
    protected = method.protected(ctx)
    if protected is None:
        return None
    protected = protected & ctx.valid
    n_protected = protected.sum(dim=-1)
    if bool((n_protected > budget).any()) and not ctx.more_context:
        worst = int((n_protected - budget).argmax())
        raise ValueError(
            f"{method!r}: the budget of {int(budget.flatten()[worst])} tokens cannot hold the "
            f"{int(n_protected.flatten()[worst])} protected tokens (sinks/window) at layer {ctx.layer_idx}; "
            "lower the ratio or the number of protected tokens."
        )
    return protected


def select(scores: Tensor, valid: Tensor, budget: Tensor, protected: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-`budget` slots per (row, head), protected first, never an empty slot; ties keep the earlier slot.

    scores, valid, protected: (B, H, T); budget: (B, H). Returns indices (B, H, K) sorted by slot with the
    `counts` (B, H) kept slots first, K = max budget.
    """
    if bool((torch.isnan(scores) & valid).any()):
        raise RuntimeError("compression scores contain NaN")
    tier = valid.long()  # 0 empty, 1 real, 2 protected real: tiers first, then scores, then the earlier slot
    if protected is not None:
        tier = tier + (protected & valid).long()
    counts = torch.minimum(budget, valid.sum(dim=-1))
    k = int(counts.max())
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, by_tier)[..., :k]  # (B, H, K)
    filled = torch.arange(k, device=scores.device)[None, None, :] < counts[..., None]
    t = scores.shape[-1]
    indices = torch.sort(torch.where(filled, order, order + t), dim=-1).values  # kept first, in slot order
    return indices % t, counts


def sinks_and_recent(ctx: ScoreContext, n_sink: int, n_recent: int) -> Tensor:
    """(B, H, T) bool: the first `n_sink` positions of each row and its `n_recent` most recent ones."""
    pos = ctx.positions
    recent_from = (ctx.seen - n_recent)[:, None, None]  # positions are 0..seen-1 per row
    return (pos >= 0) & ((pos < n_sink) | (pos >= recent_from))


@dataclass
class LayerScores:
    """One layer's share of a model-wide budget: what a `ModelScopeMethod` keeps from scoring it."""

    scores: Tensor  # (B, H, T) comparable across layers and heads, higher = keep; protected slots +inf
    valid: Tensor  # (B, H, T) real slots
    protected: Tensor | None  # (B, H, T) slots that must be kept
    budget: Tensor  # (B, H) the uniform budget this layer brings to the pool


@dataclass
class ModelForward:
    """What `compress` hands a model-wide method when a forward ends (`ModelScopeMethod.before_plan`)."""

    model: Any = field(repr=False)
    input_ids: Tensor | None  # (B, n) the forward's token ids (None when it was called with embeddings)
    attention_mask: Tensor | None  # (B, n_total) 1 = real token, as the forward received it
    tokens_before: int  # tokens (padded steps) the cache held before this forward; 0 = it filled an empty cache
    # the context replay over the forward's cache (`kvsqueeze.replay.kvzip_scores` with model and cache bound):
    # replay(context_ids, variant, attention_mask=..., prompt_ids=..., chunk_size=...) -> {layer: (B, H, T) scores}
    replay: Callable[..., dict[int, Tensor]] = field(repr=False)


class ModelScopeMethod(Method):
    """A method whose budget is shared by all full-attention layers (`budget_scope = "model"`). `press` scores every
    layer as it fills (`layer_scores`), then plans and prunes them all at once (`plan_model`) at the end of the
    forward (or of `compress_recording`); the uncompressed layers are held until then."""

    budget_scope = "model"

    def layer_scores(self, ctx: ScoreContext) -> LayerScores:
        raise NotImplementedError

    def plan_model(self, layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
        """Keep plans per layer index (see `Method.plan`) from every full-attention layer's scores."""
        raise NotImplementedError

    def before_plan(self, forward: ModelForward, layers: dict[int, LayerScores]) -> None:
        """Called by `compress` when a forward ends, after every layer was scored and before `plan_model`: a method
        that needs the whole model may complete `layers` here (KVzip replays the context through `forward.replay`).
        Not called by `compress_recording`. Default: nothing."""

    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        raise ValueError(
            f"{type(self).__name__} shares one budget across layers: it needs every layer's scores before pruning, "
            "so it only runs through `kvsqueeze.compress` / `compress_recording`, not layer by layer."
        )
