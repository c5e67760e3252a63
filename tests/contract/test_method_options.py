"""Every registered method rejects a wrongly typed option with a ValueError naming the option and the value: a bool
or a fraction for an integer option, a bool, a string or NaN for a number, anything but True/False for a flag."""

from __future__ import annotations

import math

import pytest

from kvsqueeze.methods import get_method, list_methods


def bad_values(default: object) -> list[object]:
    if isinstance(default, bool):
        return [1, "yes"]
    if isinstance(default, int):
        return [True, 2.5, "7"]
    if isinstance(default, float):
        return [True, "0.5", math.nan]
    return []


CASES = [
    (name, option, value)
    for name in list_methods()
    for option, default in type(get_method(name)).options().items()
    for value in bad_values(default)
]


def test_there_are_typed_options_to_check():
    assert len({(name, option) for name, option, _ in CASES}) > 50


@pytest.mark.parametrize(("name", "option", "value"), CASES, ids=[f"{n}.{o}={v!r}" for n, o, v in CASES])
def test_badly_typed_option_is_refused_by_name(name: str, option: str, value: object):
    cls = type(get_method(name))
    with pytest.raises(ValueError) as err:
        cls(**{option: value})
    assert option in str(err.value) and repr(value) in str(err.value)
