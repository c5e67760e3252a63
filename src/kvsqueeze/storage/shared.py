"""The shared-prefix layout: rows that read a context stored elsewhere and hold only the tokens added after it.

    prefixes   one-row storages (dense or ragged), each a context's layer as its own cache holds it: never copied
    owner      (B,) long: the prefix row b reads
    suffix     a dense storage (B, H, S, ...) of each row's own tokens (its question, then its answer)

A server answers many questions over one compressed document. Copying the document's cache for every answer costs
its bytes per row and a copy on every join; here rows over the same document read one copy of it (`prefix_attention`
attends each prefix once for all its rows and combines that with each row's own tokens). Rows of different documents,
lengths and layouts sit side by side, so joining and leaving a batch copies suffixes only.

Attention reads the prefixes directly (`attention.py` sees this layout); the step view `append` returns is the
suffix's (its past slots, then the new ones), not the whole row. Every other verb that needs the rows as one
rectangle (a pruning, a slot state written, a file saved) works on `standalone()`, the rows copied into the dense
layout: the result is an ordinary storage, so methods that prune while decoding see a plain layer. `view()` is that
copy too. Prefixes are full precision and full attention: quantized and sliding-window layers are copied instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

from kvsqueeze.storage.base import LayerStorage, StepView, storage_bytes
from kvsqueeze.storage.dense import DenseStorage
from kvsqueeze.storage.ragged import RaggedStorage, segment_starts

__all__ = ["Halves", "PrefixRead", "SharedStorage", "halves", "middle_mask"]


class Halves(NamedTuple):
    """One head's segment (L slots, L >= 2) as a batch of two equal halves, its first and its last c = ceil(L / 2)
    slots: keys (1, 2, c, D) and values (1, 2, c, Dv), views of the flat buffers; with L odd both halves hold the
    middle slot, and `middle` (1, 2, 1, c), additive, hides it from the second (None when L is even)."""

    keys: Tensor
    values: Tensor
    middle: Tensor | None


class PrefixRead(NamedTuple):
    """One prefix as attention reads it: its slots, either as its rectangular view (1, H, L, ...) or, for a ragged
    prefix, as each head's (keys (L_h, D), values (L_h, Dv)) segment of its flat buffers (no copy); the rows reading
    it (None: every row of the storage); whether every slot of the view is filled (no empty slot to mask); and, for a
    ragged prefix whose every head holds two slots or more, each head's segment as two halves (`halves`)."""

    view: StepView | None
    heads: tuple[tuple[Tensor, Tensor], ...] | None
    rows: Tensor | None
    full: bool
    halves: tuple[Halves, ...] | None = None


def middle_mask(like: Tensor, width: int) -> Tensor:
    """The additive (1, 2, 1, width) mask in `like`'s dtype and device that hides the first slot of the second half:
    -inf there, 0 elsewhere. Its first c columns are `Halves.middle` of any odd segment with c <= width."""
    mask = like.new_zeros(1, 2, 1, width)
    mask[0, 1, 0, 0] = float("-inf")
    return mask


def halves(keys: Tensor, values: Tensor, hide: Tensor | None = None) -> Halves:
    """A segment (keys (L, D), values (L, Dv), L >= 2) as its two halves (see `Halves`). hide: a `middle_mask` at
    least ceil(L / 2) wide, shared by a prefix's heads; made here when not given."""
    n = keys.shape[0]
    c = (n + 1) // 2

    def split(t: Tensor) -> Tensor:
        return t.as_strided((1, 2, c, t.shape[1]), (0, (n - c) * t.stride(0), t.stride(0), t.stride(1)))

    if n % 2 == 0:
        return Halves(split(keys), split(values), None)
    return Halves(split(keys), split(values), (middle_mask(keys, c) if hide is None else hide)[..., :c])


