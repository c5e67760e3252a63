"""The tune report (tune_report.md): every probe of every candidate, the score-vs-bytes frontier, the chosen point,
its held-out score against no compression, and the passes the search used against a full grid."""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.bench.frontier import MIB, Point, pareto_frontier
from kvsqueeze.bench.report import markdown_table
from kvsqueeze.tuning.runner import Probe, TuneResult

REPORT_FILE = "tune_report.md"


def _scored(p: Probe) -> str:
    if p.error is not None:
        return f"cannot run: {p.error}"
    return f"{100 * p.score:.1f} [{100 * p.interval.low:.1f}, {100 * p.interval.high:.1f}] (n={len(p.scores)})"


def _kept(p: Probe) -> str:
    if p.kept is None:
        return "-"
    share, interval = p.kept
    return f"{100 * share:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def probe_points(result: TuneResult) -> list[Point]:
    return [Point(m, m, r, None, p.kv_bytes, p.score, p.interval) for m, s in result.searches.items()
            for r, p, _ in s.probes if p.error is None]  # fmt: skip


def render(result: TuneResult) -> str:
    base = result.baseline
    relative = result.target is not None
    rule = (f"the lower bound of the 95% paired interval of the share of the uncompressed score it keeps on the same "
            f"questions is at least {100 * result.target:.1f}%" if result.target is not None else
            f"the lower bound of its score's 95% interval is at least {100 * result.threshold:.1f}")  # fmt: skip
    lines = ["# kvsqueeze tune", "",
             f"Tuned on {result.tune_questions} questions, reported on {result.heldout_questions} held-out ones. "
             f"Uncompressed on the tune part: {_scored(base)}; a point meets the target when {rule}.", ""]  # fmt: skip
    rows = [[m, f"{r:.2f}", f"{p.kv_bytes / MIB:.2f}", _scored(p), *([_kept(p)] if relative else []),
             "yes" if ok else "no"] for m, s in result.searches.items() for r, p, ok in s.probes]  # fmt: skip
    head = ["method", "ratio", "KV MiB", "score % [95%]", *(["kept % [95%]"] if relative else []), "meets"]
    lines += ["## Probes (tune part)", "", markdown_table(head, rows)]
    frontier = pareto_frontier(probe_points(result))
    rows = [[p.method, f"{p.ratio:.2f}", f"{p.kv_bytes / MIB:.2f}", f"{100 * p.score:.1f}"] for p in frontier]
    lines += [
        "",
        "## Score-vs-bytes frontier of the probes",
        "",
        markdown_table(["method", "ratio", "KV MiB", "score %"], rows),
    ]
    lines += ["", "## Best ratio per candidate", ""]
    lines += [f"- {m}: {'none meets the target' if s.best is None else f'{s.best:.2f}'} ({s.evaluations} probes)"
              for m, s in result.searches.items()]  # fmt: skip
    lines += ["", "## Chosen", ""]
    if result.choice is None or result.heldout is None or result.heldout_baseline is None or result.paired is None:
        lines.append("No candidate met the target on the tune part; no tune.json was written.")
    else:
        c, t = result.choice, result.paired
        chunks = "one forward" if c.chunk_size is None else f"chunks of {c.chunk_size}"
        lines += [f"`{c.method}` at ratio {c.ratio:.2f} (budget policy {c.budget_policy}, kv_bits {c.kv_bits}, "
                  f"prefill in {chunks}).", "",
                  f"Held out: {_scored(result.heldout)} against uncompressed {_scored(result.heldout_baseline)}"
                  f"{f' (kept {_kept(result.heldout)} %)' if result.heldout.kept else ''}; "
                  f"paired {t.test} test: {t.better} better, {t.worse} worse, p = {t.p_value:.3g}"
                  f"{' (significant)' if t.significant else ''}."]  # fmt: skip
    f = result.forwards
    lines += ["", "## Cost", "",
              f"The search needs {result.search_forwards} model passes on the tune part (counted as one prefill per "
              f"context, then per probe one real run for time and memory and one answer per question); the full "
              f"grid of {len(result.searches)} candidates x ratios would need {result.grid_forwards}.",
              f"Run in this call (resumed rows not counted): {f.prefills} shared prefills, {f.cost_passes} cost "
              f"passes, {f.answers} answers.", ""]  # fmt: skip
    return "\n".join(lines)


def write_tune_report(result: TuneResult) -> Path:
    path = result.out_dir / REPORT_FILE
    path.write_text(render(result), encoding="utf-8")
    return path
