"""The KV cache that compression prunes for real. The ONLY module that touches transformers' Cache internals.

Layout of one full-attention layer (shape legend in `methods/base.py`):
    keys, values  (B, H, T, D)  post-RoPE, as the model cached them; T = the longest row/head kept
    positions     (B, H, T)     int32 absolute position of each slot; -1 marks an empty slot
                                (a left-pad token, or a row/head that keeps fewer tokens than T)
    seen          (B,)          real (non-pad) tokens this layer has seen per row, kept or not

Each layer has its own T, so layers may keep different amounts (per-layer budgets). Within a layer, rows and heads
may keep different counts: shorter ones leave empty slots, whose bytes are reported as `padding_bytes`. Pruning
gathers the kept slots into new tensors, so the old storages are freed and `cache_bytes` drops for real.

Every forward must tell the cache the positions and padding of its new tokens (`begin_step`); `kvsqueeze.attach`
and `kvsqueeze.compress` install a hook that does it. The attention function in `attention.py` reads the layer that
was just updated (`take_updated_layer`) and builds the mask from that layer's own positions.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

__all__ = ["CacheStats", "KVCache", "KVLayer", "cache_bytes", "cache_stats", "layer_windows"]

_UPDATED: ContextVar[KVLayer | None] = ContextVar("kvsqueeze_updated_layer", default=None)


class KVLayer(DynamicLayer):
    """One attention layer's cache: keys/values plus the absolute position of every slot."""

    def __init__(self, sliding_window: int | None = None) -> None:
        super().__init__()
        self.sliding_window = sliding_window  # sliding-window layers are trimmed to the window and never pruned
        self.positions: Tensor | None = None  # (B, H, T) int32, -1 = empty
        self.seen: Tensor | None = None  # (B,) int64
        self.total_seen = 0  # padded steps seen (what transformers calls the sequence length)
        self.query_positions: Tensor | None = None  # (B, q) positions of the tokens of the current step, -1 = pad
        self.tracker = _BytesTracker()  # shared with the other layers of the cache, for the peak

    @property
    def is_sliding(self) -> bool:  # type: ignore[override]
        return self.sliding_window is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=torch.int32, device=key_states.device)
        self.seen = torch.zeros(b, dtype=torch.long, device=key_states.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if _UPDATED.get() is not None:
            raise RuntimeError(
                "A kvsqueeze KVCache was updated twice without its attention running in between: the model is not "
                "using kvsqueeze's attention function. Run it inside `kvsqueeze.attach(model)` or "
                "`kvsqueeze.compress(model, method)`."
            )
        if self.query_positions is None:
            raise RuntimeError(
                "This kvsqueeze KVCache was not told the positions of the new tokens: run the model inside "
                "`kvsqueeze.attach(model)` or `kvsqueeze.compress(model, method)`."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None and self.positions is not None
        assert self.seen is not None
        b, h, q, _ = key_states.shape
        before = self.nbytes()
        new_pos = self.query_positions.to(torch.int32)[:, None, :].expand(b, h, q)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        self.seen = self.seen + (self.query_positions >= 0).sum(dim=1)
        self.total_seen += q
        self.tracker.add(self.nbytes() - before)
        _UPDATED.set(self)
        return self.keys, self.values

    def finish_step(self) -> None:
        """Called once attention has read the layer: sliding layers drop what no future query can see."""
        if self.sliding_window is None or self.positions is None:
            return
        if self.positions.shape[-1] < self.sliding_window:
            return
        # the next query of a row sits at (its newest position + 1) and sees positions > that - window
        newest = self.positions.amax(dim=-1, keepdim=True)  # (B, H, 1)
        keep = (self.positions >= 0) & (self.positions > newest + 1 - self.sliding_window)
        if bool(keep.all()):
            return
        self.keep_where(keep)

    def keep_where(self, keep: Tensor) -> None:
        """Keep the slots where `keep` (B, H, T) is True, in slot order."""
        counts = keep.sum(dim=-1)
        t = keep.shape[-1]
        slots = torch.arange(t, device=keep.device).expand_as(keep)
        order = torch.sort(torch.where(keep, slots, slots + t), dim=-1).values[..., : int(counts.max())]
        self.prune(order % t, counts)

    def get_seq_length(self) -> int:
        return self.total_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.positions is None else self.positions.shape[-1]
        return stored + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvsqueeze's KVCache cannot be cropped: evicted tokens are already gone.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support beam search or num_return_sequences > 1.")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support selecting batch rows.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support beam search.")

    def select_rows(self, rows: Tensor) -> KVLayer:
        """A copy of this layer holding the given batch rows (indices may repeat)."""
        new = KVLayer(self.sliding_window)
        if self.is_initialized:
            assert self.keys is not None and self.values is not None and self.positions is not None
            assert self.seen is not None
            new.dtype, new.device, new.is_initialized = self.dtype, self.device, True
            rows = rows.to(self.keys.device)
            new.keys, new.values = self.keys[rows], self.values[rows]
            new.positions, new.seen = self.positions[rows], self.seen[rows]
        new.total_seen = self.total_seen
        return new

    def nbytes(self) -> int:
        """Bytes of keys and values held now (tensors are never views here, so numel is the storage)."""
        if self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @property
    def kept(self) -> Tensor:
        """(B, H) number of filled slots per row and head."""
        assert self.positions is not None
        return (self.positions >= 0).sum(dim=-1)

    def replace_keys(self, keys: Tensor, positions: Tensor) -> None:
        """Rewrite keys and slot positions in place of the current ones (same shapes): for key re-rotation, which
        moves kept tokens to new positions. Values, `seen` and the bytes held are unchanged."""
        assert self.keys is not None and self.positions is not None
        if keys.shape != self.keys.shape or positions.shape != self.positions.shape:
            shapes = f"{tuple(keys.shape)}, {tuple(positions.shape)}"
            raise ValueError(f"replace_keys: shapes {shapes} do not match the layer's")
        self.keys = keys.to(self.keys.dtype)
        self.positions = positions.to(torch.int32)

    def prune(self, indices: Tensor, counts: Tensor) -> None:
        """Keep, for each (row, head), the slots `indices[b, h, :counts[b, h]]`; the rest become empty slots.

        indices: (B, H, K) long slot indices into the current T; counts: (B, H) long, counts <= K.
        The new tensors hold K slots; the old storages are released.
        """
        assert self.keys is not None and self.values is not None and self.positions is not None
        b, h, k = indices.shape
        before = self.nbytes()
        d, dv = self.keys.shape[-1], self.values.shape[-1]
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        self.keys = self.keys.gather(2, indices[..., None].expand(b, h, k, d))
        self.values = self.values.gather(2, indices[..., None].expand(b, h, k, dv))
        self.positions = torch.where(filled, self.positions.gather(2, indices), -1)
        self.tracker.add(self.nbytes() - before)


class _BytesTracker:
    """Running total of the keys/values bytes held by all layers of one cache, and its maximum."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


@dataclass
class CacheStats:
    """Bytes actually held by a cache, from its storages (a slice counts its whole storage, once)."""

    kv_bytes: int  # keys + values of the full-attention layers (the layers compression prunes)
    sliding_kv_bytes: int  # keys + values of sliding-window layers (never pruned; reported apart)
    metadata_bytes: int  # position bookkeeping
    padding_bytes: int  # part of kv_bytes spent on empty slots (padded rows, heads that keep fewer)
    tokens_kept: list[int]  # per layer: slots filled, averaged over rows and heads, rounded down
    peak_kv_bytes: int  # the most keys+values bytes all layers held at once (tracked by a KVCache; else current)


class KVCache(Cache):
    """A transformers `Cache` whose layers can be pruned for real. Build it from the model's config."""

    def __init__(self, config: PretrainedConfig) -> None:
        layers = [KVLayer(window) for window in layer_windows(config)]
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.tracker = _BytesTracker()
        for layer in layers:
            layer.tracker = self.tracker
        self.step_positions: Tensor | None = None  # (B, q) of the current forward
        self.position_offset: Tensor | None = None  # (B,) positions removed by key re-rotation (None: none)

    # -- the step protocol: positions and padding of the new tokens of each forward
    def begin_step(self, positions: Tensor, valid: Tensor | None = None) -> None:
        """Announce the next forward's tokens: positions (B, q) absolute positions; valid (B, q) False for pads."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be (batch, tokens), got shape {tuple(positions.shape)}")
        pos = positions.long()
        if valid is not None:
            pos = torch.where(valid.bool(), pos, -1)
        self.step_positions = pos
        _UPDATED.set(None)
        for layer in self.kv_layers():
            layer.query_positions = pos

    @property
    def batch_size(self) -> int:
        seen = self.real_tokens_seen()
        return 0 if seen is None else int(seen.shape[0])

    @property
    def device(self) -> torch.device:
        seen = self.real_tokens_seen()
        return torch.device("cpu") if seen is None else seen.device

    def end_step(self) -> None:
        """Forget the announced positions once the forward is over, so a stray forward cannot reuse them."""
        self.step_positions = None
        for layer in self.kv_layers():
            layer.query_positions = None

    def real_tokens_seen(self) -> Tensor | None:
        """(B,) real tokens seen per row (the uncompressed length), or None before the first forward."""
        layers = self.kv_layers()
        return layers[0].seen if layers else None

    def next_positions(self) -> Tensor | None:
        """(B,) position of each row's next token: the uncompressed length, minus what key re-rotation removed."""
        seen = self.real_tokens_seen()
        if seen is None or self.position_offset is None:
            return seen
        return seen - self.position_offset.to(seen.device)

    def kv_layers(self) -> list[KVLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVLayer)]

    def full_layers(self) -> list[KVLayer]:
        return [layer for layer in self.kv_layers() if not layer.is_sliding]

    def sliding_layers(self) -> list[KVLayer]:
        return [layer for layer in self.kv_layers() if layer.is_sliding]

    def select_rows(self, rows: Tensor) -> KVCache:
        """A new cache whose row i is a copy of row `rows[i]` of this one (e.g. one row per question)."""
        new = KVCache.__new__(KVCache)
        layers = [layer.select_rows(rows) for layer in self.kv_layers()]
        Cache.__init__(new, layers=layers)  # type: ignore[arg-type]
        new.tracker = _BytesTracker()
        for layer in layers:
            layer.tracker = new.tracker
        new.tracker.add(sum(layer.nbytes() for layer in layers))
        new.step_positions = None
        new.position_offset = None if self.position_offset is None else self.position_offset[rows.to(self.device)]
        return new

    def layer(self, idx: int) -> KVLayer:
        layer = self.layers[idx]
        assert isinstance(layer, KVLayer)
        return layer


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer: the sliding window, or None for full attention (the layer types transformers' caches use)."""
    kinds, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if unsupported:
        raise ValueError(f"kvsqueeze supports full and sliding-window attention layers, not {unsupported}")
    pairs = zip(kinds, kwargs, strict=True)
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in pairs]


def take_updated_layer(key: Tensor) -> KVLayer | None:
    """The KVLayer whose `update` returned `key` just now (consumed), or None if `key` did not come from one."""
    layer = _UPDATED.get()
    if layer is None or layer.keys is not key:
        return None
    _UPDATED.set(None)
    return layer


def _storage_bytes(tensors: list[Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() == 0:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


def cache_stats(cache: Cache) -> CacheStats:
    """Measure what a cache holds. Works on any transformers Cache; padding/peaks only for KVCache."""
    seen_ptrs: set[int] = set()
    kv = sliding = meta = padding = 0
    kept: list[int] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            continue
        nbytes = _storage_bytes([keys, values], seen_ptrs)
        if getattr(layer, "is_sliding", False):
            sliding += nbytes
            continue
        kv += nbytes
        if isinstance(layer, KVLayer) and layer.positions is not None:
            meta += _storage_bytes([layer.positions, layer.seen] if layer.seen is not None else [], seen_ptrs)
            per_slot = keys.element_size() * keys.shape[-1] + values.element_size() * values.shape[-1]
            padding += int((layer.positions < 0).sum()) * per_slot
            kept.append(int(layer.kept.float().mean()))
        else:
            kept.append(keys.shape[-2])
    peak = cache.tracker.peak if isinstance(cache, KVCache) else kv + sliding
    return CacheStats(kv, sliding, meta, padding, kept, peak)


def cache_bytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds, counted from the distinct storages (all layers)."""
    stats = cache_stats(cache)
    return stats.kv_bytes + stats.sliding_kv_bytes
