"""What the calibration store promises about its files (`kvsqueeze.calibration.store`), tested on real files and real
processes: a tampered or damaged artifact is never used (it is reported and computed again), a read-only folder still
serves calibrated methods (computed in memory, one warning), concurrent processes compute once, and what a killed
writer left is removed. Only names the store had before these promises are imported at module level, so the reproduced
cases of issue 13 can be run against the old store as well (they fail there)."""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kvsqueeze.calibration import artifact_path, calibrated, read_info, store
from tests.files import CALIBRATION_SETTINGS, CountingCompute, read_only, start_python
from tests.tiny import tiny_model


def assert_made_by(tensors: dict[str, torch.Tensor], value: float) -> None:
    expected = CountingCompute(value)()
    assert sorted(tensors) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(tensors[name], expected[name], rtol=0, atol=0)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "kvsqueeze"]


# --- tampered and damaged artifacts -------------------------------------------------------------------------------


def flip_data_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 16, len(raw)):  # the last tensor's data, the header untouched: still valid safetensors
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def resave(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_sidecar(path: Path, edit) -> None:
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    edit(info)
    sidecar.write_text(json.dumps(info))


def other_sidecar(path: Path) -> None:
    """The sidecar of another artifact (other settings, same tensors) put in its place."""
    other = calibrated("demo", tiny_model("llama"), {**CALIBRATION_SETTINGS, "seed": 1}, CountingCompute(1.0))
    assert other  # computed and saved
    source = artifact_path("demo", tiny_model("llama"), {**CALIBRATION_SETTINGS, "seed": 1}).with_suffix(".json")
    path.with_suffix(".json").write_text(source.read_text())


def set_nan(t: dict[str, torch.Tensor]) -> None:
    t["layer_0"][0, 0] = float("nan")


TAMPER = {
    "flipped bytes in the tensor data": flip_data_bytes,
    "zeros re-saved": lambda p: resave(p, lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items()})),
    "wrong shape re-saved": lambda p: resave(p, lambda t: t.update(layer_0=t["layer_0"].reshape(3, 2))),
    "NaN re-saved": lambda p: resave(p, set_nan),
    "tensor dropped": lambda p: resave(p, lambda t: t.pop("layer_1")),
    "tensor added": lambda p: resave(p, lambda t: t.update(extra=torch.ones(2))),
    "float64 re-saved": lambda p: resave(p, lambda t: t.update(layer_1=t["layer_1"].double())),
    "another artifact's sidecar": other_sidecar,
    "sidecar settings edited": lambda p: edit_sidecar(p, lambda i: i["settings"].update(seed=7)),
    "sidecar fingerprint edited": lambda p: edit_sidecar(p, lambda i: i.update(fingerprint="0" * 16)),
    "sidecar checksum edited": lambda p: edit_sidecar(p, lambda i: i.update(checksum="0" * 64)),
    "sidecar without checksum": lambda p: edit_sidecar(p, lambda i: (i.pop("checksum", None), i.pop("format", None))),
    "sidecar a JSON list": lambda p: p.with_suffix(".json").write_text("[1, 2]"),
}


@pytest.mark.parametrize("damage", sorted(TAMPER))
def test_tampered_artifact_is_computed_again_with_a_warning(calib_dir, damage, caplog) -> None:
    """Issue 13: a tampered artifact was used silently (zeros, NaN, flipped bytes) or failed deep inside scoring."""
    model = tiny_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    TAMPER[damage](path)
    compute = CountingCompute(2.0)
    with caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        out = calibrated("demo", model, CALIBRATION_SETTINGS, compute)
    assert compute.calls == 1
    assert_made_by(out, 2.0)
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "computing it again" in warned[0]
    assert str(path) in warned[0] or str(path.with_suffix(".json")) in warned[0]  # names the file
    again = CountingCompute(3.0)
    assert_made_by(calibrated("demo", model, CALIBRATION_SETTINGS, again), 2.0)  # the rewritten artifact is trusted
    assert again.calls == 0


