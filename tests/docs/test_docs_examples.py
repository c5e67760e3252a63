"""The documentation's examples run and name things that exist, so README.md and docs/ cannot silently rot.

- docs/add-a-method.md: its Python blocks run in order in a fresh interpreter (so the method it registers does not
  leak into this process's registry), on a tiny random Llama instead of the embedded model: the block after the
  `<!-- docs-test: setup -->` marker is replaced by the tiny model's setup.
- docs/datasets.md: the sample files (blocks after `<!-- docs-test: file NAME -->`) load, and JSONL and CSV agree.
- docs/results-jsonl.md: its snippet, run on the recorded default suite, gives the score tables of
  docs/results/default-suite.md and README.md.
- Everywhere: Python blocks name real API (names, keyword arguments, method names and options); `kvsqueeze ...`
  command lines parse and pass the CLI's own checks up to loading the model; both method tables list exactly the
  registered methods; repository paths quoted in code spans exist; README's relative links resolve.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvsqueeze as kvs
from kvsqueeze.bench.dataset import load_dataset
from kvsqueeze.cli import build_parser, main
from kvsqueeze.methods import METHODS
from kvsqueeze.tuning import TuneChoice, write_choice

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)

TINY_SETUP = """import torch

import kvsqueeze as kvs
from tests.tiny import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
model, tokenizer = tiny_model("llama"), tiny_tokenizer()
"""
# Run after the page's blocks, in their namespace: report what the test checks as one JSON line.
FACTS = """
import json as _json
from kvsqueeze.bench.results import read_jsonl as _read_jsonl

try:
    kvs.get_method("value_norm", n_sink=-1)
    _rejects = False
except ValueError:
    _rejects = True
_rows = _read_jsonl(run.out_dir / "results.jsonl")
print("FACTS " + _json.dumps({
    "registered": "value_norm" in kvs.list_methods(), "repr": repr(method), "rejects_negative_n_sink": _rejects,
    "before": out.stats.kv_bytes_before, "after": out.stats.kv_bytes_after,
    "computed_rows": run.computed_rows, "labels": sorted(r["method_name"] for r in _rows),
}))
"""


def blocks(page: Path) -> Iterator[tuple[str | None, str, str]]:
    """(marker, language, code) of every fenced block of a Markdown page."""
    for m in BLOCK.finditer(page.read_text(encoding="utf-8")):
        yield m["marker"], m["lang"], m["code"]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_add_a_method_page_runs_on_a_tiny_model(tmp_path: Path) -> None:
    code = [TINY_SETUP if marker == "setup" else block for marker, lang, block in blocks(DOCS / "add-a-method.md")
            if lang == "python"]  # fmt: skip
    assert code[0] == TINY_SETUP, "the page's first Python block must be its `docs-test: setup` block"
    script = tmp_path / "page.py"
    script.write_text("\n".join(code) + FACTS, encoding="utf-8")
    src = Path(kvs.__file__).resolve().parents[1]  # the kvsqueeze under test, even where another is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("FACTS ")]
    facts = json.loads(line.removeprefix("FACTS "))
    assert facts["registered"] and facts["rejects_negative_n_sink"]
    assert facts["repr"] == "ValueNorm(ratio=0.5, n_sink=2)"
    assert 0 < facts["after"] <= 0.6 * facts["before"]  # ratio 0.5 frees about half of the bytes
    assert facts["computed_rows"] == 6
    assert facts["labels"] == ["knorm", "knorm", "none", "none", "value_norm", "value_norm"]


def test_dataset_samples_load_and_agree(tmp_path: Path) -> None:
    files = {}
    for marker, _, code in blocks(DOCS / "datasets.md"):
        if marker and marker.startswith("file "):
            path = tmp_path / marker.removeprefix("file ")
            path.write_text(code, encoding="utf-8")
            files[path.suffix] = path
    assert set(files) == {".jsonl", ".csv"}
    samples = load_dataset(files[".jsonl"])
    assert samples == load_dataset(files[".csv"])  # Sample equality ignores `meta` (file and line numbers)
    assert [len(s.questions) for s in samples] == [2, 1]  # the first two rows share a context
    assert samples[0].answers == (("4127",), ("Mara Quill",)) and samples[0].metric == "any"
    second = samples[1]
    assert (second.metric, second.max_new_tokens, second.answer_prefix) == ("all", 16, "The ferry leaves at")


def score_table(page: Path) -> dict[tuple[str, float], str]:
    """The `| method | 0 | 0.25 | 0.5 | 0.75 |` table of a page: (method, ratio) -> the printed score (a report
    written since the intervals came prints 'score [low, high]'; the score alone is kept)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index("| method | 0 | 0.25 | 0.5 | 0.75 |")
    ratios = [0.0, 0.25, 0.5, 0.75]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        method, *cells = [c.strip() for c in line.strip("|").split("|")]
        table.update({(method, r): c.split()[0] for r, c in zip(ratios, cells, strict=True) if c})  # not the interval
    return table


