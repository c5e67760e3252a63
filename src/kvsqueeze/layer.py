"""One attention layer of kvsqueeze's KV cache: `KVLayer` adapts a storage (`kvsqueeze.storage`: rectangular,
ragged or quantized, optionally with thin keys) to transformers' cache-layer API. With `cache.py`, the only code that
touches transformers' Cache internals.

A layer holds:

    storage   the kept keys, values and slot positions (see `storage/base.py` for the rectangular view)
    seen      (B,) real (non-pad) tokens this layer has seen per row, kept or not (the uncompressed length)
    thin      the key channels kept by ThinK (`storage/thin.py`), or None
    quant     how a quantized layer stores its tokens (`QuantSpec`), or None for full precision

Pruning hands the storage a plan and gets a new, smaller storage back, so the old tensors are freed and the bytes
held drop for real. A plan whose counts differ per row or head moves a full-attention layer to the ragged layout;
sliding-window layers stay rectangular and are never pruned, only trimmed to their window. Storages are immutable,
so `snapshot()` / `restore()` put a layer back exactly as it was (KVzip's context replay). A full-attention layer
with a `quant` spec stores its tokens quantized (`storage/quantized.py`) from its first one on; `settle()`, called by
the cache when a forward ends, quantizes what left the full-precision window. Sliding-window layers stay in full
precision: they hold a bounded window, not the context, are never compressed, and their bytes are reported apart.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from kvsqueeze import step
from kvsqueeze.layerfile import layer_tensors, read_layer_tensors
from kvsqueeze.quantization import QuantSpec
from kvsqueeze.storage import (
    DenseStorage,
    KeyChannels,
    LayerStorage,
    QuantizedStorage,
    RaggedStorage,
    SharedStorage,
    StepView,
)

__all__ = ["BytesTracker", "KVLayer", "LayerSnapshot", "StepTokens"]


class BytesTracker:
    """Running total of the keys/values bytes held by all layers of one cache, and its maximum."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


@dataclass(frozen=True)
class StepTokens:
    """A forward's new tokens as each layer reads them: worked out once per forward (`KVCache.begin_step`), not once
    per layer and step."""

    positions: Tensor  # (B, q) absolute positions, -1 = pad
    slots: Tensor  # (B, q) int32: the positions as slots store them
    real: Tensor  # (B,) real (non-pad) tokens per row
    all_real: bool  # no pad among them

    @classmethod
    def of(cls, positions: Tensor) -> StepTokens:
        real = positions >= 0
        return cls(positions, positions.to(torch.int32), real.sum(dim=1), bool(real.all()))


@dataclass(frozen=True)
class LayerSnapshot:
    """A layer's state at one moment; storages are immutable, so holding them is enough to restore it."""

    storage: LayerStorage | None
    thin: KeyChannels | None
    seen: Tensor | None
    total_seen: int
    bytes_appended: int


