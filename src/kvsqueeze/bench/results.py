"""The files of a results directory: results.jsonl (one row per answer), costs.jsonl (one row per cost pass) and
config.json; rows are appended and flushed one by one, and the keys below say which rows a rerun may skip."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("kvsqueeze")

RESULTS, COSTS, CONFIG = "results.jsonl", "costs.jsonl", "config.json"
NONE = "none"  # the method name of the uncompressed baseline (run once, at ratio 0)


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result row: rerunning skips rows whose key is already in results.jsonl."""
    return (row["task"], row["context_length"], row["sample"], row["question_index"], row["method"],
            float(row["ratio"]), row["model"], row["seed"], bool(row.get("query_aware", False)),
            *_run_key(row))  # fmt: skip


def cost_key(row: dict[str, Any]) -> tuple:
    return (row["method"], float(row["ratio"]), row["group"], row["model"], row["seed"], bool(row["query_aware"]),
            *_run_key(row))  # fmt: skip


def _run_key(row: dict[str, Any]) -> tuple:
    """How a compressed row ran (chunked prefill, compression while answering); absent in one-shot rows."""
    return tuple(row.get(k) for k in ("chunk_size", "decode_target", "decode_every"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a line cut short by a hard kill is skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: line %d is not valid JSON (an interrupted write?); it will be recomputed", path, n)
    return rows


class Appender:
    """Appends JSON rows to a file, one line each, flushed at once."""

    def __init__(self, path: Path) -> None:
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = path.open("a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row, default=str) + "\n")  # default=str: task metadata of any type
        self.file.flush()

    def close(self) -> None:
        self.file.close()