def test_results_snippet_reproduces_the_default_suite_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (snippet,) = [code for marker, _, code in blocks(DOCS / "results-jsonl.md") if marker == "results snippet"]
    target = tmp_path / "results" / "bench" / "default"
    target.mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "results" / "bench_default" / "results.jsonl", target)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "results-jsonl.md", "exec"), namespace)
    computed = {(m, r): f"{100 * sum(v) / len(v):.1f}" for (m, r), v in namespace["scores"].items()}
    assert len(capsys.readouterr().out.splitlines()) == len(computed) == 22  # none + 7 methods x 3 ratios
    assert score_table(DOCS / "results" / "default-suite.md") == computed
    assert score_table(README) == computed


def _kvs_attribute(node: ast.AST) -> str | None:
    """NAME for a `kvs.NAME` expression, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kvs":
        return node.attr
    return None


def _check_call(call: ast.Call, target: Any, registered_here: set[str]) -> None:
    """The call's keyword arguments fit the real signature; a literal method name and its options are registered."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return
    inspect.signature(target).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
    if target is kvs.get_method and call.args and isinstance(call.args[0], ast.Constant):
        name = call.args[0].value
        if name not in registered_here:
            fields = {f.name for f in dataclasses.fields(METHODS.get(name))}
            assert {k.arg for k in call.keywords} <= fields, f"options of {name!r}: {ast.unparse(call)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_examples_name_real_api(page: Path) -> None:
    trees = [ast.parse(code) for _, lang, code in blocks(page) if lang == "python"]
    imported: dict[str, Any] = {}
    registered_here: set[str] = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvsqueeze"):
            module = importlib.import_module(str(node.module))
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
        if isinstance(node, ast.Call) and _kvs_attribute(node.func) == "register_method":
            registered_here.add(node.args[0].value)  # type: ignore[attr-defined]
    for node in (n for tree in trees for n in ast.walk(tree)):
        name = _kvs_attribute(node)
        assert name is None or name in kvs.__all__, f"kvs.{name} does not exist"
        if isinstance(node, ast.Call):
            func = node.func
            target = getattr(kvs, _kvs_attribute(func) or "", None)
            target = imported.get(func.id) if isinstance(func, ast.Name) else target
            if target is not None:
                _check_call(node, target, registered_here)


def command_lines(page: Path) -> Iterator[list[str]]:
    """The words of every command line of the page's bash blocks (continuations joined, comments dropped)."""
    for _, lang, code in blocks(page):
        if lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                if words := shlex.split(line, comments=True):
                    yield words


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_command_lines_pass_the_cli_checks(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("The code is 4127.", encoding="utf-8")
    (tmp_path / "doc.safetensors").write_bytes(b"")  # --load-cache: the file must exist; its content is read later
    (tmp_path / "mine.jsonl").write_text(
        json.dumps({"context": "The code is 4127.", "question": "What is the code?", "answers": ["4127"]}) + "\n"
    )
    write_choice(TuneChoice("knorm", 0.5), tmp_path / "tune.json")  # --config: a file `kvsqueeze tune` wrote
    write_choice(TuneChoice("knorm", 0.5), tmp_path / "results" / "tune" / "default" / "tune.json")
    missing = str(tmp_path / "no-model-here")
    targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    for words in command_lines(page):
        if words[0] == "make":
            assert set(words[1:]) <= set(targets), f"{page_id(page)}: {shlex.join(words)}"
        if words[0] != "kvsqueeze":
            continue
        argv = words[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page_id(page)}: does not parse: {shlex.join(words)}\n{capsys.readouterr().err}")
        if argv[0] == "list":
            assert main(argv) == 0
        elif argv[0] != "report" and "--model" not in argv:
            # everything the CLI checks comes before the model loads: failing only there means the line is valid
            code = main([*argv, "--model", missing])
            err = capsys.readouterr().err
            assert code == 2 and missing in err, f"{page_id(page)}: {shlex.join(words)}\n{err}"


def table_names(page: Path) -> set[str]:
    """The method names in the first column of the page's `| name | ...` table."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name |"))
    names = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names.add(line.split("|")[1].strip().strip("`"))
    return names


@pytest.mark.parametrize("page", [README, DOCS / "methods.md"], ids=page_id)
def test_method_tables_list_every_registered_method(page: Path) -> None:
    assert table_names(page) == set(kvs.list_methods())


REPO_PATH = re.compile(r"^(?:benchmarks|tests|src)/\S*$")


def test_quoted_repository_paths_exist() -> None:
    found, missing = 0, []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        spans = re.findall(r"`([^`\n]+)`", BLOCK.sub("", text)) + [" ".join(w) for w in command_lines(page)]
        paths = [w.rstrip(".,;:)") for span in spans for w in span.split() if REPO_PATH.match(w)]
        found += len(paths)
        missing += [f"{page_id(page)}: {p}" for p in paths if not glob.glob(str(REPO / p))]
    assert found > 30  # the pattern does find the quoted paths
    assert not missing, missing


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", BLOCK.sub("", text), re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, link
        elif not link.startswith(("http://", "https://")):
            assert (REPO / link.split("#")[0]).exists(), link
