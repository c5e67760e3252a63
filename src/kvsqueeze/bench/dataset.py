"""User datasets for the benchmark: a .jsonl, .csv or .parquet file of (context, question, answers) rows.

Fields per row: `context` and `question` (non-empty text), `answers` (a list of acceptable answers; in CSV a JSON list
or a single string), optional `answer_prefix` (text the answer starts with), `max_new_tokens` (default 32) and
`metric` ("any": one answer found is enough, the default for user data; "all": every answer must be found).
Rows with the same context (and the same options) become one sample with several questions, so the context is
compressed once; a row that repeats an earlier one is asked once (with a warning). Other fields are ignored. A
malformed row raises ValueError naming the file, line and field; so does a file that cannot be read (a folder, no
read permission, a read error, text that is not UTF-8).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvsqueeze.bench.tasks.base import Sample

logger = logging.getLogger("kvsqueeze")

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_METRIC = "any"
_PARQUET_HINT = "reading .parquet files needs pyarrow: pip install 'kvsqueeze[parquet]' (or pip install pyarrow)"


class _RowError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def load_dataset(path: str | Path) -> list[Sample]:
    """Samples of a user dataset file, grouped by context in order of first appearance."""
    path = _checked_path(path)
    reader = _READERS[path.suffix.lower()]
    groups: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    try:
        rows = list(reader(path))
    except OSError as err:  # no read permission, a read error
        raise ValueError(f"dataset {str(path)!r} cannot be read: {err.strerror or err}") from None
    for line, raw in rows:
        try:
            row = _parse_row(raw, csv_style=path.suffix.lower() == ".csv")
        except _RowError as err:
            raise ValueError(f"{path}: line {line}: field {err.field!r}: {err}") from None
        key = (row["context"], row["answer_prefix"], row["max_new_tokens"], row["metric"])
        group = groups.setdefault(key, {"questions": [], "answers": [], "lines": []})
        asked = list(zip(group["questions"], group["answers"], strict=True))
        if (row["question"], tuple(row["answers"])) in asked:  # its result row would be the same one
            first = group["lines"][asked.index((row["question"], tuple(row["answers"])))]
            logger.warning("%s: line %d repeats line %d (same context, question and answers); asked once", path,
                           line, first)  # fmt: skip
            continue
        group["questions"].append(row["question"])
        group["answers"].append(tuple(row["answers"]))
        group["lines"].append(line)
    if not groups:
        raise ValueError(f"dataset {str(path)!r} has no rows")
    return [
        Sample(
            task=path.stem,
            index=i,
            context=context,
            questions=tuple(g["questions"]),
            answers=tuple(g["answers"]),
            answer_prefix=prefix,
            max_new_tokens=max_new,
            metric=metric,  # type: ignore[arg-type]
            meta={"source": str(path), "lines": g["lines"]},
        )
        for i, ((context, prefix, max_new, metric), g) in enumerate(groups.items())
    ]


def dataset_hash(path: str | Path) -> str:
    """16 hex digits of the SHA-256 of a dataset file's bytes (recorded with the results it was run on)."""
    return hashlib.sha256(_checked_path(path).read_bytes()).hexdigest()[:16]


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"dataset {str(path)!r} is a folder; give a .jsonl, .csv or .parquet file")
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} does not exist")
    if path.suffix.lower() not in _READERS:
        raise ValueError(f"dataset {str(path)!r}: unsupported extension {path.suffix!r}; use .jsonl, .csv or .parquet")
    return path


def _decoded(path: Path) -> str:
    """The file's text (UTF-8, with or without a byte order mark); other bytes raise naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = bytes(err.object)  # the bytes after a byte order mark: err.start counts from there
        line = bad.count(b"\n", 0, err.start) + 1
        detail = f"not UTF-8 text (byte 0x{bad[err.start]:02x}); save it as UTF-8"
        raise ValueError(f"{path}: line {line}: {detail}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with io.StringIO(_decoded(path), newline=None) as f:  # universal newlines, as open() reads text
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with io.StringIO(_decoded(path), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        for name in ("context", "question", "answers"):
            if name not in reader.fieldnames:
                raise ValueError(f"{path}: line 1: field {name!r}: missing from the header {reader.fieldnames}")
        start = reader.line_num + 1
        for row in reader:
            yield start, {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ModuleNotFoundError(_PARQUET_HINT) from None
    try:
        table = pq.read_table(path)
    except ValueError as err:  # pyarrow's ArrowInvalid: not a parquet file, a broken one
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    yield from enumerate(table.to_pylist(), start=1)  # plain Python values (lists, str, int; None for nulls)


_READERS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def _text(raw: dict[str, Any], name: str, required: bool) -> str:
    value = raw.get(name)
    if value is None or (isinstance(value, float) and value != value):  # absent, or NaN from a parquet file
        if required:
            raise _RowError(name, "missing")
        return ""
    if not isinstance(value, str):
        raise _RowError(name, f"must be text, got {type(value).__name__} {value!r}")
    if required and not value.strip():
        raise _RowError(name, "is empty")
    return value


def _answers(raw: dict[str, Any], csv_style: bool) -> list[str]:
    value = raw.get("answers")
    if value is None:
        raise _RowError("answers", "missing")
    if csv_style and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _RowError("answers", f"looks like a JSON list but does not parse ({err.msg})") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _RowError("answers", f"must be a non-empty list of strings, got {value!r}")
    bad = [a for a in value if not isinstance(a, str) or not a.strip()]
    if bad:
        raise _RowError("answers", f"every answer must be non-empty text, got {bad[0]!r}")
    return value


def _max_new_tokens(raw: dict[str, Any]) -> int:
    value = raw.get("max_new_tokens")
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return DEFAULT_MAX_NEW_TOKENS
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity (JSON allows it) or 1e400
        number = None
    if number is None or number < 1 or (isinstance(value, float) and value != number):
        raise _RowError("max_new_tokens", f"must be a positive integer, got {value!r}")
    return number


def _parse_row(raw: dict[str, Any], csv_style: bool) -> dict[str, Any]:
    metric = _text(raw, "metric", required=False) or DEFAULT_METRIC
    if metric not in ("all", "any"):
        raise _RowError("metric", f"must be 'all' or 'any', got {metric!r}")
    return {
        "context": _text(raw, "context", required=True),
        "question": _text(raw, "question", required=True),
        "answers": _answers(raw, csv_style),
        "answer_prefix": _text(raw, "answer_prefix", required=False),
        "max_new_tokens": _max_new_tokens(raw),
        "metric": metric,
    }
