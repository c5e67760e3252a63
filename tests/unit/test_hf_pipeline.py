"""The transformers pipeline over kvs.generate, on a tiny llama: the same answers and stats as kvs.generate, method
names and objects alike, per-call parameters over construction ones, clear errors, and explicit, idempotent
registration (never an import side effect)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import kvsqueeze as kvs
from kvsqueeze.hf_pipeline import TASK, KVSqueezePipeline
from tests.tiny import tiny_model

CONTEXT = (
    "The harbour master walked to the market in the morning because it was raining. The old baker sold a box of "
    "apples after the storm. The lighthouse keeper counted the boats at night and nobody knows why."
)
OTHER = "A young sailor painted a wooden boat last winter. The mayor visited the museum on Sunday."
QUESTIONS = ["Who sold apples?", "When did the keeper count the boats?"]
MAX_NEW = 6
SAME_STATS = ("tokens_before", "tokens_after", "kv_bytes_before", "kv_bytes_after", "kept_tokens_per_layer")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    kvs.register_pipeline()
    return pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu")


def same_stats(stats: dict, expected: kvs.GenerationStats) -> bool:
    reference = expected.to_dict()
    return all(stats[key] == reference[key] for key in SAME_STATS)


# --- the same answers as kvs.generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [("knorm", {}), ("snapkv", {"window": 4})])
def test_questions_answer_as_generate(pipe, model, tokenizer, name, options):
    method = kvs.get_method(name, ratio=0.5, **options)
    out = pipe(CONTEXT, questions=QUESTIONS, method=method, max_new_tokens=MAX_NEW, answer_prefix="Answer:")
    ref = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, method, max_new_tokens=MAX_NEW, answer_prefix="Answer:")
    assert set(out) == {"answers", "stats"}
    assert out["answers"] == ref.answers
    assert any(out["answers"]), "empty answers would make the comparison vacuous"
    assert same_stats(out["stats"], ref.stats)


def test_one_question_answers_as_generate(pipe, model, tokenizer):
    method = kvs.get_method("knorm", ratio=0.5)
    out = pipe(CONTEXT, question=QUESTIONS[1], method=method, max_new_tokens=MAX_NEW)
    ref = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS[1], method, max_new_tokens=MAX_NEW)
    assert set(out) == {"answer", "stats"}
    assert out["answer"] == ref.answers[0] and out["answer"]
    assert same_stats(out["stats"], ref.stats)


def test_without_chat_template_answers_as_generate(model, tokenizer_no_template):
    kvs.register_pipeline()
    plain = pipeline(TASK, model=model, tokenizer=tokenizer_no_template, device="cpu")
    out = plain(CONTEXT, questions=QUESTIONS, max_new_tokens=MAX_NEW)
    ref = kvs.generate(model, tokenizer_no_template, CONTEXT, QUESTIONS, max_new_tokens=MAX_NEW)
    assert out["answers"] == ref.answers
    assert same_stats(out["stats"], ref.stats)


def test_ratio_zero_equals_no_compression(pipe):
    plain = pipe(CONTEXT, questions=QUESTIONS, max_new_tokens=MAX_NEW)
    zero = pipe(CONTEXT, questions=QUESTIONS, method="knorm", ratio=0.0, max_new_tokens=MAX_NEW)
    assert zero["answers"] == plain["answers"]
    assert zero["stats"]["kv_bytes_after"] == zero["stats"]["kv_bytes_before"] == plain["stats"]["kv_bytes_after"]


def test_method_name_equals_method_object(pipe):
    by_name = pipe(
        CONTEXT, question=QUESTIONS[0], method="snapkv", ratio=0.5, method_options={"window": 4}, max_new_tokens=MAX_NEW
    )
    method = kvs.get_method("snapkv", ratio=0.5, window=4)
    by_object = pipe(CONTEXT, question=QUESTIONS[0], method=method, max_new_tokens=MAX_NEW)
    assert by_name["answer"] == by_object["answer"]
    assert by_name["stats"]["kv_bytes_after"] == by_object["stats"]["kv_bytes_after"]
    assert by_name["stats"]["kv_bytes_after"] < by_name["stats"]["kv_bytes_before"], "the method must have run"


def test_stats_show_bytes_dropping_at_half_ratio(pipe):
    stats = pipe(CONTEXT, question=QUESTIONS[0], method="knorm", ratio=0.5, max_new_tokens=MAX_NEW)["stats"]
    n = stats["tokens_before"]
    assert n > 20
    assert stats["tokens_after"] == math.floor(n * 0.5)
    # 4 layers, 2 KV heads x 16 dims x fp32 x (K, V) = 256 bytes a token and layer
    assert stats["kv_bytes_before"] == 4 * 256 * n
    assert stats["kv_bytes_after"] == 4 * 256 * math.floor(n * 0.5)


def test_call_parameters_override_construction_ones(model, tokenizer):
    kvs.register_pipeline()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu", method="knorm", ratio=0.5, max_new_tokens=3)
    default = pipe(CONTEXT, question=QUESTIONS[0])
    assert default["stats"]["tokens_after"] == math.floor(default["stats"]["tokens_before"] * 0.5)
    uncompressed = pipe(CONTEXT, question=QUESTIONS[0], ratio=0.0)
    assert uncompressed["stats"]["kv_bytes_after"] == uncompressed["stats"]["kv_bytes_before"]


def test_a_list_of_contexts_gives_one_output_each(pipe):
    outs = pipe([CONTEXT, OTHER], question=QUESTIONS[0], max_new_tokens=MAX_NEW)
    alone = [pipe(c, question=QUESTIONS[0], max_new_tokens=MAX_NEW)["answer"] for c in (CONTEXT, OTHER)]
    assert [o["answer"] for o in outs] == alone
    assert outs[0]["stats"]["tokens_before"] > outs[1]["stats"]["tokens_before"]


# --- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": "q", "method": "knrm"}, "Did you mean 'knorm'"),
        ({"question": "q", "method": "knorm", "method_options": {"windw": 4}}, "Unknown option 'windw'"),
        ({}, "no question given"),
        ({"question": "q", "questions": ["q"]}, "not both"),
        ({"question": " "}, "question must be a non-empty string"),
        ({"questions": []}, "non-empty list"),
        ({"questions": "q"}, "non-empty list"),
        ({"question": "q", "ratio": 0.5}, "no method was given"),
        ({"question": "q", "method": kvs.get_method("knorm"), "ratio": 0.5}, "the Method object"),
        ({"question": "q", "method": 3}, "registered method name"),
        ({"question": "q", "press": object()}, "kvsqueeze takes method="),
        ({"question": "q", "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_call_raises_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(CONTEXT, **kwargs)


@pytest.mark.parametrize("context", [None, "", "   "])
def test_missing_context_raises(pipe, context):
    with pytest.raises(ValueError, match="context"):
        pipe(context, question="q")


def test_unknown_method_fails_at_construction(model, tokenizer):
    kvs.register_pipeline()
    with pytest.raises(ValueError, match="Did you mean 'snapkv'"):
        pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu", method="snapvk")


def test_missing_tokenizer_raises(model):
    kvs.register_pipeline()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        pipeline(TASK, model=model, device="cpu")


# --- registration -----------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    assert kvs.register_pipeline() == TASK
    entry = PIPELINE_REGISTRY.to_dict()[TASK]
    assert kvs.register_pipeline() == TASK
    assert PIPELINE_REGISTRY.to_dict()[TASK] is entry, "a second call must not register again"
    assert entry["impl"] is KVSqueezePipeline


def test_import_does_not_register():
    code = (
        "import kvsqueeze, kvsqueeze.hf_pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        f"print({TASK!r} in PIPELINE_REGISTRY.get_supported_tasks())\n"
        "kvsqueeze.register_pipeline()\n"
        f"print({TASK!r} in PIPELINE_REGISTRY.get_supported_tasks())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "True"]
