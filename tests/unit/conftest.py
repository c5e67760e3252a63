"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def calib_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty calibration store for this test (KVSQUEEZE_CALIBRATION_DIR points into tmp_path)."""
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path / "calib"))
    return tmp_path / "calib"
