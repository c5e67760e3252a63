"""Attach kvsqueeze to a model: `with attach(model):` routes attention through kvsqueeze; `with compress(model,
method):` also prunes every layer right after each forward fills it. Hooks are always removed on exit.

Inside `compress`, after every forward each full-attention layer is pruned back to what the method keeps of the
tokens it has seen (one-shot prefill, chunked prefill and, under `model.generate`, decoding alike). A method with a
model-wide budget (`ModelScopeMethod`, e.g. the global budget) scores each layer as it fills and prunes every layer
when the model's forward ends.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze.attention import BACKENDS, implementation_name, register
from kvsqueeze.cache import KVCache, capturing_queries
from kvsqueeze.methods.base import LayerScores, Method, ModelScopeMethod, ScoreContext
from kvsqueeze.models import ModelAdapter, get_adapter


@dataclass
class CompressionLog:
    """What compression did during a `compress` block (measured from the cache's storages)."""

    seconds: float = 0.0
    bytes_before: dict[int, int] = field(default_factory=dict)  # layer -> bytes right before its last pruning
    bytes_after: dict[int, int] = field(default_factory=dict)  # layer -> bytes right after it

    @property
    def kv_bytes_before(self) -> int:
        return sum(self.bytes_before.values())

    @property
    def kv_bytes_after(self) -> int:
        return sum(self.bytes_after.values())


_PAUSED: ContextVar[bool] = ContextVar("kvsqueeze_paused", default=False)


@contextmanager
def paused() -> Iterator[None]:
    """Inside this block the hooks of `compress` and `record` do nothing: for a method's own extra forwards over the
    cache it is compressing (KVzip's context replay), which must neither be scored nor pruned."""
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


def _set_attention(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - every PreTrainedModel has it
        model.config._attn_implementation = name


def _inner_backend(current: str | None, backend: str | None) -> str:
    if backend is not None:
        implementation_name(backend)  # validates
        return backend
    if current and current.startswith("kvsqueeze_"):
        return current.removeprefix("kvsqueeze_")
    return current if current in BACKENDS else "sdpa"  # flash/flex: sdpa computes the same attention


def _bound_arguments(model: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def _prepare_step(model: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: make sure a KVCache is used and tell it the positions and padding of the new tokens."""
    kw = _bound_arguments(model, args, kwargs)
    cache = kw.get("past_key_values")
    tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if tokens is None:
        return args, kwargs
    if cache is None:
        if kw.get("use_cache") is False:
            raise ValueError("kvsqueeze needs a cache: do not pass use_cache=False inside attach()/compress().")
        cache = kw["past_key_values"] = KVCache(model.config)
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"kvsqueeze needs past_key_values=kvsqueeze.KVCache(model.config), got {type(cache).__name__}. "
            "transformers' own caches cannot be pruned per layer, row and head."
        )
    batch, q_len = tokens.shape[0], tokens.shape[1]
    mask = kw.get("attention_mask")
    valid = (
        torch.ones(batch, q_len, dtype=torch.bool, device=tokens.device)
        if mask is None
        else mask[:, -q_len:].to(tokens.device).bool()
    )
    positions = kw.get("position_ids")
    if positions is None:
        seen = cache.next_positions()  # the uncompressed length, unless keys were re-rotated
        start = seen.to(tokens.device)[:, None] if seen is not None else 0
        positions = (start + valid.long().cumsum(dim=1) - 1).clamp(min=0)
        kw["position_ids"] = positions
    cache.begin_step(positions.expand(batch, q_len), valid)
    return (), kw


def _end_step(model: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if isinstance(cache, KVCache):
        cache.end_step()


@contextmanager
def attach(model: Any, backend: str | None = None) -> Iterator[ModelAdapter]:
    """Run the model's attention through kvsqueeze (masks from each layer's own cache), without compressing.

    backend: 'sdpa' or 'eager' underneath (default: the model's own when it is one of those, else sdpa).
    """
    adapter = get_adapter(model)
    register()
    previous = model.config._attn_implementation
    _set_attention(model, implementation_name(_inner_backend(previous, backend)))
    handles = [
        model.register_forward_pre_hook(_prepare_step, with_kwargs=True),
        model.register_forward_hook(_end_step, with_kwargs=True),
    ]
    try:
        yield adapter
    finally:
        for handle in handles:
            handle.remove()
        _set_attention(model, previous)


def _hidden_states(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _layer_bytes(keys: Tensor | None, values: Tensor | None) -> int:
    if keys is None or values is None:
        return 0
    return keys.untyped_storage().nbytes() + values.untyped_storage().nbytes()


def rerotate_cache(cache: KVCache, adapter: ModelAdapter) -> None:
    """Key re-rotation after a compressed forward: every layer's tokens are moved to contiguous positions ending right
    before the row's next token, at P = the most tokens any full-attention layer keeps for the row.

    Full layers: the kept tokens of each (row, head), in order, take positions P - K .. P - 1 (K = how many it keeps;
    with a uniform budget that is 0 .. K - 1, StreamingLLM as published). Sliding layers (never pruned) shift by the
    same amount as the row's newest position. Keys are re-rotated with the model's own RoPE; values are unchanged; the
    next tokens continue at P (`KVCache.next_positions`), while `seen` keeps the uncompressed length for budgets.
    """
    full = [i for i, layer in enumerate(cache.kv_layers()) if not layer.is_sliding and layer.positions is not None]
    nxt = cache.next_positions()
    if not full or nxt is None:
        return
    kept = {i: cache.layer(i).kept for i in full}  # (B, H)
    target = torch.stack([k.amax(dim=1) for k in kept.values()]).amax(dim=0)  # (B,) P
    for i, layer in enumerate(cache.kv_layers()):
        if layer.positions is None or layer.keys is None:
            continue
        keys, _, pos = layer.view()  # rectangular, also for a ragged layer
        valid = pos >= 0
        if layer.is_sliding:
            new = torch.where(valid, pos - (nxt - target).to(pos.device)[:, None, None], -1)
            if bool((valid & (new < 0)).any()):
                raise ValueError(
                    f"key re-rotation: sliding-window layer {i} holds more tokens than the {int(target.min())} "
                    "positions of the re-rotated context; lower the ratio."
                )
        else:
            rank = valid.long().cumsum(dim=-1) - 1  # slots are in position order
            start = target.to(pos.device)[:, None, None] - kept[i][..., None]
            new = torch.where(valid, start + rank, -1)
        if not torch.equal(new.to(pos.dtype), pos):
            layer.replace_keys(adapter.rerotate(i, keys, pos, new), new)
    seen = cache.real_tokens_seen()
    assert seen is not None
    cache.position_offset = seen - target.to(seen.device)


def _rerotate_after_forward(adapter: ModelAdapter):
    def hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if isinstance(cache, KVCache) and not _PAUSED.get():
            rerotate_cache(cache, adapter)

    return hook


@contextmanager
def compress(model: Any, method: Method | None, backend: str | None = None) -> Iterator[CompressionLog]:
    """Inside this block, every forward prunes each full-attention layer with `method` right after filling it.

    A method with a model-wide budget (`budget_scope == "model"`) scores each layer as it fills and prunes them all
    when the forward ends. Yields a `CompressionLog` (seconds spent compressing, bytes before/after per layer).
    `method=None` only attaches kvsqueeze's attention (no pruning).
    """
    log = CompressionLog()
    with attach(model, backend) as adapter, capturing_queries() if method is not None else nullcontext():
        handles = []
        if method is not None:
            pending: dict[int, LayerScores] = {}
            residuals: dict[int, Tensor] | None = {} if "residual" in method.needs else None
            for idx, module in enumerate(adapter.attention_modules):
                if adapter.is_sliding(idx):
                    continue
                hook = _make_hook(method, adapter, idx, log, pending, residuals)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
                if residuals is not None:
                    keep = _keep_layer_input(residuals, idx)
                    handles.append(adapter.decoder_layers[idx].register_forward_pre_hook(keep, with_kwargs=True))
            if isinstance(method, ModelScopeMethod):
                handles.append(model.register_forward_hook(_make_model_hook(method, pending, log), with_kwargs=True))
            if method.rerotates_keys:
                handles.append(model.register_forward_hook(_rerotate_after_forward(adapter), with_kwargs=True))
        try:
            yield log
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class LayerInputs:
    """What one attention layer received in a forward: enough to score its cache again later."""

    hidden_states: Tensor  # (B, q, hidden)
    position_embeddings: tuple[Tensor, Tensor]  # cos, sin (B, q, R)
    query_positions: Tensor  # (B, q), -1 = pad
    queries: Tensor | None = None  # (B, H_q, q, D) post-RoPE, when the attention function's were captured
    layer_input: Tensor | None = None  # (B, q, hidden) the decoder layer's input, for methods needing ("residual",)
    attention_update: Tensor | None = None  # (B, q, hidden) what the attention block adds to the residual stream


@contextmanager
def _timed(device: torch.device, log: CompressionLog) -> Iterator[None]:
    sync = device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        log.seconds += time.perf_counter() - start


def _context(adapter: ModelAdapter, cache: KVCache, layer_idx: int, inputs: LayerInputs) -> ScoreContext | None:
    layer = cache.layer(layer_idx)
    if layer.keys is None or layer.values is None or layer.positions is None or layer.seen is None:
        return None
    keys, values, positions = layer.view()  # rectangular (a transient copy when the layer is ragged)
    return ScoreContext(
        keys=keys,
        values=values,
        positions=positions,
        hidden_states=inputs.hidden_states,
        query_positions=inputs.query_positions,
        position_embeddings=inputs.position_embeddings,
        captured_queries=inputs.queries,
        layer_input=inputs.layer_input,
        attention_update=inputs.attention_update,
        slot_store=layer,
        seen=layer.seen,
        layer_idx=layer_idx,
        module=adapter.attention_modules[layer_idx],
        adapter=adapter,
    )


def _apply(
    cache: KVCache,
    layer_idx: int,
    plan: tuple[Tensor, Tensor] | None,
    log: CompressionLog,
    channels: Tensor | None = None,
    values: Tensor | None = None,
) -> None:
    layer = cache.layer(layer_idx)
    log.bytes_before[layer_idx] = _layer_bytes(layer.keys, layer.values)
    if plan is not None:
        layer.prune(*plan, values=values)
    if channels is not None:  # thin keys (Method.channel_plan), after the token plan
        layer.prune_key_channels(channels)
    log.bytes_after[layer_idx] = _layer_bytes(layer.keys, layer.values)


def compress_layer(
    method: Method, adapter: ModelAdapter, cache: KVCache, layer_idx: int, inputs: LayerInputs, log: CompressionLog
) -> None:
    """Score and prune one full-attention layer of `cache` with `method`, logging bytes and time."""
    ctx = _context(adapter, cache, layer_idx, inputs)
    if ctx is None:
        return
    with _timed(ctx.keys.device, log), torch.no_grad():
        plan = method.plan(ctx)
        channels = method.channel_plan(ctx, plan) if cache.layer(layer_idx).key_channels is None else None
        values = None if plan is None else method.merge_values(ctx, *plan)  # value-merging methods only
        del ctx
        _apply(cache, layer_idx, plan, log, channels, values)


def score_layer(
    method: ModelScopeMethod,
    adapter: ModelAdapter,
    cache: KVCache,
    layer_idx: int,
    inputs: LayerInputs,
    log: CompressionLog,
    pending: dict[int, LayerScores],
) -> None:
    """Score one layer for a model-wide budget; it is pruned later by `prune_scored`."""
    ctx = _context(adapter, cache, layer_idx, inputs)
    if ctx is None:
        return
    with _timed(ctx.keys.device, log), torch.no_grad():
        pending[layer_idx] = method.layer_scores(ctx)


def prune_scored(
    method: ModelScopeMethod, cache: KVCache, pending: dict[int, LayerScores], log: CompressionLog
) -> None:
    """Plan the model-wide budget over every scored layer and prune them all (then forget the scores)."""
    if not pending:
        return
    with _timed(cache.device, log), torch.no_grad():
        plans = method.plan_model(pending)
        pending.clear()
        for layer_idx, plan in sorted(plans.items()):
            _apply(cache, layer_idx, plan, log)


def _keep_layer_input(residuals: dict[int, Tensor], layer_idx: int):
    """Forward pre-hook of a decoder layer: keep its input (the residual stream) for the layer's attention hook."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        residuals[layer_idx] = _hidden_states(args, kwargs)

    return hook


def _make_hook(
    method: Method,
    adapter: ModelAdapter,
    layer_idx: int,
    log: CompressionLog,
    pending: dict[int, LayerScores],
    residuals: dict[int, Tensor] | None = None,
):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, KVCache) or _PAUSED.get():
            return
        pos = cache.layer(layer_idx).query_positions
        if pos is None:
            return
        layer = cache.layer(layer_idx)
        queries, layer.step_queries = layer.step_queries, None
        inputs = LayerInputs(_hidden_states(args, kwargs), kwargs["position_embeddings"], pos, queries)
        if residuals is not None:  # methods that need ("residual",): the stream before and the block's update
            inputs.layer_input = residuals.pop(layer_idx, None)
            attn_output = output[0] if isinstance(output, tuple) else output
            inputs.attention_update = adapter.attention_update(layer_idx, attn_output)
        if isinstance(method, ModelScopeMethod):
            score_layer(method, adapter, cache, layer_idx, inputs, log, pending)
        else:
            compress_layer(method, adapter, cache, layer_idx, inputs, log)

    return hook


def _make_model_hook(method: ModelScopeMethod, pending: dict[int, LayerScores], log: CompressionLog):
    def hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if _PAUSED.get():
            return
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if isinstance(cache, KVCache):
            if pending:
                with _timed(cache.device, log), torch.no_grad():
                    method.before_plan(model, cache, kwargs, pending)
            prune_scored(method, cache, pending, log)
        pending.clear()

    return hook


@dataclass
class Recording:
    """An uncompressed prefill and every full-attention layer's inputs, to compress copies of it later.

    For a one-shot prefill, compressing a copy of a recording gives exactly what `compress` gives in the forward:
    each layer is pruned after its attention ran, so later layers saw the same inputs either way.
    """

    cache: KVCache
    inputs: dict[int, LayerInputs]
    adapter: ModelAdapter = field(repr=False)


@contextmanager
def record(model: Any, cache: KVCache, backend: str | None = None) -> Iterator[Recording]:
    """Inside this block, forwards fill `cache` uncompressed and the layers' inputs are kept (last forward wins)."""
    with attach(model, backend) as adapter:
        rec = Recording(cache=cache, inputs={}, adapter=adapter)

        def make(layer_idx: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
                pos = cache.layer(layer_idx).query_positions
                if kwargs.get("past_key_values") is cache and pos is not None and not _PAUSED.get():
                    hidden = _hidden_states(args, kwargs)
                    rec.inputs[layer_idx] = LayerInputs(hidden, kwargs["position_embeddings"], pos)

            return hook

        handles = [
            adapter.attention_modules[i].register_forward_hook(make(i), with_kwargs=True) for i in adapter.full_layers
        ]
        try:
            yield rec
        finally:
            for handle in handles:
                handle.remove()


def compress_recording(recording: Recording, method: Method | None) -> tuple[KVCache, CompressionLog]:
    """A compressed copy of a recorded prefill (the recording itself is left untouched)."""
    rows = torch.arange(recording.cache.batch_size, device=recording.cache.device)
    cache = recording.cache.select_rows(rows)
    log = CompressionLog()
    if isinstance(method, ModelScopeMethod):
        pending: dict[int, LayerScores] = {}
        for layer_idx, inputs in sorted(recording.inputs.items()):
            score_layer(method, recording.adapter, cache, layer_idx, inputs, log, pending)
        prune_scored(method, cache, pending, log)
    elif method is not None:
        for layer_idx, inputs in sorted(recording.inputs.items()):
            compress_layer(method, recording.adapter, cache, layer_idx, inputs, log)
    if method is not None and method.rerotates_keys:
        rerotate_cache(cache, recording.adapter)
    return cache, log
