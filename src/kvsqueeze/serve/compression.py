"""A request's compression settings (the `kv_compression` extension field) and the method they build.

A field left out takes the server's value (`--method`, `--ratio`, `--option`, `--budget-policy`, `--kv-bits`), except
that the server's options and budget policy only apply to the server's own method: a request naming another method
starts from that method's defaults. Bad names and options raise the registry's ValueErrors ("Unknown method
'snapkvv'. Did you mean 'snapkv'?"), which the server answers with a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvsqueeze.methods import get_method
from kvsqueeze.methods.base import Method
from kvsqueeze.methods.registry import with_budget_policy
from kvsqueeze.quantization import QuantSpec, quant_spec
from kvsqueeze.validation import check_float

FIELDS = ("method", "ratio", "options", "budget_policy", "kv_bits")


@dataclass(frozen=True)
class Compression:
    """How a context is compressed: a registered method ('none' = off), its ratio, options and budget policy, and the
    bits its kept keys and values are stored in (8, 4 or 2; None = full precision)."""

    method: str = "knorm"
    ratio: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)
    budget_policy: str | None = None
    kv_bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": self.ratio, "options": dict(self.options),
                "budget_policy": self.budget_policy, "kv_bits": self.kv_bits}  # fmt: skip

    def quant(self) -> QuantSpec | None:
        """How the context's kept keys and values are quantized (None: full precision); a ValueError when kv_bits is
        not one the storage has."""
        try:
            return quant_spec(self.kv_bits)
        except ValueError as err:
            raise ValueError(f"kv_compression.kv_bits: {err}") from None

    def build(self) -> Method | None:
        """The method these settings describe (None for 'none'); a ValueError names what is wrong."""
        if not isinstance(self.method, str) or not self.method.strip():
            raise ValueError(f"kv_compression.method must be a method name (see `kvsqueeze list`), got {self.method!r}")
        check_float("kv_compression.ratio", self.ratio, 0.0, 1.0, high_open=True, note="the fraction of tokens removed")
        if "ratio" in self.options:
            raise ValueError("give the ratio as kv_compression.ratio, not in kv_compression.options")
        self.quant()
        if self.method.lower() == "none":
            if self.options or self.budget_policy is not None:
                raise ValueError("kv_compression.method 'none' takes no options and no budget_policy")
            return None
        method = get_method(self.method, ratio=self.ratio, **self.options)
        if "question" in method.needs:
            raise ValueError(
                f"method {self.method!r} needs the question to compress the context (query-aware); the server "
                "compresses a context before any question, to reuse it: choose a query-agnostic method"
            )
        return with_budget_policy(self.budget_policy, method, self.ratio)


def request_compression(given: Mapping[str, Any] | None, default: Compression) -> Compression:
    """The settings of a request: the fields it gives over the server's `default` (see the module docstring)."""
    if not given:
        return default
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"kv_compression has no field {unknown[0]!r}; its fields: {', '.join(FIELDS)}")
    same_method = given.get("method", default.method) == default.method
    base = default if same_method else replace(default, options={}, budget_policy=None)
    values = {key: value for key, value in given.items() if value is not None or key == "budget_policy"}
    if "options" in given and given["options"] is None:
        values["options"] = {}
    return replace(base, **values)
