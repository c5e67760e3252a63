"""The server's options, checked once when they are built (a ValueError naming the option and what it allows)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.validation import check_float, check_int, check_str

GIB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """A byte count written as a number with an optional unit: 1000000, 512MiB, 2GB, 1.5GiB."""
    match = _SIZE.match(text)
    unit = match[2].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a size in bytes such as 2GiB, 512MB or 1000000, got {text!r}")
    return int(float(match[1]) * _UNITS[unit])


@dataclass(frozen=True)
class ServerSettings:
    """What `kvsqueeze serve` runs with. The compression fields are the default of requests that give no
    `kv_compression`; the limits bound what one request may ask."""

    model_name: str  # the model's id in the API (`GET /v1/models`, the `model` of requests and responses)
    host: str = "127.0.0.1"
    port: int = 8000
    method: str = "knorm"  # 'none' = no compression
    ratio: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)
    budget_policy: str | None = None
    kv_bits: int | None = None  # 8, 4 or 2: contexts' kept keys and values quantized; None: full precision
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    max_cache_bytes: int = 2 * GIB  # keys and values held by cached contexts, measured from their storages
    cache_dir: Path | None = None  # where compressed contexts are also written, to survive a restart
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask (and the default of one that gives none)
    max_prompt_tokens: int | None = None  # context + question tokens of one request; None: the model's positions
    max_body_bytes: int = 16 * 2**20  # a request body larger than this is refused (413)
    max_queue: int = 64  # requests waiting for the model; one more is refused (503)
    max_batch: int = 8  # requests decoded together as rows of the running batch (any contexts); the others wait

    def __post_init__(self) -> None:
        check_str("model_name", self.model_name, empty_ok=False)
        check_str("host", self.host, empty_ok=False)
        check_int("port", self.port, 0, 65535)
        check_str("method", self.method, empty_ok=False)
        check_float("ratio", self.ratio, 0.0, 1.0, high_open=True, note="the fraction of tokens removed")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"options must be a dict of option names to values, got {self.options!r}")
        check_str("budget_policy", self.budget_policy, none_ok=True)
        check_int("kv_bits", self.kv_bits, 2, 8, none_ok=True)
        check_str("api_key", self.api_key, empty_ok=False, none_ok=True)
        check_int("max_cache_bytes", self.max_cache_bytes, 0, note="0 caches nothing")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            raise ValueError(f"cache_dir must be a Path or None, got {self.cache_dir!r}")
        check_int("max_tokens_limit", self.max_tokens_limit, 1)
        check_int("max_prompt_tokens", self.max_prompt_tokens, 1, none_ok=True)
        check_int("max_body_bytes", self.max_body_bytes, 1)
        check_int("max_queue", self.max_queue, 1)
        check_int("max_batch", self.max_batch, 1)
