"""`kvsqueeze generate --budget-policy P` wraps the --method scorer in a budget policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.cli import main


def run(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 12 + "The code is 4417. " + "Gulls circled. " * 10)
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?"]
    argv += ["--method", "knorm", "--ratio", "0.5", "--max-new-tokens", "3", "--json", *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("policy", "wrapper"),
    [("adakv", "AdaKV"), ("criticalkv", "CriticalKV"), ("global", "GlobalBudget"), ("pyramid", "PyramidKV")],
)
def test_budget_policy_wraps_the_scorer(policy, wrapper, model_dir, tmp_path, capsys):
    plain = run(model_dir, tmp_path, capsys)
    out = run(model_dir, tmp_path, capsys, "--budget-policy", policy)
    assert out["method"].startswith(f"{wrapper}(ratio=0.5, scorer=KNorm(ratio=0.5)")
    stats = out["stats"]
    assert stats["padding_bytes"] == 0
    if policy != "pyramid":  # pooled or two-stage budgets keep the same total as the plain scorer
        assert stats["kv_bytes_after"] == plain["stats"]["kv_bytes_after"]
    assert stats["kv_bytes_after"] < stats["kv_bytes_before"]


def test_budget_policy_needs_a_scorer(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text here")
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "q?"]
    assert main([*argv, "--method", "none", "--budget-policy", "adakv"]) == 2
    assert "needs a scoring --method" in capsys.readouterr().err
