"""Fixtures shared by the benchmark's unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.tiny import tiny_model, tiny_tokenizer
from tests.unit.bench.runner_fakes import register_fakes


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake task and methods of `runner_fakes`, registered for this test."""
    register_fakes(monkeypatch)


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    """A tiny random Llama and its tokenizer, shared by a test module."""
    return tiny_model("llama"), tiny_tokenizer()
