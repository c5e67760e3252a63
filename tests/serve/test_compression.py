"""A request's `kv_compression`: what it leaves out comes from the server, and bad settings get the CLI's errors."""

from __future__ import annotations

import pytest

from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.serve.compression import Compression, request_compression

SERVER = Compression("snapkv", 0.5, {"window": 4}, "adakv")


def test_fields_left_out_come_from_the_server() -> None:
    assert request_compression(None, SERVER) is SERVER
    assert request_compression({"ratio": 0.25}, SERVER) == Compression("snapkv", 0.25, {"window": 4}, "adakv")
    # another method starts from its own defaults: the server's options belong to the server's method
    assert request_compression({"method": "knorm"}, SERVER) == Compression("knorm", 0.5, {}, None)
    assert request_compression({"method": "snapkv", "options": None}, SERVER).options == {}
    assert request_compression({"budget_policy": None}, SERVER).budget_policy is None
    assert request_compression({"kv_bits": 4}, SERVER) == Compression("snapkv", 0.5, {"window": 4}, "adakv", 4)


def test_build() -> None:
    assert Compression("none", 0.5).build() is None
    assert Compression("knorm", 0.25).build() == KNorm(ratio=0.25)
    assert repr(SERVER.build()).startswith("AdaKV(")


@pytest.mark.parametrize(
    ("compression", "words"),
    [
        (Compression("snapkvv"), "Did you mean 'snapkv'"),
        (Compression("snapkv", options={"windw": 3}), "Unknown option 'windw'"),
        (Compression("snapkv", options={"window": "big"}), "window must be an integer"),
        (Compression("knorm", ratio=1.0), "ratio must be"),
        (Compression("knorm", options={"ratio": 0.3}), "not in kv_compression.options"),
        (Compression("knorm", budget_policy="nope"), "unknown budget policy 'nope'"),
        (Compression("none", options={"window": 3}), "takes no options"),
        (Compression("finch"), "query-aware"),
        (Compression(""), "method name"),
        (Compression("knorm", kv_bits=3), "kv_compression.kv_bits: .*3"),
    ],
)
def test_bad_settings(compression: Compression, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        compression.build()


def test_unknown_fields() -> None:
    with pytest.raises(ValueError, match="no field 'methd'"):
        request_compression({"methd": "knorm"}, SERVER)
