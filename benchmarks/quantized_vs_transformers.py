"""kvsqueeze's quantized cache side by side with transformers' own (`QuantizedCache`, optimum-quanto backend) at the
same bits, on the same passkey and niah_single samples, answered by the embedded SmolLM2-135M (float32, CPU).

Each sample's prompt is split as the benchmark splits it (`prompts.encode_prompt`): the context is prefilled, then
the question is fed and the answer decoded greedily (its own `max_new_tokens`, stopping at end of sequence).
- kvsqueeze: one full-precision prefill recorded (`recording.record`), then for each setting a copy compressed by the
  method at its ratio (`compress_recording`) and quantized (`KVCache.quantize`: KIVI's layout, keys per channel,
  values per token, groups of 32, the newest 64 tokens exact), answered with `generation.answer`.
- transformers: a real prefill into `QuantizedCache("quanto", config, nbits=...)` with its defaults (groups of 64
  along each token's channels for keys and values alike, a full-precision residual of up to 128 tokens that the
  prefill does not use: the whole context is quantized at its first update), then the same question and greedy
  loop. A `DynamicCache` run (full precision) checks that this loop answers like kvsqueeze's uncompressed cache.

KV bytes are measured after the context prefill, before the question: kvsqueeze's from its storages
(`cache_stats`), transformers' from the tensors its layers hold (the quantized tensors' inner data, scales and
shifts, through `__tensor_flatten__`, plus the residual keys/values), each storage counted once at its full size.
Scores are RULER string match (0/1 here); the mean over the two tasks comes with its 95% interval (Wilson within a
task, combined across tasks: `bench.summary.mean_of_task_means`); settings at equal bits are compared on the same
questions with the exact McNemar test (`bench.statistics.paired_test`).

Run (766 CPU seconds, 17 minutes wall, on one thread of a shared 2-core machine):
    PYTHONPATH=src .venv/bin/python benchmarks/quantized_vs_transformers.py --samples 12
It needs optimum-quanto (`pip install optimum-quanto`; it compiles a small C++ extension with ninja on first use).
HQQ, transformers' other group-wise backend, is left out: see docs/studies/quantization.md.
Results: benchmarks/results/quantized_vs_transformers.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, QuantizedCache

import kvsqueeze as kvs
from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.statistics import paired_test
from kvsqueeze.bench.summary import mean_of_task_means
from kvsqueeze.bench.tasks import Sample, get_task
from kvsqueeze.cache import KVCache
from kvsqueeze.generation import answer, encode, eos_ids
from kvsqueeze.memory import cache_stats
from kvsqueeze.prompts import encode_prompt
from kvsqueeze.recording import Recording, compress_recording, record

OUT = Path(__file__).parent / "results"
TASKS = ("passkey", "niah_single")
MIB = 2**20


@dataclass(frozen=True)
class Setting:
    """One way of holding the context: a library, its bits (None: full precision) and, for kvsqueeze, an eviction."""

    library: str  # "kvsqueeze" or "transformers"
    bits: int | None
    ratio: float = 0.0
    method: str | None = None  # kvsqueeze method name (None: no eviction)
    group: int = 32  # kvsqueeze: tokens per key group, channels per value group
    residual: int = 64  # kvsqueeze: newest tokens kept in full precision

    @property
    def label(self) -> str:
        if self.library == "transformers":
            return "transformers DynamicCache" if self.bits is None else f"transformers quanto {self.bits}-bit"
        name = "none" if self.method is None else f"{self.method} {self.ratio:g}"
        layout = "" if (self.group, self.residual) == (32, 64) else f" g{self.group} r{self.residual}"
        return f"kvsqueeze {name}" + ("" if self.bits is None else f" {self.bits}-bit{layout}")


def settings(method: str) -> list[Setting]:
    """transformers' caches; kvsqueeze's at its defaults, then with groups of 64 and no residual (the bytes of
    transformers' layout: same codes, one scale and zero per 64 numbers), then evicting half and quantizing."""
    out = [Setting("transformers", None), Setting("transformers", 4), Setting("transformers", 2)]
    out += [Setting("kvsqueeze", b) for b in (None, 4, 2)]
    out += [Setting("kvsqueeze", b, group=64, residual=0) for b in (4, 2)]
    out += [Setting("kvsqueeze", b, 0.5, method) for b in (None, 4, 2)]
    return out


def tensor_bytes(t: Any, seen: set[int]) -> int:
    """Bytes of the storages under `t` (a tensor, a tensor subclass holding inner tensors, a tuple/list/dict of
    them), each storage counted once at its full size."""
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x, seen) for x in t)
    if isinstance(t, dict):
        return sum(tensor_bytes(x, seen) for x in t.values())
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # quanto's packed/quantized tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    storage = t.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def transformers_bytes(cache: Any) -> int:
    """What a transformers cache holds: quantized states (if any) and full-precision keys/values, every layer."""
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            total += tensor_bytes(getattr(layer, name, None), seen)
    return total


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, cache: Any, question_ids: list[int], max_new: int, eos: set[int]) -> str:
    """Feed the question after the cached context, then decode greedily (transformers' caches)."""
    ids = torch.tensor([question_ids])
    out: list[int] = []
    for _ in range(max_new):
        token = int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
        ids = torch.tensor([[token]])
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@torch.no_grad()
def run_transformers(model: Any, tok: Any, s: Setting, ids: list[int], texts: list[str], max_new: int) -> tuple:
    if s.bits is None:
        cache: Any = DynamicCache(config=model.config)
    else:
        cache = QuantizedCache("quanto", model.config, nbits=s.bits)
    model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    held = transformers_bytes(cache)
    eos = eos_ids(model, tok)
    copies = [copy.deepcopy(cache) for _ in texts[1:]] + [cache]  # one cache per question (these tasks ask one)
    answers = [greedy(model, tok, c, encode(tok, t), max_new, eos) for c, t in zip(copies, texts, strict=True)]
    return answers, held