def test_what_the_warning_says(calib_dir, caplog) -> None:
    model = tiny_model("llama")
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    reasons = {
        "wrong shape re-saved": "tensor 'layer_0' is {'dtype': 'float32', 'shape': [3, 2]",
        "NaN re-saved": "'finite': False",
        "tensor dropped": "the file holds tensors ['layer_0'], the sidecar lists others",
        "another artifact's sidecar": "the sidecar is for settings {'n_tokens': 64, 'seed': 1}",
        "flipped bytes in the tensor data": "the checksum does not match",
        "sidecar without checksum": "has no kvsqueeze-calibration/2 checksum",
        "sidecar a JSON list": "is not a JSON object",
    }
    for damage, reason in reasons.items():
        calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0), force=True)
        TAMPER[damage](path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvsqueeze"):
            calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(2.0))
        assert reason in warnings_of(caplog)[0], damage


_MODEL = tiny_model("llama")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_flips_anywhere_never_give_wrong_values(calib_dir, data) -> None:
    """Fuzz: flip 1-8 bytes anywhere in the tensors file or the sidecar: the store answers with the true values
    (a flip that changes nothing read, e.g. the case of a JSON exponent) or computes again, never anything else."""
    path = artifact_path("demo", _MODEL, CALIBRATION_SETTINGS)
    if not path.exists():
        calibrated("demo", _MODEL, CALIBRATION_SETTINGS, CountingCompute(1.0))
    good = {p: p.read_bytes() for p in (path, path.with_suffix(".json"))}
    target = data.draw(st.sampled_from(sorted(good)))
    raw = bytearray(good[target])
    for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8, unique=True)):
        raw[i] ^= data.draw(st.integers(1, 255))
    target.write_bytes(bytes(raw))
    compute = CountingCompute(2.0)
    try:
        out = calibrated("demo", _MODEL, CALIBRATION_SETTINGS, compute)
        assert_made_by(out, 2.0 if compute.calls else 1.0)
    finally:
        for p, content in good.items():
            p.write_bytes(content)


def test_read_info_names_a_damaged_or_missing_sidecar(calib_dir) -> None:
    model = tiny_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    sidecar = path.with_suffix(".json")
    sidecar.write_bytes(b"\xff{not json")
    with pytest.raises(store.CalibrationFileError, match=re.escape(f"calibration sidecar '{sidecar}' is unreadable")):
        read_info(path)
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"calibration sidecar '{sidecar}' does not exist")):
        read_info(path)


def test_read_artifact_raises_where_load_artifact_recomputes(calib_dir) -> None:
    model = tiny_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    assert_made_by(store.read_artifact(path), 1.0)
    flip_data_bytes(path)
    with pytest.raises(
        store.CalibrationFileError, match=re.escape(f"artifact '{path}' cannot be trusted: the checksum")
    ):
        store.read_artifact(path)
    assert store.load_artifact(path) is None
    path.write_bytes(b"garbage")
    with pytest.raises(store.CalibrationFileError, match=re.escape(f"artifact '{path}' is unreadable")):
        store.read_artifact(path)


def test_sidecar_lists_tensors_and_checksum(calib_dir) -> None:
    model = tiny_model("llama")
    calibrated(
        "demo", model, CALIBRATION_SETTINGS, lambda: {"a": torch.tensor([1.0, float("inf")]), "b": torch.ones(2, 1)}
    )
    info = read_info(artifact_path("demo", model, CALIBRATION_SETTINGS))
    assert info["format"] == "kvsqueeze-calibration/2" and len(info["checksum"]) == 64
    assert info["tensors"] == {
        "a": {"dtype": "float32", "shape": [2], "finite": False},  # computed that way: recorded, so loads fine
        "b": {"dtype": "float32", "shape": [2, 1], "finite": True},
    }
    reloaded = calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute())
    assert float(reloaded["a"][1]) == float("inf")


# --- read-only folders --------------------------------------------------------------------------------------------


