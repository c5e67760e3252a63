"""Argument checks shared by every module: each raises a ValueError naming the parameter, the bad value and what
is allowed, e.g. "window must be an integer >= 1 (recent tokens kept), got 0".

A bool is never accepted where a number is asked for (Python counts True as the integer 1, but `window=True` is a
mistake, not a window of one token). Numbers are compared as they are, without converting them first, so a huge
integer or a NaN is rejected with the same clear error instead of an OverflowError or a silent pass.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NoReturn


def _show(bound: float) -> str:
    """A bound as a reader writes it: 0 rather than 0.0, inf, 1e-08."""
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return repr(bound)


def _fail(name: str, value: object, allowed: str, none_ok: bool, note: str) -> NoReturn:
    text = f"{name} must be {allowed}"
    if none_ok:
        text += " or None"
    if note:
        text += f" ({note})"
    raise ValueError(f"{text}, got {value!r}")


def int_range(low: int | None, high: int | None) -> str:
    """What check_int asks for, in words: "an integer in [1, 8]", "an integer >= 1", "an integer"."""
    if low is not None and high is not None:
        return f"an integer in [{low}, {high}]"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer <= {high}"
    return "an integer"


def float_range(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False, finite: bool = False
) -> str:
    """What check_float asks for, in words: "a number in [0, 1)", "a finite number > 0", "a number"."""
    kind = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_show(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_show(high)}"
    return kind


def check_int(
    name: str,
    value: object,
    low: int | None = None,
    high: int | None = None,
    *,
    none_ok: bool = False,
    note: str = "",
) -> None:
    """`value` must be an int (not a bool) with low <= value <= high (a bound left None is open); None passes when
    `none_ok`. `note` is added to the error in parentheses (what the parameter means)."""
    if value is None and none_ok:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        _fail(name, value, int_range(low, high), none_ok, note)


def check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = False,
    none_ok: bool = False,
    note: str = "",
) -> None:
    """`value` must be an int or a float (not a bool) within the bounds: closed unless `low_open` / `high_open`, a
    bound left None is unlimited. NaN never passes; +-inf passes only an unlimited side, and never when `finite`."""
    if value is None and none_ok:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and (math.isnan(value) or (finite and math.isinf(value))))
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    ):
        _fail(name, value, float_range(low, high, low_open, high_open, finite), none_ok, note)


def check_choice(name: str, value: object, allowed: Collection[object]) -> None:
    """`value` must equal one of `allowed` (listed in the error in their order)."""
    try:
        found = value in allowed
    except TypeError:  # an unhashable value asked of a set or a dict: not one of them
        found = False
    if not found:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """`value` must be True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_str(name: str, value: object, *, empty_ok: bool = True, none_ok: bool = False) -> None:
    """`value` must be a string (with text other than whitespace unless `empty_ok`); None passes when `none_ok`."""
    if value is None and none_ok:
        return
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        _fail(name, value, "a string" if empty_ok else "a non-empty string", none_ok, "")


def check_ratio(ratio: object) -> None:
    """A compression ratio: the fraction of tokens removed, a number in [0, 1)."""
    check_float("ratio", ratio, 0.0, 1.0, high_open=True, note="the fraction of tokens removed")
