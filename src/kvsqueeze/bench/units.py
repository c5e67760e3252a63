"""The grid's compression units: one context (query-aware: with one question) and the questions asked after it.
`plan_units` lists them for a `BenchConfig`, each checked against the model's maximum length before anything runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.dataset import load_dataset
from kvsqueeze.bench.results import content_hash
from kvsqueeze.bench.tasks import Sample
from kvsqueeze.methods import Method
from kvsqueeze.models import get_adapter
from kvsqueeze.pipeline import check_length
from kvsqueeze.prompts import encode_prompt, encode_query_aware, question_token_count


@dataclass
class Unit:
    """One compression: a context (query-aware: with one question) and the questions asked after it."""

    sample: Sample
    length: int  # the context_length of its rows: the target length, or a dataset context's token count
    group: str  # rows sharing one cost pass: the length, or the dataset
    context_ids: list[int]
    question_indices: list[int]
    question_texts: list[str]
    max_new_tokens: int
    query_aware: bool = False  # each question compressed with the context (then one question per unit)
    question_tokens: int | None = None  # query-aware: how many of the compressed prompt's last tokens are the question
    contents: list[str] = field(init=False)  # results.content_hash of each question (what its rows are keyed by)

    def __post_init__(self) -> None:
        s = self.sample
        self.contents = [content_hash(self.context_ids, text, s.answers[qi], s.metric, self.max_new_tokens)
                         for qi, text in zip(self.question_indices, self.question_texts, strict=True)]  # fmt: skip


def needs_question(method: Method | None) -> bool:
    """True for methods that only work with the question inside the compressed prompt (FINCH)."""
    return method is not None and "question" in method.needs


def cell_query_aware(config: BenchConfig, method: Method | None) -> bool:
    """Whether a cell compresses each question with its context: the run is query-aware or the method needs it."""
    return config.query_aware or needs_question(method)


def plan_units(model: Any, tokenizer: Any, config: BenchConfig) -> list[Unit]:
    """Every compression unit of the grid's contexts, checked against the model's maximum length. A query-agnostic
    run with a method that needs the question has both kinds of units (each cell uses those of its own mode)."""
    modes = sorted({cell_query_aware(config, method) for _, method, _ in config.cells()})
    units: list[Unit] = []
    for task in config.tasks:
        for length in config.lengths:
            for sample in config.task(task).samples(tokenizer, length, config.samples, config.seed):
                units += [u for aware in modes for u in _units(tokenizer, config, sample, length, str(length), aware)]
    for path in config.datasets:
        for sample in load_dataset(path):
            ids, _ = encode_prompt(tokenizer, sample.context, list(sample.questions), sample.answer_prefix)
            group = f"dataset:{sample.task}"
            units += [u for aware in modes for u in _units(tokenizer, config, sample, len(ids), group, aware)]
    max_positions = get_adapter(model).max_positions
    for u in units:
        try:
            check_length(max_positions, [u.context_ids], u.question_texts, tokenizer, u.max_new_tokens)
        except ValueError as err:
            raise ValueError(f"{u.sample.task} sample {u.sample.index} (length {u.length}): {err}") from None
    return units


def _units(
    tokenizer: Any, config: BenchConfig, sample: Sample, length: int, group: str, query_aware: bool
) -> list[Unit]:
    new = config.max_new_tokens or sample.max_new_tokens
    questions = list(sample.questions)
    if not query_aware:
        ids, texts = encode_prompt(tokenizer, sample.context, questions, sample.answer_prefix)
        return [Unit(sample, length, group, ids, list(range(len(questions))), texts, new)]
    out = []
    for i, q in enumerate(questions):
        ids, text = encode_query_aware(tokenizer, sample.context, q, sample.answer_prefix)
        n_question = question_token_count(tokenizer, sample.context, q, sample.answer_prefix)
        out.append(Unit(sample, length, group, ids, [i], [text], new, True, n_question))
    return out


def with_question(method: Method | None, unit: Unit) -> Method | None:
    """`method` told the unit's question length (its `question_tokens` option) when it needs the question."""
    if unit.question_tokens is None or not needs_question(method) or not hasattr(method, "question_tokens"):
        return method
    return dataclasses.replace(method, question_tokens=unit.question_tokens)  # type: ignore[type-var]