def test_read_only_folder_computes_in_memory_with_one_warning(calib_dir, caplog) -> None:
    """Issue 13: a read-only cache made calibrated methods unusable: they calibrated, then failed saving, every run."""
    calib_dir.mkdir()
    model = tiny_model("llama")
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    compute = CountingCompute(1.0)
    with read_only(calib_dir), caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        assert_made_by(calibrated("demo", model, CALIBRATION_SETTINGS, compute), 1.0)
        assert_made_by(
            calibrated("demo", tiny_model("llama"), CALIBRATION_SETTINGS, compute), 1.0
        )  # the same process: kept
        info = read_info(path)  # what `kvsqueeze calibrate` prints after calibrating
    assert compute.calls == 1 and not path.exists()
    warned = warnings_of(caplog)
    assert len(warned) == 1
    assert warned[0].startswith(f"Could not save the demo calibration to {path} (")
    assert "not permitted" in warned[0] or "denied" in warned[0]  # why: the OS's own words
    assert info["settings"] == CALIBRATION_SETTINGS and info["kind"] == "demo"


def test_read_only_folder_loads_a_saved_artifact(calib_dir, caplog) -> None:
    model = tiny_model("llama")
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    compute = CountingCompute(2.0)
    with read_only(calib_dir), caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        assert_made_by(calibrated("demo", model, CALIBRATION_SETTINGS, compute), 1.0)
    assert compute.calls == 0 and warnings_of(caplog) == []


def test_read_only_folder_with_a_damaged_artifact(calib_dir, caplog) -> None:
    model = tiny_model("llama")
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    flip_data_bytes(path)
    with read_only(calib_dir), caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        assert_made_by(calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(2.0)), 2.0)
    damaged, unsaved = warnings_of(caplog)
    assert "checksum does not match" in damaged and unsaved.startswith("Could not save")


def test_cache_folder_under_a_file(tmp_path, monkeypatch, caplog) -> None:
    """A folder that cannot even be created (its parent is a file): the same, with the OS's reason."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KVSQUEEZE_CALIBRATION_DIR", str(tmp_path / "file" / "calib"))
    with caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        assert_made_by(calibrated("demo", tiny_model("llama"), CALIBRATION_SETTINGS, CountingCompute(1.0)), 1.0)
    (warned,) = warnings_of(caplog)
    assert "Not a directory" in warned


# --- processes ----------------------------------------------------------------------------------------------------

WORKER = """
import sys, time
from pathlib import Path
import torch
from kvsqueeze.calibration import calibrated
from tests.tiny import tiny_model
calls, ready, go = map(Path, sys.argv[1:4])
model = tiny_model("llama")

def compute():
    with calls.open("a") as f:
        f.write("computed\\n")
    time.sleep(1.0)  # long enough for the others to arrive while this one computes
    return {"layer_0": torch.full((2, 3), 1.0)}

ready.touch()
while not go.exists():
    time.sleep(0.005)
print(calibrated("demo", model, {"n_tokens": 64}, compute)["layer_0"].sum().item())
"""


def test_concurrent_processes_compute_once(calib_dir, tmp_path) -> None:
    """Issue 13: no lock, every process computed (and wrote) the same artifact."""
    calls, go = tmp_path / "calls", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    env = {"KVSQUEEZE_CALIBRATION_DIR": str(calib_dir)}
    workers = [start_python(f"import sys; sys.argv[1:] = {[str(calls), str(r), str(go)]!r}\n{WORKER}", env)
               for r in ready]  # fmt: skip
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["6.0"] * 3
    assert calls.read_text() == "computed\n"


KILLED_WRITER = """
import os, signal, sys
from kvsqueeze.atomic import write_atomic
write_atomic(sys.argv[1], lambda tmp: os.kill(os.getpid(), signal.SIGKILL))  # kill -9 in the middle of a save
"""


def test_killed_writer_debris_is_removed(calib_dir, caplog) -> None:
    model = tiny_model("llama")
    path = artifact_path("demo", model, CALIBRATION_SETTINGS)
    path.parent.mkdir(parents=True)
    killed = start_python(f"import sys; sys.argv[1:] = [{str(path)!r}]\n{KILLED_WRITER}")
    assert killed.wait(timeout=300) == -signal.SIGKILL
    (left,) = path.parent.glob(f".{path.name}.*.tmp")
    with caplog.at_level(logging.DEBUG, logger="kvsqueeze"):
        calibrated("demo", model, CALIBRATION_SETTINGS, CountingCompute(1.0))
    assert not left.exists() and f"Removed {left}, left by an interrupted calibration save" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name, path.with_suffix(".lock").name]
    )
