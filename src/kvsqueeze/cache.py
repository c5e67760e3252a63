"""The KV cache that compression prunes for real. The ONLY module that touches transformers' Cache internals.

Layout of one full-attention layer (shape legend in `methods/base.py`):
    keys, values  (B, H, T, D)  post-RoPE, as the model cached them; T = the longest row/head kept
    positions     (B, H, T)     int32 absolute position of each slot; -1 marks an empty slot
                                (a left-pad token, or a row/head that keeps fewer tokens than T)
    seen          (B,)          real (non-pad) tokens this layer has seen per row, kept or not

Each layer has its own T, so layers may keep different amounts (per-layer budgets). Pruning gathers the kept slots
into new tensors, so the old storages are freed and `cache_bytes` drops for real.

Ragged layout. When a plan keeps different counts per row or head (head-adaptive budgets, rows of a padded batch), a
full-attention layer switches to a ragged layout that holds exactly the kept tokens, with no empty slots:
    keys, values  (N, D)        one flat buffer per layer; N = total tokens kept over all rows and heads, stored
                                segment after segment in (row, head) order, each segment in slot (position) order
    positions     (N,)          int32 absolute position of each stored token
    lengths       (B, H)        int64 tokens held by each (row, head) segment (`lengths is not None` = ragged)
New tokens (questions, decoding) are appended to every segment of their row; pad tokens are not stored. `view()`
unpacks a layer to the rectangular (B, H, T, D) form (a transient copy, empty slots = -1) for scoring and attention.
Sliding-window layers stay rectangular.

Thin keys (ThinK). A full-attention layer may keep only D' < D key channels, chosen per (row, head):
    key_channels  (B, H, D')    int64 kept channel indices (ascending) of each (row, head); None = all D channels
    key_dim       int           D, the model's head dim (queries keep it; scaling stays 1/sqrt(D))
Keys are then stored with D' channels in either layout ((B, H, T, D') or (N, D')); values keep all theirs. Tokens
appended later (questions, decoding, the next chunk) are stored with the same channels, so decoding saves too.
The attention function gathers the matching query channels (`gather_query_channels`), so q.k over the kept channels
is exact; `view()` returns keys at full width with zeros in the pruned channels (the same q.k), so scorers and
later compressions see what attention sees. The channels are chosen once per layer (`prune_key_channels`).

Slot state. A stateful method (H2O's accumulated attention) keeps one float per slot in `slot_state` (name -> tensor
in the layout of `positions`: (B, H, T), or (N,) when ragged). It follows the tokens: new tokens start at 0, pruning
and row selection keep the kept slots' values. Methods read and write it in the rectangular form of `view()`
(`read_slot_state` / `write_slot_state`, reached through `ScoreContext.slot_store`). It is not saved by `to_tensors`.

Every forward must tell the cache the positions and padding of its new tokens (`begin_step`); `kvsqueeze.attach`
and `kvsqueeze.compress` install a hook that does it. The attention function in `attention.py` reads the layer that
was just updated (`take_updated_layer`) and builds the mask from that layer's own positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
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
        self.lengths: Tensor | None = None  # (B, H) int64 in the ragged layout, None in the rectangular one
        # what the current step's attention reads (rectangular; a transient unpacked copy when ragged)
        self.step_keys: Tensor | None = None
        self.step_values: Tensor | None = None
        self.step_positions: Tensor | None = None  # (B, H, T) int32
        self.step_queries: Tensor | None = None  # (B, H_q, q, D) post-RoPE queries, captured inside `compress`
        self.key_channels: Tensor | None = None  # (B, H, D') kept key channels (thin keys); None = all of them
        self.key_dim: int | None = None  # D, the full key width, once key channels were pruned
        self.slot_state: dict[str, Tensor] = {}  # per-slot floats of stateful methods, in the layout of `positions`

    @property
    def is_ragged(self) -> bool:
        return self.lengths is not None

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
        if self.key_channels is not None:  # thin keys: new tokens are stored with the layer's kept channels
            key_states = key_states.gather(-1, self.key_channels[:, :, None, :].expand(*key_states.shape[:3], -1))
        b, h, q, _ = key_states.shape
        before = self.nbytes()
        new_pos = self.query_positions.to(device=self.positions.device, dtype=torch.int32)[:, None, :].expand(b, h, q)
        if self.lengths is None:
            step_keys = torch.cat([self.keys, key_states], dim=-2)
            step_values = torch.cat([self.values, value_states], dim=-2)
            step_pos = torch.cat([self.positions, new_pos], dim=-1)
            self.keys, self.values, self.positions = step_keys, step_values, step_pos
            for name, state in self.slot_state.items():  # new tokens start at 0
                self.slot_state[name] = torch.cat([state, state.new_zeros(b, h, q)], dim=-1)
        else:
            step_keys, step_values, step_pos = self._append_ragged(key_states, value_states, new_pos)
        self.step_keys, self.step_values, self.step_positions = step_keys, step_values, step_pos
        self.seen = self.seen + (self.query_positions >= 0).sum(dim=1)
        self.total_seen += q
        self.tracker.add(self.nbytes() - before)
        _UPDATED.set(self)
        return step_keys, step_values

    def _append_ragged(
        self, key_states: Tensor, value_states: Tensor, new_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Append the real new tokens to every (row, head) segment; return this step's rectangular keys, values and
        positions (B, H, T_max + q, ...): each segment left-aligned, then the q new slots (pads at -1)."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        assert self.lengths is not None
        b, h, q, _ = key_states.shape
        n = self.lengths.flatten().tolist()  # tokens per segment, S = B H segments
        width = max(n, default=0)
        real = (new_pos >= 0).reshape(b * h, q)  # (S, q) the row's real new tokens, in every head
        n_real = real.sum(dim=1).tolist()
        all_real = bool(real.all())
        steps, packed = [], []
        for flat, new, fill in (
            (self.keys, key_states, 0.0),
            (self.values, value_states, 0.0),
            (self.positions, new_pos, -1),
        ):
            segments = torch.split(flat, n)  # views, one per (row, head)
            past = pad_sequence(list(segments), batch_first=True, padding_value=fill)  # (S, width, ...)
            if past.shape[1] < width:  # pad_sequence of all-empty segments
                past = flat.new_full((b * h, width, *flat.shape[1:]), fill)
            steps.append(torch.cat([past.view(b, h, width, *flat.shape[1:]), new], dim=2))
            new_s = new.reshape(b * h, q, *new.shape[3:])
            pieces = []
            for i, seg in enumerate(segments):  # repack: each segment, then its row's real new tokens
                pieces.append(seg)
                pieces.append(new_s[i] if all_real else new_s[i][real[i]])
            packed.append(torch.cat(pieces))
        self.keys, self.values, self.positions = packed
        for name, state in self.slot_state.items():  # each segment, then 0 for its row's real new tokens
            pieces = [p for i, seg in enumerate(torch.split(state, n)) for p in (seg, state.new_zeros(n_real[i]))]
            self.slot_state[name] = torch.cat(pieces)
        lengths = torch.tensor([a + c for a, c in zip(n, n_real, strict=True)], device=self.lengths.device)
        step_keys, step_values, step_pos = steps
        self.lengths = lengths.view(b, h)
        return step_keys, step_values, step_pos

    def view(self) -> tuple[Tensor, Tensor, Tensor]:
        """keys (B, H, T, D), values (B, H, T, Dv), positions (B, H, T): the stored tensors in the rectangular layout;
        in the ragged one a transient copy, each (row, head) left-aligned, slots beyond its length empty (-1).
        Thin keys come back at full width D, zeros in the pruned channels (a transient copy)."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        if self.lengths is None:
            keys, values, positions = self.keys, self.values, self.positions
        else:
            keys = unpack(self.keys, self.lengths, 0.0)
            values, positions = unpack(self.values, self.lengths, 0.0), unpack(self.positions, self.lengths, -1)
        if self.key_channels is not None:
            assert self.key_dim is not None
            idx = self.key_channels[:, :, None, :].expand(*keys.shape[:3], -1)
            keys = keys.new_zeros(*keys.shape[:3], self.key_dim).scatter_(-1, idx, keys)
        return keys, values, positions

    def prune_key_channels(self, channels: Tensor) -> None:
        """Keep only the key channels `channels` (B or 1, H, D') of every stored and future token (thin keys).

        Indices must be distinct and ascending per (row, head); every (row, head) keeps the same number D' < D. Chosen
        once per layer: a second call raises. The old key storage is released."""
        assert self.keys is not None and self.positions is not None
        if self.key_channels is not None:
            raise ValueError("this layer's key channels were already pruned; they are chosen once per layer")
        if self.is_sliding:
            raise ValueError("sliding-window layers are never compressed: their key channels cannot be pruned")
        b, h = self.kept.shape
        d = self.keys.shape[-1]
        channels = channels.to(device=self.keys.device, dtype=torch.long)
        if channels.dim() != 3 or channels.shape[0] not in (1, b) or channels.shape[1] != h:
            raise ValueError(f"key channels must be (1 or {b}, {h}, D'), got shape {tuple(channels.shape)}")
        ordered = bool((channels[..., 1:] > channels[..., :-1]).all())
        if not 0 < channels.shape[-1] < d or not ordered or int(channels.min()) < 0 or int(channels.max()) >= d:
            raise ValueError(f"key channels must be fewer than {d}, distinct, ascending and in [0, {d})")
        channels = channels.expand(b, h, -1).contiguous()
        before = self.nbytes()
        if self.lengths is None:
            self.keys = self.keys.gather(-1, channels[:, :, None, :].expand(b, h, self.keys.shape[2], -1))
        else:  # each stored token takes its (row, head) segment's channels
            segment = torch.repeat_interleave(torch.arange(b * h, device=self.keys.device), self.lengths.flatten())
            self.keys = self.keys.gather(-1, channels.view(b * h, -1)[segment])
        self.key_channels, self.key_dim = channels, d
        self.tracker.add(self.nbytes() - before)

    def gather_query_channels(self, query: Tensor) -> Tensor:
        """Queries (B, H_q, q, D) -> (B, H_q, q, D'): the channels this layer keeps of their KV head's keys."""
        if self.key_channels is None:
            return query
        b, hq, q, _ = query.shape
        channels = self.key_channels.repeat_interleave(hq // self.key_channels.shape[1], dim=1)  # (B, H_q, D')
        return query.gather(-1, channels.to(query.device)[:, :, None, :].expand(b, hq, q, -1))

    def finish_step(self) -> None:
        """Called once attention has read the layer: sliding layers drop what no future query can see."""
        self.step_keys = self.step_values = self.step_positions = None  # frees the transient copy of a ragged layer
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
        if self.lengths is not None:
            stored = int(self.lengths.max()) if self.lengths.numel() else 0
        else:
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
            new.seen = self.seen[rows]
            if self.key_channels is not None:
                new.key_channels, new.key_dim = self.key_channels[rows], self.key_dim
            if self.lengths is None:
                new.keys, new.values, new.positions = self.keys[rows], self.values[rows], self.positions[rows]
                new.slot_state = {name: state[rows] for name, state in self.slot_state.items()}
            else:  # gather the rows' runs of segments from the flat buffers
                per_row = self.lengths.sum(dim=1)
                starts = per_row.cumsum(0) - per_row
                idx = torch.cat([torch.arange(int(starts[r]), int(starts[r] + per_row[r])) for r in rows.tolist()])
                idx = idx.to(self.keys.device)
                new.keys, new.values, new.positions = self.keys[idx], self.values[idx], self.positions[idx]
                new.lengths = self.lengths[rows]
                new.slot_state = {name: state[idx] for name, state in self.slot_state.items()}
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
        if self.lengths is not None:
            return self.lengths.clone()
        assert self.positions is not None
        return (self.positions >= 0).sum(dim=-1)

    def read_slot_state(self, name: str) -> Tensor | None:
        """A method's per-slot state (B, H, T) in the layout of `view()` (empty slots 0), or None if never written."""
        state = self.slot_state.get(name)
        if state is None or self.lengths is None:
            return state
        return unpack(state, self.lengths, 0.0)

    def write_slot_state(self, name: str, value: Tensor) -> None:
        """Set a method's per-slot state from a (B, H, T) tensor in the layout of `view()`."""
        assert self.positions is not None
        if self.lengths is not None:
            filled = self.view()[2] >= 0
            if value.shape != filled.shape:
                raise ValueError(f"write_slot_state: shape {tuple(value.shape)} does not match the layer's view")
            value = value[filled]
        elif value.shape != self.positions.shape:
            raise ValueError(
                f"write_slot_state: shape {tuple(value.shape)} does not match {tuple(self.positions.shape)}"
            )
        self.slot_state[name] = value.float().contiguous()

    def replace_keys(self, keys: Tensor, positions: Tensor) -> None:
        """Rewrite keys and slot positions in place of the current ones (the shapes of `view()`): for key re-rotation,
        which moves kept tokens to new positions. Values, `seen` and the bytes held are unchanged."""
        assert self.keys is not None and self.positions is not None
        if self.key_channels is not None:
            raise ValueError(
                "key re-rotation cannot move thin keys (pruned key channels): RoPE mixes each kept channel with its "
                "pair, which may be pruned. Do not combine key re-rotation with key channel pruning (ThinK)."
            )
        if self.lengths is not None:  # ragged: `keys`/`positions` have the shapes of `view()`; pack them back
            filled = self.view()[2] >= 0
            if keys.shape[:-1] != filled.shape or positions.shape != filled.shape:
                raise ValueError(f"replace_keys: shapes {tuple(keys.shape)} do not match the layer's view")
            keys, positions = keys[filled], positions[filled]  # (row, head, slot) order = the segments' order
        if keys.shape != self.keys.shape or positions.shape != self.positions.shape:
            shapes = f"{tuple(keys.shape)}, {tuple(positions.shape)}"
            raise ValueError(f"replace_keys: shapes {shapes} do not match the layer's")
        self.keys = keys.to(self.keys.dtype)
        self.positions = positions.to(torch.int32)

    def prune(self, indices: Tensor, counts: Tensor, values: Tensor | None = None) -> None:
        """Keep, for each (row, head), the slots `indices[b, h, :counts[b, h]]` of `view()`.

        values: (B, H, K, Dv) replacement values of the kept slots, in the order of `indices` (value merging); None
        keeps the cached ones.

        indices: (B, H, K) long slot indices into the current T of `view()`; counts: (B, H) long, counts <= K.
        Equal counts everywhere keep the rectangular layout (K slots); otherwise a full-attention layer switches to
        the ragged layout (exactly sum(counts) tokens) and sliding ones keep K slots with empty ones. The old
        storages are released.
        """
        assert self.keys is not None and self.values is not None and self.positions is not None
        b, h, k = indices.shape
        before = self.nbytes()
        uneven = bool((counts != counts.flatten()[0]).any()) if counts.numel() else False
        if values is not None and values.shape[:3] != indices.shape:
            raise ValueError(f"prune: values {tuple(values.shape)} do not match indices {tuple(indices.shape)}")
        if self.lengths is not None or (uneven and not self.is_sliding):
            self._prune_ragged(indices, counts, values)
            self.tracker.add(self.nbytes() - before)
            return
        d, dv = self.keys.shape[-1], self.values.shape[-1]
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        self.keys = self.keys.gather(2, indices[..., None].expand(b, h, k, d))
        if values is None:
            self.values = self.values.gather(2, indices[..., None].expand(b, h, k, dv))
        else:
            self.values = values.to(self.values.dtype).contiguous()
        self.positions = torch.where(filled, self.positions.gather(2, indices), -1)
        for name, state in self.slot_state.items():
            self.slot_state[name] = torch.where(filled, state.gather(2, indices), 0.0)
        self.tracker.add(self.nbytes() - before)

    def _prune_ragged(self, indices: Tensor, counts: Tensor, new_values: Tensor | None = None) -> None:
        assert self.keys is not None and self.values is not None and self.positions is not None
        b, h, k = indices.shape
        if self.lengths is None:  # rectangular -> ragged: segment (b, h) starts at (b H + h) T in the flattened tensors
            t = self.positions.shape[-1]
            starts = torch.arange(b * h, device=indices.device).view(b, h) * t
            keys, values = self.keys.reshape(b * h * t, -1), self.values.reshape(b * h * t, -1)
            positions = self.positions.reshape(-1)
        else:
            starts = segment_starts(self.lengths)
            keys, values, positions = self.keys, self.values, self.positions
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        flat = (starts[..., None] + indices)[filled]  # (N,) in (row, head, slot) order
        kept_values = values[flat] if new_values is None else new_values[filled].to(values.dtype)
        self.keys, self.values, self.positions = keys[flat], kept_values, positions[flat]
        self.slot_state = {name: state.reshape(-1)[flat] for name, state in self.slot_state.items()}
        self.lengths = counts.to(torch.long).clone()


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

    # -- serialization: flat name -> tensor dicts (what safetensors stores); see kvsqueeze.storage
    def to_tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild this cache, as `layers.{i}.{keys,values,positions,seen,total_seen}` (and
        `layers.{i}.lengths` for a ragged layer, whose keys/values/positions are flat buffers; `layers.{i}.key_channels`
        and `layers.{i}.key_dim` for thin keys)."""
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.kv_layers()):
            if not layer.is_initialized:
                continue
            assert layer.keys is not None and layer.values is not None
            assert layer.positions is not None and layer.seen is not None
            parts = {"keys": layer.keys, "values": layer.values, "positions": layer.positions, "seen": layer.seen}
            parts["total_seen"] = torch.tensor([layer.total_seen], dtype=torch.long)
            if layer.lengths is not None:
                parts["lengths"] = layer.lengths
            if layer.key_channels is not None:
                parts["key_channels"] = layer.key_channels
                parts["key_dim"] = torch.tensor([layer.key_dim], dtype=torch.long)
            out.update({f"layers.{i}.{name}": t.contiguous() for name, t in parts.items()})
        return out

    @classmethod
    def from_tensors(cls, config: PretrainedConfig, tensors: dict[str, Tensor]) -> KVCache:
        """Rebuild a cache saved by `to_tensors` for a model with this config (layers and windows from it)."""
        cache = cls(config)
        for i, layer in enumerate(cache.kv_layers()):
            if f"layers.{i}.keys" not in tensors:
                continue
            part = {name: tensors[f"layers.{i}.{name}"] for name in ("keys", "values", "positions", "seen")}
            layer.keys, layer.values = part["keys"], part["values"]
            layer.positions, layer.seen = part["positions"].to(torch.int32), part["seen"].long()
            layer.total_seen = int(tensors[f"layers.{i}.total_seen"][0])
            lengths = tensors.get(f"layers.{i}.lengths")
            layer.lengths = None if lengths is None else lengths.long()
            channels = tensors.get(f"layers.{i}.key_channels")
            if channels is not None:
                layer.key_channels = channels.long()
                layer.key_dim = int(tensors[f"layers.{i}.key_dim"][0])
            layer.dtype, layer.device, layer.is_initialized = layer.keys.dtype, layer.keys.device, True
            cache.tracker.add(layer.nbytes())
        return cache


def segment_starts(lengths: Tensor) -> Tensor:
    """(B, H) offset of each (row, head) segment in a flat buffer holding `lengths` (B, H) tokens per segment."""
    flat = lengths.flatten()
    return (flat.cumsum(0) - flat).view_as(lengths)


def unpack(flat: Tensor, lengths: Tensor, fill: float) -> Tensor:
    """(N, ...) segments in (row, head) order -> (B, H, T, ...) left-aligned, T = the longest, `fill` beyond."""
    b, h = lengths.shape
    t = int(lengths.max()) if lengths.numel() else 0
    filled = torch.arange(t, device=flat.device)[None, None, :] < lengths[..., None]  # (B, H, T)
    out = flat.new_full((b, h, t, *flat.shape[1:]), fill)
    out[filled] = flat
    return out


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer: the sliding window, or None for full attention (the layer types transformers' caches use)."""
    kinds, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if unsupported:
        raise ValueError(f"kvsqueeze supports full and sliding-window attention layers, not {unsupported}")
    pairs = zip(kinds, kwargs, strict=True)
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in pairs]


