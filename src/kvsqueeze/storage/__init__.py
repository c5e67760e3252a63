"""Storage layouts of one attention layer's cache, behind one protocol (`LayerStorage`, see `storage.base`)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.storage.base import LayerStorage, StepView, storage_bytes
from kvsqueeze.storage.dense import DenseStorage
from kvsqueeze.storage.ragged import RaggedStorage, segment_starts, unpack
from kvsqueeze.storage.thin import KeyChannels

__all__ = [
    "DenseStorage",
    "KeyChannels",
    "LayerStorage",
    "RaggedStorage",
    "StepView",
    "from_tensors",
    "segment_starts",
    "storage_bytes",
    "unpack",
]


def from_tensors(tensors: dict[str, Tensor]) -> LayerStorage:
    """Rebuild a storage saved by its `to_tensors` (a `lengths` entry marks the ragged layout)."""
    positions = tensors["positions"].to(torch.int32)
    if "lengths" in tensors:
        return RaggedStorage(tensors["keys"], tensors["values"], positions, tensors["lengths"].long())
    return DenseStorage(tensors["keys"], tensors["values"], positions)
