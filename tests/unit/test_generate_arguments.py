"""generate / answer_saved at the boundary: every argument is checked before any model forward, and a wrong one is a
ValueError that names it (never an AttributeError or TypeError from deep inside, never a silently rewritten
question). Property tests draw arbitrary values; the cases reproduced in issue 13 are listed one by one."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvsqueeze as kvs
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.pipeline import answer_saved, generate

CONTEXT = "The old baker sold a box of apples after the storm. The lighthouse keeper counted the boats at night."
FIXTURES = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)

ANYTHING = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=2)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner), st.dictionaries(st.text(max_size=1), inner)),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def model():
    from tests.tiny import tiny_model

    return tiny_model("llama")


def _message(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    return str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"questions": None}, "questions must be a string or a list of strings, got None"),
        ({"method": "knorm"}, "method must be a Method object or None, got the name 'knorm': build it with "
                              "kvsqueeze.get_method('knorm', ratio=...)"),
        ({"method": KNorm}, "method must be a Method object, got the class KNorm"),
        ({"method": 0.5}, "method must be a Method object (see kvsqueeze.get_method) or None, got 0.5"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        ({"max_new_tokens": math.nan}, "max_new_tokens must be an integer >= 1, got nan"),
        ({"questions": [["q1", "q2"]]}, "with one context (a string), questions must be a string or a list of strings"),
        ({"questions": [1, 2]}, "questions[0] must be a string, got 1"),
        ({"context": 123}, "context must be a string or a list of strings (one per context), got 123"),
        ({"context": None}, "context must be a string or a list of strings (one per context), got None"),
        ({"context": b"bytes"}, "context must be a string or a list of strings (one per context), got b'bytes'"),
        ({"context": [CONTEXT, 5], "questions": [["q"], ["q"]]}, "context 1 must be a string, got 5"),
        ({"context": [CONTEXT, CONTEXT], "questions": [["q"], [3]]}, "questions[1][0] must be a string, got 3"),
        ({"context": [CONTEXT, CONTEXT], "questions": "q"}, "with several contexts, questions must be a list of"),
        ({"chunk_size": 2.5}, "chunk_size must be an integer >= 1 or None, got 2.5"),
        ({"decode_target": 2.5}, "decode_target must be an integer >= 1 or None"),
        ({"decode_every": 0}, "decode_every must be an integer >= 1, got 0"),
        ({"answer_prefix": None}, "answer_prefix must be a string, got None"),
        ({"chat_template": "no"}, "chat_template must be True or False, got 'no'"),
        ({"tokenizer": None}, "tokenizer must be a transformers tokenizer, got None"),
        ({"model": None}, "model must be a transformers model (a torch.nn.Module), got None"),
    ],
)  # fmt: skip
def test_a_bad_argument_is_a_value_error_naming_it(model, tokenizer, kwargs: dict[str, Any], message: str):
    call = {"model": model, "tokenizer": tokenizer, "context": CONTEXT, "questions": "q", "max_new_tokens": 2}
    assert message in _message(generate, **{**call, **kwargs})


def test_a_long_context_in_an_error_is_cut(model, tokenizer):
    text = _message(generate, model, tokenizer, [CONTEXT, ["x" * 500]], [["q"], ["q"]])
    assert text.startswith("context 1 must be a string, got ['xxx") and text.endswith("...") and len(text) < 120


def test_a_tuple_of_contexts_and_of_questions_is_accepted(model, tokenizer):
    out = generate(model, tokenizer, (CONTEXT, CONTEXT), (("q",), ("q", "r")), max_new_tokens=1)
    assert [len(a) for a in out.answers] == [1, 2]


@FIXTURES
@given(value=st.one_of(ANYTHING, st.integers(max_value=0)).filter(lambda v: not (type(v) is int and v >= 1)))
def test_any_max_new_tokens_but_a_positive_int_is_refused_by_name(model, tokenizer, value: Any):
    assert _message(generate, model, tokenizer, CONTEXT, "q", max_new_tokens=value).startswith("max_new_tokens must")


def _well_formed(context: Any, questions: Any) -> bool:
    """What generate accepts: one context with a question or a list of them, or contexts with a list each."""

    def texts(q: Any) -> bool:
        return isinstance(q, str) or (isinstance(q, (list, tuple)) and bool(q) and all(isinstance(x, str) for x in q))

    if isinstance(context, str):
        return bool(context.strip()) and texts(questions)
    return (
        isinstance(context, (list, tuple))
        and bool(context)
        and all(isinstance(c, str) and c.strip() for c in context)
        and isinstance(questions, (list, tuple))
        and len(questions) == len(context)
        and all(isinstance(q, (list, tuple)) and texts(q) for q in questions)
    )


@FIXTURES
@given(context=st.one_of(st.just(CONTEXT), ANYTHING), questions=st.one_of(st.just("q"), ANYTHING))
def test_arbitrary_contexts_and_questions_are_refused_by_name(model, tokenizer, context: Any, questions: Any):
    """max_new_tokens=0 stops every call before the model: well-formed inputs reach that check, the rest are
    refused for what they are."""
    message = _message(generate, model, tokenizer, context, questions, max_new_tokens=0)
    if _well_formed(context, questions):
        assert message.startswith("max_new_tokens must"), message
    else:
        assert "context" in message or "questions" in message or "no question" in message, message


def test_answer_saved_checks_its_arguments_before_reading_the_file(model, tokenizer, tmp_path):
    missing = tmp_path / "none.safetensors"  # never opened: each bad argument is refused first
    assert "questions[0] must be a string, got 1" in _message(answer_saved, model, tokenizer, missing, [1])
    assert "max_new_tokens must be an integer >= 1" in _message(answer_saved, model, tokenizer, missing, "q", 2.5)
    assert "path must be a str or a Path, got 3" in _message(answer_saved, model, tokenizer, 3, "q")


def test_answer_saved_takes_one_question_as_a_string(model, tokenizer, tmp_path):
    out = generate(model, tokenizer, CONTEXT, "q", method=kvs.get_method("knorm", ratio=0.5), max_new_tokens=1)
    path = kvs.save_cache(tmp_path / "c.safetensors", out.cache, model)
    answers, _ = answer_saved(model, tokenizer, path, "Who sold apples?", max_new_tokens=2)
    assert len(answers) == 1  # one question, not one per character of the string
