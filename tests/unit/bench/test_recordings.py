"""The recording store: hits by context, bounded by bytes (newcomers turned away once full), sizes from the tensors
held."""

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


def test_store_hits_and_turns_newcomers_away_once_full() -> None:
    store = RecordingStore(max_bytes=100)
    rec = [Held(torch.zeros(10), {}) for _ in range(3)]  # 40 bytes each
    store.put([1], rec[0])  # type: ignore[arg-type]
    store.put([2], rec[1])  # type: ignore[arg-type]
    store.put([3], rec[2])  # type: ignore[arg-type]  # no room left: not kept, the others stay
    assert store.get([1]) is rec[0] and store.get([2]) is rec[1] and store.get([3]) is None
    assert store.nbytes == 80 and (store.hits, store.misses) == (2, 1)
    store.put([1], Held(torch.zeros(15), {}))  # type: ignore[arg-type]  # replacing one counts its own bytes as free
    assert store.nbytes == 100
    store.put([4], Held(torch.zeros(100), {}))  # type: ignore[arg-type]  # larger than the whole store: not kept
    assert store.get([4]) is None and store.nbytes == 100
    store.clear()
    assert store.nbytes == 0 and store.get([1]) is None
    with pytest.raises(ValueError, match="max_bytes"):
        RecordingStore(max_bytes=-1)


def test_a_repeated_scan_larger_than_the_store_hits_what_fits() -> None:
    store = RecordingStore(max_bytes=100)  # room for 2 of 3 contexts read in the same order again and again
    for _ in range(3):
        for i in range(3):
            if store.get([i]) is None:
                store.put([i], Held(torch.zeros(10), {}))  # type: ignore[arg-type]
    assert (store.hits, store.misses) == (4, 5)  # passes 2 and 3 hit twice (LRU eviction would miss all 9)
