"""The tune config file (`tune.json`): the configuration a tune chose, which `generate --config` and
`bench --config` read back.

    {"kvsqueeze_tune": 1, "method": "knorm", "ratio": 0.5, "options": {}, "budget_policy": null, "kv_bits": null,
     "chunk_size": null, "provenance": {...}}

`method`, `ratio`, `options`, `budget_policy`, `kv_bits` and `chunk_size` (the prefill's chunk size; null or absent:
one forward) say how to compress; `provenance` (free-form) says where
they came from: the target, the scores and intervals, the model and the dataset's hash. Reading a file checks every
field and names the bad one, the file and the values allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.atomic import write_text_atomic
from kvsqueeze.methods import get_method, list_methods
from kvsqueeze.methods.registry import BUDGET_POLICIES
from kvsqueeze.quantization import quant_spec
from kvsqueeze.validation import check_int, check_ratio

FORMAT = 1  # the value of the "kvsqueeze_tune" field this version writes and reads
TUNE_FILE = "tune.json"
_FIELDS = ("kvsqueeze_tune", "method", "ratio", "options", "budget_policy", "kv_bits", "chunk_size", "provenance")


@dataclass
class TuneChoice:
    """A compression configuration: method name, ratio, the method's options, budget policy, KV bits and the prefill's
    chunk size."""

    method: str
    ratio: float
    options: dict[str, Any] = field(default_factory=dict)
    budget_policy: str | None = None
    kv_bits: int | None = None  # None: full precision
    provenance: dict[str, Any] = field(default_factory=dict)
    chunk_size: int | None = None  # None: the context prefilled in one forward

    def __post_init__(self) -> None:
        self.method = str(self.method).strip().lower().replace("-", "_")
        if self.method not in list_methods():
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(list_methods())}")
        check_ratio(self.ratio)
        self.ratio = float(self.ratio)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a JSON object of the method's options, got {self.options!r}")
        if self.budget_policy is not None and self.budget_policy not in BUDGET_POLICIES:
            raise ValueError(
                f"unknown budget policy {self.budget_policy!r}; known: {', '.join(sorted(BUDGET_POLICIES))}"
            )
        if self.kv_bits in (16, 32):
            self.kv_bits = None
        quant_spec(self.kv_bits)  # ValueError naming the allowed bits
        check_int("chunk_size", self.chunk_size, 1, none_ok=True, note="context tokens per prefill forward")
        get_method(self.method, ratio=self.ratio, **self.options)  # bad options fail here, naming them

    def as_json(self) -> dict[str, Any]:
        fields = {"method": self.method, "ratio": self.ratio, "options": self.options}
        return {"kvsqueeze_tune": FORMAT, **fields, "budget_policy": self.budget_policy, "kv_bits": self.kv_bits,
                "chunk_size": self.chunk_size, "provenance": self.provenance}  # fmt: skip


def write_choice(choice: TuneChoice, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(choice.as_json(), indent=2, default=str) + "\n")
    return path


def read_choice(path: str | Path) -> TuneChoice:
    """The configuration in a tune file; ValueError naming the file and the bad field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tune config {str(path)!r} does not exist (write one with `kvsqueeze tune`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"tune config {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"tune config {str(path)!r}: expected a JSON object, got {type(data).__name__}")
    if data.get("kvsqueeze_tune") != FORMAT:
        raise ValueError(f"tune config {str(path)!r}: field 'kvsqueeze_tune' must be {FORMAT}, got "
                         f"{data.get('kvsqueeze_tune')!r} (not a file written by `kvsqueeze tune`?)")  # fmt: skip
    for name in ("method", "ratio"):
        if name not in data:
            raise ValueError(f"tune config {str(path)!r}: missing field {name!r}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"tune config {str(path)!r}: unknown fields {unknown}; allowed: {list(_FIELDS)}")
    try:
        return TuneChoice(data["method"], data["ratio"], data.get("options") or {}, data.get("budget_policy"),
                          data.get("kv_bits"), data.get("provenance") or {}, data.get("chunk_size"))  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ValueError(f"tune config {str(path)!r}: {err}") from None
