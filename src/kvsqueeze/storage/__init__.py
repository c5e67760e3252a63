"""Storage layouts of one attention layer's cache, behind one protocol (`LayerStorage`, see `storage.base`)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from kvsqueeze.storage.base import LayerStorage, StepView, check_tensor, storage_bytes
from kvsqueeze.storage.dense import DenseStorage
from kvsqueeze.storage.quantized import QuantizedStorage
from kvsqueeze.storage.ragged import RaggedStorage, segment_starts, unpack
from kvsqueeze.storage.shared import SharedStorage
from kvsqueeze.storage.thin import KeyChannels

__all__ = [
    "DenseStorage",
    "KeyChannels",
    "LayerStorage",
    "QuantizedStorage",
    "RaggedStorage",
    "SharedStorage",
    "StepView",
    "check_tensor",
    "from_tensors",
    "segment_starts",
    "storage_bytes",
    "unpack",
]


def from_tensors(tensors: Mapping[str, Tensor], heads: int, key_width: int, value_dim: int) -> LayerStorage:
    """Rebuild a storage saved by its `to_tensors` (a `quant` entry marks the quantized layout, else `lengths` the
    ragged one), checking that it holds `heads` KV heads, keys of `key_width` channels and values of `value_dim`: a
    ValueError says what is wrong."""
    layout: type[DenseStorage] | type[RaggedStorage] | type[QuantizedStorage] = DenseStorage
    if "quant" in tensors:
        layout = QuantizedStorage
    elif "lengths" in tensors:
        layout = RaggedStorage
    return layout.from_tensors(tensors, heads, key_width, value_dim)
