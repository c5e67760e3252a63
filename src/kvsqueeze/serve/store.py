"""Compressed contexts kept for reuse: in memory, least recently used dropped first, bounded by the bytes their
storages hold (`kvsqueeze.cache_bytes`); optionally also on disk, one checked cache file per context
(`save_cache`/`load_cache`: atomic writes, checksum, model fingerprint), so a restarted server answers without a new
prefill.

A context's id is derived from what it holds: the model's fingerprint, the compression method's repr (and kv_bits when
the context is quantized) and the prefix's token ids. The same prefix compressed the same way by the same model always
has the same id, in any process.
Contexts made from an uploaded document (`POST /v1/contexts`) also keep the document's text, in memory and in the
file, so their compressed cache can be rebuilt after it was dropped from memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open

from kvsqueeze.cache import KVCache
from kvsqueeze.cachefile import CacheFileError, load_cache, save_cache
from kvsqueeze.memory import cache_bytes
from kvsqueeze.methods.base import Method

logger = logging.getLogger("kvsqueeze")

Found = Literal["memory", "disk", "miss"]
ID_PATTERN = re.compile(r"^ctx-[0-9a-f]{32}$")


def context_id(fingerprint: str, method: Method | None, ids: list[int], kv_bits: int | None = None) -> str:
    """The id of the context holding `ids` compressed by `method` (and quantized to `kv_bits`) in the model of
    `fingerprint`."""
    # a full-precision context keeps the id it had before kv_bits existed
    key = [fingerprint, repr(method), len(ids)] + ([] if kv_bits is None else [kv_bits])
    digest = hashlib.sha256(json.dumps(key).encode())
    digest.update(b"".join(i.to_bytes(4, "little") for i in ids))
    return "ctx-" + digest.hexdigest()[:32]


def well_formed(info: object) -> bool:
    """Whether a context file's info has what the server reads from it (its other fields are only shown)."""
    if not isinstance(info, dict):
        return False
    tokens, compression, document = info.get("tokens"), info.get("compression"), info.get("document", "")
    if type(tokens) is not int or tokens < 1 or not isinstance(document, str) or not isinstance(compression, dict):
        return False
    method, ratio = compression.get("method"), compression.get("ratio")
    return (
        set(compression) <= {"method", "ratio", "options", "budget_policy", "kv_bits"}
        and isinstance(method, str)
        and isinstance(ratio, (int, float))
        and isinstance(compression.get("options", {}), dict)
        and isinstance(compression.get("budget_policy"), (str, type(None)))
        and (compression.get("kv_bits") is None or type(compression.get("kv_bits")) is int)
    )


@dataclass
class StoredContext:
    """A compressed context and what is known about it (`info`: JSON, written into its file too)."""

    id: str
    cache: KVCache
    info: dict[str, Any]
    nbytes: int  # keys and values its storages hold


@dataclass
class StoreCounts:
    hits_memory: int = 0
    hits_disk: int = 0
    misses: int = 0
    evictions: int = 0  # contexts dropped from memory to stay under the byte bound
    too_large: int = 0  # contexts larger than the whole bound, never held in memory


class ContextStore:
    """Contexts by id, in memory (LRU bounded by `max_bytes`) and, with `directory`, on disk."""

    def __init__(self, model: Any, max_bytes: int, directory: Path | None = None) -> None:
        self.model, self.max_bytes, self.directory = model, max_bytes, directory
        self._memory: OrderedDict[str, StoredContext] = OrderedDict()
        self._documents: dict[str, dict[str, Any]] = {}  # id -> info, for contexts made from a document
        self._lock = threading.Lock()
        self.counts = StoreCounts()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, cid: str) -> Path | None:
        """Where context `cid` is written (None without a directory, or for a string that is not a context id)."""
        if self.directory is None or not ID_PATTERN.match(cid):
            return None
        return self.directory / f"{cid}.safetensors"

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._memory.values())

    def __len__(self) -> int:
        return len(self._memory)

    def holds(self, cid: str) -> bool:
        """Whether context `cid` is held in memory now."""
        with self._lock:
            return cid in self._memory

    def get(self, cid: str) -> tuple[StoredContext | None, Found]:
        """The context `cid` from memory, else from disk (then held in memory too), else (None, "miss")."""
        with self._lock:
            found = self._memory.get(cid)
            if found is not None:
                self._memory.move_to_end(cid)
                self.counts.hits_memory += 1
                return found, "memory"
        loaded = self._load(cid)
        if loaded is None:
            self.counts.misses += 1
            return None, "miss"
        self.counts.hits_disk += 1
        self._hold(loaded)
        return loaded, "disk"

    def put(self, context: StoredContext, method: Method | None) -> None:
        """Keep a freshly computed context (and write it to disk when the store has a directory)."""
        if "document" in context.info:
            self._documents[context.id] = context.info
        self._hold(context)
        path = self.path(context.id)
        if path is not None:
            try:
                save_cache(path, context.cache, self.model, method, extra={"serve": json.dumps(context.info)})
            except OSError as err:
                logger.warning("could not write context %s to %s: %s", context.id, path, err)

    def document(self, cid: str) -> dict[str, Any] | None:
        """The info of context `cid` if it was made from a document (its text under "document"), else None."""
        info = self._documents.get(cid)
        if info is None:
            info = self._read_info(cid)
            if info is not None and "document" in info:
                self._documents[cid] = info
        return info if info is not None and "document" in info else None

    def info(self, cid: str) -> dict[str, Any] | None:
        """What is known about context `cid`: held in memory (any context), or made from a document (memory or
        disk); None when it is unknown."""
        with self._lock:
            held = self._memory.get(cid)
        return held.info if held is not None else self.document(cid)

    def delete(self, cid: str) -> bool:
        """Forget context `cid` everywhere (memory, documents, disk). False when it was nowhere."""
        with self._lock:
            held = self._memory.pop(cid, None) is not None
        known = self._documents.pop(cid, None) is not None
        path = self.path(cid)
        on_disk = path is not None and path.exists()
        if on_disk and path is not None:
            path.unlink(missing_ok=True)
        return held or known or on_disk

    def _hold(self, context: StoredContext) -> None:
        context.cache.make_room()  # where its forks decode (`KVCache.make_room`): held, and counted, with it
        context.nbytes = cache_bytes(context.cache)
        if context.nbytes > self.max_bytes:
            self.counts.too_large += 1
            return
        with self._lock:
            self._memory[context.id] = context
            self._memory.move_to_end(context.id)
            total = sum(c.nbytes for c in self._memory.values())
            while total > self.max_bytes:
                _, dropped = self._memory.popitem(last=False)
                total -= dropped.nbytes
                self.counts.evictions += 1

    def _load(self, cid: str) -> StoredContext | None:
        path = self.path(cid)
        if path is None or not path.exists():
            return None
        try:
            saved = load_cache(path, self.model)
            info = json.loads(saved.extra["serve"])
        except (CacheFileError, KeyError, TypeError, json.JSONDecodeError) as err:
            logger.warning("ignoring the cached context file %s: %s", path, err)
            return None
        if not well_formed(info):
            logger.warning("ignoring the cached context file %s: its info is not a kvsqueeze server's", path)
            return None
        return StoredContext(cid, saved.cache, info, cache_bytes(saved.cache))

    def _read_info(self, cid: str) -> dict[str, Any] | None:
        """A context file's info, from its metadata alone (the tensors are read and checked by `_load`)."""
        path = self.path(cid)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(json.loads((f.metadata() or {})["extra"])["serve"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            logger.warning("ignoring the cached context file %s: %s", path, err)
            return None
        return info if well_formed(info) else None
