"""The seed methods on held-out phrasings: which of Expected Attention's and Q-Filters' published options (and the
budgets they are published with) help them on varied text, chosen on some needle phrasings and reported on others.

Two stages, each a set of ordinary benchmark runs (`kvsqueeze.bench.run_bench`) over the rank suite's varied tasks
(`passkey_varied`, `niah_varied`, 1k and 2k tokens, every haystack source and value format):

- choose: every variant below at ratios 0.5 and 0.75 on the CHOOSE phrasings only (half of each task's phrasings),
  `--choose-samples` samples per task and length. Per method, the variant with the highest mean score over both
  ratios is chosen (the default stays when nothing beats it); when two single changes beat the default, their
  combination is run too and competes.
- report: the default and the chosen variant of each method, next to `none` and TOVA, at 0.5 and 0.75 (where the
  seed methods lose) on the HELD-OUT phrasings (never looked at while choosing), `--report-samples` per task and
  length. Each chosen variant is compared with its default on the same questions (exact McNemar test).

Each run is a folder under `--out` (its own results.jsonl and report.md; a rerun resumes them); the stage summaries
go to `--out`/study.json and study.md. Contexts are prefilled once per Ray actor and reused by every run.

Run (about an hour and three quarters on this 2-core CPU with two single-thread actors):
    .venv/bin/python benchmarks/seed_method_study.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.bench.config import BenchConfig
from kvsqueeze.bench.ray_executor import RayOptions, RayPool
from kvsqueeze.bench.results import read_jsonl
from kvsqueeze.bench.runner import run_bench
from kvsqueeze.bench.statistics import mcnemar, wilson
from kvsqueeze.loading import ModelSpec

OUT = Path(__file__).parent / "results" / "seed_study"
TASKS = ("passkey_varied", "niah_varied")
LENGTHS = (1024, 2048)
# chosen on the phrasings the uncompressed model finds hardest, reported on the others (the issue's own failure,
# "The special magic number is ...", among them)
CHOOSE = {"passkey_varied": ["pass_key", "access_code"], "niah_varied": ["assigned", "code_for"]}
HELD_OUT = {"passkey_varied": ["magic_number", "remember_code"], "niah_varied": ["magic_for", "ledger"]}
CHOOSE_RATIOS = (0.5, 0.75)
REPORT_RATIOS = (0.5, 0.75)
BASELINES = ("tova",)
RECORDING_BYTES = 5 * 2**30  # per actor: half of a stage's 48 contexts at 1k and 2k tokens (about 4.1 GiB)


@dataclass(frozen=True)
class Variant:
    """One setting of a method: its options and, optionally, a budget policy wrapped around it."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.options.items()] + ([f"{self.policy} budgets"] if self.policy else [])
        return ", ".join(parts) or "defaults"


VARIANTS = (
    Variant("ea", "expected_attention"),
    Variant("ea_future128", "expected_attention", {"n_future": 128}),
    Variant("ea_future2048", "expected_attention", {"n_future": 2048}),
    Variant("ea_sink16", "expected_attention", {"n_sink": 16}),
    Variant("ea_nocov", "expected_attention", {"use_covariance": False}),
    Variant("ea_novnorm", "expected_attention", {"use_vnorm": False}),
    Variant("ea_eps0", "expected_attention", {"eps": 0.0}),
    Variant("ea_eps0.1", "expected_attention", {"eps": 0.1}),
    Variant("ea_eps1", "expected_attention", {"eps": 1.0}),
    Variant("ea_adakv", "expected_attention", policy="adakv"),
    Variant("ea_global", "expected_attention", policy="global"),
    Variant("qf", "qfilters"),
    Variant("qf_mixed", "qfilters", {"text": "mixed"}),
    Variant("qf_adakv", "qfilters", policy="adakv"),
    Variant("qf_global", "qfilters", policy="global"),
)


def config(variant: Variant | str, phrasings: dict[str, list[str]], ratios: tuple[float, ...], samples: int) -> Any:
    """The benchmark grid of one variant (or of a plain method name) on the given phrasings."""
    v = variant if isinstance(variant, Variant) else Variant(variant, variant)
    return BenchConfig(
        methods=(v.method,),
        ratios=ratios,
        tasks=TASKS,
        lengths=LENGTHS,
        samples=samples,
        options={v.method: v.options} if v.options else {},
        task_options={task: {"phrasings": names} for task, names in phrasings.items()},
        budget_policy=v.policy,
        name=f"seed-study-{v.label}",
    )


