"""Bad inputs, tried as a user would: every case runs the real CLI (`python -m kvsqueeze ...`) in a fresh process on
the embedded SmolLM2-135M and is classified from its exit code and output.

    clear error   exit 1 or 2 with one "kvsqueeze: error: ..." line and no traceback
    traceback     a Python traceback reached the user
    silent        exit 0 where the input should have been refused (a damaged file answered, a stale row was reused)
    works         exit 0 where the input is valid (the control cases)

Cases cover saved caches (truncated, flipped, edited, re-saved with a valid checksum but wrong tensors), method
options of the wrong type, API-facing CLI arguments, bench folders (a rerun with other settings, two runs at once)
and dataset files. Each case builds its own files in a temporary folder.

Run (about 10 minutes on 2 CPU cores; the first run converts the embedded model once):
    .venv/bin/python benchmarks/bad_inputs.py
Results: benchmarks/results/bad_inputs.{json,md}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).parent / "results"
QUESTION = ["--question", "What is the code?", "--max-new-tokens", "4"]


@dataclass
class Case:
    area: str
    name: str
    argv: Callable[[Path], list[str]]  # builds its files under the folder, returns the CLI arguments
    valid: bool = False  # a control case that must work
    interrupt_after: float | None = None  # send SIGINT after this many seconds


def cli(args: list[str], interrupt_after: float | None = None) -> tuple[int, str]:
    """Run `python -m kvsqueeze ARGS`; (exit code, stdout + stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsqueeze", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def classify(code: int, out: str, valid: bool) -> str:
    if "Traceback (most recent call last)" in out:
        return "traceback"
    if code == 0:
        return "works" if valid else "silent"
    return "clear error" if not valid else f"failed (exit {code})"


# -- saved caches ---------------------------------------------------------------------------------------------------
def good_cache(folder: Path) -> Path:
    """A cache of the bundled example compressed by KNorm at 0.5, saved by the CLI (made once per run)."""
    path = folder.parent / "good.safetensors"
    if not path.exists():
        code, out = cli(["generate", "--example", "--method", "knorm", "--ratio", "0.5", "--no-compare",
                         "--max-new-tokens", "2", "--save-cache", str(path), "-q"])  # fmt: skip
        if code != 0:
            raise SystemExit(f"could not make the reference cache:\n{out}")
    return path


def load(path: Path) -> list[str]:
    return ["generate", "--load-cache", str(path), *QUESTION]


def edited(folder: Path, edit: Callable[[dict, dict], None], checksum: bool = True) -> Path:
    """A copy of the good cache after `edit(tensors, metadata)`; with `checksum`, re-signed so that only the
    structural checks can catch it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvsqueeze.checksum import tensors_digest

    with safe_open(str(good_cache(folder)), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    edit(tensors, meta)
    if checksum:
        meta["checksum"] = tensors_digest(tensors, meta)
    path = folder / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def raw(folder: Path, change: Callable[[bytes], bytes]) -> Path:
    path = folder / "bad.safetensors"
    path.write_bytes(change(good_cache(folder).read_bytes()))
    return path


def flip_tail(data: bytes) -> bytes:
    return data[:-4096] + bytes(b ^ 0xFF for b in data[-4096:])


def _drop_layers(t: dict, m: dict) -> None:
    for name in [n for n in t if int(n.split(".")[1]) >= 5]:
        del t[name]


def _set(name: str, value: Callable) -> Callable[[dict, dict], None]:
    def edit(t: dict, m: dict) -> None:
        t[name] = value(t[name]).contiguous()

    return edit


def _nan(x):
    x = x.clone()
    x.view(-1)[0] = float("nan")
    return x


def _meta(key: str, value: str | None) -> Callable[[dict, dict], None]:
    def edit(t: dict, m: dict) -> None:
        if value is None:
            del m[key]
        else:
            m[key] = value

    return edit


CACHE_CASES = [
    Case("saved cache", "valid file (control)", lambda d: load(good_cache(d)), valid=True),
    Case("saved cache", "file does not exist", lambda d: load(d / "missing.safetensors")),
    Case("saved cache", "a directory", lambda d: load(d)),
    Case("saved cache", "truncated to half", lambda d: load(raw(d, lambda b: b[: len(b) // 2]))),
    Case("saved cache", "empty file", lambda d: load(raw(d, lambda b: b""))),
    Case("saved cache", "a text file renamed", lambda d: load(raw(d, lambda b: b"Dear diary,\n" * 100))),
    Case("saved cache", "damaged header", lambda d: load(raw(d, lambda b: b[:8] + b"{" * 24 + b[32:]))),
    Case("saved cache", "4 KiB of flipped bytes in the tensor data", lambda d: load(raw(d, flip_tail))),
    Case(
        "saved cache",
        "tensor edited, old checksum kept",
        lambda d: load(edited(d, _set("layers.0.keys", lambda x: x * 2), checksum=False)),
    ),
    Case("saved cache", "layers 5-29 dropped (re-signed)", lambda d: load(edited(d, _drop_layers))),
    Case("saved cache", "NaN keys (re-signed)", lambda d: load(edited(d, _set("layers.3.keys", _nan)))),
    Case(
        "saved cache",
        "huge position (re-signed)",
        lambda d: load(edited(d, _set("layers.0.positions", lambda p: p * 0 + 10**9))),
    ),
    Case("saved cache", "negative seen (re-signed)", lambda d: load(edited(d, _set("layers.0.seen", lambda s: -s)))),
    Case(
        "saved cache",
        "wrong head dim (re-signed)",
        lambda d: load(edited(d, _set("layers.0.keys", lambda x: x[..., :32]))),
    ),
    Case(
        "saved cache",
        "keys/values length mismatch (re-signed)",
        lambda d: load(edited(d, _set("layers.0.values", lambda x: x[:, :, :-3]))),
    ),
    Case("saved cache", "metadata key missing (re-signed)", lambda d: load(edited(d, _meta("seen", None)))),
    Case("saved cache", "metadata not JSON (re-signed)", lambda d: load(edited(d, _meta("extra", "{oops")))),
    Case(
        "saved cache", "written by another model (re-signed)", lambda d: load(edited(d, _meta("fingerprint", "0" * 24)))
    ),
]


# -- options, arguments and files --------------------------------------------------------------------------------------
def example(*extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["generate", "--example", "--no-compare", "--max-new-tokens", "2", *extra]


def context_file(content: bytes) -> Callable[[Path], list[str]]:
    def argv(d: Path) -> list[str]:
        (d / "ctx.txt").write_bytes(content)
        return ["generate", "--context-file", str(d / "ctx.txt"), *QUESTION]

    return argv


ARGUMENT_CASES = [
    Case(
        "options",
        "valid option (control)",
        example("--method", "snapkv", "--ratio", "0.5", "--option", "window=8"),
        valid=True,
    ),
    Case("options", "int option given 8.5", example("--method", "snapkv", "--ratio", "0.5", "--option", "window=8.5")),
    Case(
        "options", "int option given true", example("--method", "snapkv", "--ratio", "0.5", "--option", "window=true")
    ),
    Case("options", "int option given nan", example("--method", "snapkv", "--ratio", "0.5", "--option", "window=nan")),
    Case(
        "options", "float option given a word", example("--method", "adakv", "--ratio", "0.5", "--option", "alpha=high")
    ),
    Case("options", "leverage seed=2.5", example("--method", "leverage", "--ratio", "0.5", "--option", "seed=2.5")),
    Case(
        "options",
        "lagkv partition_size=2.5",
        example("--method", "lagkv", "--ratio", "0.5", "--option", "partition_size=2.5"),
    ),
    Case("options", "unknown option", example("--method", "knorm", "--ratio", "0.5", "--option", "windw=8")),
    Case("options", "unknown method", example("--method", "knrom", "--ratio", "0.5")),
    Case("options", "ratio 1.5", example("--method", "knorm", "--ratio", "1.5")),
    Case("arguments", "--device foo", example("--device", "foo")),
    Case("arguments", "--device cuda on a CPU build", example("--device", "cuda")),
    Case("arguments", "--load-cache with --method", lambda d: [*load(good_cache(d)), "--method", "knorm"]),
    Case("arguments", "--max-new-tokens 0", example("--max-new-tokens", "0")),
    Case("files", "context file is a directory", lambda d: ["generate", "--context-file", str(d), *QUESTION]),
    Case("files", "context file is not UTF-8", context_file(b"\xff\xfe\x00bad\x80" * 50)),
    Case(
        "files", "context file does not exist", lambda d: ["generate", "--context-file", str(d / "no.txt"), *QUESTION]
    ),
    Case("interrupts", "Ctrl-C during generate", example("--method", "knorm", "--ratio", "0.5"), interrupt_after=4.0),
]


# -- bench folders and datasets ----------------------------------------------------------------------------------------
def dataset(rows: list[str]) -> Callable[[Path], list[str]]:
    def argv(d: Path) -> list[str]:
        (d / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return ["bench", "--dataset", str(d / "data.jsonl"), "--methods", "none", "--out", str(d / "out"), "-q"]

    return argv


ROW = json.dumps({"context": "The code is 4417. " * 20, "question": "What is the code?", "answers": ["4417"]})


def rerun(change: list[str]) -> Callable[[Path], list[str]]:
    """A bench into a folder that already holds a run with other settings."""

    def argv(d: Path) -> list[str]:
        first = dataset([ROW])(d)
        code, out = cli([*first, "--max-new-tokens", "4"])
        if code != 0:
            raise SystemExit(f"the first bench run failed:\n{out}")
        return [*first, *change]

    return argv


BENCH_CASES = [
    Case("bench", "valid dataset (control)", dataset([ROW]), valid=True),
    Case("bench", "dataset row {}", dataset(["{}"])),
    Case("bench", "dataset row max_new_tokens Infinity", dataset([ROW[:-1] + ', "max_new_tokens": Infinity}'])),
    Case(
        "bench",
        "dataset is a directory",
        lambda d: ["bench", "--dataset", str(d), "--methods", "none", "--out", str(d / "o")],
    ),
    Case("bench", "rerun into the folder with another --max-new-tokens", rerun(["--max-new-tokens", "8"])),
    Case(
        "bench", "rerun into the folder with another --dtype", rerun(["--max-new-tokens", "4", "--dtype", "bfloat16"])
    ),
]

CASES = CACHE_CASES + ARGUMENT_CASES + BENCH_CASES


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            folder = Path(tmp) / f"case{i}"
            folder.mkdir()
            code, out = cli(case.argv(folder), case.interrupt_after)
            outcome = classify(code, out, case.valid)
            if case.interrupt_after is not None and code == 130 and "Traceback" not in out:
                outcome = "clear error"
            last = next((line for line in reversed(out.strip().splitlines()) if line.strip()), "")
            rows.append({"area": case.area, "case": case.name, "exit": code, "outcome": outcome, "last_line": last})
            print(f"{case.area:12} {case.name:55} exit {code:3}  {outcome}", flush=True)
    bad = [r for r in rows if not r["case"].endswith("(control)")]
    summary = {
        "inputs_tried": len(bad),
        "tracebacks": sum(r["outcome"] == "traceback" for r in bad),
        "silent": sum(r["outcome"] == "silent" for r in bad),
        "controls_working": sum(r["outcome"] == "works" for r in rows if r["case"].endswith("(control)")),
        "controls": sum(r["case"].endswith("(control)") for r in rows),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "bad_inputs.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Bad inputs through the CLI (benchmarks/bad_inputs.py)",
        "",
        f"Inputs tried: {summary['inputs_tried']}; tracebacks escaped: {summary['tracebacks']}; silent wrong "
        f"answers: {summary['silent']}; control cases working: {summary['controls_working']}/{summary['controls']}.",
        "",
        "| area | case | exit | outcome | last line printed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["last_line"].replace("|", "\\|")[:150]
        lines.append(f"| {r['area']} | {r['case']} | {r['exit']} | {r['outcome']} | {last} |")
    (OUT / "bad_inputs.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
