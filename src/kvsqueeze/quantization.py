"""Asymmetric integer quantization of cached keys and values in groups, and packing of the codes into bytes, as KIVI
does it (Liu et al. 2024, arXiv 2402.02750): pure tensor functions and containers, used by `storage/quantized.py`.

A group of numbers x shares a zero point m = min(x) and a scale s = (max(x) - min(x)) / (2^bits - 1). Each number is
stored as the code q = round((x - m) / s), in [0, 2^bits - 1], and read back as q s + m, so round-to-nearest errs by
at most s / 2 per number. That bound is exact (up to float rounding) when the cache is float32; in a 16-bit cache,
m and s are stored in that dtype and their own rounding adds to it. A constant group has s = 0 and reads back exactly.

Keys are quantized per channel: a group is one channel of G consecutive tokens (their outlier channels stay apart).
Values are quantized per token: a group is G consecutive channels of one token (a last group of fewer channels is
padded with copies of its last channel, which changes neither its min nor its max).

Codes of 2 or 4 bits are packed along the last dim, four or two to a uint8 byte, the first code in the low bits; a
last byte left part-empty holds zero codes. 8-bit codes are the bytes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvsqueeze.validation import check_choice, check_int

__all__ = [
    "BITS",
    "GROUP_TENSORS",
    "QuantSpec",
    "TokenGroups",
    "dequantize",
    "pack_codes",
    "packed_width",
    "quant_spec",
    "quantize",
    "unpack_codes",
]

BITS = (2, 4, 8)
GROUP_TENSORS = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")  # TokenGroups


@dataclass(frozen=True)
class QuantSpec:
    """How a quantized cache stores its keys and values. Errors name the arguments users pass (`kv_bits` ...)."""

    bits: int = 4  # bits per key/value code: 2, 4 or 8
    group_size: int = 32  # G: tokens per key group, channels per value group
    residual: int = 64  # newest tokens per (row, head) kept in full precision

    def __post_init__(self) -> None:
        check_int("kv_bits", self.bits, note="bits per cached key/value: 2, 4 or 8")
        check_choice("kv_bits", self.bits, BITS)
        check_int("kv_group_size", self.group_size, 1, note="tokens per key group, channels per value group")
        check_int("kv_residual", self.residual, 0, note="newest tokens kept in full precision")


def quant_spec(kv_bits: int | None, kv_group_size: int = 32, kv_residual: int = 64) -> QuantSpec | None:
    """The spec of these user-facing arguments, all checked (ValueError naming the bad one); None when kv_bits is
    None (full precision)."""
    if kv_bits is not None:
        return QuantSpec(kv_bits, kv_group_size, kv_residual)
    QuantSpec(BITS[0], kv_group_size, kv_residual)  # checks the other two
    return None


def packed_width(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits."""
    return (n * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., n) in [0, 2^bits) -> (..., packed_width(n, bits)) uint8, 8 // bits codes per byte."""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    fields = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per) << shifts
    return fields.sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of `pack_codes`: (..., packed_width(n, bits)) uint8 -> (..., n) uint8 codes."""
    per = 8 // bits
    if per == 1:
        return packed[..., :n]
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    fields = (packed[..., None] >> shifts) & (2**bits - 1)  # (..., bytes, per) uint8
    return fields.flatten(-2)[..., :n]


def quantize(x: Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize x in groups along `dim`: (codes uint8 of x's shape, scale, zero point), the last two of x's shape
    with `dim` reduced to 1 and stored in `dtype`. Codes are computed from the stored scale and zero point."""
    xf = x.float()
    low = xf.amin(dim=dim, keepdim=True)
    scale = ((xf.amax(dim=dim, keepdim=True) - low) / (2**bits - 1)).to(dtype)
    zero = low.to(dtype)
    s = scale.float()
    codes = torch.round((xf - zero.float()) / torch.where(s > 0, s, 1.0)).clamp_(0, 2**bits - 1)
    codes = torch.where(s > 0, codes, 0.0)  # a constant group: every code 0, read back as the zero point
    return codes.to(torch.uint8), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes * scale + zero point (broadcast), computed in float32, returned in the scale's dtype."""
    out = codes.to(torch.float32).mul_(scale).add_(zero)
    return out.to(scale.dtype)


