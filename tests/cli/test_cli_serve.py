"""`kvsqueeze serve`'s command line: every option is checked before the model loads (one line, exit 2); the server
itself is tested live in tests/serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.cli import main, parse_args


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvsqueeze: error: "), err
    return err.removeprefix("kvsqueeze: error: ")


def test_defaults() -> None:
    args = parse_args(["serve"])
    assert (args.host, args.port, args.method, args.ratio, args.api_key) == ("127.0.0.1", 8000, "knorm", 0.5, None)
    assert args.max_cache_bytes == 2 * 2**30 and args.max_body_bytes == 16 * 2**20 and args.cache_dir is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "snapkvv"], "Unknown method 'snapkvv'. Did you mean 'snapkv'"),
        (["--method", "snapkv", "--option", "windw=8"], "Unknown option 'windw'"),
        (["--option", "ratio=0.3"], "give the ratio with --ratio"),
        (["--method", "finch"], "query-aware"),
        (["--port", "70000"], "port must be an integer in [0, 65535]"),
        (["--api-key", " "], "api_key must be a non-empty string"),
    ],
)
def test_bad_options_fail_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["serve", "--model", str(tmp_path / "no-model"), *extra]) == 2
    assert message in _one_error_line(capsys)


def test_a_cache_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--cache-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in _one_error_line(capsys)


def test_sizes_are_read_with_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["serve", "--max-cache-bytes", "512MiB"]).max_cache_bytes == 512 * 2**20
    with pytest.raises(SystemExit) as err:
        parse_args(["serve", "--max-cache-bytes", "lots"])
    assert err.value.code == 2 and "expected a size in bytes" in capsys.readouterr().err


def test_the_api_key_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVSQUEEZE_API_KEY", " ")  # read, and checked like --api-key
    assert main(["serve", "--model", str(tmp_path / "no-model")]) == 2
    assert "api_key must be a non-empty string" in _one_error_line(capsys)
