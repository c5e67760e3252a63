"""One results folder holds one run: its identity, stored in config.json, and a lock while a bench writes into it.

The run identity is everything that changes a result and is the same for every row: the versions of kvsqueeze, torch
and transformers, the model (name and `model_fingerprint`), its dtype, device and attention implementation, the
tokenizer's chat template, how every cell runs (the answer length override, query-aware prompts, the budget policy,
chunked prefill, compression while answering) and the tasks' options where any are given (e.g. the phrasings a
varied task draws from: the same task under other options is another run). Rows are keyed by the identity's hash plus
the question's content (`results.content_hash`), so the grid may grow in the same folder (more methods, ratios, tasks,
samples, datasets, bits of the quantization axis) and an edited dataset row is computed again, alone. A run whose
identity differs is refused before it computes anything, with the fields that differ; `new_run=True` writes into the
first folder next to it (OUT-2, OUT-3, ...) that is empty or holds this very run, so the same command resumes there too.

A row's quantization (`kv_bits`, and for a quantized row its group size and residual) is part of its key
(`results.row_key`), not of the identity: one folder holds full-precision and quantized rows side by side, so the
report can put them on one score-vs-bytes plot; rows at other bits or group settings are never taken for each other;
and a folder written before the quantization axis existed (full-precision rows without the field) resumes as it is.

The lock is an advisory `fcntl.flock` on `bench.lock` inside the folder, held for the whole run (the file stays; it
holds the pid of the last holder). A second bench into the same folder stops at once with FolderBusyError. Where
fcntl does not exist (Windows) the folder is used without a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import transformers

from kvsqueeze import __version__
from kvsqueeze.atomic import write_text_atomic
from kvsqueeze.bench.results import CONFIG, COSTS, LOCK, RESULTS, ResultsError, read_config
from kvsqueeze.fingerprint import model_fingerprint

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger("kvsqueeze")


class FolderBusyError(ResultsError):
    """Another process holds the results folder's lock."""


def versions() -> dict[str, str]:
    return {"kvsqueeze": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def settings_identity(config: Any, model_name: str, dtype: str, attention: str) -> dict[str, Any]:
    """The part of the run identity known before the model loads (`config` is a BenchConfig)."""
    every = config.decode_every if config.decode_target is not None else None  # only means something with a target
    tasks = config.task_options  # recorded only when given: the identities of runs without stay as they were
    return {**versions(), "model": model_name, "dtype": dtype, "attention": attention,
            "max_new_tokens": config.max_new_tokens, "query_aware": config.query_aware,
            "budget_policy": config.budget_policy, "chunk_size": config.chunk_size,
            "decode_target": config.decode_target, "decode_every": every,
            **({"task_options": tasks} if tasks else {})}  # fmt: skip


def run_identity(model: Any, tokenizer: Any, config: Any, model_name: str) -> dict[str, Any]:
    """Everything that changes a result and is the same for every row of a run (see the module docstring)."""
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    attention = str(getattr(model.config, "_attn_implementation", None))
    template = getattr(tokenizer, "chat_template", None)
    return {
        **settings_identity(config, model_name, dtype, attention),
        "model_fingerprint": model_fingerprint(model),
        "device": device_label(param.device),
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if isinstance(template, str) else None,
    }


def device_label(device: torch.device) -> str:
    """The device type, with the accelerator's name (two GPU models give different timings and numerics)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def identity_id(identity: dict[str, Any]) -> str:
    """12 hex digits naming a run identity (stored in every row as `run`)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field: old -> new' for every field that differs (a field only one of them has counts as differing)."""
    missing = "(not recorded)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]  # fmt: skip


def has_rows(folder: Path) -> bool:
    return any((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in (RESULTS, COSTS))


def mismatch(folder: Path, identity: dict[str, Any], fields: set[str] | None = None) -> list[str] | None:
    """Why `folder` cannot take rows of `identity` (compared on `fields` only, if given): the differing fields, or
    None when it can (it does not exist, holds no rows yet, or holds this run)."""
    if folder.exists() and not folder.is_dir():
        raise ResultsError(f"results folder {str(folder)!r} is a file, not a folder")
    if not has_rows(folder):
        return None
    meta = read_config(folder)
    stored = None if meta is None else meta.get("identity")
    if not isinstance(stored, dict):
        what = "no config.json" if meta is None else "no run identity in its config.json (an older kvsqueeze)"
        return [f"it holds rows but {what}, so their settings cannot be checked"]
    if fields is not None:
        stored, identity = {k: stored.get(k) for k in fields}, {k: identity[k] for k in fields}
    return identity_diff(stored, identity) or None


def refusal(folder: Path, differences: list[str]) -> ResultsError:
    lines = "\n  ".join(differences)
    return ResultsError(
        f"results folder {str(folder)!r} holds rows of another run, which would mix with these:\n  {lines}\n"
        "Choose another --out, or pass --new-run to write next to it (new_run=True from Python)."
    )


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse early (before the model loads) a folder whose run differs in the fields `settings` already knows."""
    differences = mismatch(folder, settings, set(settings))
    if differences:
        raise refusal(folder, differences)


def candidates(out: Path) -> Iterator[Path]:
    yield out
    n = 2
    while True:
        yield out.with_name(f"{out.name}-{n}")
        n += 1


@contextmanager
def open_folder(out: str | Path, identity: dict[str, Any], new_run: bool = False) -> Iterator[Path]:
    """The results folder this run writes into, created and locked for the duration of the `with`: `out` itself,
    or with `new_run` the first of OUT-2, OUT-3, ... that is empty or holds this run. Raises ResultsError when `out`
    holds another run (without `new_run`), FolderBusyError when another process holds the folder."""
    for folder in candidates(Path(out)):
        if mismatch(folder, identity) is not None and new_run:  # a cheap look before locking: skip other runs
            continue
        with folder_lock(folder):
            differences = mismatch(folder, identity)  # again, now that no other bench can write
            if differences is None:
                if folder != Path(out):
                    logger.info("%s holds another run: writing into %s", out, folder)
                yield folder
                return
            if not new_run:
                raise refusal(folder, differences)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s bench.lock (creating the folder); FolderBusyError at once if another process holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK).open("a+", encoding="utf-8")
    except OSError as err:
        raise ResultsError(f"cannot write into the results folder {str(folder)!r}: {err.strerror}") from None
    try:
        _acquire(handle, folder)
        yield
    finally:
        handle.close()  # closing releases the lock


def _acquire(handle: IO[str], folder: Path) -> None:
    if sys.platform == "win32":
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise FolderBusyError(
            f"results folder {str(folder)!r} is in use by another kvsqueeze bench ({who}); wait for it to finish, "
            "or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()


def write_config(folder: Path, meta: dict[str, Any]) -> None:
    """config.json, written atomically (a crash leaves the old one or the new one, never half of it)."""
    write_text_atomic(folder / CONFIG, json.dumps(meta, indent=2, default=str) + "\n")
