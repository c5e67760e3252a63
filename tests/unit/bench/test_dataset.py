"""User datasets: JSONL/CSV rows become samples grouped by context; malformed rows name the file, line and field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvsqueeze.bench.dataset import dataset_hash, load_dataset


def _jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROW = {"context": "The code is 4417.", "question": "What is the code?", "answers": ["4417"]}


def test_rows_sharing_a_context_become_one_sample(tmp_path: Path) -> None:
    other = {"context": "Gulls circled.", "question": "What circled?", "answers": "gulls", "metric": "all"}
    second = {**ROW, "question": "Which code?", "answers": ["4417", "four"], "max_new_tokens": 5}
    path = _jsonl(tmp_path, [ROW, "", other, {**ROW, "question": "Code?"}, {**ROW, "answer_prefix": "It is"}])
    samples = load_dataset(path)
    questions = [s.questions for s in samples]
    assert questions == [("What is the code?", "Code?"), ("What circled?",), ("What is the code?",)]
    first = samples[0]
    assert first.task == "data" and first.index == 0 and first.answers == (("4417",), ("4417",))
    assert first.metric == "any" and first.max_new_tokens == 32 and first.meta["lines"] == [1, 4]
    assert samples[1].answers == (("gulls",),) and samples[1].metric == "all"
    assert samples[2].answer_prefix == "It is" and samples[2].meta["lines"] == [5]
    assert load_dataset(_jsonl(tmp_path, [second], "b.jsonl"))[0].max_new_tokens == 5


def test_csv_answers_as_json_list_or_single_string(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        'context,question,answers,max_new_tokens\n"Line one\nline two, 4417",What is the code?,"[""4417"", ""x""]",\n'
        "Other text,Why?,because,7\n"
    )
    samples = load_dataset(path)
    assert samples[0].context == "Line one\nline two, 4417" and samples[0].answers == (("4417", "x"),)
    assert samples[0].max_new_tokens == 32 and samples[1].answers == (("because",),)
    assert samples[1].max_new_tokens == 7 and samples[1].meta["lines"] == [4]  # the quoted context spans lines 2-3


@pytest.mark.parametrize(
    ("row", "field", "detail"),
    [
        ({"question": "q", "answers": ["a"]}, "context", "missing"),
        ({**ROW, "question": "  "}, "question", "is empty"),
        ({**ROW, "answers": []}, "answers", "non-empty list"),
        ({**ROW, "answers": ["a", 3]}, "answers", "non-empty text"),
        ({**ROW, "answers": 4417}, "answers", "non-empty list"),
        ({**ROW, "context": 12}, "context", "must be text"),
        ({**ROW, "max_new_tokens": 0}, "max_new_tokens", "positive integer"),
        ({**ROW, "max_new_tokens": 2.5}, "max_new_tokens", "positive integer"),
        ({**ROW, "metric": "some"}, "metric", "'all' or 'any'"),
    ],
)
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path: Path, row: dict, field: str, detail: str) -> None:
    path = _jsonl(tmp_path, [ROW, row])
    with pytest.raises(ValueError, match=rf"data\.jsonl: line 2: field '{field}': .*{detail}"):
        load_dataset(path)


def test_broken_json_and_non_objects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        load_dataset(_jsonl(tmp_path, [ROW, '{"context": "x"']))
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        load_dataset(_jsonl(tmp_path, ["[1, 2]"]))


def test_malformed_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("context,question\nabc,q\n")
    with pytest.raises(ValueError, match=r"d\.csv: line 1: field 'answers': missing from the header"):
        load_dataset(path)
    path.write_text('context,question,answers\nabc,q,a\nabc,q,"[""a"", "\n')
    with pytest.raises(ValueError, match=r"d\.csv: line 3: field 'answers': looks like a JSON list"):
        load_dataset(path)


def test_files_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "none.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported extension '.txt'; use .jsonl, .csv or .parquet"):
        load_dataset(tmp_path / "d.txt")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_dataset(tmp_path / "e.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ModuleNotFoundError, match=r"needs pyarrow: pip install 'kvsqueeze\[parquet\]'"):
        load_dataset(tmp_path / "d.parquet")


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'kvsqueeze[parquet]')")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)  # pyarrow alone, no pandas
    return path


def test_parquet_rows(tmp_path: Path) -> None:
    rows = [
        {**ROW, "max_new_tokens": None},
        {**ROW, "question": "Code?", "answers": ["4417", "x"], "max_new_tokens": 4},
    ]
    path = _write_parquet(tmp_path / "d.parquet", rows)
    samples = load_dataset(path)
    assert [s.questions for s in samples] == [("What is the code?",), ("Code?",)]
    assert samples[1].answers == (("4417", "x"),) and samples[1].max_new_tokens == 4
    assert samples[0].max_new_tokens == 32  # the null: the default
    _write_parquet(path, [{**ROW, "answers": []}])
    with pytest.raises(ValueError, match=r"d\.parquet: line 1: field 'answers'"):
        load_dataset(path)
    path.write_bytes(b"PAR1 but not parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: not a readable parquet file"):
        load_dataset(path)


def test_parquet_is_read_without_pandas(tmp_path: Path) -> None:
    """pyarrow alone reads the file: pandas is neither needed nor imported (a fresh interpreter shows what the
    reader imports)."""
    path = _write_parquet(tmp_path / "d.parquet", [ROW])
    code = ("import sys; from kvsqueeze.bench.dataset import load_dataset\n"
            f"print(len(load_dataset({str(path)!r})), 'pandas' in sys.modules)")  # fmt: skip
    src = Path(__file__).resolve().parents[3] / "src"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(src)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "1e400", "NaN", "true", '"ten"', "1e3000"])
def test_max_new_tokens_that_is_no_integer(tmp_path: Path, text: str) -> None:
    line = json.dumps(ROW)[:-1] + f', "max_new_tokens": {text}}}'
    if text == "NaN":  # a missing value in pandas-made files: the default
        assert load_dataset(_jsonl(tmp_path, [line]))[0].max_new_tokens == 32
        return
    with pytest.raises(ValueError, match=r"data\.jsonl: line 1: field 'max_new_tokens': must be a positive integer"):
        load_dataset(_jsonl(tmp_path, [line]))


def test_a_folder_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"dataset '.*d\.jsonl' is a folder; give a .jsonl, .csv or .parquet file"):
        load_dataset(tmp_path / "d.jsonl")


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    header = b"context,question,answers\n" if name.endswith("csv") else b""
    body = b'{"context": "x", "question": "q", "answers": ["a"]}\n' if name.endswith("jsonl") else b"x,q,a\n"
    path.write_bytes(header + body + body.replace(b"x", b"caf\xe9"))
    line = 3 if header else 2
    with pytest.raises(ValueError, match=rf"{name}: line {line}: not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        load_dataset(path)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfcontext,question,answers\nabc,q,a\n")  # as spreadsheets save it
    assert load_dataset(tmp_path / "d.csv")[0].context == "abc"
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n")
    assert load_dataset(tmp_path / "d.jsonl")[0].questions == (ROW["question"],)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_a_read_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").symlink_to("/proc/self/mem")  # a regular file whose first bytes cannot be read (EIO)
    with pytest.raises(ValueError, match=r"dataset '.*d\.jsonl' cannot be read: Input/output error"):
        load_dataset(tmp_path / "d.jsonl")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_names_the_file(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [ROW])
    path.chmod(0)
    with pytest.raises(ValueError, match=r"dataset '.*data\.jsonl' cannot be read: Permission denied"):
        load_dataset(path)


def test_dataset_hash_follows_the_bytes(tmp_path: Path) -> None:
    first = dataset_hash(_jsonl(tmp_path, [ROW]))
    assert first == dataset_hash(tmp_path / "data.jsonl") and len(first) == 16
    assert dataset_hash(_jsonl(tmp_path, [{**ROW, "answers": ["4418"]}])) != first


def test_a_repeated_row_is_asked_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _jsonl(tmp_path, [ROW, {**ROW, "question": "Code?"}, ROW])
    samples = load_dataset(path)
    assert samples[0].questions == ("What is the code?", "Code?") and samples[0].meta["lines"] == [1, 2]
    assert "data.jsonl: line 3 repeats line 1" in caplog.text
