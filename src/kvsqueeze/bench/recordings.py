"""A store of recorded prefills shared across benchmark runs, bounded by bytes (least recently used goes first).

`run_bench` records each context once per call; a caller that runs many small grids over the same contexts (the tuner
probes one method and ratio at a time) hands one store to every call, so each context is prefilled once in all.
Keys are a hash of the context's token ids; sizes are the bytes of the tensors a recording holds (its cache and every
layer's inputs), each storage counted once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import Any

import torch

from kvsqueeze.recording import Recording
from kvsqueeze.validation import check_int

DEFAULT_MAX_BYTES = 2 * 2**30


def ids_key(context_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, context_ids)).encode()).hexdigest()


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (dataclasses, dicts, lists, tuples, attributes)."""
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if id(item) in visited or isinstance(item, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            continue
        visited.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif dataclasses.is_dataclass(item):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total


class RecordingStore:
    """Recordings by context, at most `max_bytes` in all (a recording larger than that is not kept)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        check_int("max_bytes", max_bytes, 0)
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[Recording, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.entries.values())

    def get(self, context_ids: list[int]) -> Recording | None:
        entry = self.entries.get(ids_key(context_ids))
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(ids_key(context_ids))
        self.hits += 1
        return entry[0]

    def put(self, context_ids: list[int], recording: Recording) -> None:
        size = tensor_bytes(recording)
        if size > self.max_bytes:
            return
        self.entries[ids_key(context_ids)] = (recording, size)
        self.entries.move_to_end(ids_key(context_ids))
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
