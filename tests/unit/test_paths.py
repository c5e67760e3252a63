"""The base cache folder: $KVSQUEEZE_CACHE, else $XDG_CACHE_HOME/kvsqueeze, else ~/.cache/kvsqueeze; the calibration
folder ($KVSQUEEZE_CALIBRATION_DIR first) and the converted models live under the same base."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.calibration import calibration_dir
from kvsqueeze.paths import cache_dir, cache_subdir


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No kvsqueeze or XDG variable set, and a home folder of our own."""
    for name in ("KVSQUEEZE_CACHE", "KVSQUEEZE_CALIBRATION_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_default_is_under_the_home_folder(env, tmp_path):
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvsqueeze"
    assert calibration_dir() == tmp_path / "home" / ".cache" / "kvsqueeze" / "calibration"
    assert cache_subdir("models") == tmp_path / "home" / ".cache" / "kvsqueeze" / "models"


def test_xdg_cache_home_comes_next(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvsqueeze"
    assert calibration_dir() == tmp_path / "xdg" / "kvsqueeze" / "calibration"
    assert cache_subdir("models") == tmp_path / "xdg" / "kvsqueeze" / "models"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_empty_or_relative_xdg_cache_home_is_ignored(env, tmp_path, xdg):
    env.setenv("XDG_CACHE_HOME", xdg)
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvsqueeze"


def test_kvsqueeze_cache_wins_over_xdg(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("KVSQUEEZE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert calibration_dir() == tmp_path / "mine" / "calibration"
    env.setenv("KVSQUEEZE_CACHE", "")  # empty: as if unset
    assert cache_dir() == tmp_path / "xdg" / "kvsqueeze"


def test_calibration_dir_wins_over_everything(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("KVSQUEEZE_CACHE", str(tmp_path / "mine"))
    env.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path / "calib"))
    assert calibration_dir() == tmp_path / "calib"
    assert cache_subdir("models") == tmp_path / "mine" / "models"  # only calibration moves
    assert cache_subdir("other", "KVSQUEEZE_UNSET_FOLDER_VARIABLE") == tmp_path / "mine" / "other"
