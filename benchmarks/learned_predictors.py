"""Do the learned KVzip+ predictors keep their teacher's answers? KVzap (linear, MLP) and Fast KVzip gates trained on
the default calibration (6 documents of 512 tokens of generic prose) and on more and more varied text (`--docs`
documents of Python's documentation, docstrings and generic prose in turn: `text=mixed`), each under per-head top-k
at the ratio, under the KVzap paper's threshold rule and under one model-wide top-k, against KVzip+ itself.

Per predictor setting, stored in `--out`/study.json and study.md:
- held-out Spearman correlation with the true KVzip+ scores on held-out calibration documents (from the artifact);
- answers on the rank suite's varied tasks (passkey_varied, niah_varied, every phrasing, source and format) at
  `--length` tokens: the score with its Wilson interval, and the answers kept: of the questions KVzip+ answers at the
  same ratio, the share the predictor also answers;
- for the threshold rule, the threshold tau is chosen on calibration text, never on the questions: the tau at which
  the predictor keeps (1 - ratio) of the slots of one `--length`-token mixed calibration document (bisection); the
  share each question's cache actually kept is reported next to the score;
- the fixed-bytes counterpart of the threshold rule: `global_budget` over the raw predicted log-scores
  (`normalize="none"`), one top-k over every layer and head, so the cache holds exactly (1 - ratio) of the bytes but
  heads and layers keep different amounts.

Each bench run is a folder under `--out` (resumable); rows of every cell are ordinary benchmark rows.

Run (about 40 minutes on this 2-core CPU, most of it KVzip+'s replays):
    .venv/bin/python benchmarks/learned_predictors.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import kvsqueeze as kvs
from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.recordings import RecordingStore
from kvsqueeze.bench.results import read_jsonl
from kvsqueeze.bench.runner import run_bench
from kvsqueeze.bench.statistics import mcnemar, wilson
from kvsqueeze.calibration import read_info
from kvsqueeze.corpus import calibration_text

OUT = Path(__file__).parent / "results" / "learned_predictors"
TASKS = ("passkey_varied", "niah_varied")
PREDICTORS = ("kvzap_linear", "kvzap_mlp", "fastkvzip_gates")


def settings(docs: int) -> dict[str, dict[str, Any]]:
    """label -> calibration options of each predictor setting."""
    out: dict[str, dict[str, Any]] = {}
    for name in PREDICTORS:
        out[f"{name}"] = {}
        out[f"{name}_mixed{docs}"] = {"n_docs": docs, "heldout_docs": max(2, docs // 8), "text": "mixed"}
    return out


def kept_share(model: Any, tokenizer: Any, method: kvs.Method, ids: torch.Tensor) -> float:
    """Share of the (layer, head, token) slots of the full-attention layers that `method` keeps of `ids` (1, T)."""
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method):
        model(ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
    layers = list(cache.full_layers())
    return sum(int(layer.kept.sum()) for layer in layers) / sum(layer.kept.numel() * ids.shape[1] for layer in layers)


def choose_tau(model: Any, tokenizer: Any, name: str, options: dict[str, Any], ratio: float, length: int) -> float:
    """The threshold at which `name` keeps (1 - ratio) of one mixed calibration document's slots (bisection)."""
    text = calibration_text(tokenizer, length, seed=12345, text="mixed")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
    low, high = -100.0, 100.0  # wide enough for log-scores and gate logits alike
    for _ in range(30):
        tau = (low + high) / 2
        share = kept_share(model, tokenizer, kvs.get_method(name, threshold=tau, **options), ids)
        low, high = (tau, high) if share > 1 - ratio else (low, tau)
    return (low + high) / 2


def run(model: Any, tokenizer: Any, folder: Path, name: str, options: dict[str, Any], ratio: float, args: Any,
        store: RecordingStore) -> dict[str, dict[str, float]]:  # fmt: skip
    """{content: {"score", "kept"}} of one method setting over the varied tasks."""
    config = BenchConfig(
        methods=(name,), ratios=(ratio,), tasks=TASKS, lengths=(args.length,), samples=args.samples,
        options={name: options} if options else {}, name=folder.name,
    )  # fmt: skip
    print(f"[bench] {folder.name}", flush=True)
    run_bench(model, tokenizer, config, folder, progress=False, recordings=store)
    out = {}
    for row in read_jsonl(folder / "results.jsonl"):
        out[row["content"]] = {"score": float(row["score"]), "kept": row["kv_bytes_after"] / row["kv_bytes_before"]}
    return out


