"""Shared pytest setup: offline guards, modest CPU threading, the `--run-slow` switch and tiny-model fixtures."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported anywhere: tests must never reach the network or the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kvsqueeze.loading import load_model
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer
from tests.unit.bench.runner_fakes import register_fakes

torch.set_num_threads(2)

RUN_SLOW_ENV = "KVSQUEEZE_RUN_SLOW"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help=f"run tests marked @pytest.mark.slow (same as setting {RUN_SLOW_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: tests that load the embedded SmolLM2 model (integration tier)")


def _slow_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--run-slow")) or os.environ.get(RUN_SLOW_ENV, "").strip() == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _slow_enabled(config):
        return
    skip_slow = pytest.mark.skip(reason=f"slow test: pass --run-slow or set {RUN_SLOW_ENV}=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def _calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Calibration artifacts written during the tests go to a session temporary directory, never to ~/.cache."""
    path = tmp_path_factory.mktemp("calibration")
    patch = pytest.MonkeyPatch()
    patch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer with a chat template (shared by the session: do not mutate it)."""
    return tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def tokenizer_no_template() -> PreTrainedTokenizerFast:
    """The same tokenizer without a chat template (`chat_template is None`; shared: do not mutate it)."""
    return tiny_tokenizer(chat_template=False)


@pytest.fixture
def make_model() -> Callable[..., PreTrainedModel]:
    """The `tiny_model(family, seed=0, **config_overrides)` factory: every call builds a fresh model."""
    return tiny_model


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's fake task and methods (`tests/unit/bench/runner_fakes.py`), registered for this test."""
    register_fakes(monkeypatch)


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    """A tiny random Llama and its tokenizer, shared by a test module."""
    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A real local Ray of 2 CPUs for a test module (Ray, an optional extra, is imported by the tests that use it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """(path, model, tokenizer): a tiny Llama saved on disk and loaded from there, as Ray actors load it by name."""
    path = str(save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama"))
    return (path, *load_model(path))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """This process on one torch thread, as each Ray actor is: the same float sums, so the same greedy answers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
