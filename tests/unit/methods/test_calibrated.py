"""CalibrationOptions, the base every method calibrated on generic text shares: its fields come last (where the
methods always had them: their reprs feed artifact keys), its checks, and the settings that key the artifact."""

from __future__ import annotations

import dataclasses

import pytest

from kvsqueeze.methods._calibrated import CalibrationOptions
from kvsqueeze.methods.duo_attention import DuoAttention
from kvsqueeze.methods.expected_attention_calibrated import ExpectedAttentionCalibrated
from kvsqueeze.methods.lukv import LUKV
from kvsqueeze.methods.qfilters import QFilters

CALIBRATED = [QFilters, ExpectedAttentionCalibrated, DuoAttention, LUKV]


@pytest.mark.parametrize("cls", CALIBRATED)
def test_calibration_fields_come_last(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    assert issubclass(cls, CalibrationOptions) and cls.needs == ("calibration",)
    assert names[0] == "ratio" and names[-4:] == ["n_tokens", "seed", "calibration_chunk", "text"]
    assert cls.options()["n_tokens"] == 4096 and cls.options()["calibration_chunk"] == 1024


def test_reprs_keep_their_field_order():
    assert repr(QFilters(ratio=0.5, seed=2)) == (
        "QFilters(ratio=0.5, n_tokens=4096, seed=2, calibration_chunk=1024, text='generic')"
    )
    assert repr(DuoAttention(window=32)) == (
        "DuoAttention(ratio=0.0, n_sink=4, window=32, streaming_fraction=None, n_tokens=4096, seed=0, "
        "calibration_chunk=1024, text='generic')"
    )
    assert [f.name for f in dataclasses.fields(LUKV)] == [
        "ratio", "scorer", "horizon", "grid", "n_tokens", "seed", "calibration_chunk", "text"
    ]  # fmt: skip


@pytest.mark.parametrize("cls", CALIBRATED)
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("n_tokens", 15, r"n_tokens must be an integer in \[16, 1000000\], got 15"),
        ("seed", -1, r"seed must be an integer in \[0, 2147483647\], got -1"),
        ("calibration_chunk", True, r"calibration_chunk must be an integer in \[16, 1000000\], got True"),
        ("text", "wiki", r"text must be one of 'generic', 'python_docs', 'docstrings', 'mixed', got 'wiki'"),
    ],
)
def test_calibration_options_are_checked(cls, option, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{option: value})


def test_the_methods_own_checks_still_run():
    with pytest.raises(ValueError, match="n_sink \\+ window must be >= 1"):
        DuoAttention(n_sink=0, window=0)
    with pytest.raises(ValueError, match=r"calibration_chunk must exceed n_sink \+ window = 68"):
        DuoAttention(calibration_chunk=64)  # a check of DuoAttention's over both groups of options
    with pytest.raises(ValueError, match=r"horizon must be an integer in \[1, 99\] \(below calibration_chunk=100"):
        LUKV(calibration_chunk=100, horizon=100)
    with pytest.raises(ValueError, match=r"grid must be an integer in \[1, 4096\]"):
        LUKV(grid=0)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        ExpectedAttentionCalibrated(ratio=1.0)


def test_setup_caps_the_chunk_and_keys_the_artifact(make_model):
    model = make_model("llama", max_position_embeddings=48)
    ids, chunk, settings = QFilters(n_tokens=64, seed=1, calibration_chunk=256).calibration_setup(model, None)
    assert ids.shape == (64,) and chunk == 48  # capped by the model's max positions
    assert settings["n_tokens"] == 64 and settings["seed"] == 1 and settings["chunk_size"] == 48
    assert sorted(settings) == ["chunk_size", "ids", "n_tokens", "seed", "text"]
    again = DuoAttention(n_tokens=64, seed=1, calibration_chunk=256).calibration_setup(model, None)
    assert again[2] == settings  # the same options give the same settings, whichever method asks
    other = QFilters(n_tokens=64, seed=2, calibration_chunk=256).calibration_setup(model, None)
    assert other[2]["ids"] != settings["ids"]


def test_calibration_text_keys_the_artifact_and_the_process_memo(make_model, tokenizer):
    model = make_model("llama")
    generic = QFilters(n_tokens=64).calibration_setup(model, tokenizer)[2]
    mixed = QFilters(n_tokens=64, text="mixed").calibration_setup(model, tokenizer)[2]
    assert generic["text"] == "text" and mixed["text"] == "mixed"  # generic artifacts keep their old key
    assert mixed["ids"] != generic["ids"]
    assert QFilters(text="mixed").calibration_key() != QFilters().calibration_key()
