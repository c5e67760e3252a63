"""What a quantized layer holds, and what reading it costs (CPU micro-benchmark).

A layer shaped like one of SmolLM2-135M's (3 KV heads, head_dim 64, float32 as the embedded model runs) holds 6,000
tokens, stored in full precision (`DenseStorage`) or quantized (`QuantizedStorage`, groups of 32, the newest 64
tokens exact) at 8, 4 and 2 bits. For each: the bytes held (`nbytes`), the transient memory `view()` takes to
dequantize the layer (the peak resident set while it runs, minus the resident set before), the time of one `view()`,
and the time of one decoding step's update (append one token, attention's view, settle).

Large allocations are made to go straight to the OS (mallopt), so the resident set follows the live tensors.
Run: `.venv/bin/python benchmarks/quantized_layer.py` (Linux; about ten seconds).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import torch

from kvsqueeze.quantization import QuantSpec
from kvsqueeze.storage import DenseStorage, LayerStorage, QuantizedStorage

TOKENS, HEADS, DIM = 6000, 3, 64
STEPS = 50
OUT = Path(__file__).parent / "results" / "quantized_layer"


def _resident(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def transient_bytes(storage: LayerStorage) -> int:
    """Peak resident set during one `view()` minus the resident set before it."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _resident("VmRSS")
    view = storage.view()
    peak = _resident("VmHWM")
    del view
    return peak - before


def seconds(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def decode_step(storage: LayerStorage, i: int) -> LayerStorage:
    position = torch.full((1, HEADS, 1), TOKENS + i, dtype=torch.int32)
    grown, view = storage.append(torch.randn(1, HEADS, 1, DIM), torch.randn(1, HEADS, 1, DIM), position)
    del view  # attention has read it
    return grown.settle()


def measure(name: str, storage: LayerStorage) -> dict[str, float | str]:
    keys, values, _ = storage.view()
    full = keys.nbytes + values.nbytes
    del keys, values
    state = {"storage": storage}

    def step() -> None:
        state["storage"] = decode_step(state["storage"], 0)

    return {
        "layout": name,
        "held_MiB": storage.nbytes() / 2**20,
        "held_vs_fp32": storage.nbytes() / full,
        "view_transient_MiB": transient_bytes(storage) / 2**20,
        "view_ms": seconds(storage.view, 10) * 1e3,
        "decode_step_ms": seconds(step, STEPS) * 1e3,
    }


def main() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors leave the resident set
    torch.manual_seed(0)
    torch.set_num_threads(1)
    keys, values = torch.randn(1, HEADS, TOKENS, DIM), torch.randn(1, HEADS, TOKENS, DIM)
    positions = torch.arange(TOKENS, dtype=torch.int32).expand(1, HEADS, TOKENS).contiguous()
    dense = DenseStorage(keys, values, positions)
    rows = [measure("fp32 (dense)", dense)]
    for bits in (8, 4, 2):
        quantized = QuantizedStorage.from_storage(dense, QuantSpec(bits=bits, group_size=32, residual=64))
        rows.append(measure(f"{bits}-bit", quantized))
    OUT.parent.mkdir(exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    header = "| layout | held MiB | held / fp32 | view() transient MiB | view() ms | decode step ms |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['held_MiB']:.2f} | {r['held_vs_fp32']:.3f} | {r['view_transient_MiB']:.2f} | "
            f"{r['view_ms']:.1f} | {r['decode_step_ms']:.1f} |"
        )
    table = "\n".join(lines)
    OUT.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