class KVLayer(DynamicLayer):
    """One attention layer's cache: a storage of keys/values plus the absolute position of every slot."""

    def __init__(self, sliding_window: int | None = None, quant: QuantSpec | None = None) -> None:
        # no super().__init__: keys/values are properties
        self.is_initialized = False
        self.sliding_window = sliding_window  # sliding-window layers are trimmed to the window and never pruned
        self.quant = quant if sliding_window is None else None  # sliding-window layers stay in full precision
        self.storage: LayerStorage | None = None
        self.thin: KeyChannels | None = None
        self.seen: Tensor | None = None  # (B,) int64
        self.total_seen = 0  # padded steps seen (what transformers calls the sequence length)
        # bytes of keys and values appended so far as the model produced them (pads and all channels included): what
        # an uncompressed cache of this layer would hold (copies by `select_rows` start again at 0)
        self.bytes_appended = 0
        self.tokens: StepTokens | None = None  # the current step's tokens (`query_positions`)
        self.tracker = BytesTracker()  # shared with the other layers of the cache, for the peak
        self.step_view: StepView | None = None  # what the current step's attention reads (rectangular)
        self.counted: tuple[weakref.ref[LayerStorage] | None, int] = (None, 0)  # the storage `nbytes` last counted

    @property
    def query_positions(self) -> Tensor | None:
        """(B, q) positions of the current step's tokens, -1 = pad; None between forwards."""
        return None if self.tokens is None else self.tokens.positions

    @query_positions.setter
    def query_positions(self, positions: Tensor | None) -> None:
        self.tokens = None if positions is None else StepTokens.of(positions)

    # -- read-only views of the storage, under the names transformers and callers use
    @property
    def keys(self) -> Tensor | None:  # type: ignore[override]
        return None if self.storage is None else self.storage.keys

    @property
    def values(self) -> Tensor | None:  # type: ignore[override]
        return None if self.storage is None else self.storage.values

    @property
    def positions(self) -> Tensor | None:
        return None if self.storage is None else self.storage.positions

    @property
    def lengths(self) -> Tensor | None:
        """(B, H) tokens per (row, head) segment in the ragged layout; None in the rectangular one."""
        return getattr(self.storage, "lengths", None)

    @property
    def key_channels(self) -> Tensor | None:
        return None if self.thin is None else self.thin.channels

    @property
    def is_ragged(self) -> bool:
        return self.storage is not None and self.storage.is_ragged

    @property
    def is_sliding(self) -> bool:  # type: ignore[override]
        return self.sliding_window is not None

    @property
    def kept(self) -> Tensor:
        """(B, H) number of filled slots per row and head."""
        assert self.storage is not None
        return self.storage.kept()

    def nbytes(self) -> int:
        """Bytes of keys and values held now (counted once per storage: storages are immutable)."""
        if self.storage is None:
            return 0
        counted, held = self.counted
        if counted is None or counted() is not self.storage:  # a weak reference: never keeps an old storage alive
            held = self.storage.nbytes()
            self.counted = (weakref.ref(self.storage), held)
        return held

    def _set(self, storage: LayerStorage) -> None:
        before = self.nbytes()
        self.storage = storage
        self.tracker.add(self.nbytes() - before)

    # -- transformers' layer API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.quant is None:
            self.storage = DenseStorage.empty(key_states, value_states)
        else:
            self.storage = QuantizedStorage.empty(key_states, value_states, self.quant)
        self.seen = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if step.pending_update():
            raise RuntimeError(
                "A kvsqueeze KVCache was updated twice without its attention running in between: the model is not "
                "using kvsqueeze's attention function. Run it inside `kvsqueeze.attach(model)` or "
                "`kvsqueeze.compress(model, method)`."
            )
        tokens = self.tokens
        if tokens is None:
            raise RuntimeError(
                "This kvsqueeze KVCache was not told the positions of the new tokens: run the model inside "
                "`kvsqueeze.attach(model)` or `kvsqueeze.compress(model, method)`."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.storage is not None and self.seen is not None
        self.bytes_appended += key_states.nbytes + value_states.nbytes
        if self.thin is not None:  # thin keys: new tokens are stored with the layer's kept channels
            key_states = self.thin.narrow(key_states)
        b, h, q, _ = key_states.shape
        if q == 1 and isinstance(self.storage, RaggedStorage) and not self.storage.slot_state:
            self._set(SharedStorage.decoding(self.storage))  # decode steps no longer repack the segments
        new_pos = tokens.slots.to(self.seen.device)
        storage, self.step_view = self.storage.append(key_states, value_states, new_pos[:, None, :].expand(b, h, q))
        self._set(storage)
        self.seen = self.seen + tokens.real.to(self.seen.device)
        self.total_seen += q
        step.mark_updated(self, self.step_view[0])
        return self.step_view[0], self.step_view[1]

    def get_seq_length(self) -> int:
        return self.total_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.storage is None else self.storage.width()) + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvsqueeze's KVCache cannot be cropped: evicted tokens are already gone.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support beam search or num_return_sequences > 1.")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support selecting batch rows.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("kvsqueeze's KVCache does not support beam search.")

    # -- what attention and the methods read
    def view(self) -> StepView:
        """keys (B, H, T, D), values (B, H, T, Dv), positions (B, H, T): the rectangular form (a transient copy when
        ragged; empty slots -1). Thin keys come back at full width D, zeros in the pruned channels."""
        assert self.storage is not None
        keys, values, positions = self.storage.view()
        return (keys if self.thin is None else self.thin.widen(keys)), values, positions

    def gather_query_channels(self, query: Tensor) -> Tensor:
        """Queries (B, H_q, q, D) -> (B, H_q, q, D'): the channels this layer keeps of their KV head's keys."""
        return query if self.thin is None else self.thin.queries(query)

    def settle(self) -> None:
        """Called when a forward ends, after the compression hooks: a quantized layer quantizes, in whole groups,
        what left its full-precision window (see `storage/quantized.py`); other layers do nothing."""
        if self.storage is not None:
            self._set(self.storage.settle())

    def quantize(self, quant: QuantSpec) -> None:
        """Store this full-attention layer quantized from now on, its tokens included (sliding ones: no change)."""
        if self.is_sliding:
            return
        self.quant = quant
        if self.storage is not None:
            self._set(QuantizedStorage.from_storage(self.storage, quant))

    def finish_step(self) -> None:
        """Called once attention has read the layer: sliding layers drop what no future query can see."""
        self.step_view = None  # frees the transient copy of a ragged layer
        if self.sliding_window is None or self.storage is None or self.storage.width() < self.sliding_window:
            return
        positions = self.storage.positions
        # the next query of a row sits at (its newest position + 1) and sees positions > that - window
        newest = positions.amax(dim=-1, keepdim=True)  # (B, H, 1)
        keep = (positions >= 0) & (positions > newest + 1 - self.sliding_window)
        if not bool(keep.all()):
            self.keep_where(keep)

    # -- pruning
    def prune(self, indices: Tensor, counts: Tensor, values: Tensor | None = None) -> None:
        """Keep, for each (row, head), the slots `indices[b, h, :counts[b, h]]` of `view()`.

        indices: (B, H, K) long slot indices into the current T of `view()`; counts: (B, H) long, counts <= K.
        values: (B, H, K, Dv) replacement values of the kept slots, in the order of `indices` (value merging); None
        keeps the cached ones. Equal counts everywhere keep the rectangular layout (K slots); otherwise a
        full-attention layer switches to the ragged layout (exactly sum(counts) tokens) and sliding ones keep K slots
        with empty ones. The old storage is released.
        """
        assert self.storage is not None
        if values is not None and values.shape[:3] != indices.shape:
            raise ValueError(f"prune: values {tuple(values.shape)} do not match indices {tuple(indices.shape)}")
        uneven = bool((counts != counts.flatten()[0]).any()) if counts.numel() else False
        self._set(self.storage.prune(indices, counts, values, ragged=uneven and not self.is_sliding))

    def keep_where(self, keep: Tensor) -> None:
        """Keep the slots where `keep` (B, H, T) is True, in slot order."""
        counts = keep.sum(dim=-1)
        t = keep.shape[-1]
        slots = torch.arange(t, device=keep.device).expand_as(keep)
        order = torch.sort(torch.where(keep, slots, slots + t), dim=-1).values[..., : int(counts.max())]
        self.prune(order % t, counts)

    def prune_key_channels(self, channels: Tensor) -> None:
        """Keep only the key channels `channels` (B or 1, H, D') of every stored and future token (thin keys).

        Indices must be distinct and ascending per (row, head); every (row, head) keeps the same number D' < D. Chosen
        once per layer: a second call raises. The old key storage is released."""
        assert self.storage is not None
        if self.thin is not None:
            raise ValueError("this layer's key channels were already pruned; they are chosen once per layer")
        if self.is_sliding:
            raise ValueError("sliding-window layers are never compressed: their key channels cannot be pruned")
        b, h = self.kept.shape
        thin = KeyChannels.checked(channels, b, h, self.storage.keys.shape[-1], self.storage.keys.device)
        self._set(self.storage.replace(keys=thin.narrow_stored(self.storage)))
        self.thin = thin

    def replace_keys(self, keys: Tensor, positions: Tensor) -> None:
        """Rewrite keys and slot positions (in the shapes of `view()`): key re-rotation moves kept tokens to new
        positions. Values, `seen` and the bytes held are unchanged."""
        assert self.storage is not None
        if self.thin is not None:
            raise ValueError(
                "key re-rotation cannot move thin keys (pruned key channels): RoPE mixes each kept channel with its "
                "pair, which may be pruned. Do not combine key re-rotation with key channel pruning (ThinK)."
            )
        stored_keys, stored_positions = self.storage.pack(keys), self.storage.pack(positions)
        if stored_keys.shape != self.storage.keys.shape or stored_positions.shape != self.storage.positions.shape:
            shapes = f"{tuple(keys.shape)}, {tuple(positions.shape)}"
            raise ValueError(f"replace_keys: shapes {shapes} do not match the layer's")
        dtype = self.storage.keys.dtype
        self._set(self.storage.replace(keys=stored_keys.to(dtype), positions=stored_positions.to(torch.int32)))

    # -- per-slot state of stateful methods (H2O): follows the tokens through pruning and row selection
    def read_slot_state(self, name: str) -> Tensor | None:
        """A method's per-slot state (B, H, T) in the layout of `view()` (empty slots 0), or None if never written."""
        assert self.storage is not None
        state = self.storage.slot_state.get(name)
        return None if state is None else self.storage.unpack(state, 0.0)

    def write_slot_state(self, name: str, value: Tensor) -> None:
        """Set a method's per-slot state from a (B, H, T) tensor in the layout of `view()`."""
        assert self.storage is not None
        try:
            packed = self.storage.pack(value)
        except ValueError as err:
            raise ValueError(f"write_slot_state: {err}") from None
        if packed.shape != self.storage.positions.shape:
            raise ValueError(f"write_slot_state: shape {tuple(value.shape)} does not match the layer's view")
        state = {**self.storage.slot_state, name: packed.float().contiguous()}
        self.storage = self.storage.replace(slot_state=state)

    # -- copies, snapshots and files
    def select_rows(self, rows: Tensor) -> KVLayer:
        """A copy of this layer holding the given batch rows (indices may repeat). When `rows` are all the rows in
        order, the copy shares this layer's storage instead of copying it: storages are immutable (every verb returns
        a new one), so what the copy appends or prunes never reaches this layer."""
        if self.storage is None or self.seen is None:
            return self._rows_with(rows, None)
        rows = rows.to(self.seen.device)
        every = rows.numel() == self.seen.shape[0] and bool(
            (rows == torch.arange(rows.numel(), device=rows.device)).all()
        )
        return self._rows_with(rows, self.storage if every else self.storage.select_rows(rows))

    def fork(self, rows: Sequence[int]) -> KVLayer:
        """A layer whose row i continues row `rows[i]` of this one, reading this layer's tokens where they are, as a
        shared prefix (each row of this layer once, however often it is named), and keeping the tokens appended to
        it apart (`storage/shared.py`): forks of a context cost only their own tokens, and rows over one context read
        it once per step. A prefix is one row: on a layer of several rows, each row named is copied once (as its
        forks' prefix). Sliding-window and quantized layers, whose stored tokens change as tokens are added, are
        taken as `select_rows` takes them.

        A one-row fork of a one-row rectangular layer writes its tokens into the room after the layer's last slot when
        no other fork holds it (`DenseStorage.lend_room`), so a decode step attends to the context and its own tokens
        as one rectangle, as a plain layer does; other forks, and this one once the room is full, keep their tokens in
        buffers of their own. A layer with no room yet gets it first (`make_room`: its storage is replaced by a copy
        with room, the same tokens; a copy of the old storage held elsewhere, a snapshot say, then stays as well)."""
        index = torch.tensor(list(rows), dtype=torch.long)
        if self.storage is None or self.seen is None or self.is_sliding or self.quant is not None:
            return self.select_rows(index)
        distinct = sorted(set(index.tolist()))
        one_row = self.seen.shape[0] == 1
        if one_row and index.numel() == 1 and isinstance(self.storage, DenseStorage):
            if self.storage.spare is None:
                self.make_room()
            assert isinstance(self.storage, DenseStorage)
            own = self.storage.lend_room()
            if own is not None:
                row = torch.zeros(1, dtype=torch.long)
                return self._rows_with(index.to(self.seen.device), SharedStorage.over([self.storage], row, own))
        prefixes = [self.storage if one_row else self.storage.select_rows(torch.tensor([r])) for r in distinct]
        owner = torch.tensor([distinct.index(r) for r in index.tolist()], dtype=torch.long)
        index = index.to(self.seen.device)
        return self._rows_with(index, SharedStorage.over(prefixes, owner.to(self.seen.device)))

    def make_room(self) -> None:
        """Keep room for ROOM more tokens after the last slot of a one-row, full-precision, full-attention rectangular
        layer (`DenseStorage.with_room`: a copy once, then appends and a fork write there); other layers: no change."""
        storage = self.storage
        if self.is_sliding or self.quant is not None or not isinstance(storage, DenseStorage) or storage.slot_state:
            return
        if storage.positions.shape[0] == 1:
            self._set(storage.with_room())

    def _rows_with(self, rows: Tensor, storage: LayerStorage | None) -> KVLayer:
        """A layer of this kind holding `storage`, whose rows are rows `rows` of this one (their `seen` and kept key
        channels follow)."""
        new = KVLayer(self.sliding_window, self.quant)
        new.total_seen = self.total_seen
        if storage is not None and self.seen is not None:
            new.dtype, new.device, new.is_initialized = self.dtype, self.device, True
            new.storage = storage
            new.seen = self.seen[rows]
            new.thin = None if self.thin is None else self.thin.select_rows(rows)
        return new

    def concat_problem(self, other: KVLayer) -> str | None:
        """Why `other`'s rows cannot join this layer's in one batch (None: they can)."""
        if self.storage is None or other.storage is None:
            return "a layer holds no tokens yet (rows join after their prefill)"
        if self.sliding_window != other.sliding_window:
            return f"one layer has a sliding window of {self.sliding_window}, the other {other.sliding_window}"
        if self.quant != other.quant:
            return f"one layer is quantized with {self.quant}, the other with {other.quant} (None: full precision)"
        widths = [None if t is None else int(t.channels.shape[-1]) for t in (self.thin, other.thin)]
        if widths[0] != widths[1]:
            return f"the layers keep {widths[0]} and {widths[1]} key channels (ThinK; None: all of them)"
        return None

    def concat_rows(self, others: Sequence[KVLayer]) -> KVLayer:
        """A new layer holding this layer's rows, then each of `others`' rows, each row with its own tokens, `seen`
        and kept key channels: decoded together they go on as they would alone (`LayerStorage.concat_rows`)."""
        for other in others:
            problem = self.concat_problem(other)
            if problem is not None:
                raise ValueError(f"cannot join these rows: {problem}")
        parts = [self, *others]
        assert self.storage is not None
        new = KVLayer(self.sliding_window, self.quant)
        new.storage = self.storage.concat_rows([p.storage for p in others if p.storage is not None])
        new.seen = torch.cat([p.seen for p in parts if p.seen is not None])
        new.thin = None if self.thin is None else self.thin.concat_rows([p.thin for p in others if p.thin is not None])
        new.total_seen = max(p.total_seen for p in parts)
        new.bytes_appended = sum(p.bytes_appended for p in parts)
        new.dtype, new.device, new.is_initialized = self.dtype, self.device, True
        return new

    def detach(self) -> None:
        """Drop the autograd graph behind the stored keys and values (KVgrad's backward pass per replay chunk)."""
        if self.storage is not None:
            self.storage = self.storage.replace(keys=self.storage.keys.detach(), values=self.storage.values.detach())

    def snapshot(self) -> LayerSnapshot:
        return LayerSnapshot(self.storage, self.thin, self.seen, self.total_seen, self.bytes_appended)

    def restore(self, snap: LayerSnapshot) -> None:
        """Put the layer back as it was at `snap` (the bytes tracker's current total follows, not its peak)."""
        self.tracker.current -= self.nbytes()
        self.storage, self.thin, self.seen, self.total_seen = snap.storage, snap.thin, snap.seen, snap.total_seen
        self.bytes_appended = snap.bytes_appended
        self.tracker.current += self.nbytes()
        self.step_view = None
        self.query_positions = None

    def to_tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild this layer (`layer_tensors`)."""
        assert self.storage is not None and self.seen is not None
        return layer_tensors(self.storage, self.seen, self.total_seen, self.thin)

    def load_tensors(self, parts: dict[str, Tensor], heads: int, head_dim: int) -> None:
        """Fill an empty layer from `to_tensors`' output read back from a file, for a model with `heads` KV heads of
        `head_dim` channels. Every tensor is checked first (`read_layer_tensors`): a ValueError says what is wrong and
        nothing is kept."""
        read = read_layer_tensors(parts, heads, head_dim, self.is_sliding)
        self.storage, self.seen, self.total_seen, self.thin = read.storage, read.seen, read.total_seen, read.thin
        self.quant = read.storage.spec if isinstance(read.storage, QuantizedStorage) else None
        self.dtype, self.device, self.is_initialized = read.storage.keys.dtype, read.storage.keys.device, True
        self.tracker.add(self.nbytes())
