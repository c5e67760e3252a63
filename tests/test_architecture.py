"""The module boundaries of docs/architecture.md, checked on the source: imports only go down (no cycle), no import is
deferred into a function except the CLI's (it keeps `kvsqueeze --help` fast), no private name crosses a module, and
methods never reach the cache or the hooks that run them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvsqueeze"
ENGINE = {"kvsqueeze.cache", "kvsqueeze.layer", "kvsqueeze.press", "kvsqueeze.hooks", "kvsqueeze.recording"}


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = modules()
# imports inside functions keep the CLI's start-up light
LAZY_OK = {n for n in MODULES if n == "kvsqueeze.cli" or n.startswith("kvsqueeze.cli.")}


def imports(name: str) -> list[tuple[str, list[str], bool]]:
    """(module imported, names taken from it, at module level?) for every kvsqueeze import of `name`."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        top = node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvsqueeze"):
            found.append((node.module, [a.name for a in node.names], top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], top) for a in node.names if a.name.startswith("kvsqueeze")]
    return found


def edges(name: str) -> set[str]:
    out = set()
    for module, names, _ in imports(name):
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        # `from package import submodule` depends on the submodule (a package's own __init__ may re-export it)
        targets = submodules if names and len(submodules) == len(names) else [module, *submodules]
        for target in targets:
            if target in MODULES and target != name and not target.startswith(name + "."):
                out.add(target)
    return out


def test_imports_form_no_cycle():
    graph = {name: edges(name) for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(set(MODULES) - LAZY_OK))
def test_no_deferred_imports(name):
    deferred = [module for module, _, top in imports(name) if not top]
    assert not deferred, f"{name} imports {deferred} inside a function"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_module(name):
    private = [
        f"{module}.{n}"
        for module, names, _ in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, f"{name} imports private names {private}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("kvsqueeze.methods")))
def test_methods_never_reach_the_engine(name):
    reached = {module for module, _, _ in imports(name)} & ENGINE
    assert not reached, f"{name} imports {sorted(reached)}: methods see the cache only through ScoreContext"
