"""Integration tier on the embedded SmolLM2-135M-Instruct (slow: run with --run-slow or KVSQUEEZE_RUN_SLOW=1)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest

import kvsqueeze as kvs

pytestmark = pytest.mark.slow

FILLER = (
    "The market square filled slowly as the bakers opened their shutters. Fishermen argued about the weather "
    "while children chased pigeons between the stalls. "
)
NEEDLE = "The secret number of the lighthouse keeper is 5831. "
QUESTION = "What is the secret number of the lighthouse keeper?"
PREFIX = "The secret number of the lighthouse keeper is"


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any]:
    return kvs.load_model()


def _context() -> str:
    return FILLER * 3 + NEEDLE + FILLER * 3


def test_default_model_is_smollm2(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    adapter = kvs.get_adapter(model)
    assert (adapter.n_layers, adapter.n_q_heads, adapter.n_kv_heads) == (30, 9, 3)
    assert tokenizer.chat_template


# Options a method needs to take a token ratio (ThinK prunes key channels; tokens go to a scorer)
NEEDS_OPTIONS: dict[str, dict[str, object]] = {"think": {"scorer": "snapkv"}}


@pytest.mark.parametrize("name", sorted(kvs.list_methods()))
def test_every_method_runs_end_to_end(smol: tuple[Any, Any], name: str) -> None:
    model, tokenizer = smol
    defaults = kvs.get_method(name).options()
    # sizes a ~200-token context can afford (LagKV's 16 sinks + 128-token tail would not fit half the budget)
    small = {"window": 16, "partition_size": 32, "n_sink": 4}
    options = {k: v for k, v in small.items() if isinstance(defaults.get(k), int) and defaults[k] > v}
    options.update(NEEDS_OPTIONS.get(name, {}))
    method = kvs.get_method(name, ratio=0.5, **options)
    out = kvs.generate(model, tokenizer, _context(), [QUESTION], method=method, max_new_tokens=6, answer_prefix=PREFIX)
    assert isinstance(out.answers[0], str)
    s = out.stats
    if type(method).budget_kind == "adaptive":  # the rule sizes each layer (SimLayerKV: lazy layers only)
        assert s.kv_bytes_after < s.kv_bytes_before
        return
    assert s.kv_bytes_after < 0.6 * s.kv_bytes_before
    assert s.tokens_after == pytest.approx(s.tokens_before * 0.5, abs=1.0)


def test_knorm_half_still_answers_the_needle(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    base = kvs.generate(model, tokenizer, _context(), [QUESTION], max_new_tokens=6, answer_prefix=PREFIX)
    assert "5831" in base.answers[0]
    out = kvs.generate(model, tokenizer, _context(), [QUESTION], method=kvs.get_method("knorm", ratio=0.5),
                       max_new_tokens=6, answer_prefix=PREFIX)  # fmt: skip
    assert "5831" in out.answers[0]
    assert out.stats.kv_bytes_after <= base.stats.kv_bytes_after // 2 + 30 * 2 * 3 * 64 * 4


def test_bundled_example_uncompressed_answer(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    example = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())
    out = kvs.generate(model, tokenizer, example["context"], [example["question"]], max_new_tokens=6,
                       answer_prefix=example["answer_prefix"])  # fmt: skip
    assert example["answers"][0] in out.answers[0]
    assert 1500 < out.stats.tokens_before < 2500
