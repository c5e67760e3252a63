"""The files of a results directory: results.jsonl (one row per answer), costs.jsonl (one row per cost pass),
config.json (the run identity and the grid), bench.lock and failed.jsonl (rows the last run gave up on); rows are
appended and flushed one by one, and the keys below say which rows a rerun may skip.

Reading is strict: every line must be a JSON object holding the fields its key needs. The one exception is a cut last
line (no newline at its end, not valid JSON): what a hard kill in the middle of a write leaves. It is dropped with a
warning (`drop_cut_line` removes it from the file before a run appends to it), and its row is computed again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kvsqueeze.atomic import write_text_atomic

logger = logging.getLogger("kvsqueeze")

RESULTS, COSTS, CONFIG, LOCK = "results.jsonl", "costs.jsonl", "config.json", "bench.lock"
SUPERSEDED = "superseded.jsonl"  # rows of dataset questions that were edited since they were computed
# rows the last run could not compute (their worker died too often): the base row plus `error`; rerun to retry them
FAILED = "failed.jsonl"
NONE = "none"  # the method name of the uncompressed baseline (run once, at ratio 0)
Row = dict[str, Any]  # one line of results.jsonl or costs.jsonl


class ResultsError(ValueError):
    """A results folder that cannot be used as it is: a malformed line, rows of other settings, a busy folder."""


def row_key(row: Row) -> tuple:
    """What identifies a result row: the run (`run`, the hash of the run identity), the task and the question's
    content (`content`), and the cell that answered it. A rerun skips rows whose key is already in results.jsonl.
    The question's position (sample, question index) is left out: a row inserted into a dataset moves the others
    without changing what they ask."""
    return (row["run"], row["task"], row["content"], row["method"], float(row["ratio"]), row["seed"],
            bool(row.get("query_aware", False)), *_run_key(row))  # fmt: skip


def cost_key(row: Row) -> tuple:
    """What identifies a cost pass: one per run, method, ratio and group (a context length or a dataset)."""
    return (row["run"], row["method"], float(row["ratio"]), row["group"], row["seed"], bool(row["query_aware"]),
            *_run_key(row))  # fmt: skip


def _run_key(row: Row) -> tuple:
    """How a row ran: chunked prefill and compression while answering (absent in one-shot rows), and its cache's
    quantization (kv_bits, then group size and residual; absent or None in full-precision rows and in rows written
    before the quantization axis existed, which are full precision)."""
    return tuple(row.get(k) for k in ("chunk_size", "decode_target", "decode_every", *QUANT_FIELDS))


QUANT_FIELDS = ("kv_bits", "kv_group_size", "kv_residual")  # a row's quantization, part of its key


def content_hash(context_ids: list[int], question: str, answers: Iterable[str], metric: str, max_new: int) -> str:
    """16 hex digits naming what one question asks: the encoded context (the prompt's compressed part, so the
    tokenizer and chat template count too), the question text as it is decoded after it (with the answer prefix),
    the reference answers, the metric and the answer length. Editing any of them makes a new row."""
    doc = json.dumps([context_ids, question, list(answers), metric, max_new], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ResultsError(f"{path}: not UTF-8 text (byte {err.start}); a results file is JSON lines") from None


def read_jsonl(path: Path, key: Callable[[Row], object] | None = None) -> list[Row]:
    """Rows of a JSONL file (none when it does not exist). Every line must be a JSON object, and `key(row)` (e.g.
    `row_key`) must work on it: anything else raises ResultsError naming the file, the line and what is wrong. A cut
    last line (an interrupted write) is skipped with a warning."""
    if not path.exists():
        return []
    lines = _lines(path)
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):  # the last line has no newline after it: a write cut short
                logger.warning("%s: line %d was cut short (an interrupted write); its row will be computed again",
                               path, n)  # fmt: skip
                continue
            raise ResultsError(f"{path}: line {n}: not valid JSON ({err.msg}); fix or delete that line") from None
        rows.append(_checked(path, n, row, key))
    return rows


def _checked(path: Path, n: int, row: Any, key: Callable[[Row], object] | None) -> Row:
    if not isinstance(row, dict):
        raise ResultsError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
    if key is not None:
        try:
            key(row)
        except KeyError as err:
            raise ResultsError(f"{path}: line {n}: not a row of this file: field {err} is missing") from None
        except (TypeError, ValueError) as err:
            raise ResultsError(f"{path}: line {n}: not a row of this file: {err}") from None
    return row


def drop_cut_line(path: Path) -> bool:
    """Remove a cut last line (no newline at its end and not valid JSON) from `path`; True if there was one. Call it
    while holding the folder's lock, before appending."""
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    last = data[data.rfind(b"\n") + 1 :]
    try:
        json.loads(last)
        return False  # a complete row that only lacks its newline: Appender adds one
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        pass
    with path.open("r+b") as f:
        f.truncate(len(data) - len(last))
    logger.warning("%s: dropped a last line cut short (an interrupted write); its row will be computed again", path)
    return True


def report_key(row: Row) -> tuple:
    """The fields the report reads of a result row, converted as it converts them (raises on a row it cannot use)."""
    for name in ("method", "task"):
        if not isinstance(row[name], str):
            raise TypeError(f"field {name!r} must be text, got {row[name]!r}")
    return (row["method"], row["task"], int(row["context_length"]), *(float(row[k]) for k in _REPORTED_NUMBERS))


_REPORTED_NUMBERS = ("ratio", "score", "kv_bytes_before", "kv_bytes_after", "prefill_seconds", "compression_seconds",
                     "decode_tokens_per_second", "peak_memory_bytes")  # fmt: skip


def read_config(folder: Path) -> Row | None:
    """config.json of a results folder (None when there is none); a file that is not a JSON object raises."""
    path = folder / CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def rewrite_jsonl(path: Path, rows: list[Row]) -> None:
    """Replace `path` with `rows`, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


class Appender:
    """Appends JSON rows to a file, one line each, flushed at once."""

    def __init__(self, path: Path) -> None:
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = path.open("a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")

    def write(self, row: Row) -> None:
        self.file.write(json.dumps(row, default=str) + "\n")  # default=str: task metadata of any type
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_run(folder: Path, run: str) -> tuple[list[Row], list[Row]]:
    """(result rows, cost rows) of a results folder, after dropping cut last lines (hold the folder's lock). Every
    row must be complete and belong to run `run`; anything else raises ResultsError naming the file and line."""
    out = []
    for name, key in ((RESULTS, row_key), (COSTS, cost_key)):
        drop_cut_line(folder / name)
        out.append(read_jsonl(folder / name, key=functools.partial(_of_run, key=key, run=run)))
    return out[0], out[1]


def _of_run(row: Row, key: Callable[[Row], tuple], run: str) -> tuple:
    if row.get("run", run) != run:
        raise ValueError(f"it belongs to run {row['run']!r}, not to this folder's run {run!r}")
    return key(row)


def supersede(folder: Path, rows: list[Row], stale: Callable[[Row], bool]) -> list[Row]:
    """Move the `stale` rows from results.jsonl to superseded.jsonl (hold the folder's lock); the rows kept."""
    moved = [r for r in rows if stale(r)]
    if not moved:
        return rows
    kept = [r for r in rows if not stale(r)]
    archive = Appender(folder / SUPERSEDED)
    for row in moved:
        archive.write(row)
    archive.close()
    rewrite_jsonl(folder / RESULTS, kept)
    logger.warning("%d row(s) of edited dataset questions moved to %s; they are computed again", len(moved),
                   folder / SUPERSEDED)  # fmt: skip
    return kept
