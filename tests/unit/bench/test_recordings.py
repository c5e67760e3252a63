"""The recording store: hits by context, LRU eviction by bytes, sizes from the tensors held."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvsqueeze.bench.recordings import RecordingStore, tensor_bytes


@dataclass
class Held:
    a: torch.Tensor
    b: dict


def test_tensor_bytes_counts_each_storage_once() -> None:
    t = torch.zeros(10, dtype=torch.float32)
    assert tensor_bytes(Held(t, {"x": t[:5], "y": [torch.zeros(3, dtype=torch.int64)]})) == 40 + 24


def test_store_hits_and_evicts_least_recently_used() -> None:
    store = RecordingStore(max_bytes=100)
    rec = [Held(torch.zeros(10), {}) for _ in range(3)]  # 40 bytes each
    store.put([1], rec[0])  # type: ignore[arg-type]
    store.put([2], rec[1])  # type: ignore[arg-type]
    assert store.get([1]) is rec[0]  # [1] is now the most recent
    store.put([3], rec[2])  # type: ignore[arg-type]
    assert store.get([2]) is None and store.get([1]) is rec[0] and store.get([3]) is rec[2]
    assert store.nbytes == 80 and (store.hits, store.misses) == (3, 1)
    store.put([4], Held(torch.zeros(100), {}))  # type: ignore[arg-type]  # larger than the whole store: not kept
    assert store.get([4]) is None and store.nbytes == 80
    with pytest.raises(ValueError, match="max_bytes"):
        RecordingStore(max_bytes=-1)
