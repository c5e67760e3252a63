"""--help: every subcommand shows its defaults and examples; the model options are the same wherever a model loads."""

from __future__ import annotations

import pytest

from kvsqueeze.cli import build_parser


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args([*argv, "--help"])
    assert err.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("list", []),
        ("generate", ["(default: knorm)", "(default: 0.5)", "(default: 32)", "(default: float32)"]),
        ("calibrate", ["(default: float32)", "(default: sdpa)"]),
        ("bench", ["(default: default)", "(default: 32)", "(default: sdpa)"]),
        ("report", []),
        ("serve", ["(default: 127.0.0.1)", "(default: 8000)", "(default: knorm)", "(default: 2GiB)"]),
    ],
)
def test_each_subcommand_shows_defaults_and_examples(
    capsys: pytest.CaptureFixture[str], command: str, defaults: list[str]
) -> None:
    text = _help(capsys, command)
    assert "examples:\n" in text and f"  kvsqueeze {command}" in text.split("examples:")[1]
    assert "-v, --verbose" in text and "-q, --quiet" in text
    for default in defaults:
        assert default in " ".join(text.split()), default  # help text wraps: compare with spaces normalized
    assert "(default: None)" not in text and "(default: False)" not in text  # only defaults that say something


def test_top_level_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys)
    assert "kvsqueeze generate --example" in text and "kvsqueeze bench -v" in text


@pytest.mark.parametrize("command", ["generate", "calibrate", "bench", "serve"])
def test_model_options_are_shared(capsys: pytest.CaptureFixture[str], command: str) -> None:
    model_section = _help(capsys, command).split("\nmodel:\n")[1].split("\n\n")[0]
    for option in ("--model MODEL", "--dtype {float32,bfloat16,float16}", "--attn {sdpa,eager}", "--device DEVICE"):
        assert option in model_section, (command, option)
