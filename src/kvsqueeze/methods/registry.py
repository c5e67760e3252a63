"""The method registry: `@register_method("name")` on a Method class; `get_method(name, **options)` builds one."""

from __future__ import annotations

from typing import Any, TypeVar

from kvsqueeze.methods.base import Method
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
    """Build a registered method; unknown names or options raise ValueError with close matches."""
    method: Method = METHODS.build(name, **options)
    return method


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
