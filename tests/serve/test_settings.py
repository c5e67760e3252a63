"""The server's settings: sizes as people write them, and every option checked."""

from __future__ import annotations

from typing import Any

import pytest

from kvsqueeze.serve.settings import ServerSettings, parse_size


@pytest.mark.parametrize(
    ("text", "size"), [("1000", 1000), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5 kib", 1536), ("0", 0)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2 GX", "-1", "lots", "1e9"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size in bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 70000), ("ratio", 1.0), ("max_queue", 0), ("max_tokens_limit", 0), ("api_key", ""), ("host", "")],
)
def test_bad_settings_name_the_option(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        ServerSettings(model_name="m", **{field: value})
