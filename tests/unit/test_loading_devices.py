"""Device checks before any model loads: a device this machine has comes back as a torch.device; anything else is a
ValueError that lists the devices it has."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvsqueeze.loading import available_devices, check_device, load_model


def test_the_cpu_is_always_there():
    assert available_devices()[0] == "cpu"
    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("cpu")) == torch.device("cpu")


def test_every_listed_device_is_accepted():
    for name in available_devices():
        assert str(check_device(name)) == name


@pytest.mark.parametrize("device", ["foo", "", "CPU", "cuda:99", "meta", "mps:3", "xpu:7"])
def test_other_devices_are_refused_listing_those_here(device: str):
    with pytest.raises(ValueError) as err:
        check_device(device)
    assert repr(device) in str(err.value) and str(err.value).endswith(f"devices here: {', '.join(available_devices())}")


@pytest.mark.parametrize("device", [None, 0, 1.5, ["cpu"]])
def test_a_device_that_is_not_a_string_is_refused(device: object):
    with pytest.raises(ValueError, match="device must be a string such as 'cpu' or 'cuda:0'"):
        check_device(device)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_cuda_without_cuda_says_the_build_lacks_it():
    with pytest.raises(ValueError, match=r"device 'cuda' is not available \(this torch was built without CUDA\)"):
        check_device("cuda")


@given(st.text(max_size=12))
def test_any_text_is_a_device_here_or_a_value_error(text: str):
    try:
        device = check_device(text)
    except ValueError as err:
        assert "devices here: cpu" in str(err)
        return
    assert device.type == "cpu" or str(device) in available_devices() or f"{device}:0" in available_devices()


def test_load_model_checks_the_device_before_looking_for_the_model(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        load_model(str(tmp_path / "no-model"), device="foo")
