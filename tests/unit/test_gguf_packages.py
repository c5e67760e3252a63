"""The registry of models shipped as GGUF in Python packages (`kvsqueeze.gguf_packages`): short names, the hint that
lists them, a GGUF found inside its package or assembled from chunks, and the install command when the package is
missing. Converting one of them: tests/unit/test_loading.py; the real packages: tests/integration (slow)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsqueeze.gguf_packages import GGUF_PACKAGES, GgufPackage, gguf_package, known_models_hint
from tests.files import write_chunked_package, write_tiny_gguf


def test_short_names_ignore_case_and_separators() -> None:
    assert set(GGUF_PACKAGES) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert gguf_package("Gemma3_270M") is GGUF_PACKAGES["gemma3-270m"]
    assert gguf_package(" smollm2-135m-instruct ") is GGUF_PACKAGES["smollm2-135m-instruct"]
    assert gguf_package("gemma3") is None and gguf_package("path/to/model") is None


def test_the_hint_suggests_a_close_name_and_lists_all() -> None:
    hint = known_models_hint("gemma3")
    assert hint.startswith("Did you mean 'gemma3-270m'?")
    assert hint.endswith("Known short names: smollm2-135m-instruct, gemma3-270m.")
    assert known_models_hint("/some/folder").startswith("Known short names:")


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GgufPackage, Path]]:
    """A package shipping a tiny GGUF in 3 chunks, importable for this test only, and the GGUF itself."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    write_chunked_package(tmp_path / "site", gguf, "kvsqueeze_test_chunked_gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    package = GgufPackage("tiny-chunked", "tiny", "kvsqueeze_test_chunked_gguf", "tiny.gguf", "pip install tiny", True)
    yield package, gguf
    sys.modules.pop("kvsqueeze_test_chunked_gguf", None)  # the next test's package lies in another folder


def test_a_chunked_gguf_is_sized_without_assembling_then_assembled_where_asked(
    chunked: tuple[GgufPackage, Path], tmp_path: Path
) -> None:
    package, gguf = chunked
    scratch = tmp_path / "scratch"
    assert package.size() == gguf.stat().st_size and not scratch.exists()
    path = package.locate(scratch)
    assert path == scratch / "tiny.gguf" and path.read_bytes() == gguf.read_bytes()


def test_a_missing_chunk_is_named(chunked: tuple[GgufPackage, Path], tmp_path: Path) -> None:
    package, _ = chunked
    (tmp_path / "site" / "kvsqueeze_test_chunked_gguf" / "data" / "tiny.gguf.part01").unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny\.gguf\.part01"):
        package.size()


def test_a_file_shipped_whole_is_found_next_to_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "site" / "kvsqueeze_test_whole_gguf"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('importing the package is never needed')\n")
    gguf = write_tiny_gguf(folder / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    package = GgufPackage("tiny-whole", "tiny", "kvsqueeze_test_whole_gguf", "tiny.gguf", "pip install tiny")
    assert package.locate(tmp_path / "unused") == gguf and package.size() == gguf.stat().st_size
    gguf.unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny\.gguf is missing; reinstall 'tiny-whole' with: pip install"):
        package.size()


@pytest.mark.parametrize("assembled", [False, True])
def test_a_missing_package_says_what_to_install(assembled: bool) -> None:
    package = GgufPackage("nope", "Nope 1B", "kvsqueeze_no_such_package", "nope.gguf", "pip install nope", assembled)
    expected = r"model 'nope' \(Nope 1B\) needs .* Install it with: pip install nope"
    with pytest.raises(ModuleNotFoundError, match=expected):
        package.size()
