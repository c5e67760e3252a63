"""Property tests over every registered method and every option: whatever value an option is given, `get_method`
either builds the method, holding a value of the option's annotated type, or raises a ValueError that names the
method and the option; never another exception. A value of the wrong type is always refused, and its error also
shows the value. The annotations are read here as a user reads them, independently of the registry's own checks."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.methods import METHODS, Method, get_method, list_methods

NAMES = list_methods()
OPTIONS = [
    (name, f.name, get_type_hints(METHODS.get(name))[f.name])
    for name in NAMES
    for f in dataclasses.fields(METHODS.get(name))  # type: ignore[arg-type]
    if not f.name.startswith("_")
]
IDS = [f"{name}.{option}" for name, option, _ in OPTIONS]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63, max_value=2**70),
    st.floats(),  # NaN and +-inf included
    st.text(max_size=6),
    st.sampled_from(NAMES),  # registered names, right or wrong for the option
    st.sampled_from(NAMES).map(get_method),  # methods of every kind
    st.binary(max_size=3),
)
ANY_VALUE = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.tuples(SCALARS, SCALARS),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object),
)


def conforms(value: Any, hint: Any) -> bool:
    """True when `value`, as the method holds it after construction, has the annotated type."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(items) == len(value) and all(map(conforms, value, items))
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return type(value) is int and abs(value) < 2**63
    if hint is float:
        return type(value) is int or (type(value) is float and not math.isnan(value))
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise AssertionError(f"an annotation this test does not know: {hint!r}")


def given_fits(value: Any, hint: Any) -> bool:
    """True when `value`, as a user passes it, is of the annotated type: lists count as tuples, registered names as
    the methods they name."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(given_fits(value, a) for a in args)
    if origin is tuple and isinstance(value, list):
        value = tuple(value)
    if origin is tuple and isinstance(value, tuple):
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(items) == len(value) and all(map(given_fits, value, items))
    if isinstance(hint, type) and issubclass(hint, Method) and isinstance(value, str):
        return METHODS.known(value) and issubclass(METHODS.get(value), hint)
    return conforms(value, hint)


def test_every_annotation_is_one_this_test_reads():
    for _, _, hint in OPTIONS:
        conforms(None, hint)  # raises on an annotation of an unknown form
    assert len(OPTIONS) > 100


@pytest.mark.parametrize(("name", "option", "hint"), OPTIONS, ids=IDS)
@settings(max_examples=20, deadline=None)
@given(value=ANY_VALUE)
def test_any_value_builds_a_typed_method_or_is_refused_by_name(name: str, option: str, hint: Any, value: Any):
    try:
        method = get_method(name, **{option: value})
    except ValueError as err:
        message = str(err)
        assert message.startswith(f"{name}: ") and option in message, message
        return
    assert given_fits(value, hint), f"{name}.{option}={value!r} was accepted"
    assert conforms(getattr(method, option), hint), getattr(method, option)


@pytest.mark.parametrize(("name", "option", "hint"), OPTIONS, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_value_of_the_wrong_type_is_refused_naming_method_option_and_value(
    name: str, option: str, hint: Any, data: st.DataObject
):
    value = data.draw(ANY_VALUE.filter(lambda v: not given_fits(v, hint)), label="value")
    with pytest.raises(ValueError) as err:
        get_method(name, **{option: value})
    message = str(err.value)
    assert message.startswith(f"{name}: {option} must be ") and f"got {value!r}" in message


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("snapkv", {"window": 8.5}, "snapkv: window must be an integer, got 8.5"),
        ("snapkv", {"window": True}, "snapkv: window must be an integer, got True"),
        ("leverage", {"seed": 2.5}, "leverage: seed must be an integer, got 2.5"),
        ("lagkv", {"partition_size": 2.5}, "lagkv: partition_size must be an integer, got 2.5"),
        ("random", {"seed": 2**64}, f"random: seed must be an integer, got {2**64} (beyond 64 bits)"),
        ("compose", {"methods": 3}, "compose: methods must be a list of scoring methods"),
        ("layer_budgets", {"weights": None}, "layer_budgets: weights must be a list of numbers, got None"),
        ("adakv", {"scorer": "snapk"}, "adakv: scorer must be a scoring method"),
        ("adakv", {"scorer": "kvzip"}, "got 'kvzip' (the method 'kvzip' is not of that kind)"),
        ("expected_attention", {"use_vnorm": "True"}, "expected_attention: use_vnorm must be True or False"),
        ("snapkv", {"window": 0}, "snapkv: window must be an integer >= 1"),  # the method's own range check
    ],
)
def test_reproduced_cases_are_refused_with_a_clear_message(name: str, options: dict[str, Any], expected: str):
    with pytest.raises(ValueError) as err:
        get_method(name, **options)
    assert expected in str(err.value)


def test_an_unknown_scorer_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"got 'snapk' \(no method is registered under that name. Did you mean "):
        get_method("adakv", scorer="snapk")


def test_registered_names_are_accepted_for_method_fields_and_lists_for_tuples():
    assert type(get_method("adakv", scorer="snapkv").scorer).name == "snapkv"
    compose = get_method("compose", ratio=0.5, methods=["knorm", "tova"], shares=[0.25, 0.75])
    assert [type(m).name for m in compose.methods] == ["knorm", "tova"] and compose.shares == (0.25, 0.75)


@pytest.mark.parametrize("name", [None, 123, 1.5, ["knorm"], b"knorm"])
def test_a_method_name_that_is_not_a_string_is_refused(name: Any):
    with pytest.raises(ValueError, match="method name must be a string"):
        get_method(name)