_CAPTURE_QUERIES: ContextVar[bool] = ContextVar("kvsqueeze_capture_queries", default=False)


@contextmanager
def capturing_queries() -> Iterator[None]:
    """Inside this block the attention function leaves each layer's queries in `KVLayer.step_queries` for the
    compression hook that runs right after it (which takes them), so scorers need not recompute q_proj and RoPE."""
    token = _CAPTURE_QUERIES.set(True)
    try:
        yield
    finally:
        _CAPTURE_QUERIES.reset(token)


def capture_queries(layer: KVLayer, query: Tensor) -> None:
    """Called by the attention function: keep `query` on the layer if capturing is on."""
    if _CAPTURE_QUERIES.get() and not layer.is_sliding:  # sliding layers are never scored
        layer.step_queries = query


def take_updated_layer(key: Tensor) -> KVLayer | None:
    """The KVLayer whose `update` returned `key` just now (consumed), or None if `key` did not come from one."""
    layer = _UPDATED.get()
    if layer is None or layer.step_keys is not key:
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
            extra = [t for t in (layer.positions, layer.seen, layer.lengths, layer.key_channels) if t is not None]
            meta += _storage_bytes(extra, seen_ptrs)
            per_slot = keys.element_size() * keys.shape[-1] + values.element_size() * values.shape[-1]
            if not layer.is_ragged:  # the ragged layout has no empty slots
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