def _channel_groups(x: Tensor, size: int) -> Tensor:
    """(..., C) -> (..., ceil(C / size), size), a last short group padded with copies of the last channel."""
    pad = (-x.shape[-1]) % size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.view(*x.shape[:-1], x.shape[-1] // size, size)


@dataclass(frozen=True)
class TokenGroups:
    """M groups of G consecutive tokens of one (row, head), quantized: keys per channel, values per token.

    key_codes    (M, G, packed_width(D, bits))   uint8     key_scale, key_zero      (M, D)
    value_codes  (M, G, packed_width(Dv, bits))  uint8     value_scale, value_zero  (M, G, ceil(Dv / G))

    Tokens are numbered group after group: token g G + r is row r of group g.
    """

    key_codes: Tensor
    key_scale: Tensor
    key_zero: Tensor
    value_codes: Tensor
    value_scale: Tensor
    value_zero: Tensor
    bits: int
    value_dim: int  # Dv (a packed width does not tell it)

    @property
    def group_size(self) -> int:
        return self.key_codes.shape[1]

    @property
    def key_dim(self) -> int:
        return self.key_scale.shape[-1]

    def __len__(self) -> int:
        return self.key_codes.shape[0]

    @classmethod
    def empty(cls, group_size: int, key_dim: int, value_dim: int, bits: int, like: Tensor) -> TokenGroups:
        """No groups, scales in the dtype and on the device of `like`."""
        return cls.quantize(like.new_empty(0, group_size, key_dim), like.new_empty(0, group_size, value_dim), bits)

    @classmethod
    def quantize(cls, keys: Tensor, values: Tensor, bits: int) -> TokenGroups:
        """Quantize keys (M, G, D) and values (M, G, Dv), scales and zero points in their dtype."""
        key_codes, key_scale, key_zero = quantize(keys, bits, dim=1, dtype=keys.dtype)
        value_codes, value_scale, value_zero = _quantize_values(values, bits, keys.shape[1])
        return cls(
            pack_codes(key_codes, bits),
            key_scale.squeeze(1),
            key_zero.squeeze(1),
            value_codes,
            value_scale,
            value_zero,
            bits,
            values.shape[-1],
        )

    def with_keys(self, keys: Tensor) -> TokenGroups:
        """The same groups with keys (M, G, D') quantized anew (e.g. re-rotated or narrowed); values unchanged."""
        codes, scale, zero = quantize(keys, self.bits, dim=1, dtype=keys.dtype)
        return replace(
            self, key_codes=pack_codes(codes, self.bits), key_scale=scale.squeeze(1), key_zero=zero.squeeze(1)
        )

    def with_values(self, values: Tensor) -> TokenGroups:
        """The same groups with values (M, G, Dv) quantized anew; keys unchanged."""
        codes, scale, zero = _quantize_values(values, self.bits, self.group_size)
        return replace(self, value_codes=codes, value_scale=scale, value_zero=zero, value_dim=values.shape[-1])

    def dequantize(self, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(keys (n, D), values (n, Dv)) of the tokens numbered `tokens` (n,) long; every token (n = M G) when None."""
        return self.dequantize_keys(tokens), self.dequantize_values(tokens)

    def dequantize_keys(self, tokens: Tensor | None = None) -> Tensor:
        """Keys (n, D) of the tokens numbered `tokens`, all when None (codes against their group's scales, float32
        work)."""
        if tokens is None:  # (M, G, D) codes against (M, 1, D) scales
            codes, scale, zero = self.key_codes, self.key_scale[:, None, :], self.key_zero[:, None, :]
        else:
            group = tokens // self.group_size
            codes, scale, zero = self.key_codes.flatten(0, 1)[tokens], self.key_scale[group], self.key_zero[group]
        return dequantize(unpack_codes(codes, self.bits, self.key_dim), scale, zero).reshape(-1, self.key_dim)

    def dequantize_values(self, tokens: Tensor | None = None) -> Tensor:
        """Values (n, Dv) of the tokens numbered `tokens`, all when None."""
        codes, scale, zero = (t.flatten(0, 1) for t in (self.value_codes, self.value_scale, self.value_zero))
        if tokens is not None:
            codes, scale, zero = codes[tokens], scale[tokens], zero[tokens]
        grouped = _channel_groups(unpack_codes(codes, self.bits, self.value_dim), self.group_size)  # (n, Dv/G, G)
        return dequantize(grouped, scale[..., None], zero[..., None]).flatten(-2)[..., : self.value_dim]

    def take(self, groups: Tensor) -> TokenGroups:
        """The groups numbered `groups` (long indices, may repeat), in that order."""
        return replace(self, **{name: getattr(self, name)[groups] for name in GROUP_TENSORS})

    def cat(self, other: TokenGroups) -> TokenGroups:
        """These groups followed by `other`'s."""
        parts = {name: torch.cat([getattr(self, name), getattr(other, name)]) for name in GROUP_TENSORS}
        return replace(self, **parts)  # type: ignore[arg-type]

    def tensors(self) -> dict[str, Tensor]:
        """The six tensors by field name."""
        return {name: getattr(self, name) for name in GROUP_TENSORS}


def _quantize_values(values: Tensor, bits: int, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values (..., Dv) per token in groups of `size` channels: packed codes (..., bytes) and scale, zero point
    (..., ceil(Dv / size))."""
    codes, scale, zero = quantize(_channel_groups(values, size), bits, dim=-1, dtype=values.dtype)
    codes = codes.flatten(-2)[..., : values.shape[-1]]
    return pack_codes(codes, bits), scale.squeeze(-1), zero.squeeze(-1)