@torch.no_grad()
def recorded(model: Any, ids: list[int]) -> Recording:
    cache = KVCache(model.config)
    x = torch.tensor([ids])
    with record(model, cache) as rec:
        model(input_ids=x, attention_mask=torch.ones_like(x), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return rec


def run_kvsqueeze(model: Any, tok: Any, s: Setting, rec: Recording, texts: list[str], max_new: int) -> tuple:
    method = None if s.method is None else kvs.get_method(s.method, ratio=s.ratio)
    cache, _ = compress_recording(rec, method)
    if s.bits is not None:
        cache.quantize(s.bits, s.group, s.residual)
    held = cache_stats(cache).kv_bytes
    return answer(model, tok, cache, [0] * len(texts), texts, max_new).texts, held


def run_sample(model: Any, tok: Any, sample: Sample, grid: list[Setting], log: dict) -> None:
    ids, texts = encode_prompt(tok, sample.context, list(sample.questions), sample.answer_prefix)
    start = time.process_time()
    rec = recorded(model, ids)
    log["kvsqueeze prefill"].append(time.process_time() - start)
    for s in grid:
        start = time.process_time()
        if s.library == "kvsqueeze":
            answers, held = run_kvsqueeze(model, tok, s, rec, texts, sample.max_new_tokens)
        else:
            answers, held = run_transformers(model, tok, s, ids, texts, sample.max_new_tokens)
        log[s.label].append(time.process_time() - start)
        for q, prediction in enumerate(answers):
            refs = sample.answers[q]
            row = {
                "setting": s.label,
                "task": sample.task,
                "sample": sample.index,
                "question": q,
                "prediction": prediction,
                "answers": list(refs),
                "kv_bytes": held,
                "context_tokens": len(ids),
            }
            log["rows"].append({**row, "score": score(prediction, refs, sample.metric)})


def summarize(rows: list[dict], grid: list[Setting]) -> list[dict]:
    out = []
    full = [r["kv_bytes"] for r in rows if r["setting"] == "kvsqueeze none"]
    for s in grid:
        mine = [r for r in rows if r["setting"] == s.label]
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in mine:
            per_task[r["task"]].append(r["score"])
        sc = mean_of_task_means(per_task)
        kv = sum(r["kv_bytes"] for r in mine) / len(mine)
        out.append({"setting": s.label, "library": s.library, "bits": s.bits, "ratio": s.ratio, "method": s.method,
                    "score": sc.mean, "low": sc.interval.low, "high": sc.interval.high, "questions": sc.rows,
                    "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}, "kv_bytes": kv,
                    "of_full": kv / (sum(full) / len(full)) if full else None})  # fmt: skip
    return out


def comparisons(rows: list[dict], grid: list[Setting]) -> list[dict]:
    """kvsqueeze vs transformers at equal bits (and each full-precision pair), question by question."""
    by = {(r["setting"], r["task"], r["sample"], r["question"]): r["score"] for r in rows}
    keys = sorted({k[1:] for k in by})
    out = []
    mine = [Setting("kvsqueeze", b) for b in (None, 4, 2)] + [Setting("kvsqueeze", b, group=64, residual=0)
                                                               for b in (4, 2)]  # fmt: skip
    for s in mine:
        ours, theirs = s.label, Setting("transformers", s.bits).label
        pairs = [(by[(theirs, *k)], by[(ours, *k)]) for k in keys if (ours, *k) in by and (theirs, *k) in by]
        if pairs:
            t = paired_test([p[0] for p in pairs], [p[1] for p in pairs])
            same = sum(
                1 for k in keys if (ours, *k) in by and _prediction(rows, ours, k) == _prediction(rows, theirs, k)
            )
            out.append({"kvsqueeze": ours, "transformers": theirs, "pairs": t.pairs, "difference": t.difference,
                        "kvsqueeze_better": t.better, "transformers_better": t.worse, "p_value": t.p_value,
                        "same_text": same})  # fmt: skip
    return out


def _prediction(rows: list[dict], setting: str, key: tuple) -> str | None:
    for r in rows:
        if r["setting"] == setting and (r["task"], r["sample"], r["question"]) == key:
            return r["prediction"]
    return None


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# kvsqueeze's quantized cache vs transformers' QuantizedCache (quanto)",
        "",
        f"SmolLM2-135M-Instruct (embedded, float32, CPU), tasks {', '.join(TASKS)} at {a['length']} tokens, "
        f"{a['samples']} samples each ({result['questions']} questions per setting), greedy answers. Command: "
        f"`{result['command']}`. Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.",
        "",
        "kvsqueeze: KIVI layout (keys per channel, values per token, groups of 32, newest 64 tokens exact; 'g64 r0': "
        "groups of 64 and no full-precision residual, the bytes of transformers' layout); eviction "
        f'by {a["method"]} at ratio 0.5 before quantizing. transformers: `QuantizedCache("quanto", config, nbits)` '
        "with its defaults (groups of 64 channels per token for keys and values, residual up to 128 tokens; the "
        "prefill's context is quantized whole). KV MiB: measured after the context prefill (kvsqueeze from its "
        "storages, transformers from its layers' tensors: codes, scales, shifts, residual). Score: % of answers "
        "with the reference, mean over the two tasks, 95% interval in brackets.",
        "",
        "| setting | score % [95% interval] | passkey % | niah_single % | KV MiB | of full precision | CPU s/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        pt = r["per_task"]
        of = f"{r['of_full']:.3f}" if r["of_full"] is not None else ""
        lines.append(
            f"| {r['setting']} | {100 * r['score']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}] | "
            f"{100 * pt.get('passkey', 0):.0f} | {100 * pt.get('niah_single', 0):.0f} | {r['kv_bytes'] / MIB:.3f} | "
            f"{of} | {result['cpu_seconds'][r['setting']]:.1f} |"
        )
    lines += ["", "Paired on the same questions (exact McNemar test on 0/1 scores):", "",
              "| kvsqueeze | transformers | questions | difference (points) | kvsqueeze better | transformers better |"
              " p | same answer text |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["comparisons"]:
        lines.append(
            f"| {c['kvsqueeze']} | {c['transformers']} | {c['pairs']} | {100 * c['difference']:+.1f} | "
            f"{c['kvsqueeze_better']} | {c['transformers_better']} | {c['p_value']:.4f} | {c['same_text']} |"
        )
    lines += ["", f"kvsqueeze's shared full-precision prefill: {result['cpu_seconds']['kvsqueeze prefill']:.1f} CPU "
              "s/sample, not included above (transformers' settings include their own prefill). CPU seconds are this "
              f"process's on a shared, loaded 2-core machine; total {result['total_cpu_seconds']:.0f} CPU s, "
              f"{result['wall_seconds']:.0f} s wall."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12, help="samples per task")
    parser.add_argument("--length", type=int, default=1024, help="context length in tokens")
    parser.add_argument("--method", default="knorm", help="kvsqueeze's eviction at ratio 0.5")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = kvs.load_model()
    grid = settings(args.method)
    log: dict[str, list[Any]] = defaultdict(list)
    wall, cpu = time.perf_counter(), time.process_time()
    for task in TASKS:
        for sample in get_task(task).samples(tok, args.length, args.samples, 0):
            run_sample(model, tok, sample, grid, log)
            print(f"{task} sample {sample.index} done ({time.process_time() - cpu:.0f} CPU s)", flush=True)
    rows = log.pop("rows")
    n = args.samples * len(TASKS)
    result = {
        "args": vars(args),
        "command": f"PYTHONPATH=src python benchmarks/quantized_vs_transformers.py --samples {args.samples}"
        + (f" --length {args.length}" if args.length != 1024 else "")
        + (f" --method {args.method}" if args.method != "knorm" else ""),
        "versions": {"kvsqueeze": kvs.__version__, "torch": torch.__version__, **_versions()},
        "questions": len(rows) // len(grid),
        "summary": summarize(rows, grid),
        "comparisons": comparisons(rows, grid),
        "cpu_seconds": {k: sum(v) / n for k, v in log.items()},
        "total_cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "quantized_vs_transformers.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (OUT / "quantized_vs_transformers.md").write_text(text)
    print(text)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "optimum-quanto")}


if __name__ == "__main__":
    main()
