"""What a benchmark task is: a deterministic generator of samples (a context and the questions asked about it).

A task is a class registered by name; `get_task(name, **options)` builds one and `task.samples(tokenizer, length,
n, seed)` returns `n` samples whose contexts are about `length` tokens of that tokenizer. Same arguments, same
samples: every random choice comes from `random.Random(seed)`-style generators seeded by (seed, sample index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from kvsqueeze.registry import Registry, first_paragraph
from kvsqueeze.validation import check_choice

Metric = Literal["all", "any"]  # RULER string match: every reference contained / at least one (QA)


@dataclass(frozen=True)
class Sample:
    """One context and the questions asked about it (the context is compressed once, before any question)."""

    task: str
    index: int  # position of the sample within its task and length (with the seed, identifies it)
    context: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]  # references per question
    answer_prefix: str = ""  # text the answer starts with (weak models need it), per sample
    max_new_tokens: int = 32
    metric: Metric = "all"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. depth, needle, target length

    def __post_init__(self) -> None:
        if not self.questions:
            raise ValueError(f"sample {self.task}#{self.index} has no question")
        if len(self.answers) != len(self.questions):
            raise ValueError(
                f"sample {self.task}#{self.index}: {len(self.questions)} questions but {len(self.answers)} answer lists"
            )
        check_choice("metric", self.metric, ("all", "any"))


@dataclass
class Task:
    """Base of generated tasks: subclasses are dataclasses whose fields are the task's options."""

    name: ClassVar[str] = ""

    def samples(self, tokenizer: Any, length: int, n: int, seed: int = 0) -> list[Sample]:
        """`n` samples with contexts of about `length` tokens (within 5%) of `tokenizer`."""
        raise NotImplementedError

    @classmethod
    def description(cls) -> str:
        return first_paragraph(cls.__doc__) or cls.__name__


TASKS: Registry[type[Task]] = Registry("task")
T = TypeVar("T", bound=type[Task])


def register_task(name: str):
    """Class decorator registering a Task under `name`."""

    def decorator(cls: T) -> T:
        cls.name = name
        TASKS.register(name)(cls)
        return cls

    return decorator


def get_task(name: str, **options: Any) -> Task:
    """Build a registered task; unknown names or options raise ValueError with close matches."""
    task: Task = TASKS.build(name, **options)
    return task


def list_tasks() -> list[str]:
    return TASKS.names()
