"""The method registry: `@register_method("name")` on a Method class; `get_method(name, **options)` builds one.

`get_method` is where every option's type is checked, from the annotations of the method's dataclass fields, so a
new method gets the checks without writing them: `int` takes an int (not a bool, not 8.0, within 64 bits), `float` an
int or a float (not a bool, not NaN), `bool` only True/False, `str` a string, `X | None` None too, `tuple[X, ...]` a
list or tuple of X, a `Literal` one of its values, and a field typed as a Method class an instance of it or the
registered name of one (built with its defaults). A wrong type is a ValueError naming the method, the option, the
value and the type asked for; ranges stay with each method's `__post_init__`, whose ValueErrors get the method's
name in front. Annotations of any other form are not checked here.
"""

from __future__ import annotations

import math
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from kvsqueeze.methods.base import Method, ScorerMethod
from kvsqueeze.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

M = TypeVar("M", bound=type[Method])

# `--budget-policy NAME` (generate and bench) wraps the chosen scorer in this registered method
BUDGET_POLICIES = {"adakv": "adakv", "criticalkv": "criticalkv", "global": "global_budget", "pyramid": "pyramidkv"}


def register_method(name: str):
    """Class decorator registering a Method under `name` (also stored as the class's `name`)."""

    def decorator(cls: M) -> M:
        cls.name = name
        METHODS.register(name)(cls)
        return cls

    return decorator


def get_method(name: str, **options: Any) -> Method:
    """Build a registered method. An unknown name or option, an option of the wrong type (see the module docstring)
    or out of its range raises a ValueError that names the method, the option and the value."""
    if not isinstance(name, str):
        raise ValueError(f"a method name must be a string (see `kvsqueeze list`), got {name!r}")
    cls = METHODS.get(name)
    METHODS.check_options(name, options)
    typed = {option: typed_option(cls, option, value) for option, value in options.items()}
    try:
        return cls(**typed)
    except ValueError as err:
        raise ValueError(f"{cls.name}: {err}") from err


_INT64 = 2**63  # int options end up in tensors or seeds: nothing outside [-2**63, 2**63) means anything
_HINTS: dict[type, dict[str, Any]] = {}  # each method class's resolved field annotations


def typed_option(cls: type[Method], option: str, value: Any) -> Any:
    """`value` as method `cls` receives it for `option` (a registered name resolved to a method, a list to a tuple),
    or a ValueError when its type does not match the field's annotation."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    hint = _HINTS[cls].get(option)
    if hint is None:
        return value
    fits, converted = _convert(hint, value)
    if fits:
        return converted
    raise ValueError(f"{cls.name}: {option} must be {_expected(hint)}, got {value!r}{_why(hint, value)}")


def _why(hint: Any, value: Any) -> str:
    """What the type alone does not tell: a name no method is registered under, an integer beyond 64 bits."""
    if isinstance(value, str) and _mentions_method(hint):
        if METHODS.known(value):
            return f" (the method {value!r} is not of that kind)"
        close = ", ".join(map(repr, METHODS.close_matches(value)))
        return f" (no method is registered under that name{f'. Did you mean {close}?' if close else ''})"
    if type(value) is int and not -_INT64 <= value < _INT64:
        return " (beyond 64 bits)"
    return ""


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(True, the value to pass) when `value` fits the annotation `hint`, else (False, None)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        for arg in args:
            fits, converted = _convert(arg, value)
            if fits:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is tuple:
        return _convert_tuple(args, value)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return type(value) is int and -_INT64 <= value < _INT64, value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and not (isinstance(value, float) and math.isnan(value)), value
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, Method):
        return _convert_method(hint, value)
    return True, value  # an annotation this module does not check


def _convert_tuple(args: tuple[Any, ...], value: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, None
    items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(items) != len(value):
        return False, None
    out = []
    for item, v in zip(items, value, strict=True):
        fits, converted = _convert(item, v)
        if not fits:
            return False, None
        out.append(converted)
    return True, tuple(out)


def _convert_method(kind: type[Method], value: Any) -> tuple[bool, Any]:
    if isinstance(value, kind):
        return True, value
    if isinstance(value, str) and METHODS.known(value) and issubclass(METHODS.get(value), kind):
        return True, get_method(value)
    return False, None


def _mentions_method(hint: Any) -> bool:
    if isinstance(hint, type):
        return issubclass(hint, Method)
    return any(_mentions_method(a) for a in get_args(hint))


def _expected(hint: Any, plural: bool = False) -> str:
    """What an annotation asks for, in words: "an integer", "a list of numbers", "a string or None"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_expected(a, plural) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or None" if type(None) in args else "")
    if origin is tuple:
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return "a list of " + (_expected(item, plural=True) if item is not Any else "values")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, Method):
        what = "scoring method" if issubclass(hint, ScorerMethod) else "compression method"
        if plural:
            return f"{what}s (Method objects or registered names)"
        return f"a {what} (a {hint.__name__} or the registered name of one, see `kvsqueeze list`)"
    words = {bool: ("True or False", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings")}  # fmt: skip
    one, many = words.get(hint, (f"a {getattr(hint, '__name__', hint)}", f"{getattr(hint, '__name__', hint)} values"))
    return many if plural else one


def check_method(name: str, value: object) -> None:
    """`value`, given as the argument `name` (e.g. generate's `method`), must be a Method object or None. A method's
    name alone is refused, with how to build one: it carries no ratio, and get_method(name) compresses nothing."""
    if value is None or isinstance(value, Method):
        return
    if isinstance(value, str):
        raise ValueError(
            f"{name} must be a Method object or None, got the name {value!r}: build it with "
            f"kvsqueeze.get_method({value!r}, ratio=...)"
        )
    if isinstance(value, type) and issubclass(value, Method):
        raise ValueError(f"{name} must be a Method object, got the class {value.__name__}: call it, e.g. "
                         f"{value.__name__}(ratio=0.5)")  # fmt: skip
    raise ValueError(f"{name} must be a Method object (see kvsqueeze.get_method) or None, got {value!r}")


def list_methods() -> list[str]:
    return METHODS.names()


def describe_methods() -> list[dict[str, Any]]:
    """One dict per method: name, description, options (with defaults), needs, and how its budget is shared
    (`budget_scope`) and sized (`budget_kind`: "adaptive" when the ratio is a target the method's rule decides)."""
    return [
        {
            "name": n,
            "description": cls.description(),
            "options": cls.options(),
            "needs": list(cls.needs),
            "budget_scope": cls.budget_scope,
            "budget_kind": cls.budget_kind,
        }
        for n in METHODS.names()
        for cls in [METHODS.get(n)]
    ]


def with_budget_policy(policy: str | None, scorer: Method, ratio: float) -> Method:
    """`scorer` wrapped in the budget policy `policy` (a key of BUDGET_POLICIES); None returns it unchanged."""
    if policy is None:
        return scorer
    if policy not in BUDGET_POLICIES:
        raise ValueError(f"unknown budget policy {policy!r}; known: {', '.join(sorted(BUDGET_POLICIES))}")
    return get_method(BUDGET_POLICIES[policy], ratio=ratio, scorer=scorer)