def prefix_read(prefix: LayerStorage, rows: Tensor | None) -> PrefixRead:
    """How attention reads `prefix` (a one-row storage): a ragged one by its segments (and their halves when every
    head holds two slots or more), any other by its view."""
    if isinstance(prefix, RaggedStorage):
        starts = segment_starts(prefix.lengths)[0].tolist()
        lengths = prefix.lengths[0].tolist()
        heads = tuple((prefix.keys[s : s + n], prefix.values[s : s + n]) for s, n in zip(starts, lengths, strict=True))
        split = None
        if min(lengths, default=0) >= 2:
            hide = middle_mask(prefix.keys, (max(lengths) + 1) // 2)  # every odd head's, sliced
            split = tuple(halves(k, v, hide) for k, v in heads)
        return PrefixRead(None, heads, rows, True, split)
    return PrefixRead(prefix.view(), None, rows, bool((prefix.kept() == prefix.width()).all()))


@dataclass(frozen=True)
class SharedStorage:
    """Rows over shared one-row prefixes plus their own dense suffix (see the module docstring)."""

    prefixes: tuple[LayerStorage, ...]
    owner: Tensor  # (B,) long index into prefixes
    suffix: DenseStorage  # (B, H, S, ...)
    # how attention reads each prefix: derived from the fields above once, then handed on by `append`
    reads: tuple[PrefixRead, ...] = field(default=(), compare=False)
    prefix_bytes: int = field(default=-1, compare=False)  # the prefixes' keys and values, each counted once

    is_ragged = False

    def __post_init__(self) -> None:
        if self.prefix_bytes < 0:
            object.__setattr__(
                self, "prefix_bytes", storage_bytes([t for p in self.prefixes for t in p.kv_tensors()], set())
            )
        if self.reads:
            return
        b = self.suffix.positions.shape[0]
        if any(p.kept().shape[0] != 1 for p in self.prefixes):
            raise ValueError(f"a shared prefix is one row, got rows {[p.kept().shape[0] for p in self.prefixes]}")
        if self.owner.shape != (b,) or bool(((self.owner < 0) | (self.owner >= len(self.prefixes))).any()):
            raise ValueError(f"owner must give each of the {b} rows one of the {len(self.prefixes)} prefixes, got "
                             f"{self.owner.tolist()}")  # fmt: skip
        every = len(self.prefixes) == 1
        reads = [prefix_read(p, None if every else (self.owner == j).nonzero().flatten())
                 for j, p in enumerate(self.prefixes)]  # fmt: skip
        object.__setattr__(self, "reads", tuple(reads))

    @classmethod
    def over(cls, prefixes: Sequence[LayerStorage], owner: Tensor, suffix: DenseStorage | None = None) -> SharedStorage:
        """Rows reading `prefixes` (one-row storages, not copied), row b the prefix `owner[b]`, with no tokens of their
        own yet: `suffix`, when given, is the empty storage they go to (one writing into its prefix's room,
        `DenseStorage.lend_room`)."""
        if not prefixes:
            raise ValueError("rows over shared prefixes need at least one prefix")
        # a fork of a fork: its own tokens become part of the prefix (a copy)
        prefixes = tuple(p.standalone() if isinstance(p, SharedStorage) else p for p in prefixes)
        heads = prefixes[0].kept().shape[1]
        keys, values = prefixes[0].keys, prefixes[0].values
        b = owner.numel()
        if suffix is None:
            suffix = DenseStorage(
                keys.new_empty(b, heads, 0, keys.shape[-1]),
                values.new_empty(b, heads, 0, values.shape[-1]),
                torch.empty(b, heads, 0, dtype=torch.int32, device=keys.device),
            )
        return cls(prefixes, owner.to(keys.device), suffix)

    def joined(self) -> tuple[Tensor, Tensor] | None:
        """Keys and values (1, H, L + S, ...) of the one row's prefix and own slots as one rectangle, when the own
        slots follow the prefix's in the same buffers (the suffix writes into the prefix's room, as
        `DenseStorage.lend_room` set it up, and no append has moved it out since): views, no copy. None otherwise."""
        spare = self.suffix.spare
        if spare is None or spare.host is None or len(self.prefixes) != 1:
            return None
        prefix = self.prefixes[0]
        if not isinstance(prefix, DenseStorage) or prefix.spare is not spare.host or prefix.width() != spare.offset:
            return None
        end = spare.offset + self.suffix.width()
        return spare.host.keys.narrow(2, 0, end), spare.host.values.narrow(2, 0, end)

    # -- what attention reads
    def prefix_reads(self) -> list[PrefixRead]:
        """Each prefix as attention reads it (see `PrefixRead`); every prefix is read by some row."""
        return list(self.reads)

    @classmethod
    def decoding(cls, storage: RaggedStorage) -> SharedStorage:
        """A ragged layer about to decode, as rows reading their own tokens as prefixes (each row once, a copy when
        there are several): decode steps then append to a dense suffix and attention reads the segments in place,
        instead of repacking the flat buffers and unpacking a rectangle at every step (`RaggedStorage.append`)."""
        b = storage.lengths.shape[0]
        rows = torch.arange(b, device=storage.lengths.device)
        prefixes = [storage] if b == 1 else [storage.select_rows(rows[i : i + 1]) for i in range(b)]
        return cls.over(prefixes, rows)

    # -- the rows as one storage of their own
    def standalone(self) -> DenseStorage | RaggedStorage:
        """A copy of the rows in a layout of their own: over ragged prefixes the ragged one (each row's segments, its
        own real tokens after them); else the dense one (each row's prefix slots, right-padded with empty slots to
        the longest prefix, then its own)."""
        if self._ragged_standalone():
            parts = [RaggedStorage.from_storage(self.prefixes[j]) for j in self.owner.tolist()]
            joined = parts[0].concat_rows(parts[1:]) if len(parts) > 1 else parts[0]
            return joined.append(self.suffix.keys, self.suffix.values, self.suffix.positions)[0]
        views = [p.view() for p in self.prefixes]
        width = max((v[2].shape[-1] for v in views), default=0)
        b, h, s = self.suffix.positions.shape
        keys = self.suffix.keys.new_zeros(b, h, width + s, self.suffix.keys.shape[-1])
        values = self.suffix.values.new_zeros(b, h, width + s, self.suffix.values.shape[-1])
        positions = self.suffix.positions.new_full((b, h, width + s), -1)
        names = sorted({n for p in self.prefixes for n in p.slot_state} | set(self.suffix.slot_state))
        state = {name: torch.zeros(b, h, width + s, device=positions.device) for name in names}
        for j, (prefix, (k, v, pos)) in enumerate(zip(self.prefixes, views, strict=True)):
            rows = (self.owner == j).nonzero().flatten()
            w = pos.shape[-1]
            keys[rows, :, :w], values[rows, :, :w], positions[rows, :, :w] = k, v, pos
            for name, stored in prefix.slot_state.items():
                state[name][rows, :, :w] = prefix.unpack(stored, 0.0)
        keys[:, :, width:], values[:, :, width:] = self.suffix.keys, self.suffix.values
        positions[:, :, width:] = self.suffix.positions
        for name, stored in self.suffix.slot_state.items():
            state[name][:, :, width:] = stored
        return DenseStorage(keys, values, positions, MappingProxyType(state))

    # -- the protocol
    @property
    def keys(self) -> Tensor:
        return self.standalone().keys

    @property
    def values(self) -> Tensor:
        return self.standalone().values

    @property
    def positions(self) -> Tensor:
        return self.standalone().positions

    @property
    def slot_state(self) -> Mapping[str, Tensor]:
        if not self.suffix.slot_state and not any(p.slot_state for p in self.prefixes):
            return MappingProxyType({})
        return self.standalone().slot_state

    def view(self) -> StepView:
        return self.standalone().view()

    def kept(self) -> Tensor:
        prefix = torch.cat([p.kept() for p in self.prefixes]).to(self.owner.device)
        return prefix[self.owner] + self.suffix.kept()

    def width(self) -> int:
        if self._ragged_standalone():  # segments left-aligned: as wide as the longest one
            return int(self.kept().max()) if self.owner.numel() else 0
        return max((p.width() for p in self.prefixes), default=0) + self.suffix.width()

    def _ragged_standalone(self) -> bool:
        return not self.suffix.slot_state and any(isinstance(p, RaggedStorage) for p in self.prefixes)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[SharedStorage, StepView]:
        """The new tokens join each row's suffix; the step view is the suffix's (see the module docstring)."""
        suffix, view = self.suffix.append(keys, values, positions)
        return SharedStorage(self.prefixes, self.owner, suffix, self.reads, self.prefix_bytes), view  # a decode step

    def prune(
        self, indices: Tensor, counts: Tensor, values: Tensor | None = None, ragged: bool = False
    ) -> LayerStorage:
        return self.standalone().prune(indices, counts, values, ragged)

    def select_rows(self, rows: Tensor) -> SharedStorage:
        """The rows picked, reading the same prefixes (those no row reads any more are let go); suffixes copied."""
        rows = rows.to(self.owner.device)
        owner = self.owner[rows]
        used = torch.unique(owner)
        remap = torch.full((len(self.prefixes),), -1, dtype=torch.long, device=owner.device)
        remap[used] = torch.arange(used.numel(), device=owner.device)
        prefixes = tuple(self.prefixes[int(j)] for j in used)
        return SharedStorage(prefixes, remap[owner], self.suffix.select_rows(rows))

    def concat_rows(self, others: Sequence[LayerStorage]) -> LayerStorage:
        """Rows of shared storages join reading their prefixes as they are (a prefix read by rows of several parts
        is kept once); with a part of another layout, the rows join as `standalone()` copies."""
        if not all(isinstance(o, SharedStorage) for o in others):
            plain = [o.standalone() if isinstance(o, SharedStorage) else o for o in others]
            return self.standalone().concat_rows(plain)
        parts = [self, *(o for o in others if isinstance(o, SharedStorage))]
        prefixes: list[LayerStorage] = []
        index: dict[int, int] = {}  # id(prefix) -> its index in the joined storage
        owners = []
        for part in parts:
            mine = []
            for prefix in part.prefixes:
                if id(prefix) not in index:
                    index[id(prefix)] = len(prefixes)
                    prefixes.append(prefix)
                mine.append(index[id(prefix)])
            owners.append(torch.tensor(mine, dtype=torch.long, device=self.owner.device)[part.owner])
        suffix = self.suffix.concat_rows([p.suffix for p in parts[1:]])
        assert isinstance(suffix, DenseStorage)  # dense parts join in the dense layout
        return SharedStorage(tuple(prefixes), torch.cat(owners), suffix)

    def pack(self, rect: Tensor) -> Tensor:
        return self.standalone().pack(rect)

    def unpack(self, stored: Tensor, fill: float) -> Tensor:
        return self.standalone().unpack(stored, fill)  # `slot_state` and `pack` give the layout of `standalone()`

    def replace(self, **fields: Tensor | Mapping[str, Tensor]) -> LayerStorage:
        return self.standalone().replace(**fields)

    def settle(self) -> SharedStorage:
        return self  # full precision: nothing waits to be quantized

    def kv_tensors(self) -> list[Tensor]:
        """The prefixes' tensors (each once, however many rows read it) and the suffix's."""
        return [t for p in self.prefixes for t in p.kv_tensors()] + self.suffix.kv_tensors()

    def nbytes(self) -> int:
        """Bytes of the prefixes read (each counted once) and of the rows' own tokens."""
        return self.prefix_bytes + self.suffix.nbytes()

    def metadata_tensors(self) -> list[Tensor]:
        """The prefixes' bookkeeping (each once), the suffix's and the owner index."""
        return [t for p in self.prefixes for t in p.metadata_tensors()] + [*self.suffix.metadata_tensors(), self.owner]

    def padding_slots(self) -> int:
        """Empty slots stored: the prefixes' own and the suffix's (the rectangle of `view()` has more, not stored)."""
        return sum(p.padding_slots() for p in self.prefixes) + self.suffix.padding_slots()

    def to_tensors(self) -> dict[str, Tensor]:
        return self.standalone().to_tensors()
