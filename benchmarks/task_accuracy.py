"""Uncompressed accuracy of the embedded SmolLM2-135M model on every generated task, to pick a default suite.

Run: `.venv/bin/python benchmarks/task_accuracy.py --lengths 1000 2000 --n 5` (about 10 minutes on 2 busy CPU
cores). Prints a markdown table (task x length -> mean score) and writes benchmarks/results/task_accuracy.{json,md}
unless --no-save. `--tasks` restricts the tasks, `--show` prints each prediction next to its references.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvsqueeze as kvs
from kvsqueeze.bench.metrics import question_scores
from kvsqueeze.bench.tasks import get_task, list_tasks

OUT = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--lengths", nargs="*", type=int, default=[1000, 2000])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvs.load_model()
    table: dict[str, dict[int, float]] = {}
    rows = []
    start = time.perf_counter()
    for name in args.tasks:
        for length in args.lengths:
            scores = []
            for sample in get_task(name).samples(tokenizer, length, args.n, args.seed):
                out = kvs.generate(
                    model,
                    tokenizer,
                    sample.context,
                    list(sample.questions),
                    answer_prefix=sample.answer_prefix,
                    max_new_tokens=sample.max_new_tokens,
                )
                answers = [str(a) for a in out.answers]
                per_question = question_scores(sample, answers)
                scores.append(sum(per_question) / len(per_question))
                rows.append(
                    {
                        "task": name,
                        "length": length,
                        "index": sample.index,
                        "answers": answers,
                        "references": sample.answers,
                        "scores": per_question,
                    }
                )
                if args.show:
                    print(f"{name}@{length}#{sample.index} {per_question} {answers} <- {sample.answers}", flush=True)
            table.setdefault(name, {})[length] = sum(scores) / len(scores)
            print(f"{name} {length}: {table[name][length]:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    lines = ["| task | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |", "|---|" + "---|" * len(args.lengths)]
    lines += [f"| {t} | " + " | ".join(f"{v[n]:.2f}" for n in args.lengths) + " |" for t, v in table.items()]
    print("\n".join(lines))
    if not args.no_save:
        OUT.mkdir(exist_ok=True)
        (OUT / "task_accuracy.md").write_text(
            f"SmolLM2-135M-Instruct, no compression, n={args.n} samples per cell, seed {args.seed}\n\n"
            + "\n".join(lines)
            + "\n"
        )
        (OUT / "task_accuracy.json").write_text(json.dumps({"table": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
