"""Fixtures of the server tests: the tiny Llama saved once, one shared server, and a reference model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsqueeze.loading import load_model
from tests.serve.live import Live, live_server
from tests.tiny import save_tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved once (read only)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[Live]:
    """The shared server (knorm at 0.5 by default). Tests must not depend on what others cached in it: they read
    metrics as differences and use their own documents where they count cache hits."""
    with live_server(model_dir, max_tokens_limit=512, max_prompt_tokens=1000, max_body_bytes=200_000) as live:
        yield live


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> tuple[Any, Any]:
    """The same model loaded again, for `kvsqueeze.generate` references (the server's copy belongs to its worker
    thread: running it from the test's thread at the same time would mix their hooks)."""
    return load_model(str(model_dir))
