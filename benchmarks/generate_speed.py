"""Plain transformers `model.generate` against kvsqueeze's generation, side by side in one process.

For each context length (a passkey context of the benchmark's own task, then its question) the same prompt is
answered greedily with exactly `--new-tokens` tokens (end-of-sequence ignored) by:

    transformers        model.generate(min_new_tokens=N, max_new_tokens=N), the model in its own SDPA attention
    kvsqueeze none      kvsqueeze's prefill (no method) and decode loop: what kvs.generate runs (its `prefill` and
                        `generation.stream`), with Sampling(ignore_eos=True)
    kvsqueeze <m> <r>   the same with method m at ratio r (default: knorm at 0.5 and 0.75)
    kvsqueeze none products   (with --products) uncompressed kvsqueeze with prefix attention's fused kernel off

Each run reports its time to first token (the context and question prefilled, and compressed), its decode speed
over the N - 1 later tokens (timestamps of the steps, so prefill and decoding need one run), and the peak memory it
added (resident set size polled by `bench.memory.PeakMemory`; CUDA's allocator peak on a GPU). Runs are interleaved
(each repetition goes through every length and path, the path order rotating), and the report gives medians and
ratios against transformers. Next to each compressed speed-up stands the memory-traffic bound of one decode step,
(W + KV) / (W + KV (1 - r)), W = the bytes of the weights a step reads (every parameter once), KV = the uncompressed
cache's bytes at that length.

Run it alone on the machine (other jobs change the times):
    .venv/bin/python benchmarks/generate_speed.py                          # 1k/4k/7k, 64 tokens, 3 repetitions
    .venv/bin/python benchmarks/generate_speed.py --quick                  # a tiny check that it works
    .venv/bin/python benchmarks/generate_speed.py --device cuda --dtype bfloat16 --random-llama --lengths 32768
On a GPU, `--random-llama` builds a Llama-architecture model (Llama-3.2-1B shapes) with random weights from a config
instead of the embedded model (nothing is downloaded). Writes benchmarks/results/<--save>.{json,md}
(default generate_speed; --quick only prints).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

import kvsqueeze as kvs
from kvsqueeze import prefix_attention
from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.memory import PeakMemory
from kvsqueeze.bench.units import Unit, plan_units
from kvsqueeze.generation import Sampling, encode, stream
from kvsqueeze.loading import DEFAULT_MODEL
from kvsqueeze.pipeline import prefill
from kvsqueeze.quantization import QuantSpec

RESULTS_DIR = Path(__file__).parent / "results"
TRANSFORMERS = "transformers"
PRODUCTS = " products"  # the suffix of a path run with `products_only`


def random_llama(device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A Llama with Llama-3.2-1B's shapes and random weights, and the embedded model's tokenizer."""
    config = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=49152, max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    _, tokenizer = kvs.load_model()
    return model.to(device).eval(), tokenizer


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * element


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A transformers streamer that only notes when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls = device, 0
        self.marks: list[tuple[int, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            sync(self.device)
            self.marks.append((self.calls - 1, time.perf_counter()))

    def end(self) -> None:
        pass


Marks = list[tuple[int, float]]  # (tokens generated so far, when)


def run_transformers(model: Any, prompt: torch.Tensor, new: int) -> tuple[Marks, list[int]]:
    """model.generate with no end-of-sequence token: it runs to `new` tokens taking every argmax, the end token too,
    as kvsqueeze's ignore_eos does (min_new_tokens would forbid the end token instead and change the tokens)."""
    clock = StepClock(prompt.device)
    config = copy.deepcopy(model.generation_config)
    # no end token: None would be filled in from the model's own generation config, so name an id no logit has
    config.eos_token_id, config.do_sample, config.max_new_tokens, config.pad_token_id = (
        [model.config.vocab_size],
        False,
        new,
        0,
    )
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                         streamer=clock)  # fmt: skip
    return clock.marks, out[0, prompt.shape[1] :].tolist()


def run_kvsqueeze(model: Any, tok: Any, unit: Unit, path: Any, new: int) -> tuple[Marks, list[int]]:
    """kvsqueeze's prefill and decode loop, as kvs.generate runs them; a mark at every step that yields text. `path`:
    (a method or None, a QuantSpec or None)."""
    device = next(model.parameters()).device
    ids = torch.tensor([unit.context_ids], device=device)
    method, quant = path if isinstance(path, tuple) else (path, None)
    cache, _, _, _ = prefill(model, ids, torch.ones_like(ids), method, quant=quant)
    run = stream(model, tok, cache, [0], unit.question_texts[:1], Sampling(max_new_tokens=new, ignore_eos=True))
    marks: Marks = []
    for deltas in run:
        sync(device)
        marks.append((deltas[-1].steps, time.perf_counter()))
    return marks, run.streams[0].tokens


@contextlib.contextmanager
def products_only() -> Iterator[None]:
    """kvsqueeze with prefix attention's fused kernel switched off: a full prefix is attended by the separate products
    and softmax, as before 2026-12-05 (the `--products` path, to compare the two)."""
    saved = prefix_attention.fused_ok
    prefix_attention.fused_ok = lambda queries, keys, values: False
    try:
        yield
    finally:
        prefix_attention.fused_ok = saved


def measure(model: Any, tok: Any, unit: Unit, path: str, methods: dict[str, Any], new: int) -> dict[str, Any]:
    """One run of `path` on `unit`: time to first token, decode tokens/s after it, peak memory added, the tokens."""
    device = next(model.parameters()).device
    prompt = torch.tensor([unit.context_ids + encode(tok, unit.question_texts[0])], device=device)
    sync(device)
    with PeakMemory(device) as mem, products_only() if path.endswith(PRODUCTS) else contextlib.nullcontext():
        start = time.perf_counter()
        if path == TRANSFORMERS:
            marks, tokens = run_transformers(model, prompt, new)
        else:
            marks, tokens = run_kvsqueeze(model, tok, unit, methods[path], new)
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return {"ttft_s": t0 - start, "first_mark_tokens": s0, "decode_tok_s": (s1 - s0) / (t1 - t0) if s1 > s0 else 0.0,
            "peak_bytes": mem.peak_bytes, "tokens": tokens}  # fmt: skip


def passkey_unit(model: Any, tok: Any, length: int) -> Unit:
    """The benchmark's first passkey sample at `length` tokens: its context ids and question, as bench asks it."""
    config = BenchConfig(methods=("none",), ratios=(), tasks=("passkey",), lengths=(length,), samples=1)
    return plan_units(model, tok, config)[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(runs: dict[tuple[int, str], list[dict[str, Any]]], setup: dict[str, Any], paths: list[str]) -> str:
    lines = [
        f"# Generation speed: transformers against kvsqueeze ({setup['model']}, {setup['dtype']}, {setup['device']})",
        "",
        f"{setup['new_tokens']} greedy tokens (end-of-sequence ignored) after a passkey context and its question; "
        f"{setup['reps']} interleaved repetitions, medians; {setup['machine']}; torch {setup['torch']}, "
        f"transformers {setup['transformers']}. Weights read per step W = {setup['weight_bytes'] / 2**20:.0f} MiB; "
        f"the uncompressed cache takes {setup['kv_bytes_per_token'] / 1024:.1f} KiB per token.",
        "",
        "| tokens | path | time to first token (s) | decode tok/s | vs transformers | vs kvsqueeze none | bound "
        "(W+KV)/(W+KV(1-r)) | peak added (MiB) | peak vs transformers | tokens equal to transformers' |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length in setup["lengths"]:
        base = runs[(length, TRANSFORMERS)]
        none = runs.get((length, "kvsqueeze none"))
        kv = setup["kv_bytes_per_token"] * length
        for path in paths:
            rows = runs[(length, path)]
            speed, ttft, peak = median(rows, "decode_tok_s"), median(rows, "ttft_s"), median(rows, "peak_bytes")
            ratio = setup["ratios"].get(path)
            versus_none = f"{speed / median(none, 'decode_tok_s'):.2f}" if none and ratio else "-"
            w = setup["weight_bytes"]
            bound = f"{(w + kv) / (w + kv * (1 - ratio)):.2f}" if ratio else "-"
            equal = common_prefix(rows[0]["tokens"], base[0]["tokens"])
            base_peak = median(base, "peak_bytes")
            lines.append(
                f"| {rows[0]['context_tokens']} | {path} | {ttft:.2f} | {speed:.1f} | "
                f"{speed / median(base, 'decode_tok_s'):.2f} | {versus_none} | {bound} | {peak / 2**20:.0f} | "
                f"{peak / base_peak if base_peak else float('nan'):.2f} | {equal}/{len(base[0]['tokens'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 4096, 7168])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="knorm:0.5,knorm:0.75",
                        help="METHOD:RATIO[:BITS],... compressed paths (BITS: a cache quantized to 8, 4 or 2 bits; "
                        "none:0:4 quantizes without evicting)")  # fmt: skip
    parser.add_argument("--model", default=None, help="a model name or folder (default: the embedded model)")
    parser.add_argument("--random-llama", action="store_true", help="a random Llama-3.2-1B-shaped model instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="256 tokens, 8 new, 1 repetition; nothing written")
    parser.add_argument("--save", default="generate_speed", help="file stem in benchmarks/results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    parser.add_argument("--products", action="store_true",
                        help="also run uncompressed kvsqueeze without prefix attention's fused kernel")  # fmt: skip
    args = parser.parse_args()
    if args.report_only:
        record = json.loads((RESULTS_DIR / f"{args.save}.json").read_text())
        saved = {(int(k.split("|")[0]), k.split("|")[1]): v for k, v in record["runs"].items()}
        (RESULTS_DIR / f"{args.save}.md").write_text(
            report(saved, record["setup"], list(dict.fromkeys(p for _, p in saved)))
        )
        return
    if args.quick:
        args.lengths, args.new_tokens, args.reps = [256], 8, 1
    dtype = getattr(torch, args.dtype)
    if args.random_llama:
        model, tok = random_llama(args.device, dtype)
    else:
        model, tok = kvs.load_model(args.model, dtype=args.dtype, device=None if args.device == "cpu" else args.device)
    methods: dict[str, Any] = {"kvsqueeze none": None}
    ratios: dict[str, float] = {}
    for item in filter(None, args.methods.split(",")):
        name, ratio, *bits = item.split(":")
        method = None if name == "none" else kvs.get_method(name, ratio=float(ratio))
        label = f"kvsqueeze {name} {float(ratio)}" + (f" {bits[0]}-bit" if bits else "")
        methods[label] = (method, QuantSpec(int(bits[0])) if bits else None)
        if not bits:  # the memory-traffic bound is for a full-precision cache
            ratios[label] = float(ratio)
    if args.products:  # uncompressed kvsqueeze again, without the fused kernel
        methods["kvsqueeze none" + PRODUCTS] = None
    paths = [TRANSFORMERS, *methods]
    units = {n: passkey_unit(model, tok, n) for n in args.lengths}
    warm = passkey_unit(model, tok, 256)
    for path in paths:  # first calls of each path (kernels, calibration of a method) are not measured
        measure(model, tok, warm, path, methods, 4)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for length in args.lengths:
            order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
            for path in order:
                row = measure(model, tok, units[length], path, methods, args.new_tokens)
                row["context_tokens"] = len(units[length].context_ids)
                runs.setdefault((length, path), []).append(row)
                print(f"rep {rep} {length} {path}: ttft {row['ttft_s']:.2f} s, decode {row['decode_tok_s']:.1f} "
                      f"tok/s, peak +{row['peak_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    setup = {"model": "random Llama (1B shapes)" if args.random_llama else (args.model or DEFAULT_MODEL),
             "dtype": args.dtype, "device": args.device, "lengths": args.lengths, "new_tokens": args.new_tokens,
             "reps": args.reps, "weight_bytes": weight_bytes(model), "kv_bytes_per_token": kv_bytes_per_token(model),
             "ratios": ratios, "torch": torch.__version__, "transformers": transformers.__version__,
             "threads": torch.get_num_threads(),
             "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}  # fmt: skip
    text = report(runs, setup, paths)
    print(text)
    if args.quick:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    record = {"setup": setup, "runs": {f"{n}|{p}": rows for (n, p), rows in runs.items()}}
    (RESULTS_DIR / f"{args.save}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS_DIR / f"{args.save}.md").write_text(text)


if __name__ == "__main__":
    main()
