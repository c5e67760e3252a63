"""The ragged layout: exactly the kept tokens, when (row, head) segments keep different counts.

    keys, values  (N, D)   one flat buffer per layer; N = tokens kept over all rows and heads, stored segment after
                           segment in (row, head) order, each segment in slot (position) order
    positions     (N,)     int32 absolute position of each stored token
    lengths       (B, H)   int64 tokens held by each (row, head) segment

Head-adaptive budgets (Ada-KV, DuoAttention, KVzip) and rows of a padded batch need it: a rectangular layout would
keep the longest segment's length for every head. New tokens are appended to every segment of their row; pad tokens
are not stored. `view()` unpacks to the rectangular (B, H, T, D) form (a transient copy, empty slots -1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kvsqueeze.storage.base import (
    NO_STATE,
    FullPrecision,
    LayerStorage,
    StepView,
    check_alike,
    check_names,
    check_positions,
    check_tensor,
    concat_slot_states,
)

__all__ = ["RaggedStorage", "segment_starts", "unpack"]


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


@dataclass(frozen=True)
class RaggedStorage(FullPrecision):
    """Flat per-layer buffers plus per-(row, head) lengths (see the module docstring)."""

    keys: Tensor  # (N, D)
    values: Tensor  # (N, Dv)
    positions: Tensor  # (N,) int32
    lengths: Tensor  # (B, H) int64
    slot_state: Mapping[str, Tensor] = field(default_factory=lambda: NO_STATE)  # name -> (N,)

    is_ragged = True

    @classmethod
    def gather(
        cls,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        slot_state: Mapping[str, Tensor],
        starts: Tensor,
        indices: Tensor,
        counts: Tensor,
        new_values: Tensor | None = None,
    ) -> RaggedStorage:
        """Build from flat buffers (keys (M, D), values (M, Dv), positions (M,), slot states (M,)) where (row, head)
        slot s of a `view()` sits at flat index starts[b, h] + s: keep `indices[b, h, :counts[b, h]]` of each."""
        k = indices.shape[-1]
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        flat = (starts[..., None] + indices)[filled]  # (N,) in (row, head, slot) order
        kept_values = values[flat] if new_values is None else new_values[filled].to(values.dtype)
        state = {name: s.reshape(-1)[flat] for name, s in slot_state.items()}
        lengths = counts.to(torch.long).clone()
        return cls(keys[flat], kept_values, positions[flat], lengths, MappingProxyType(state))

    @classmethod
    def from_storage(cls, storage: LayerStorage) -> RaggedStorage:
        """The filled slots of a full-precision storage (a rectangular one), in slot order; slot states follow."""
        if isinstance(storage, RaggedStorage):
            return storage
        keys, values, positions = storage.view()
        filled = positions >= 0  # (B, H, T)
        state = {name: storage.unpack(s, 0.0)[filled] for name, s in storage.slot_state.items()}
        return cls(keys[filled], values[filled], positions[filled], filled.sum(dim=-1), MappingProxyType(state))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], heads: int, key_width: int, value_dim: int) -> RaggedStorage:
        """Rebuild from `to_tensors` output read back from a file, checking every tensor (ValueError if wrong)."""
        check_names(tensors, {"keys", "values", "positions", "lengths"})
        keys, values, positions, lengths = (tensors[n] for n in ("keys", "values", "positions", "lengths"))
        check_tensor("lengths", lengths, (None, heads), floating=False)
        if bool((lengths < 0).any()):
            raise ValueError("lengths must be >= 0")
        n = int(lengths.sum())
        check_tensor("positions", positions, (n,), floating=False)
        check_tensor("keys", keys, (n, key_width), floating=True)
        check_tensor("values", values, (n, value_dim), floating=True)
        lengths = lengths.long()
        check_positions(
            unpack(positions.long(), lengths, -1), unpack(torch.ones_like(positions, dtype=torch.bool), lengths, 0)
        )
        return cls(keys, values, positions.to(torch.int32), lengths)

    def view(self) -> StepView:
        return self.unpack(self.keys, 0.0), self.unpack(self.values, 0.0), self.unpack(self.positions, -1)

    def kept(self) -> Tensor:
        return self.lengths.clone()

    def width(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[RaggedStorage, StepView]:
        """Append the real new tokens to every (row, head) segment; the step view is each segment left-aligned
        (B, H, T_max, ...) followed by the q new slots (pads at -1)."""
        b, h, q, _ = keys.shape
        n = self.lengths.flatten().tolist()  # tokens per segment, S = B H segments
        width = max(n, default=0)
        real = (positions >= 0).reshape(b * h, q)  # (S, q) the row's real new tokens, in every head
        n_real = real.sum(dim=1).tolist()
        all_real = bool(real.all())
        steps, packed = [], []
        for flat, new, fill in ((self.keys, keys, 0.0), (self.values, values, 0.0), (self.positions, positions, -1)):
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
        state = {}
        for name, s in self.slot_state.items():  # each segment, then 0 for its row's real new tokens
            state[name] = torch.cat(
                [p for i, seg in enumerate(torch.split(s, n)) for p in (seg, s.new_zeros(n_real[i]))]
            )
        lengths = torch.tensor([a + c for a, c in zip(n, n_real, strict=True)], device=self.lengths.device)
        new_keys, new_values, new_positions = packed
        stored = RaggedStorage(new_keys, new_values, new_positions, lengths.view(b, h), MappingProxyType(state))
        step_keys, step_values, step_positions = steps
        return stored, (step_keys, step_values, step_positions)

    def prune(
        self, indices: Tensor, counts: Tensor, values: Tensor | None = None, ragged: bool = True
    ) -> RaggedStorage:
        starts = segment_starts(self.lengths)
        return RaggedStorage.gather(
            self.keys, self.values, self.positions, self.slot_state, starts, indices, counts, values
        )

    def select_rows(self, rows: Tensor) -> RaggedStorage:
        """Gather the rows' runs of segments from the flat buffers."""
        per_row = self.lengths.sum(dim=1)
        starts = per_row.cumsum(0) - per_row
        idx = torch.cat([torch.arange(int(starts[r]), int(starts[r] + per_row[r])) for r in rows.tolist()])
        idx = idx.to(self.keys.device)
        state = {name: s[idx] for name, s in self.slot_state.items()}
        rows = rows.to(self.lengths.device)
        return RaggedStorage(
            self.keys[idx], self.values[idx], self.positions[idx], self.lengths[rows], MappingProxyType(state)
        )

    def concat_rows(self, others: Sequence[LayerStorage]) -> RaggedStorage:
        """Rows are runs of segments in the flat buffers, so joining rows joins the buffers. Rectangular parts are
        packed first (their filled slots); a part of another segment layout (quantized) is refused."""
        parts = [self]
        for other in others:
            if other.is_ragged and not isinstance(other, RaggedStorage):
                raise ValueError(f"ragged rows cannot join {type(other).__name__} rows (rows quantized or not)")
            parts.append(RaggedStorage.from_storage(other))
        check_alike("heads", (p.lengths.shape[1] for p in parts))
        check_alike("key channels", (p.keys.shape[-1] for p in parts))
        check_alike("value channels", (p.values.shape[-1] for p in parts))
        check_alike("dtypes", (p.keys.dtype for p in parts))
        return RaggedStorage(
            torch.cat([p.keys for p in parts]),
            torch.cat([p.values for p in parts]),
            torch.cat([p.positions for p in parts]),
            torch.cat([p.lengths for p in parts]),
            concat_slot_states([(p.slot_state, p.positions) for p in parts]),
        )

    def pack(self, rect: Tensor) -> Tensor:
        filled = self.unpack(self.positions, -1) >= 0
        if rect.shape[: filled.dim()] != filled.shape:
            raise ValueError(f"shape {tuple(rect.shape)} does not match the layer's view {tuple(filled.shape)}")
        return rect[filled]  # (row, head, slot) order = the segments' order

    def unpack(self, stored: Tensor, fill: float) -> Tensor:
        return unpack(stored, self.lengths, fill)

    def replace(self, **fields: Tensor | Mapping[str, Tensor]) -> RaggedStorage:
        return replace(self, **fields)  # type: ignore[arg-type]

    def metadata_tensors(self) -> list[Tensor]:
        return [self.positions, self.lengths]

    def padding_slots(self) -> int:
        return 0

    def to_tensors(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "lengths": self.lengths}
