"""Shared fixtures of the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import save_tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved once for all CLI tests (read only: tests must not write into it)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")
