"""The quantized layout (KIVI, Liu et al. 2024, arXiv 2402.02750): each (row, head) segment holds its oldest tokens
in groups of G quantized to 2, 4 or 8 bits (keys per channel, values per token; `kvsqueeze.quantization`) and its
newest ones in full precision.

    lengths     (B, H)   int64  tokens held per (row, head) segment: its grouped tokens first, then its residual ones
    groups      (B, H)   int64  quantized groups per segment (G tokens each: the segment's oldest)
    positions   (N,)     int32  every token, segment after segment in (row, head) order, each in slot order
    codes       TokenGroups     all groups, segment after segment, oldest first (codes, scales and zero points)
    residual_keys (R, D), residual_values (R, Dv)   each segment's newest tokens in full precision, segment after
                                segment; R = sum(lengths - G groups)
    slot_state  name -> (N,)

Rectangular and ragged layers alike. The layout is segment-based like the ragged one: every (row, head) segment holds
exactly its own tokens (pad tokens are not stored), so heads and rows that keep different counts after per-head
pruning need nothing special, and a group never straddles two segments. `view()` is left-aligned, empty slots -1.

When tokens are quantized. New tokens join their segment's residual in full precision. `settle()` then quantizes,
per segment, the oldest residual tokens in whole groups while the residual holds at least `residual` + G tokens, so
the newest `residual` tokens always stay exact and at most `residual` + G - 1 do. `KVCache` settles every layer when
a forward ends, after the compression hooks have run, so a method scores this forward's keys and values in full
precision, eviction runs, then what is kept is quantized. Chunked prefill and decoding: the tokens of earlier forwards
are already quantized when a later forward scores them.

Pruning. At prefill nothing is quantized yet: the plan picks among full-precision tokens and what it keeps is
quantized once (`prune` settles). A later plan (chunked prefill, decoding-time compression) may cut into groups: a
group kept whole, with every earlier group of its segment kept whole too, keeps its codes; the kept tokens of the
other groups are dequantized into the residual (a segment's grouped tokens come first) and quantized again in new
groups at once, so that no pruned layer waits in full precision for the end of the forward. Such a token errs by up
to s1 / 2 + s2 / 2 (its old group's scale and its new one's). Replaced values (value merging) are quantized anew, and
so are keys that `replace` rewrites (key re-rotation, ThinK's thin keys), from their dequantized values.

Memory. `nbytes()` counts what is held: packed codes, scales and zero points (in the cache's dtype) and the
residual, so per group of G tokens G ceil(D bits / 8) + 2 D e bytes of keys and G ceil(Dv bits / 8) +
2 G ceil(Dv / G) e of values (e bytes per element of the cache's dtype), plus (D + Dv) e per residual token.
`view()` (and the step view `append` returns to attention) dequantizes into a transient rectangular copy, the layer's
full-precision size, plus while it runs the dequantized groups of either keys or values (float32 work): about 1.5
times the layer's full-precision size at the peak (measured: `benchmarks/quantized_layer.py`), one layer at a time
(attention lets the step view go when the layer is done). `keys` / `values` are transient flat (N, ...) copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch
from torch import Tensor

from kvsqueeze.quantization import GROUP_TENSORS, QuantSpec, TokenGroups
from kvsqueeze.storage.base import NO_STATE, LayerStorage, StepView, check_alike, concat_slot_states
from kvsqueeze.storage.quantized_file import checked_tensors
from kvsqueeze.storage.ragged import segment_starts, unpack
from kvsqueeze.storage.segments import merge_order, offsets, segment_ids, take_segments

__all__ = ["QuantizedStorage"]


@dataclass(frozen=True)
class QuantizedStorage:
    """Quantized groups plus a full-precision residual per (row, head) segment (see the module docstring)."""

    spec: QuantSpec
    lengths: Tensor  # (B, H) int64
    groups: Tensor  # (B, H) int64
    positions: Tensor  # (N,) int32
    codes: TokenGroups
    residual_keys: Tensor  # (R, D)
    residual_values: Tensor  # (R, Dv)
    slot_state: Mapping[str, Tensor] = field(default_factory=lambda: NO_STATE)  # name -> (N,)

    is_ragged = True  # no empty slots are stored

    @classmethod
    def empty(cls, keys: Tensor, values: Tensor, spec: QuantSpec) -> QuantizedStorage:
        """No tokens yet, with the batch, heads, dims, dtype and device of these (B, H, q, D) tensors."""
        b, h, _, d = keys.shape
        counts = torch.zeros(b, h, dtype=torch.long, device=keys.device)
        codes = TokenGroups.empty(spec.group_size, d, values.shape[-1], spec.bits, keys)
        positions = torch.empty(0, dtype=torch.int32, device=keys.device)
        return cls(
            spec, counts, counts.clone(), positions, codes, keys.new_empty(0, d), values.new_empty(0, values.shape[-1])
        )

    @classmethod
    def from_storage(cls, storage: LayerStorage, spec: QuantSpec) -> QuantizedStorage:
        """The tokens of any storage (its stored key width), quantized with `spec`; slot states follow."""
        if isinstance(storage, QuantizedStorage) and storage.spec == spec:
            return storage
        keys, values, positions = storage.view()
        filled = positions >= 0
        state = {name: storage.unpack(s, 0.0)[filled] for name, s in storage.slot_state.items()}
        lengths = filled.sum(dim=-1)
        codes = TokenGroups.empty(spec.group_size, keys.shape[-1], values.shape[-1], spec.bits, keys)
        stored = cls(spec, lengths, torch.zeros_like(lengths), positions[filled], codes, keys[filled], values[filled])
        return replace(stored, slot_state=MappingProxyType(state)).settle()

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], heads: int, key_width: int, value_dim: int
    ) -> QuantizedStorage:
        """Rebuild from `to_tensors` output read back from a file, checking every tensor (ValueError if wrong)."""
        spec, parts = checked_tensors(tensors, heads, key_width, value_dim)
        codes = TokenGroups(**{n: parts[n] for n in GROUP_TENSORS}, bits=spec.bits, value_dim=value_dim)
        return cls(
            spec,
            parts["lengths"].long(),
            parts["groups"].long(),
            parts["positions"].to(torch.int32),
            codes,
            parts["residual_keys"],
            parts["residual_values"],
        )

    # -- where each token sits
    def _grouped(self) -> Tensor:
        """(N,) bool: the token sits in a quantized group (else in the residual)."""
        counts = self.lengths.flatten()
        return offsets(counts) < (self.groups.flatten() * self.spec.group_size)[segment_ids(counts)]

    def _residual_counts(self) -> Tensor:
        """(S,) residual tokens per segment."""
        return (self.lengths - self.groups * self.spec.group_size).flatten()

    def _flat(self) -> tuple[Tensor, Tensor]:
        """Every token's keys (N, D) and values (N, Dv), dequantized, segment after segment (transient)."""
        grouped = self._grouped()
        group_keys, group_values = self.codes.dequantize()
        keys = self.residual_keys.new_empty(grouped.shape[0], self.residual_keys.shape[-1])
        values = self.residual_values.new_empty(grouped.shape[0], self.residual_values.shape[-1])
        keys[grouped], keys[~grouped] = group_keys, self.residual_keys
        values[grouped], values[~grouped] = group_values, self.residual_values
        return keys, values

    @property
    def keys(self) -> Tensor:
        """(N, D) every token's keys, dequantized (a transient copy; the bytes held are `kv_tensors()`)."""
        return self._flat()[0]

    @property
    def values(self) -> Tensor:
        """(N, Dv) every token's values, dequantized (a transient copy)."""
        return self._flat()[1]

    def view(self) -> StepView:
        return self._rect(0)

    def _rect(self, extra: int) -> StepView:
        """The rectangular form with `extra` empty slots after the longest segment: every token dequantized straight
        into its slot (transient)."""
        slots = torch.arange(self.width() + extra, device=self.lengths.device)[None, None, :]
        filled = slots < self.lengths[..., None]  # (B, H, T)
        grouped = slots < (self.groups * self.spec.group_size)[..., None]  # each segment's grouped tokens come first
        parts = []
        for dequantize, residual in (
            (self.codes.dequantize_keys, self.residual_keys),
            (self.codes.dequantize_values, self.residual_values),
        ):
            rect = residual.new_zeros(*filled.shape, residual.shape[-1])
            rect[grouped] = dequantize()  # one of keys / values at a time
            rect[filled & ~grouped] = residual
            parts.append(rect)
        positions = self.positions.new_full(filled.shape, -1)
        positions[filled] = self.positions
        return parts[0], parts[1], positions

    def kept(self) -> Tensor:
        return self.lengths.clone()

    def width(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    # -- verbs
    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[QuantizedStorage, StepView]:
        """Add the real new tokens to their segments' residual in full precision (`settle` quantizes later)."""
        b, h, q, _ = keys.shape
        width = self.width()
        step = self._rect(q)  # the past left-aligned, then the q new slots
        for rect, new in zip(step, (keys, values, positions), strict=True):
            rect[:, :, width:] = new
        real = positions >= 0  # (B, H, q)
        new = torch.arange(b * h, device=keys.device).view(b, h, 1).expand(b, h, q)[real]  # segment of each new token
        order = merge_order(segment_ids(self.lengths.flatten()), new)
        residual_order = merge_order(segment_ids(self._residual_counts()), new)
        state = {name: torch.cat([s, s.new_zeros(new.shape[0])])[order] for name, s in self.slot_state.items()}
        stored = replace(
            self,
            lengths=self.lengths + real.sum(dim=-1),
            positions=torch.cat([self.positions, positions[real].to(torch.int32)])[order],
            residual_keys=torch.cat([self.residual_keys, keys[real].to(self.residual_keys.dtype)])[residual_order],
            residual_values=torch.cat([self.residual_values, values[real].to(self.residual_values.dtype)])[
                residual_order
            ],
            slot_state=MappingProxyType(state),
        )
        return stored, step

    def settle(self) -> QuantizedStorage:
        """Quantize each segment's oldest residual tokens, in whole groups, while it holds >= residual + G of them."""
        g = self.spec.group_size
        counts = self._residual_counts()
        move = (counts - self.spec.residual).clamp(min=0) // g  # (S,) groups to quantize per segment
        if not bool(move.any()):
            return self
        moving = offsets(counts) < (move * g)[segment_ids(counts)]  # (R,) the oldest whole groups of each residual
        d, dv = self.residual_keys.shape[-1], self.residual_values.shape[-1]
        fresh = TokenGroups.quantize(
            self.residual_keys[moving].view(-1, g, d), self.residual_values[moving].view(-1, g, dv), self.spec.bits
        )
        order = merge_order(segment_ids(self.groups.flatten()), segment_ids(move))
        return replace(
            self,
            groups=self.groups + move.view_as(self.groups),
            codes=self.codes.cat(fresh).take(order),
            residual_keys=self.residual_keys[~moving],
            residual_values=self.residual_values[~moving],
        )

    def prune(
        self, indices: Tensor, counts: Tensor, values: Tensor | None = None, ragged: bool = True
    ) -> QuantizedStorage:
        """Keep the planned slots (always exactly, whatever `ragged`), then settle (see the module docstring)."""
        k = indices.shape[-1]
        filled = torch.arange(k, device=indices.device)[None, None, :] < counts[:, :, None]  # (B, H, K)
        flat = (segment_starts(self.lengths)[..., None] + indices)[filled]  # (N',) kept tokens in (row, head) order
        grouped = self._grouped()
        kept_groups = self._groups_kept(flat, grouped, indices, filled, values is None)  # (NG,) bool
        in_kept_group = torch.zeros_like(grouped)
        in_kept_group[grouped] = kept_groups.repeat_interleave(self.spec.group_size)
        rest = flat[~in_kept_group[flat]]  # kept tokens that go to the residual, in kept order
        if values is None:
            residual_keys, residual_values = self._tokens(rest, grouped)
        else:  # value merging: no group is kept, so `rest` is `flat`
            residual_keys = self._tokens(rest, grouped)[0]
            residual_values = values[filled].to(self.residual_values.dtype)
        segments = segment_ids(self.groups.flatten())
        groups = torch.zeros_like(self.groups.flatten()).index_add_(0, segments, kept_groups.long())
        state = {name: s[flat] for name, s in self.slot_state.items()}
        pruned = replace(
            self,
            lengths=counts.to(torch.long).clone(),
            groups=groups.view_as(self.groups),
            positions=self.positions[flat],
            codes=self.codes.take(kept_groups.nonzero().flatten()),
            residual_keys=residual_keys,
            residual_values=residual_values,
            slot_state=MappingProxyType(state),
        )
        return pruned.settle()

    def _groups_kept(self, flat: Tensor, grouped: Tensor, indices: Tensor, filled: Tensor, same: bool) -> Tensor:
        """(NG,) the groups that keep their codes: kept whole, after only whole groups of their segment, with
        slots kept in order and values not replaced (`same`)."""
        n_groups = len(self.codes)
        in_order = bool(((indices[..., 1:] > indices[..., :-1]) | ~filled[..., 1:]).all())
        if not same or not in_order or n_groups == 0:
            return torch.zeros(n_groups, dtype=torch.bool, device=grouped.device)
        kept = torch.zeros_like(grouped)
        kept[flat] = True
        broken = (~kept[grouped].view(n_groups, self.spec.group_size).all(dim=1)).long()  # (NG,)
        segments = segment_ids(self.groups.flatten())
        per_segment = torch.zeros_like(self.groups.flatten()).index_add_(0, segments, broken)
        before = (per_segment.cumsum(0) - per_segment)[segments]  # broken groups in earlier segments
        return (broken.cumsum(0) - before) == 0  # no broken group up to this one in its segment

    def _tokens(self, tokens: Tensor, grouped: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the tokens numbered `tokens` (flat order), dequantizing those in groups."""
        in_group = grouped[tokens]
        group_rank, residual_rank = grouped.long().cumsum(0) - 1, (~grouped).long().cumsum(0) - 1
        keys = self.residual_keys.new_empty(tokens.shape[0], self.residual_keys.shape[-1])
        values = self.residual_values.new_empty(tokens.shape[0], self.residual_values.shape[-1])
        keys[in_group], values[in_group] = self.codes.dequantize(group_rank[tokens[in_group]])
        keys[~in_group] = self.residual_keys[residual_rank[tokens[~in_group]]]
        values[~in_group] = self.residual_values[residual_rank[tokens[~in_group]]]
        return keys, values

    def select_rows(self, rows: Tensor) -> QuantizedStorage:
        h = self.lengths.shape[1]
        rows = rows.to(self.lengths.device)
        segments = (rows[:, None] * h + torch.arange(h, device=rows.device)).flatten()
        tokens = take_segments(self.lengths.flatten(), segments)
        residual = take_segments(self._residual_counts(), segments)
        return replace(
            self,
            lengths=self.lengths[rows],
            groups=self.groups[rows],
            positions=self.positions[tokens],
            codes=self.codes.take(take_segments(self.groups.flatten(), segments)),
            residual_keys=self.residual_keys[residual],
            residual_values=self.residual_values[residual],
            slot_state=MappingProxyType({name: s[tokens] for name, s in self.slot_state.items()}),
        )

    def concat_rows(self, others: Sequence[LayerStorage]) -> QuantizedStorage:
        """Segments, groups and residuals are all stored segment after segment in (row, head) order, so joining
        rows joins each of them, codes kept as they are. Only quantized rows of the same spec join."""
        parts: list[QuantizedStorage] = [self]
        for other in others:
            if not isinstance(other, QuantizedStorage) or other.spec != self.spec:
                got = other.spec if isinstance(other, QuantizedStorage) else type(other).__name__
                raise ValueError(f"rows quantized with {self.spec} join only rows quantized alike, not {got}")
            parts.append(other)
        check_alike("heads", (p.lengths.shape[1] for p in parts))
        check_alike("key channels", (p.residual_keys.shape[-1] for p in parts))
        check_alike("value channels", (p.residual_values.shape[-1] for p in parts))
        check_alike("dtypes", (p.residual_keys.dtype for p in parts))
        codes = self.codes
        for part in parts[1:]:
            codes = codes.cat(part.codes)
        return replace(
            self,
            lengths=torch.cat([p.lengths for p in parts]),
            groups=torch.cat([p.groups for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
            codes=codes,
            residual_keys=torch.cat([p.residual_keys for p in parts]),
            residual_values=torch.cat([p.residual_values for p in parts]),
            slot_state=concat_slot_states([(p.slot_state, p.positions) for p in parts]),
        )

    def pack(self, rect: Tensor) -> Tensor:
        t = self.width()
        filled = torch.arange(t, device=self.lengths.device)[None, None, :] < self.lengths[..., None]  # (B, H, T)
        if rect.shape[:3] != filled.shape:
            raise ValueError(f"shape {tuple(rect.shape)} does not match the layer's view {tuple(filled.shape)}")
        return rect[filled]

    def unpack(self, stored: Tensor, fill: float) -> Tensor:
        return unpack(stored, self.lengths, fill)

    def replace(self, **fields: Tensor | Mapping[str, Tensor]) -> QuantizedStorage:
        """keys (N, D') / values (N, Dv) in the flat layout of `keys` are quantized anew (the grouped tokens);
        positions and slot_state are set as given."""
        keys, values = fields.pop("keys", None), fields.pop("values", None)
        grouped, g = self._grouped(), self.spec.group_size
        codes, stored = self.codes, self
        for name, new in (("keys", keys), ("values", values)):
            if new is None:
                continue
            assert isinstance(new, Tensor)
            if new.dim() != 2 or new.shape[0] != grouped.shape[0]:
                raise ValueError(f"{name} {tuple(new.shape)} do not match the layer's {grouped.shape[0]} tokens")
            part = new[grouped].view(-1, g, new.shape[-1])
            codes = codes.with_keys(part) if name == "keys" else codes.with_values(part)
            stored = replace(stored, **{f"residual_{name}": new[~grouped].contiguous()})  # type: ignore[arg-type]
        return replace(stored, codes=codes, **fields)  # type: ignore[arg-type]

    def kv_tensors(self) -> list[Tensor]:
        return [*self.codes.tensors().values(), self.residual_keys, self.residual_values]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_tensors())

    def metadata_tensors(self) -> list[Tensor]:
        return [self.positions, self.lengths, self.groups]

    def padding_slots(self) -> int:
        return 0

    def to_tensors(self) -> dict[str, Tensor]:
        spec = torch.tensor([self.spec.bits, self.spec.group_size, self.spec.residual], dtype=torch.long)
        return {
            "quant": spec,
            "lengths": self.lengths,
            "groups": self.groups,
            "positions": self.positions,
            **self.codes.tensors(),
            "residual_keys": self.residual_keys,
            "residual_values": self.residual_values,
        }
