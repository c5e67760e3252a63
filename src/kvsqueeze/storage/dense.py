"""The rectangular layout: transformers' own (B, H, T, D) layer tensors, plus the position of every slot.

    keys, values  (B, H, T, D)  T = the longest (row, head) kept; shorter ones leave empty slots
    positions     (B, H, T)     int32, -1 = an empty slot (a left-pad token, or a head that keeps fewer)

Until a pruning gives heads different slots, every head of a row holds the same positions: appends then store one
row (B, 1, T) and expand it over the heads (`join_positions`), so an uncompressed layer keeps no more bookkeeping than
B x T integers beside its keys and values.

Uniform budgets fill every slot, so the stored tensors are exactly what was kept and `view()` costs nothing. When a
plan keeps different counts per row or head, `prune(..., ragged=True)` moves the layer to the ragged layout instead.

Appending one token per row right after another such append (a decode step; the first one after a prefill or a
pruning, like a one-token chunk, is copied as any append) writes it into room kept after the last slot (`Spare`:
buffers with FIRST_ROOM more slots, copied into buffers with twice the room, up to ROOM, once full) instead of copying
the whole layer into a new tensor as `torch.cat` does (and transformers' DynamicCache with it): a step then writes one
slot instead of reading and writing the whole layer and allocating a new tensor for it. The storage's tensors are
views of the first slots of those buffers. Storages stay immutable values: an append writes only slots past every
existing storage's last one, and a second append from the same storage (a fork: a snapshot put back, a row decoded
twice) finds those slots taken and copies instead. The room is memory the layer holds, so it counts in the layer's
bytes: at most ROOM slots, and no more than about the steps decoded since the last copy or pruning.

A one-row layer with room (`with_room`: made by its first fork, or when the server's store takes it in) lends it to
one fork at a time (`DenseStorage.lend_room`, `Spare.lend`): that fork's own tokens then follow the layer's last slot
in the same buffers, and attention reads the two as one rectangle. The room stays the host's memory, counted in its
bytes and not again in the fork's.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from types import MappingProxyType

import torch
from torch import Tensor

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
from kvsqueeze.storage.ragged import RaggedStorage

__all__ = ["FIRST_ROOM", "ROOM", "DenseStorage", "Spare"]

FIRST_ROOM, ROOM = 8, 128  # slots of room after the last one: 8 at first, doubled each time it fills, at most 128
LEND_MIN = 32  # the least room worth lending to a fork (its question and the start of its answer)


@dataclass(eq=False)
class Spare:
    """Buffers holding a dense layer's slots and room for more after them, shared by the storages appended one from
    another: keys (B, H, C, D), values (B, H, C, Dv), positions (B, H, C); `used`: slots written so far (a storage may
    append in place only when it ends exactly there).

    A one-row layer may lend its room to one fork at a time (`lend`): the tenant is a spare over the room (views of the
    same buffers, `host` and `offset` saying where), so the fork's own tokens follow the layer's last slot in memory and
    attention reads both as one rectangle (`SharedStorage.joined`). While a storage of the tenant lives, the room is
    its: the host's own appends copy instead; once they are all gone, the room is free again (a weak reference). Like
    the rest of a cache, this assumes one thread forks and decodes a layer at a time (the server's engine thread)."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    used: int
    room: int  # the empty slots it was made with
    host: Spare | None = None  # a tenant's: the spare whose room it writes into, from slot `offset` of its buffers on
    offset: int = 0
    nbytes: int = field(init=False)  # of the keys and values buffers, room included (a tenant's: 0, its host's)
    tenant: weakref.ref[Spare] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        own = self.host is None
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.keys, self.values)) if own else 0

    @property
    def lent(self) -> bool:
        """Whether a fork's storages write into this spare's room now."""
        return self.tenant is not None and self.tenant() is not None

    def lend(self) -> Spare | None:
        """A tenant spare over the room after the used slots (see the class docstring); None when there is no room or
        it is lent already."""
        if self.lent or self.used >= self.capacity:
            return None
        room = self.capacity - self.used
        keys, values, positions = (t.narrow(2, self.used, room) for t in (self.keys, self.values, self.positions))
        tenant = Spare(keys, values, positions, used=0, room=room, host=self, offset=self.used)
        self.tenant = weakref.ref(tenant)
        return tenant

    @property
    def writable(self) -> bool:
        """Whether the buffers may be written now: not ones made under `torch.inference_mode()` while outside it."""
        return not self.keys.is_inference() or torch.is_inference_mode_enabled()

    @property
    def capacity(self) -> int:
        return self.positions.shape[-1]

    @classmethod
    def around(cls, stored: DenseStorage, room: int) -> Spare:
        """New buffers holding `stored`'s slots, then `room` empty ones."""
        b, h, t = stored.positions.shape
        keys = stored.keys.new_empty(b, h, t + room, stored.keys.shape[-1])
        values = stored.values.new_empty(b, h, t + room, stored.values.shape[-1])
        rows = head_rows(stored.positions)  # (B, 1, T) when the heads hold the same slots: stored once
        positions = rows.new_full((b, rows.shape[1], t + room), -1)
        keys[:, :, :t], values[:, :, :t], positions[:, :, :t] = stored.keys, stored.values, rows
        return cls(keys, values, positions, t, room)

    def write(self, keys: Tensor, values: Tensor, positions: Tensor) -> bool:
        """Write one step's slots after the used ones (False, writing nothing, when its positions differ by head
        and these buffers store one row of positions for all heads)."""
        if self.positions.shape[1] != positions.shape[1]:
            positions = head_rows(positions)
            if positions.shape[1] != self.positions.shape[1]:
                return False
        q = keys.shape[2]
        self.keys.narrow(2, self.used, q).copy_(keys)  # narrow: quicker to call than slicing, on every decode step
        self.values.narrow(2, self.used, q).copy_(values)
        self.positions.narrow(2, self.used, q).copy_(positions)
        self.used += q
        return True

    def stored(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the used slots: keys, values, positions (B, H, used)."""
        b, h = self.keys.shape[:2]
        end = self.used
        return (self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end),
                self.positions.narrow(2, 0, end).expand(b, h, end))  # fmt: skip


def head_rows(positions: Tensor) -> Tensor:
    """Slot positions (B, H, T) as (B, 1, T) when every head holds the same ones in the same memory (an expanded
    row, as appends store them), else as they are."""
    if positions.shape[1] == 1 or positions.stride(1) == 0:
        return positions[:, :1]
    return positions


def join_positions(old: Tensor, new: Tensor) -> Tensor:
    """Slot positions (B, H, T) followed by (B, H, q), as int32; when both hold one row for all heads the result is
    that row expanded over the heads (so a layer no pruning split by head stores B x T positions, not B x H x T)."""
    b, h = new.shape[:2]
    old_rows, new_rows = head_rows(old), head_rows(new)
    if old_rows.shape[1] == new_rows.shape[1] == 1:
        return torch.cat([old_rows, new_rows.to(torch.int32)], dim=-1).expand(b, h, -1)
    return torch.cat([old, new.to(torch.int32)], dim=-1)


@dataclass(frozen=True)
class DenseStorage(FullPrecision):
    """Rectangular keys/values/positions (see the module docstring)."""

    keys: Tensor  # (B, H, T, D)
    values: Tensor  # (B, H, T, Dv)
    positions: Tensor  # (B, H, T) int32
    slot_state: Mapping[str, Tensor] = field(default_factory=lambda: NO_STATE)  # name -> (B, H, T)
    spare: Spare | None = None  # the buffers keys/values/positions are the first slots of, with room after them
    decoding: bool = False  # made by a one-token append: the next one-token append is a decode step and gets room

    is_ragged = False

    @classmethod
    def empty(cls, keys: Tensor, values: Tensor) -> DenseStorage:
        """No tokens yet, with the batch, heads, dims, dtype and device of these (B, H, q, D) tensors."""
        b, h, _, d = keys.shape
        positions = torch.empty(b, 1, 0, dtype=torch.int32, device=keys.device).expand(b, h, 0)
        return cls(keys.new_empty(b, h, 0, d), values.new_empty(b, h, 0, values.shape[-1]), positions)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], heads: int, key_width: int, value_dim: int) -> DenseStorage:
        """Rebuild from `to_tensors` output read back from a file, checking every tensor (ValueError if wrong)."""
        check_names(tensors, {"keys", "values", "positions"})
        keys, values, positions = tensors["keys"], tensors["values"], tensors["positions"]
        check_tensor("positions", positions, (None, heads, None), floating=False)
        b, _, t = positions.shape
        check_tensor("keys", keys, (b, heads, t, key_width), floating=True)
        check_tensor("values", values, (b, heads, t, value_dim), floating=True)
        check_positions(positions, positions >= 0)
        return cls(keys, values, positions.to(torch.int32))

    def view(self) -> StepView:
        return self.keys, self.values, self.positions

    def kept(self) -> Tensor:
        return (self.positions >= 0).sum(dim=-1)

    def width(self) -> int:
        return self.positions.shape[-1]

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[DenseStorage, StepView]:
        b, h, q, _ = keys.shape
        t = self.width()
        spare = self.spare
        free = spare is not None and spare.used == t and not spare.lent and not self.slot_state and spare.writable
        if spare is not None and free and t + q <= spare.capacity and spare.write(keys, values, positions):
            # into the room after the last slot
            stored = DenseStorage(*spare.stored(), spare=spare, decoding=q == 1)
            return stored, stored.view()
        if t > 0 and q == 1 and self.decoding and not self.slot_state:  # a decode step: copy, with room
            # after a prefill, a fork or with the room lent: a little; a full room: twice as much (a long decode copies
            # rarely)
            spare = Spare.around(self, min(ROOM, 2 * spare.room) if spare is not None and free else FIRST_ROOM)
            if spare.write(keys, values, positions):
                stored = DenseStorage(*spare.stored(), spare=spare, decoding=True)
                return stored, stored.view()
        state = {name: torch.cat([s, s.new_zeros(b, h, q)], dim=-1) for name, s in self.slot_state.items()}
        stored = DenseStorage(
            torch.cat([self.keys, keys], dim=-2),
            torch.cat([self.values, values], dim=-2),
            join_positions(self.positions, positions),
            MappingProxyType(state),
            decoding=q == 1,
        )
        return stored, stored.view()

    def with_room(self) -> DenseStorage:
        """This storage with ROOM slots of room after its last slot, for appends and forks to write into: itself when
        it has room already, else a copy in buffers with room."""
        if self.spare is not None and self.spare.used == self.width() and self.spare.capacity > self.width():
            return self
        buffers = Spare.around(self, ROOM)
        return DenseStorage(*buffers.stored(), self.slot_state, spare=buffers, decoding=self.decoding)

    def lend_room(self) -> DenseStorage | None:
        """For a one-row fork of this storage: an empty storage appending into the room after this one's last slot
        (`Spare.lend`), so the fork's own tokens follow this storage's in memory. None when there is not LEND_MIN
        slots of free room (none was made, `with_room`; it is lent or taken) or the storage has several rows, a slot
        state or an empty slot."""
        spare = self.spare
        if spare is None or spare.used != self.width() or spare.capacity - spare.used < LEND_MIN or not spare.writable:
            return None
        if self.positions.shape[0] != 1 or self.slot_state or bool((self.positions < 0).any()):
            return None
        tenant = spare.lend()
        return None if tenant is None else DenseStorage(*tenant.stored(), spare=tenant)

    def prune(
        self, indices: Tensor, counts: Tensor, values: Tensor | None = None, ragged: bool = False
    ) -> DenseStorage | RaggedStorage:
        b, h, k = indices.shape
        if ragged:  # segment (b, h) starts at (b H + h) T in the flattened tensors
            t = self.positions.shape[-1]
            starts = torch.arange(b * h, device=indices.device).view(b, h) * t
            return RaggedStorage.gather(
                self.keys.reshape(b * h * t, -1),
                self.values.reshape(b * h * t, -1),
                self.positions.reshape(-1),
                self.slot_state,
                starts,
                indices,
                counts,
                values,
            )
        d, dv = self.keys.shape[-1], self.values.shape[-1]
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        keys = self.keys.gather(2, indices[..., None].expand(b, h, k, d))
        if values is None:
            values = self.values.gather(2, indices[..., None].expand(b, h, k, dv))
        else:
            values = values.to(self.values.dtype).contiguous()
        positions = torch.where(filled, self.positions.gather(2, indices), -1)
        state = {name: torch.where(filled, s.gather(2, indices), 0.0) for name, s in self.slot_state.items()}
        return DenseStorage(keys, values, positions, MappingProxyType(state))

    def select_rows(self, rows: Tensor) -> DenseStorage:
        rows = rows.to(self.keys.device)
        state = {name: s[rows] for name, s in self.slot_state.items()}
        return DenseStorage(self.keys[rows], self.values[rows], self.positions[rows], MappingProxyType(state))

    def concat_rows(self, others: Sequence[LayerStorage]) -> DenseStorage | RaggedStorage:
        """Rows of different widths are left-padded with empty slots to the widest, as a left-padded batch is; slot
        columns then empty in every row and head (left by rows dropped earlier) are removed. With a ragged part,
        the rows join in the ragged layout."""
        if not all(isinstance(other, DenseStorage) for other in others):
            return RaggedStorage.from_storage(self).concat_rows(others)
        parts = [self, *(other for other in others if isinstance(other, DenseStorage))]
        check_alike("heads", (p.keys.shape[1] for p in parts))
        check_alike("key channels", (p.keys.shape[-1] for p in parts))
        check_alike("value channels", (p.values.shape[-1] for p in parts))
        check_alike("dtypes", (p.keys.dtype for p in parts))
        width = max(p.width() for p in parts)
        padded = [p.pad_slots(width - p.width()) for p in parts]
        keys = torch.cat([p.keys for p in padded])
        values = torch.cat([p.values for p in padded])
        positions = torch.cat([p.positions for p in padded])
        state = concat_slot_states([(p.slot_state, p.positions) for p in padded])
        used = (positions >= 0).flatten(0, 1).any(dim=0)  # (T,) slot columns some row or head fills
        if bool(used.all()):
            return DenseStorage(keys, values, positions, state)
        state = MappingProxyType({name: s[:, :, used] for name, s in state.items()})
        return DenseStorage(keys[:, :, used], values[:, :, used], positions[:, :, used], state)

    def pad_slots(self, n: int) -> DenseStorage:
        """The same rows with `n` empty slots before the first one (a left pad)."""
        if n == 0:
            return self
        b, h, _ = self.positions.shape

        def pad(t: Tensor, fill: float) -> Tensor:
            return torch.cat([t.new_full((b, h, n, *t.shape[3:]), fill), t], dim=2)

        state = {name: pad(s, 0.0) for name, s in self.slot_state.items()}
        keys, values, positions = pad(self.keys, 0.0), pad(self.values, 0.0), pad(self.positions, -1)
        return DenseStorage(keys, values, positions, MappingProxyType(state))

    def pack(self, rect: Tensor) -> Tensor:
        if rect.shape[:3] != self.positions.shape:
            raise ValueError(f"shape {tuple(rect.shape)} does not match the layer's {tuple(self.positions.shape)}")
        return rect

    def unpack(self, stored: Tensor, fill: float) -> Tensor:
        return stored

    def replace(self, **fields: Tensor | Mapping[str, Tensor]) -> DenseStorage:
        if self.spare is None or set(fields) <= {"slot_state"}:
            return replaced(self, **fields)  # type: ignore[arg-type]
        if self.spare.host is not None:  # a fork's tokens in a lent room, which goes back once this no longer holds it
            kept = {name: getattr(self, name).clone() for name in ("keys", "values", "positions") if name not in fields}
            fields = {**fields, **kept}
        # new tensors are not views of the buffers: the storage no longer appends into them
        return replaced(self, spare=None, decoding=False, **fields)  # type: ignore[arg-type]

    def nbytes(self) -> int:
        """Bytes of the keys and values held, the room after the last slot included."""
        return super().nbytes() if self.spare is None else self.spare.nbytes

    def padding_slots(self) -> int:
        return int((self.positions < 0).sum())

    def metadata_tensors(self) -> list[Tensor]:
        return [self.positions]

    def to_tensors(self) -> dict[str, Tensor]:
        parts = {"keys": self.keys, "values": self.values, "positions": self.positions}
        return {name: t.contiguous() for name, t in parts.items()}  # views of the buffers with room: copies of them
