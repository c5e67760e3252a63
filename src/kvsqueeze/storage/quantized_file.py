"""The checks a quantized layer read back from a file passes (`QuantizedStorage.from_tensors`): its spec, every
tensor's shape and dtype (uint8 codes, finite float scales >= 0, zero points and residual), group counts that fit the
token counts, and positions in slot order. Every failure is a ValueError saying what is wrong."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kvsqueeze.quantization import GROUP_TENSORS, QuantSpec, packed_width
from kvsqueeze.storage.base import check_names, check_positions, check_tensor
from kvsqueeze.storage.ragged import unpack

__all__ = ["checked_tensors"]


def checked_tensors(
    tensors: Mapping[str, Tensor], heads: int, key_width: int, value_dim: int
) -> tuple[QuantSpec, Mapping[str, Tensor]]:
    """The spec and the tensors of a saved quantized layer, every shape, dtype and count checked (ValueError)."""
    counts = ("lengths", "groups", "positions")
    check_names(tensors, {"quant", *counts, *GROUP_TENSORS, "residual_keys", "residual_values"})
    check_tensor("quant", tensors["quant"], (3,), floating=False)
    spec = QuantSpec(*(int(x) for x in tensors["quant"].tolist()))
    g, lengths, groups = spec.group_size, tensors["lengths"], tensors["groups"]
    check_tensor("lengths", lengths, (None, heads), floating=False)
    check_tensor("groups", groups, tuple(lengths.shape), floating=False)
    if bool((groups < 0).any()) or bool((groups * g > lengths).any()):
        raise ValueError(f"groups must be >= 0 and hold at most lengths tokens ({g} per group)")
    n, n_groups = int(lengths.sum()), int(groups.sum())
    check_tensor("positions", tensors["positions"], (n,), floating=False)
    shapes = {
        "key_codes": (n_groups, g, packed_width(key_width, spec.bits)),
        "key_scale": (n_groups, key_width),
        "key_zero": (n_groups, key_width),
        "value_codes": (n_groups, g, packed_width(value_dim, spec.bits)),
        "value_scale": (n_groups, g, -(-value_dim // g)),
        "value_zero": (n_groups, g, -(-value_dim // g)),
        "residual_keys": (n - n_groups * g, key_width),
        "residual_values": (n - n_groups * g, value_dim),
    }
    for name, shape in shapes.items():
        check_tensor(name, tensors[name], shape, floating=not name.endswith("codes"))
        if name.endswith("codes") and tensors[name].dtype != torch.uint8:
            raise ValueError(f"{name} has dtype {tensors[name].dtype}, expected torch.uint8")
        if name.endswith("scale") and bool((tensors[name] < 0).any()):
            raise ValueError(f"{name} must be >= 0")
    positions, lengths = tensors["positions"].long(), lengths.long()
    check_positions(unpack(positions, lengths, -1), unpack(torch.ones_like(positions, dtype=torch.bool), lengths, 0))
    return spec, tensors
