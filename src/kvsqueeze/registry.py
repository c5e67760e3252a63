"""A small generic registry: a decorator to register classes or factories by name, lookup with suggestions.

Used for compression methods and benchmark tasks. Registries hold classes or factories, never instances, so every
`get` builds a fresh object and no state is shared between users.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes (or factories). `kind` names what is registered, for error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@registry.register("knorm")` above a class."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Look a name up; an unknown name (or one that is not a string) raises ValueError listing the closest known
        names."""
        if not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a string, got {name!r}. Known: {', '.join(self.names())}.")
        key = self._key(name)
        if key in self._entries:
            return self._entries[key]
        close = self.close_matches(name)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}.")

    def known(self, name: str) -> bool:
        """True when `get(name)` finds an entry (names are matched as `get` does: case and '-'/'_' ignored)."""
        return self._key(name) in self._entries

    def close_matches(self, name: str) -> list[str]:
        """Up to three registered names close to `name` (for "did you mean")."""
        return difflib.get_close_matches(self._key(name), list(self._entries), n=3, cutoff=0.5)

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """A ValueError, with close matches and the known options, for an option the class registered as `name` does
        not have (a dataclass field that does not exist, or starts with an underscore)."""
        cls = self.get(name)
        known = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]  # type: ignore[arg-type]
        for option in options:
            if option not in known:
                close = difflib.get_close_matches(option, known, n=2, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"Unknown option {option!r} for {self.kind} {name!r}.{hint} Options: {', '.join(known) or 'none'}."
                )

    def build(self, name: str, **options: Any) -> Any:
        """`get(name)(**options)`, after `check_options`."""
        self.check_options(name, options)
        return self.get(name)(**options)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring on one line (a registered class's one-line description)."""
    head = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in head.splitlines())