def scores(folder: Path) -> dict[float, dict[str, float]]:
    """{ratio: {question content hash: score}} of a run folder."""
    out: dict[float, dict[str, float]] = {}
    for row in read_jsonl(folder / "results.jsonl"):
        out.setdefault(float(row["ratio"]), {})[row["content"]] = float(row["score"])
    return out


def cell(values: dict[str, float]) -> dict[str, Any]:
    n, hits = len(values), sum(values.values())
    ci = wilson(round(hits), n)
    return {"n": n, "score": 100 * hits / n, "low": 100 * ci.low, "high": 100 * ci.high}


def paired(base: dict[str, float], other: dict[str, float]) -> dict[str, Any]:
    """other against base on their common questions: wins, losses, exact McNemar p."""
    common = sorted(set(base) & set(other))
    wins = sum(1 for k in common if other[k] > base[k])
    losses = sum(1 for k in common if other[k] < base[k])
    return {"n": len(common), "wins": wins, "losses": losses, "p": mcnemar(wins, losses)}


def combine(a: Variant, b: Variant) -> Variant | None:
    """The two changes together, when they touch different options."""
    if set(a.options) & set(b.options) or (a.policy and b.policy):
        return None
    return Variant(f"{a.label}+{b.label.split('_', 1)[1]}", a.method, {**a.options, **b.options}, a.policy or b.policy)


class Study:
    def __init__(self, out: Path, pool: RayPool, model: Any, tokenizer: Any) -> None:
        self.out, self.pool, self.model, self.tokenizer = out, pool, model, tokenizer

    def run(self, stage: str, variant: Variant | str, phrasings: dict, ratios: tuple, samples: int) -> Path:
        label = variant.label if isinstance(variant, Variant) else variant
        folder = self.out / stage / label
        print(f"[{stage}] {label}", flush=True)
        run_bench(
            self.model, self.tokenizer, config(variant, phrasings, ratios, samples), folder,
            progress=False, executor="ray", ray_pool=self.pool,
        )  # fmt: skip
        return folder

    def choose(self, samples: int) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for method in dict.fromkeys(v.method for v in VARIANTS):
            variants = [v for v in VARIANTS if v.method == method]
            means: dict[str, float] = {}
            by_label = {v.label: v for v in variants}
            for v in variants:
                per = scores(self.run("choose", v, CHOOSE, CHOOSE_RATIOS, samples))
                means[v.label] = statistics.mean(s for r in CHOOSE_RATIOS for s in per[r].values())
            default = variants[0]
            better = sorted((v for v in variants[1:] if means[v.label] > means[default.label]),
                            key=lambda v: -means[v.label])  # fmt: skip
            if len(better) >= 2 and (both := combine(better[0], better[1])) is not None:
                by_label[both.label] = both
                per = scores(self.run("choose", both, CHOOSE, CHOOSE_RATIOS, samples))
                means[both.label] = statistics.mean(s for r in CHOOSE_RATIOS for s in per[r].values())
            chosen = by_label[max(means, key=lambda label: (means[label], label == default.label))]
            found[method] = {
                "default": default.label,
                "chosen": chosen.label,
                "variants": {
                    label: {"setting": by_label[label].describe(), "mean": 100 * m, **self.cells("choose", label)}
                    for label, m in means.items()
                },
                "chosen_variant": {"options": chosen.options, "policy": chosen.policy, "setting": chosen.describe()},
            }
        return found

    def cells(self, stage: str, label: str) -> dict[str, Any]:
        per = scores(self.out / stage / label)
        return {"cells": {str(r): cell(v) for r, v in sorted(per.items())}}

    def report(self, chosen: dict[str, Any], samples: int) -> dict[str, Any]:
        runs: dict[str, Path] = {"none": self.run("report", "none", HELD_OUT, (), samples)}
        for name in BASELINES:
            runs[name] = self.run("report", name, HELD_OUT, REPORT_RATIOS, samples)
        out: dict[str, Any] = {"none": self.cells("report", "none"), "baselines": {}, "methods": {}}
        for name in BASELINES:
            out["baselines"][name] = self.cells("report", name)
        for method, found in chosen.items():
            variant = Variant(found["chosen"], method, found["chosen_variant"]["options"],
                              found["chosen_variant"]["policy"])  # fmt: skip
            base = self.run("report", Variant(found["default"], method), HELD_OUT, REPORT_RATIOS, samples)
            entry = {"default": found["default"], "chosen": variant.label, **self.cells("report", found["default"])}
            if variant.label != found["default"]:
                other = self.run("report", variant, HELD_OUT, REPORT_RATIOS, samples)
                b, o = scores(base), scores(other)
                entry["chosen_cells"] = self.cells("report", variant.label)["cells"]
                entry["paired"] = {str(r): paired(b[r], o[r]) for r in REPORT_RATIOS}
            out["methods"][method] = entry
        return out