def summary(rows: dict[str, dict[str, float]], teacher: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    n = len(rows)
    hits = sum(r["score"] for r in rows.values())
    ci = wilson(round(hits), n)
    out: dict[str, Any] = {"n": n, "score": 100 * hits / n, "low": 100 * ci.low, "high": 100 * ci.high,
                           "kv_kept": sum(r["kept"] for r in rows.values()) / n}  # fmt: skip
    if teacher is not None:
        answered = [k for k, r in teacher.items() if r["score"] == 1.0 and k in rows]
        kept = sum(1 for k in answered if rows[k]["score"] == 1.0)
        ci = wilson(kept, len(answered)) if answered else None
        out["answers_kept"] = {"kept": kept, "of": len(answered), "low": 100 * ci.low if ci else None,
                               "high": 100 * ci.high if ci else None}  # fmt: skip
        common = [k for k in rows if k in teacher]
        wins = sum(1 for k in common if rows[k]["score"] > teacher[k]["score"])
        losses = sum(1 for k in common if rows[k]["score"] < teacher[k]["score"])
        out["vs_teacher"] = {"wins": wins, "losses": losses, "p": mcnemar(wins, losses)}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Learned predictors against their teacher (benchmarks/learned_predictors.py)",
        "",
        f"{', '.join(TASKS)} at {result['length']} tokens, {result['questions']} questions per cell, ratio "
        f"{result['ratio']}; answers kept = of the questions KVzip+ answers, the share the predictor also answers.",
        "",
        "| setting | rule | held-out Spearman | score | answers kept | KV kept | vs KVzip+ (+/-, p) |",
        "|---|---|---|---|---|---|---|",
    ]
    t = result["teacher"]
    lines.append(f"| kvzip_plus | top-k | - | {t['score']:.1f} [{t['low']:.1f}, {t['high']:.1f}] | - | "
                 f"{t['kv_kept']:.3f} | - |")  # fmt: skip
    for label, entry in result["predictors"].items():
        for rule, s in entry["rules"].items():
            a = s["answers_kept"]
            kept = f"{a['kept']}/{a['of']} [{a['low']:.0f}, {a['high']:.0f}]" if a["of"] else "-"
            v = s["vs_teacher"]
            lines.append(
                f"| {label} | {rule} | {entry['spearman']:.3f} | {s['score']:.1f} [{s['low']:.1f}, {s['high']:.1f}] | "
                f"{kept} | {s['kv_kept']:.3f} | +{v['wins']}/-{v['losses']}, p={v['p']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=12, help="per task (12: 24 questions)")
    parser.add_argument("--docs", type=int, default=32, help="calibration documents of the 'mixed' settings")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvs.load_model()
    store = RecordingStore()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = run(model, tokenizer, args.out / "kvzip_plus", "kvzip_plus", {}, args.ratio, args, store)
    result: dict[str, Any] = {"ratio": args.ratio, "length": args.length, "questions": len(teacher),
                              "teacher": summary(teacher, None), "predictors": {}}  # fmt: skip
    for label, options in settings(args.docs).items():
        name = next(p for p in PREDICTORS if label.startswith(p))
        method = kvs.get_method(name, **options)
        path = method.calibrate(model, tokenizer)
        spearman = read_info(path)["results"]["heldout_spearman_mean"]
        tau = choose_tau(model, tokenizer, name, options, args.ratio, args.length)
        print(f"{label}: held-out Spearman {spearman:.3f}, tau {tau:.3f}", flush=True)
        topk = run(model, tokenizer, args.out / label, name, options, args.ratio, args, store)
        thresholded = run(model, tokenizer, args.out / f"{label}_tau", name, {**options, "threshold": round(tau, 3)},
                          0.0, args, store)  # fmt: skip
        pooled = run(model, tokenizer, args.out / f"{label}_global", "global_budget",
                     {"scorer": method, "normalize": "none"}, args.ratio, args, store)  # fmt: skip
        result["predictors"][label] = {
            "options": options,
            "spearman": spearman,
            "tau": tau,
            "rules": {
                "top-k": summary(topk, teacher),
                f"tau={tau:.2f}": summary(thresholded, teacher),
                "global top-k": summary(pooled, teacher),
            },
        }
        (args.out / "study.json").write_text(json.dumps(result, indent=2))
    (args.out / "study.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
