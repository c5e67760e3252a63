"""The method registry: `@register_method("name")` on a Method class; `get_method(name, **options)` builds one."""

from __future__ import annotations

from typing import Any, TypeVar

from kvsqueeze.methods.base import Method
from kvsqueeze.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

M = TypeVar("M", bound=type[Method])


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
    """One dict per method: name, description, options (with defaults), needs."""
    return [
        {"name": n, "description": cls.description(), "options": cls.options(), "needs": list(cls.needs)}
        for n in METHODS.names()
        for cls in [METHODS.get(n)]
    ]
