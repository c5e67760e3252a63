"""The shared argument checks: every value inside the allowed range passes, every value outside it or of the wrong type
raises a ValueError naming the parameter, the value and the range (property tests over many values)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvsqueeze.methods.base import check_ratio as base_check_ratio
from kvsqueeze.validation import check_bool, check_choice, check_float, check_int, check_ratio, check_str

NOT_NUMBERS = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)


def raises_naming(check, name: str, value: object, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        check(name, value, *args, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{name} must be ") and message.endswith(f"got {value!r}")
    return message


@st.composite
def int_bounds(draw: st.DrawFn) -> tuple[int, int]:
    low = draw(st.integers(-(10**6), 10**6))
    return low, low + draw(st.integers(0, 10**6))


@given(int_bounds(), st.data())
def test_check_int_accepts_every_integer_in_range(bounds: tuple[int, int], data: st.DataObject):
    low, high = bounds
    check_int("n", data.draw(st.integers(low, high)), low, high)


@given(int_bounds(), st.integers(1, 10**30), st.booleans())
def test_check_int_rejects_integers_outside_the_range(bounds: tuple[int, int], offset: int, below: bool):
    low, high = bounds
    value = low - offset if below else high + offset
    assert f"an integer in [{low}, {high}]" in raises_naming(check_int, "n_tokens", value, low, high)


@given(st.one_of(NOT_NUMBERS, FLOATS))
def test_check_int_rejects_what_is_not_an_int(value: object):
    raises_naming(check_int, "window", value, None, None)  # no bounds: only the type is checked
    raises_naming(check_int, "window", value, 1)


@given(st.integers(-(10**9), 10**9))
def test_check_int_one_sided_and_none(value: int):
    if value >= 1:
        check_int("block_size", value, 1)
    else:
        assert "an integer >= 1" in raises_naming(check_int, "block_size", value, 1)
    if value <= 7:
        check_int("k", value, high=7)
    else:
        assert "an integer <= 7" in raises_naming(check_int, "k", value, high=7)
    check_int("seed", value)  # no bounds


def test_check_int_none_and_note():
    check_int("target_tokens", None, 1, none_ok=True)
    message = raises_naming(check_int, "target_tokens", None, 1)
    assert message == "target_tokens must be an integer >= 1, got None"
    message = raises_naming(check_int, "window", 0, 1, none_ok=True, note="recent tokens kept")
    assert message == "window must be an integer >= 1 or None (recent tokens kept), got 0"
    raises_naming(check_int, "window", True, 1, none_ok=True)


@st.composite
def float_bounds(draw: st.DrawFn) -> tuple[float, float]:
    low = draw(st.floats(-1e6, 1e6))
    return low, low + draw(st.floats(1e-3, 1e6))


@given(float_bounds(), st.booleans(), st.booleans(), st.data())
def test_check_float_accepts_every_number_in_range(
    bounds: tuple[float, float], low_open: bool, high_open: bool, data: st.DataObject
):
    low, high = bounds
    value = data.draw(st.floats(low, high, exclude_min=low_open, exclude_max=high_open))
    check_float("x", value, low, high, low_open=low_open, high_open=high_open)
    if float(int(value)) == value and (low < int(value) < high):
        check_float("x", int(value), low, high, low_open=low_open, high_open=high_open)  # ints are numbers too


@given(float_bounds(), st.floats(1e-3, 1e300), st.booleans())
def test_check_float_rejects_numbers_outside_the_range(bounds: tuple[float, float], offset: float, below: bool):
    low, high = bounds
    value = low - offset if below else high + offset
    assume(value < low or value > high)  # the offset may vanish in rounding next to a large bound
    raises_naming(check_float, "beta", value, low, high)


@given(st.floats(0.0, 1.0))
def test_check_float_open_bounds_exclude_the_bound_itself(value: float):
    if value in (0.0, 1.0):
        message = raises_naming(check_float, "share", value, 0.0, 1.0, low_open=True, high_open=True)
        assert "a number in (0, 1)" in message
    else:
        check_float("share", value, 0.0, 1.0, low_open=True, high_open=True)


@given(NOT_NUMBERS)
def test_check_float_rejects_what_is_not_a_number(value: object):
    raises_naming(check_float, "tau", value)
    if value is not None:
        raises_naming(check_float, "tau", value, 0.0, none_ok=True)


def test_check_float_nan_inf_and_messages():
    for bounds in [(None, None), (0.0, None), (None, 1.0), (0.0, 1.0)]:
        raises_naming(check_float, "eps", math.nan, *bounds)
    check_float("beta", math.inf, 0.0)  # an unlimited side takes inf ...
    message = raises_naming(check_float, "beta", math.inf, 0.0, finite=True)
    assert message.startswith("beta must be a finite number >= 0")
    raises_naming(check_float, "beta", -math.inf, 0.0)
    assert raises_naming(check_float, "tau", 0, 0, low_open=True, finite=True, note="a temperature") == (
        "tau must be a finite number > 0 (a temperature), got 0"
    )
    assert raises_naming(check_float, "lr", 20.0, 1e-8, 10.0) == "lr must be a number in [1e-08, 10], got 20.0"
    assert "a number < 2.5" in raises_naming(check_float, "x", 2.5, high=2.5, high_open=True)
    check_float("streaming_fraction", None, 0.0, 1.0, none_ok=True)
    assert raises_naming(check_float, "streaming_fraction", 2, 0.0, 1.0, none_ok=True) == (
        "streaming_fraction must be a number in [0, 1] or None, got 2"
    )
    raises_naming(check_float, "x", 10**400, 0.0, 1.0)  # compared exactly, no OverflowError from float()


@given(st.one_of(FLOATS, st.integers(), NOT_NUMBERS, st.just(math.nan)))
def test_check_ratio_is_the_half_open_unit_interval(value: object):
    inside = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 1.0
    for check in (check_ratio, base_check_ratio):  # still importable from methods.base
        if inside:
            check(value)
        else:
            with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\) \(the fraction of tokens"):
                check(value)


@given(st.one_of(st.text(max_size=4), st.integers(), st.none(), st.lists(st.text(), max_size=1)))
def test_check_choice(value: object):
    allowed = ("mean", "max", "none")
    if value in allowed:
        check_choice("normalize", value, allowed)
    else:
        message = raises_naming(check_choice, "normalize", value, allowed)
        assert "one of 'mean', 'max', 'none'" in message
        raises_naming(check_choice, "normalize", value, {"mean": 1})  # a dict or set of choices: unhashables too


@given(st.one_of(st.booleans(), st.integers(), st.text(max_size=3), st.none()))
def test_check_bool(value: object):
    if isinstance(value, bool):
        check_bool("sample", value)
    else:
        assert "True or False" in raises_naming(check_bool, "sample", value)


@given(st.one_of(st.text(max_size=4), st.integers(), st.none(), st.binary(max_size=2), st.lists(st.text(), max_size=1)))
def test_check_str(value: object):
    if isinstance(value, str):
        check_str("answer_prefix", value)
    else:
        assert "a string" in raises_naming(check_str, "answer_prefix", value)
    if isinstance(value, str) and value.strip():
        check_str("question", value, empty_ok=False)
    else:
        assert "a non-empty string" in raises_naming(check_str, "question", value, empty_ok=False)
    if value is None:
        check_str("answer", value, none_ok=True)
    elif not isinstance(value, str):
        assert "a string or None" in raises_naming(check_str, "answer", value, none_ok=True)