def fmt(c: dict[str, Any]) -> str:
    return f"{c['score']:.1f} [{c['low']:.1f}, {c['high']:.1f}]"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Seed-method study (benchmarks/seed_method_study.py)", ""]
    lines += [f"Choose phrasings: {json.dumps(CHOOSE)}; held-out phrasings: {json.dumps(HELD_OUT)}.", ""]
    for method, found in result["choose"].items():
        lines += [f"## {method}: choose split (ratios {', '.join(map(str, CHOOSE_RATIOS))})", ""]
        lines += ["| variant | setting | " + " | ".join(f"@{r}" for r in CHOOSE_RATIOS) + " | mean |"]
        lines += ["|---|---|" + "---|" * (len(CHOOSE_RATIOS) + 1)]
        for label, v in found["variants"].items():
            cells = " | ".join(fmt(v["cells"][str(r)]) for r in CHOOSE_RATIOS)
            lines.append(f"| {label} | {v['setting']} | {cells} | {v['mean']:.1f} |")
        lines += ["", f"Chosen: **{found['chosen']}** ({found['chosen_variant']['setting']}).", ""]
    if "report" in result:
        rep = result["report"]
        lines += ["## Held-out phrasings", "", "| method | " + " | ".join(f"@{r}" for r in REPORT_RATIOS) + " |"]
        lines += ["|---|" + "---|" * len(REPORT_RATIOS)]
        lines.append(f"| none | {fmt(rep['none']['cells']['0.0'])} |" + " |" * (len(REPORT_RATIOS) - 1))
        for name, b in rep["baselines"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(b["cells"][str(r)]) for r in REPORT_RATIOS) + " |")
        for e in rep["methods"].values():
            lines.append(f"| {e['default']} | " + " | ".join(fmt(e["cells"][str(r)]) for r in REPORT_RATIOS) + " |")
            if "chosen_cells" in e:
                row = []
                for r in REPORT_RATIOS:
                    t = e["paired"][str(r)]
                    row.append(f"{fmt(e['chosen_cells'][str(r)])} (+{t['wins']}/-{t['losses']}, p={t['p']:.3g})")
                lines.append(f"| {e['chosen']} (chosen) | " + " | ".join(row) + " |")
        lines += ["", "(+wins/-losses: questions the chosen variant answers and its default does not, and the other",
                  "way round; p: exact McNemar test on them.)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--choose-samples", type=int, default=12, help="per task and length (12: 48 per cell)")
    parser.add_argument("--report-samples", type=int, default=12, help="per task and length (12: 48 per cell)")
    parser.add_argument("--stage", choices=("choose", "all"), default="all")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    spec = ModelSpec()
    model, tokenizer = spec.load()

    def pool() -> RayPool:  # one per stage: each stage reads other contexts, all of them kept by the actors
        return RayPool(spec, RayOptions(actors=args.actors, threads=1), recording_bytes=RECORDING_BYTES)

    with pool() as choosing:
        result: dict[str, Any] = {"choose": Study(args.out, choosing, model, tokenizer).choose(args.choose_samples)}
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    if args.stage == "all":
        with pool() as reporting:
            study = Study(args.out, reporting, model, tokenizer)
            result["report"] = study.report(result["choose"], args.report_samples)
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    (args.out / "study.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
