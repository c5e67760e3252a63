"""User datasets for the benchmark: a .jsonl, .csv or .parquet file of (context, question, answers) rows.

Fields per row: `context` and `question` (non-empty text), `answers` (a list of acceptable answers; in CSV a JSON list
or a single string), optional `answer_prefix` (text the answer starts with), `max_new_tokens` (default 32) and
`metric` ("any": one answer found is enough, the default for user data; "all": every answer must be found).
Rows with the same context (and the same options) become one sample with several questions, so the context is
compressed once. Other fields are ignored. A malformed row raises ValueError naming the file, line and field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvsqueeze.bench.tasks.base import Sample

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_METRIC = "any"
_PARQUET_HINT = "reading .parquet files needs pyarrow: pip install 'kvsqueeze[parquet]' (or pip install pyarrow)"


class _RowError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def load_dataset(path: str | Path) -> list[Sample]:
    """Samples of a user dataset file, grouped by context in order of first appearance."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} does not exist")
    readers = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"dataset {str(path)!r}: unsupported extension {path.suffix!r}; use .jsonl, .csv or .parquet")
    groups: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for line, raw in reader(path):
        try:
            row = _parse_row(raw, csv_style=path.suffix.lower() == ".csv")
        except _RowError as err:
            raise ValueError(f"{path}: line {line}: field {err.field!r}: {err}") from None
        key = (row["context"], row["answer_prefix"], row["max_new_tokens"], row["metric"])
        group = groups.setdefault(key, {"questions": [], "answers": [], "lines": []})
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


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
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
    with path.open(encoding="utf-8", newline="") as f:
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
    except (TypeError, ValueError):
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
