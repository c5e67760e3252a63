"""Conversation at the boundary: bad arguments are ValueErrors naming the argument, raised before anything changes;
a refused turn leaves the conversation as it was, so it can go on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvsqueeze as kvs
from kvsqueeze.methods.knorm import KNorm

CONTEXT = "The old baker sold a box of apples after the storm. The lighthouse keeper counted the boats at night."


@pytest.fixture(scope="module")
def model():
    from tests.tiny import tiny_model

    return tiny_model("llama")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": None}, "context must be a string, got None"),
        ({"context": 5}, "context must be a string, got 5"),
        ({"method": "knorm"}, "method must be a Method object or None, got the name 'knorm'"),
        ({"method": KNorm}, "method must be a Method object, got the class KNorm"),
        ({"budget": 2.5}, "budget must be an integer >= 1 or None"),
        ({"budget": True}, "budget must be an integer >= 1 or None"),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"every": "x"}, "every must be an integer >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1 or None, got 0"),
        ({"tokenizer": "path/to/tokenizer"}, "tokenizer must be a transformers tokenizer, got 'path/to/tokenizer'"),
    ],
)
def test_bad_constructor_arguments_name_themselves(model, tokenizer, kwargs: dict[str, Any], message: str):
    call = {"model": model, "tokenizer": tokenizer, "context": CONTEXT, **kwargs}
    with pytest.raises(ValueError) as err:
        kvs.Conversation(**call)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((None,), {}, "question must be a string, got None"),
        ((["a"],), {}, "question must be a string, got ['a']"),
        (("q",), {"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
        (("q",), {"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        (("q",), {"answer": 5}, "answer must be a string or None, got 5"),
    ],
)
def test_a_refused_turn_changes_nothing(model, tokenizer, args: tuple, kwargs: dict[str, Any], message: str):
    conv = kvs.Conversation(model, tokenizer, CONTEXT)
    conv.ask("Who sold apples?", answer="The baker.")
    before = (list(conv.messages), list(conv.ids), conv.text)
    with pytest.raises(ValueError) as err:
        conv.ask(*args, **kwargs)
    assert message in str(err.value)
    assert (conv.messages, conv.ids, conv.text) == before
    assert conv.ask("And the keeper?", answer="Boats.") == "Boats."  # the conversation goes on


def test_a_question_too_long_for_the_model_leaves_the_conversation_usable(model, tokenizer):
    conv = kvs.Conversation(model, tokenizer, CONTEXT)
    before = (list(conv.messages), list(conv.ids), conv.text)
    with pytest.raises(ValueError, match="more than the model's maximum"):
        conv.ask("boats " * 1200, answer="no")
    assert (conv.messages, conv.ids, conv.text) == before
    assert conv.ask("Who sold apples?", answer="The baker.") == "The baker."


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.one_of(
        st.booleans(), st.integers(max_value=0), st.floats(), st.text(max_size=3), st.lists(st.integers(), max_size=2)
    )
)
def test_any_budget_but_a_positive_int_or_none_is_refused(model, tokenizer, value: Any):
    with pytest.raises(ValueError, match=r"^budget must be an integer >= 1 or None"):
        kvs.Conversation(model, tokenizer, CONTEXT, budget=value)


def test_load_checks_its_method_and_the_saved_state(model, tokenizer, tmp_path):
    conv = kvs.Conversation(model, tokenizer, CONTEXT)
    path = conv.save(tmp_path / "conv.safetensors")
    with pytest.raises(ValueError, match="method must be a Method object or None, got the name 'knorm'"):
        kvs.Conversation.load(path, model, tokenizer, method="knorm")  # type: ignore[arg-type]
    damaged = kvs.save_cache(tmp_path / "damaged.safetensors", conv.cache, model,
                             extra={"conversation": json.dumps({"context": CONTEXT})})  # fmt: skip
    with pytest.raises(ValueError, match=r"holds a damaged conversation \(KeyError: 'budget'\)"):
        kvs.Conversation.load(damaged, model, tokenizer)
