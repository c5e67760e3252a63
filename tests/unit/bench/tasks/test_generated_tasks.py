"""Every registered task, parametrized over the registry: determinism, answers in the context, token lengths."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.tasks import Sample, get_task, list_tasks
from kvsqueeze.bench.tasks._common import count_tokens

TASKS = list_tasks()
EXPECTED = {
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa", "multiturn",
    "passkey", "passkey_varied", "niah_varied",
}  # fmt: skip


def test_every_task_family_is_registered() -> None:
    assert set(TASKS) >= EXPECTED


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_samples_other_seed_other_samples(name: str, tokenizer: Any) -> None:
    task = get_task(name)
    a = task.samples(tokenizer, 1200, 3, seed=1)
    b = get_task(name).samples(tokenizer, 1200, 3, seed=1)
    c = task.samples(tokenizer, 1200, 3, seed=2)
    assert a == b
    assert [s.context for s in a] != [s.context for s in c]
    assert len({s.context for s in a}) == 3  # samples of one seed differ too
    assert a[:2] == task.samples(tokenizer, 1200, 2, seed=1)  # sample i does not depend on n


@pytest.mark.parametrize("name", TASKS)
def test_samples_are_well_formed_and_every_answer_is_in_the_context(name: str, tokenizer: Any) -> None:
    for sample in get_task(name).samples(tokenizer, 1500, 4, seed=0):
        assert isinstance(sample, Sample) and sample.task == name
        assert sample.answer_prefix and sample.max_new_tokens >= 8
        for question, refs in zip(sample.questions, sample.answers, strict=True):
            assert question.strip() and refs
            if sample.metric == "all":
                assert all(r in sample.context for r in refs), (refs, question)
            else:
                assert any(r in sample.context for r in refs), (refs, question)
            assert score(" ".join(refs), refs, sample.metric) == 1.0
            assert score("", refs, sample.metric) == 0.0


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("length", [800, 2000, 4000])
def test_context_length_within_5_percent_of_target(name: str, length: int, tokenizer: Any) -> None:
    for sample in get_task(name).samples(tokenizer, length, 2, seed=3):
        n = count_tokens(tokenizer, sample.context)
        assert abs(n - length) <= 0.05 * length, (n, length)
        assert sample.meta["tokens"] == n


@pytest.mark.parametrize("name", TASKS)
def test_too_short_length_raises_a_clear_error(name: str, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="length"):
        get_task(name).samples(tokenizer, 20, 1)


def test_generation_at_8k_tokens_is_fast(tokenizer: Any) -> None:
    start = time.perf_counter()
    sample = get_task("niah_single").samples(tokenizer, 8000, 1)[0]
    assert time.perf_counter() - start < 5.0  # about 0.1 s; generous for a busy machine
    assert abs(count_tokens(tokenizer, sample.context) - 8000) <= 400


def test_unknown_task_and_option_raise_with_suggestions() -> None:
    with pytest.raises(ValueError, match="niah_single"):
        get_task("niah_singel")
    with pytest.raises(ValueError, match="num_keys"):
        get_task("niah_multikey", num_key=3)
    with pytest.raises(ValueError, match="Options"):
        get_task("passkey", values="numbers")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("niah_single", {"values": "letters"}, "values"),
        ("niah_single", {"keys": "emoji"}, "keys"),
        ("niah_single", {"depth": 1.5}, r"\[0, 1\]"),
        ("niah_multikey", {"num_keys": 0}, "num_keys"),
        ("niah_multivalue", {"num_values": 100}, "num_values"),
        ("niah_multiquery", {"num_queries": -1}, "num_queries"),
        ("vt", {"num_hops": 0}, "num_hops"),
        ("vt", {"num_chains": 0}, "num_chains"),
        ("cwe", {"freq_common": 3, "freq_uncommon": 3}, "freq_common"),
        ("fwe", {"alpha": 0.5}, "alpha"),
        ("qa", {"fact": "weather"}, "fact"),
        ("multiturn", {"num_questions": 0}, "num_questions"),
        ("passkey", {"filler": "lorem"}, "filler"),
        ("passkey", {"digits": 0}, "digits"),
    ],
)
def test_bad_options_raise_naming_the_value(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_task(name, **options)


@pytest.mark.parametrize(("length", "n", "seed"), [(0, 1, 0), (1000, -1, 0), (1000, 1, "x")])
def test_bad_sample_requests_raise(length: int, n: int, seed: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError):
        get_task("niah_single").samples(tokenizer, length, n, seed)


def test_zero_samples_is_an_empty_list(tokenizer: Any) -> None:
    assert get_task("qa").samples(tokenizer, 1000, 0) == []


@pytest.mark.slow  # two fresh interpreters importing transformers: ~10 s idle, minutes on a busy machine
def test_samples_do_not_depend_on_the_process_hash_seed() -> None:
    script = (
        "import hashlib; from tests.tiny import tiny_tokenizer; from kvsqueeze.bench.tasks import get_task, list_tasks;"
        "t = tiny_tokenizer(); h = hashlib.sha256()\n"
        "for name in list_tasks():\n"
        "    for s in get_task(name).samples(t, 600 if name != 'cwe' else 900, 1):\n"
        "        h.update(repr((s.context, s.questions, s.answers)).encode())\n"
        "print(h.hexdigest())"
    )
    root = Path(__file__).resolve().parents[4]
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
        result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout.strip())
    assert len(digests) == 1
