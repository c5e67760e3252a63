"""Fixtures of the tune tests: the benchmark's fake task and methods, and a tiny random Llama."""

from __future__ import annotations

from typing import Any

import pytest

from tests.tiny import tiny_model, tiny_tokenizer
from tests.unit.bench.runner_fakes import register_fakes


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    register_fakes(monkeypatch)


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    return tiny_model("llama"), tiny_tokenizer()
