"""The protocol every storage layout of one attention layer's cache follows, and byte counting from storages.

A storage holds, for one layer, the cached keys and values and the absolute position of every stored token, plus the
per-slot floats of stateful methods (`slot_state`, e.g. H2O's accumulated attention). Each layout decides how they sit
in memory; everything above it (the cache, attention, methods) reads the rectangular form of `view()`:

    keys     (B, H, T, D)   post-RoPE, as the model cached them; T = the longest (row, head) kept
    values   (B, H, T, Dv)
    positions (B, H, T)     int32 absolute position of each slot; -1 marks an empty slot

Storages are immutable values: every verb that changes the cache returns a new storage and never writes into the
tensors of the old one. Holding on to a storage is therefore a snapshot of the layer, and putting it back restores it
(`KVLayer.snapshot` / `restore`, used by KVzip's context replay). Adding a layout (like `quantized.py`) means adding one
file that implements this protocol and passes the storage contract tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol, Self

import torch
from torch import Tensor

__all__ = [
    "NO_STATE",
    "FullPrecision",
    "LayerStorage",
    "StepView",
    "check_alike",
    "check_names",
    "check_positions",
    "check_tensor",
    "concat_slot_states",
    "storage_bytes",
]

StepView = tuple[Tensor, Tensor, Tensor]  # keys (B, H, T, D), values (B, H, T, Dv), positions (B, H, T)
NO_STATE: Mapping[str, Tensor] = MappingProxyType({})  # a storage's slot states when it has none (read-only, shared)


class LayerStorage(Protocol):
    """One layer's keys, values and slot positions in some memory layout (see the module docstring)."""

    @property
    def keys(self) -> Tensor:
        """The stored keys, in the layout's own shape."""
        ...

    @property
    def values(self) -> Tensor: ...

    @property
    def positions(self) -> Tensor:
        """int32 positions in the layout's own shape (the keys' shape without the channel dim)."""
        ...

    @property
    def slot_state(self) -> Mapping[str, Tensor]:
        """name -> per-slot floats of stateful methods, in the layout of `positions`."""
        ...

    @property
    def is_ragged(self) -> bool:
        """True when (row, head) segments hold different numbers of tokens with no empty slots between them."""
        ...

    def view(self) -> StepView:
        """The rectangular form (see the module docstring): the stored tensors themselves, or a transient copy."""
        ...

    def kept(self) -> Tensor:
        """(B, H) long: real tokens held per (row, head)."""
        ...

    def width(self) -> int:
        """T, the slot count of `view()`."""
        ...

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[LayerStorage, StepView]:
        """Add q new tokens, keys (B, H, q, D), values (B, H, q, Dv), positions (B, H, q) with -1 for pad tokens.

        Returns the new storage and the step view attention reads: the past slots in view order, then the q new ones
        (pads included, at -1). New tokens start every slot state at 0."""
        ...

    def prune(
        self, indices: Tensor, counts: Tensor, values: Tensor | None = None, ragged: bool = False
    ) -> LayerStorage:
        """Keep the slots `indices[b, h, :counts[b, h]]` of `view()` (indices (B, H, K) long, counts (B, H)).

        values: replacement values (B, H, K, Dv) of the kept slots (value merging), None keeps the cached ones.
        ragged: the counts differ and the caller wants exactly sum(counts) tokens stored (no empty slots); else a
        rectangular layout keeps K slots and marks the unused ones empty."""
        ...

    def select_rows(self, rows: Tensor) -> LayerStorage:
        """A storage holding copies of the given batch rows (indices may repeat)."""
        ...

    def concat_rows(self, others: Sequence[LayerStorage]) -> LayerStorage:
        """A storage holding this storage's rows, then each of `others`' rows, in order (continuous batching puts
        rows of different caches into one batch this way). Rows keep their tokens, positions and slot states
        exactly; rows of different lengths sit side by side, a layout with slots padding the shorter ones with
        empty slots. A layout that cannot hold some part's rows as they are raises a ValueError naming it."""
        ...

    def pack(self, rect: Tensor) -> Tensor:
        """A tensor in the layout of `view()` (B, H, T, ...) -> the stored layout (only the filled slots if ragged)."""
        ...

    def unpack(self, stored: Tensor, fill: float) -> Tensor:
        """A tensor in the stored layout -> the layout of `view()` (B, H, T, ...), `fill` in the empty slots."""
        ...

    def replace(self, **fields: Tensor | Mapping[str, Tensor]) -> LayerStorage:
        """A copy with some of keys / values / positions / slot_state replaced (same layout and shapes)."""
        ...

    def settle(self) -> LayerStorage:
        """The storage after the end of a forward (every compression hook done): a quantized layout quantizes what
        left its full-precision window; others return themselves."""
        ...

    def kv_tensors(self) -> list[Tensor]:
        """The tensors that hold keys and values (codes, scales and zero points for a quantized layout): what
        `nbytes` counts and memory reports measure."""
        ...

    def nbytes(self) -> int:
        """Bytes of keys and values held (the stored tensors are never views, so numel is the storage)."""
        ...

    def metadata_tensors(self) -> list[Tensor]:
        """The tensors of bookkeeping beside keys and values (slot positions, segment lengths, group counts): what
        memory reports count as metadata."""
        ...

    def padding_slots(self) -> int:
        """Empty slots stored (bytes spent on nothing): 0 for layouts without empty slots."""
        ...

    def to_tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild this storage (slot state excepted), by name."""
        ...


def storage_bytes(tensors: Iterable[Tensor], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` (a slice counts its whole storage), skipping those in `seen`
    (data pointers already counted), which is updated."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() == 0:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


def check_alike(what: str, values: Iterable[object]) -> None:
    """A ValueError when rows to be joined disagree on `what` (heads, channels, dtype...): `values`, one per part."""
    seen = list(values)
    if len(set(seen)) > 1:
        raise ValueError(f"cannot join rows of different {what}: {seen}")


def concat_slot_states(parts: Sequence[tuple[Mapping[str, Tensor], Tensor]], dim: int = 0) -> Mapping[str, Tensor]:
    """The slot states of parts joined along `dim`: each part gives (its slot states, its positions in the same
    layout); a state that a part lacks is 0 in its slots (what a new token starts with)."""
    names = sorted({name for state, _ in parts for name in state})
    joined = {
        name: torch.cat(
            [
                state[name] if name in state else torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
                for state, pos in parts
            ],
            dim=dim,
        )
        for name in names
    }
    return MappingProxyType(joined)


# -- checks of tensors read back from a file (every failure is a ValueError saying what is wrong)
def check_names(tensors: Mapping[str, Tensor], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """The saved parts are exactly `required` plus some of `optional`."""
    missing, unknown = set(required) - set(tensors), set(tensors) - set(required) - set(optional)
    if missing or unknown:
        parts = [f"missing {sorted(missing)}" if missing else "", f"unexpected {sorted(unknown)}" if unknown else ""]
        raise ValueError("tensors " + " and ".join(p for p in parts if p))


def check_tensor(name: str, t: Tensor, shape: tuple[int | None, ...], floating: bool) -> None:
    """`t` has this many dims with the given sizes (None = any), a float (finite values) or an integer dtype."""
    want = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
    if t.dim() != len(shape) or any(n is not None and n != got for n, got in zip(shape, t.shape, strict=True)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if floating != t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {'a float' if floating else 'an integer'} dtype")
    if floating and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def check_positions(positions: Tensor, filled: Tensor, name: str = "positions") -> None:
    """Slot positions (..., T): -1 exactly where `filled` is False, else >= 0 and strictly increasing along T."""
    if bool((positions[filled] < 0).any()) or bool((positions[~filled] != -1).any()):
        raise ValueError(f"{name} must be >= 0 in filled slots and -1 in empty ones")
    order = torch.where(filled, positions.long(), torch.iinfo(torch.long).min)
    running = torch.cummax(order, dim=-1).values  # the largest position in the earlier slots, at each slot
    earlier = torch.cat([running.new_full((*running.shape[:-1], 1), -1), running[..., :-1]], dim=-1)
    if bool((filled & (positions.long() <= earlier)).any()):
        raise ValueError(f"{name} of the filled slots must increase strictly (slots are kept in position order)")


class FullPrecision:
    """What the full-precision layouts (dense, ragged) share: their keys and values tensors are what they hold."""

    keys: Tensor
    values: Tensor

    def settle(self) -> Self:
        return self  # nothing waits to be quantized

    def kv_tensors(self) -> list[Tensor]:
        return [self.keys, self.values]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
