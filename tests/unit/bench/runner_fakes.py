"""A small generated task and a method that can interrupt a run, for the runner and CLI tests (never registered
globally: tests add them to the registries with monkeypatch, so other tests never see them)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from torch import Tensor

from kvsqueeze.bench.tasks.base import TASKS, Sample, Task
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.registry import METHODS

_FILLER = ["The harbour was quiet in the morning.", "Gulls circled over the old market.",
           "A farmer from the hills sold apples.", "The lighthouse keeper counted the boats."]  # fmt: skip


@dataclass
class FakeTask(Task):
    """Find a code hidden in filler text (two questions per context)."""

    name: ClassVar[str] = "fake"

    def samples(self, tokenizer: Any, length: int, n: int, seed: int = 0) -> list[Sample]:
        out = []
        for i in range(n):
            rng = random.Random(f"{seed}-{length}-{i}")
            code = str(rng.randint(1000, 9999))
            parts: list[str] = []
            while len(tokenizer(" ".join(parts))["input_ids"]) < length:
                parts.append(rng.choice(_FILLER))
            parts.insert(rng.randint(0, len(parts)), f"The code is {code}.")
            out.append(Sample(task=self.name, index=i, context=" ".join(parts),
                              questions=("What is the code?", "What did the farmer sell?"),
                              answers=((code,), ("apples",)), max_new_tokens=4))  # fmt: skip
        return out


class Interrupt:
    """How many more plans FakeInterrupt makes before raising KeyboardInterrupt (None: never)."""

    after: int | None = None
    calls = 0


@dataclass
class FakeInterrupt(ScorerMethod):
    """KNorm-like scores, but raises KeyboardInterrupt once `Interrupt.after` layers were scored."""

    name: ClassVar[str] = "fake_interrupt"

    def score(self, ctx: ScoreContext) -> Tensor:
        Interrupt.calls += 1
        if Interrupt.after is not None and Interrupt.calls > Interrupt.after:
            raise KeyboardInterrupt
        return -ctx.keys.float().norm(dim=-1)


@dataclass
class FakeChunked(ScorerMethod):
    """KNorm-like scores from a method that declares it cannot use a shared prefill (run for real)."""

    name: ClassVar[str] = "fake_chunked"
    shared_prefill: ClassVar[bool] = False

    def score(self, ctx: ScoreContext) -> Tensor:
        return -ctx.keys.float().norm(dim=-1)


class Gate:
    """Where FakeGate waits: it creates `entered`, then scores only once `opened` exists (None: never waits)."""

    entered: Path | None = None
    opened: Path | None = None


@dataclass
class FakeGate(ScorerMethod):
    """KNorm-like scores that wait at `Gate` on their first call: holds a bench mid-run while a test looks at it."""

    name: ClassVar[str] = "fake_gate"

    def score(self, ctx: ScoreContext) -> Tensor:
        if Gate.entered is not None and Gate.opened is not None:
            Gate.entered.touch()
            deadline = time.monotonic() + 600
            while not Gate.opened.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return -ctx.keys.float().norm(dim=-1)


def register_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add the fake task and methods to the registries for one test (monkeypatch removes them after it)."""
    monkeypatch.setitem(TASKS._entries, "fake", FakeTask)
    monkeypatch.setitem(METHODS._entries, "fake_interrupt", FakeInterrupt)
    monkeypatch.setitem(METHODS._entries, "fake_chunked", FakeChunked)
    monkeypatch.setitem(METHODS._entries, "fake_gate", FakeGate)
    Interrupt.after, Interrupt.calls = None, 0
