"""The checksum a file kvsqueeze writes carries, so that damage or an edit is found before the file is used: saved
caches (`cachefile.py`) and calibration artifacts (`calibration/store.py`) store it next to their tensors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def tensors_digest(tensors: Mapping[str, Tensor], header: Mapping[str, Any]) -> str:
    """SHA-256 over `header` (JSON, keys sorted; its own "checksum" entry left out) and every tensor's name, dtype,
    shape and bytes, in name order."""
    fields = {key: value for key, value in header.items() if key != "checksum"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
