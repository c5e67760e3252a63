"""Thin keys (ThinK, arXiv 2407.21018): a layer that stores only D' < D of its key channels, chosen per (row, head).

    channels  (B, H, D')  int64 kept channel indices of each (row, head), distinct and ascending
    dim       int         D, the model's head dim (queries keep it; attention still scales by 1/sqrt(D))

Keys are then stored with D' channels in any layout; values keep all theirs. Tokens appended later are narrowed to the
same channels (`narrow`), so decoding saves too. Attention gathers the matching query channels (`queries`), so q.k
over the kept channels is exact; `widen` puts keys back at full width with zeros in the pruned channels (the same
q.k), so scorers and later compressions see what attention sees. Works on any storage layout through its
`pack`/`unpack`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.storage.base import LayerStorage

__all__ = ["KeyChannels"]


@dataclass(frozen=True)
class KeyChannels:
    """The key channels one layer keeps (see the module docstring)."""

    channels: Tensor  # (B, H, D') long
    dim: int  # D

    @classmethod
    def checked(cls, channels: Tensor, batch: int, heads: int, dim: int, device: torch.device) -> KeyChannels:
        """Validate `channels` (1 or B, H, D') against a layer of `batch` rows, `heads` heads and head dim `dim`."""
        channels = channels.to(device=device, dtype=torch.long)
        if channels.dim() != 3 or channels.shape[0] not in (1, batch) or channels.shape[1] != heads:
            raise ValueError(f"key channels must be (1 or {batch}, {heads}, D'), got shape {tuple(channels.shape)}")
        ordered = bool((channels[..., 1:] > channels[..., :-1]).all())
        if not 0 < channels.shape[-1] < dim or not ordered or int(channels.min()) < 0 or int(channels.max()) >= dim:
            raise ValueError(f"key channels must be fewer than {dim}, distinct, ascending and in [0, {dim})")
        return cls(channels.expand(batch, heads, -1).contiguous(), dim)

    def narrow(self, keys: Tensor) -> Tensor:
        """Keys (B, H, q, D) -> (B, H, q, D'): the kept channels of new tokens."""
        return keys.gather(-1, self.channels[:, :, None, :].expand(*keys.shape[:3], -1))

    def narrow_stored(self, storage: LayerStorage) -> Tensor:
        """The storage's keys, every token narrowed to its (row, head)'s channels, in the stored layout."""
        b, h, _ = self.channels.shape
        per_slot = self.channels[:, :, None, :].expand(b, h, storage.width(), -1)  # (B, H, T, D')
        return storage.keys.gather(-1, storage.pack(per_slot))

    def widen(self, keys: Tensor) -> Tensor:
        """Keys (B, H, T, D') -> (B, H, T, D), zeros in the pruned channels (a transient copy)."""
        idx = self.channels[:, :, None, :].expand(*keys.shape[:3], -1)
        return keys.new_zeros(*keys.shape[:3], self.dim).scatter_(-1, idx, keys)

    def queries(self, query: Tensor) -> Tensor:
        """Queries (B, H_q, q, D) -> (B, H_q, q, D'): the channels kept of their KV head's keys."""
        b, hq, q, _ = query.shape
        channels = self.channels.repeat_interleave(hq // self.channels.shape[1], dim=1)  # (B, H_q, D')
        return query.gather(-1, channels.to(query.device)[:, :, None, :].expand(b, hq, q, -1))

    def select_rows(self, rows: Tensor) -> KeyChannels:
        return KeyChannels(self.channels[rows.to(self.channels.device)], self.dim)

    def concat_rows(self, others: list[KeyChannels]) -> KeyChannels:
        """These rows' channels, then each of `others`' (every part keeping as many channels of the same D)."""
        parts = [self, *others]
        widths = {(p.channels.shape[1:], p.dim) for p in parts}
        if len(widths) > 1:
            raise ValueError(f"cannot join rows keeping different key channels (heads, kept, D): {sorted(widths)}")
        return KeyChannels(torch.cat([p.channels for p in parts]), self.dim)
