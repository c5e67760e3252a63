"""The benchmark report: from a results directory, Markdown and HTML pages with the methods x ratios table and
PNG plots (score vs compression ratio with 95% error bars, KV bytes vs ratio, prefill time per method, and score vs
KV MiB with every (method, ratio, bits) cell and the frontier of `frontier.py`). The plots are written next to the
pages; report.html also embeds them (data URIs), so it is one self-contained file. Plots need matplotlib (the `plot`
extra): without it the pages are still written and say the plots were skipped.

The numbers come from `summary.py`: every score is printed in % with its 95% interval, and a compressed score that
differs from the uncompressed one on the same questions (p < 0.05, paired test) is marked with `*`. At each ratio the
ranking table orders the methods by score and tests each against the next one down on the same questions, so it
says which steps of the ranking are differences and which may be noise.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsqueeze.bench import frontier
from kvsqueeze.bench.results import FAILED, NONE, RESULTS, read_config, read_jsonl, report_key
from kvsqueeze.bench.statistics import ALPHA, LEVEL, Interval, PairedTest
from kvsqueeze.bench.summary import Summary, summarize

MIB = 2**20
PLOTS_SKIPPED = "matplotlib is not installed; to draw them: pip install 'kvsqueeze[plot]', then `kvsqueeze report DIR`"
PLOTS = {
    "score_vs_ratio.png": "Score vs compression ratio",
    "kv_bytes_vs_ratio.png": "KV cache size vs compression ratio",
    "prefill_time.png": "Prefill time per method",
    "score_vs_kv_mib.png": "Score vs KV cache size, with the frontier",
}


BREAKDOWN_TITLES = {"source": "haystack source", "phrasing": "needle phrasing", "format": "value format"}
INTERVALS_NOTE = (
    f"Scores are in % with their {LEVEL:.0%} interval in brackets (Wilson for 0/1 scores, a percentile bootstrap "
    f"over the questions of a task with partial credit, and for an average over unlike tasks the tasks' intervals "
    f"combined); * marks a compressed score that differs from 'none' on the same "
    f"questions with p < {ALPHA:g} (exact McNemar test for 0/1 scores, sign-flip permutation test otherwise; one "
    "test per cell, not corrected for the number of cells)."
)


def scored(value: float | None, interval: Interval | None = None, test: PairedTest | None = None) -> str:
    """'62.5 [30.6, 86.3]' (in %), with ' *' when `test` is significant; '' for no value."""
    if value is None:
        return ""
    text = f"{100 * value:.1f}"
    if interval is not None:
        text += f" [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"
    return text + (" *" if test is not None and test.significant else "")


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def tables(s: Summary) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report, as text cells."""
    keys = [(m, r) for m in s.methods for r in s.ratios if (m, r) in s.cells]
    pivot = [[m] + [_average(s, m, r) for r in s.ratios] for m in s.methods]
    head = ["method", "ratio", *s.tasks, "average", "KV MiB before", "KV MiB after", "prefill s", "compression s",
            "decode tok/s", "peak MiB", "rows"]  # fmt: skip
    details = []
    for m, r in keys:
        c = s.cells[(m, r)]
        scores = [scored(c.scores.get(t), c.task_intervals.get(t), s.task_tests.get((m, r, t))) for t in s.tasks]
        scores.append(_average(s, m, r))
        kv = [f"{c.kv_before / MIB:.2f}", f"{c.kv_after / MIB:.2f}"]
        times = [f"{c.prefill_s:.2f}", f"{c.compression_s:.3f}", f"{c.decode_tps:.1f}"]
        details.append([m, f"{r:g}", *scores, *kv, *times, f"{c.peak_bytes / MIB:.1f}", str(c.rows)])
    out = [
        ("Average score (%), methods × compression ratios", ["method", *[f"{r:g}" for r in s.ratios]], pivot),
        ("Per task (score %), KV cache and timings", head, details),
    ]
    if len(s.lengths) > 1:
        rows = [[m, f"{r:g}", *(scored(s.cells[(m, r)].by_length.get(n), s.cells[(m, r)].length_intervals.get(n))
                                for n in s.lengths)] for m, r in keys]  # fmt: skip
        out.append(("Average score (%) by context length", ["method", "ratio", *map(str, s.lengths)], rows))
    if s.tests:
        out.append(_paired_table(s, keys))
    if s.rankings:
        out.append(_ranking_table(s))
    out.append(_frontier_table(s))
    for dim, by_cell in s.breakdowns.items():
        values = sorted({v for scores in by_cell.values() for v in scores})
        rows = [[m, f"{r:g}", *(scored(sc.mean, sc.interval) if (sc := by_cell[(m, r)].get(v)) else "" for v in values)]
                for m, r in keys if (m, r) in by_cell]  # fmt: skip
        out.append((f"Average score (%) by {BREAKDOWN_TITLES.get(dim, dim)}", ["method", "ratio", *values], rows))
    return out


def _average(s: Summary, method: str, ratio: float) -> str:
    c = s.cells.get((method, ratio))
    return "" if c is None else scored(c.average, c.interval, s.tests.get((method, ratio)))


def _paired_table(s: Summary, keys: list[tuple[str, float]]) -> tuple[str, list[str], list[list[str]]]:
    head = ["method", "ratio", "questions", "difference (points)", "better", "worse", "test", "p", "significant"]
    rows = [
        [m, f"{r:g}", str(t.pairs), f"{100 * t.difference:+.1f}", str(t.better), str(t.worse), t.test, _p(t.p_value),
         "yes" if t.significant else "no"]
        for m, r in keys if (t := s.tests.get((m, r))) is not None
    ]  # fmt: skip
    return ("Paired test against 'none' on the same questions", head, rows)


def _ranking_table(s: Summary) -> tuple[str, list[str], list[list[str]]]:
    """Per ratio, the compressed cells by score; each row's test is against the row below it."""
    head = ["ratio", "rank", "method", "score", "lead over the next (points)", "better", "worse", "p", "significant"]
    rows = []
    for ratio, ranking in s.rankings.items():
        for i, (m, t) in enumerate(ranking, start=1):
            c = s.cells[(m, ratio)]
            test = ["", "", "", "", ""]
            if t is not None:
                verdict = "yes" if t.significant else "no"
                test = [f"{100 * t.difference:+.1f}", str(t.better), str(t.worse), _p(t.p_value), verdict]
            rows.append([f"{ratio:g}", str(i), m, scored(c.average, c.interval), *test])
    return ("Ranking at each ratio: each method against the next one down, on the same questions", head, rows)


def _frontier_table(s: Summary) -> tuple[str, list[str], list[list[str]]]:
    """The frontier cells (`frontier.pareto_frontier`), by bytes; 'of none': the share of the uncompressed cache."""
    base = s.cells.get((NONE, 0.0))
    rows = [[p.label, f"{p.ratio:g}", "full" if p.kv_bits is None else str(p.kv_bits), f"{p.kv_bytes / MIB:.3f}",
             f"{p.kv_bytes / base.kv_after:.3f}" if base and base.kv_after else "",
             scored(p.score, p.interval, s.tests.get((p.label, p.ratio)))]
            for p in frontier.pareto_frontier(frontier.points(s))]  # fmt: skip
    head = ["method", "ratio", "bits", "KV MiB", "of 'none'", "average"]
    return ("Frontier: the best average score (%) for at most this much KV cache", head, rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _intro(s: Summary) -> list[str]:
    cfg = s.meta.get("config", {})
    mode = "query-aware (the question is compressed with the context)" if cfg.get("query_aware") else (
        "query-agnostic (each context compressed once, before its questions)")  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in s.meta.get("versions", {}).items())
    return [
        f"Model: {s.meta.get('model', '?')}; seed {cfg.get('seed', '?')}; {mode}.",
        f"Tasks: {', '.join(s.tasks)}; context lengths (tokens): {', '.join(map(str, s.lengths))}.",
        "Ratio = fraction of the context's KV entries removed; 'none' is the uncompressed model (ratio 0). "
        "KV MiB: full-attention keys and values measured from the cache's storages; time and peak memory: one real "
        "run per (method, ratio, length)." + (f" Versions: {versions}." if versions else ""),
        INTERVALS_NOTE,
    ]


def render_markdown(s: Summary, plots: list[Path] | None = None) -> str:
    """The Markdown page; `plots` (PNG files next to it, as `plot` writes them): linked by name; none: a note."""
    parts = ["# kvsqueeze benchmark", "", *_intro(s), ""]
    for title, header, rows in tables(s):
        parts += [f"## {title}", "", markdown_table(header, rows), ""]
    shown = [f"![{PLOTS.get(p.name, p.stem)}]({p.name})" for p in plots or []]
    parts += ["## Plots", "", *(shown or [f"Plots skipped: {PLOTS_SKIPPED}."]), ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"""


def render_html(s: Summary, plots: list[Path] | None = None) -> str:
    """One self-contained page: `plots` (PNG files) are embedded as data URIs; none: a note instead."""
    esc = html.escape
    body = ["<h1>kvsqueeze benchmark</h1>", *(f"<p>{esc(p)}</p>" for p in _intro(s))]
    for title, header, rows in tables(s):
        body.append(f"<h2>{esc(title)}</h2>\n<table>")
        body.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        body.append("</table>")
    body.append("<h2>Plots</h2>")
    body += [f'<img src="{_data_uri(p)}" alt="{esc(PLOTS.get(p.name, p.stem))}">' for p in plots or []]
    if not plots:
        body.append(f"<p>Plots skipped: {esc(PLOTS_SKIPPED)}.</p>")
    head = ('<meta charset="utf-8"><title>kvsqueeze benchmark</title><link rel="icon" href="data:,">'
            f"<style>{_CSS}</style>")  # fmt: skip
    page = "\n".join(body)
    return f"<!DOCTYPE html>\n<html lang='en'>\n<head>{head}</head>\n<body>\n{page}\n</body>\n</html>\n"


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def can_plot() -> bool:
    """Whether matplotlib (the `plot` extra) can be imported."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # in sys.modules as None (imports of it blocked)
        return False


def plot(s: Summary, out_dir: Path) -> list[Path]:
    """Write the PNG plots into out_dir, drawn on matplotlib Figures with the Agg canvas (no pyplot, no global
    backend switch: safe inside any application)."""
    return [
        _score_plot(s, out_dir / "score_vs_ratio.png"),
        _kv_plot(s, out_dir / "kv_bytes_vs_ratio.png"),
        _prefill_plot(s, out_dir / "prefill_time.png"),
        _frontier_plot(s, out_dir / "score_vs_kv_mib.png"),
    ]


def _ratio_axes(ax: Any, name: str, ylabel: str) -> None:
    ax.set_xlabel("compression ratio (fraction of KV entries removed)")
    ax.set_ylabel(ylabel)
    ax.set_title(PLOTS[name])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _score_plot(s: Summary, path: Path) -> Path:
    """Average score per method vs ratio, with 95% error bars (methods shifted a little apart so bars do not hide
    each other); 'none' is a dashed line with its interval shaded."""
    fig, ax = _figure()
    compressed = [m for m in s.methods if m != NONE]
    gap = min((b - a for a, b in zip(s.ratios, s.ratios[1:], strict=False)), default=1.0)
    step = 0.2 * gap / max(1, len(compressed))
    for m in s.methods:
        cells = [(r, s.cells[(m, r)]) for r in s.ratios if (m, r) in s.cells]
        if m == NONE:
            c = cells[0][1]
            ax.axhline(100 * c.average, color="black", linestyle="--", linewidth=1, label="none (uncompressed)")
            ax.axhspan(100 * c.interval.low, 100 * c.interval.high, color="black", alpha=0.07, linewidth=0)
            continue
        shift = (compressed.index(m) - (len(compressed) - 1) / 2) * step
        ys = [100 * c.average for _, c in cells]
        errors = [[y - 100 * c.interval.low for y, (_, c) in zip(ys, cells, strict=True)],
                  [100 * c.interval.high - y for y, (_, c) in zip(ys, cells, strict=True)]]  # fmt: skip
        ax.errorbar([r + shift for r, _ in cells], ys, yerr=errors, marker="o", capsize=3, label=m)
    ax.set_ylim(bottom=0, top=105)
    ax.set_xticks(sorted({r for m, r in s.cells if m != NONE}) or s.ratios)
    _ratio_axes(ax, path.name, f"average score (%), {LEVEL:.0%} interval")
    return _save(fig, path)


def _kv_plot(s: Summary, path: Path) -> Path:
    fig, ax = _figure()
    for m in s.methods:
        xs = [r for r in s.ratios if (m, r) in s.cells]
        ys = [s.cells[(m, r)].kv_after / MIB for r in xs]
        if m == NONE:
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="none (uncompressed)")
        else:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_ylim(bottom=0)
    _ratio_axes(ax, path.name, "KV cache after compression (MiB)")
    return _save(fig, path)


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    return fig, fig.add_subplot()


def _prefill_plot(s: Summary, path: Path) -> Path:
    fig, ax = _figure()
    keys = [(m, r) for m in s.methods for r in s.ratios if (m, r) in s.cells]
    labels = [m if m == NONE else f"{m}\n{r:g}" for m, r in keys]
    total = [s.cells[k].prefill_s for k in keys]
    compression = [s.cells[k].compression_s for k in keys]
    xs = list(range(len(keys)))
    ax.bar(xs, total, color="#8fb3d9", label="prefill (compression included)")
    ax.bar(xs, compression, color="#1f4e79", label="compression")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("seconds (mean over lengths)")
    ax.set_title(PLOTS[path.name])
    ax.legend(fontsize=8)
    return _save(fig, path)


def _frontier_plot(s: Summary, path: Path) -> Path:
    """Every (method, ratio, bits) cell's score against its KV MiB, with error bars, and the frontier."""
    fig, ax = _figure()
    every = frontier.points(s)
    frontier.draw(ax, every, frontier.pareto_frontier(every))
    log = bool(every) and min(p.kv_bytes for p in every) > 0
    if log:  # powers of two, written as plain MiB
        ax.set_xscale("log", base=2)
        low, high = (math.log2(f(p.kv_bytes for p in every) / MIB) for f in (min, max))
        ticks = [2.0**k for k in range(math.floor(low), math.ceil(high) + 1)]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(bottom=0, top=105)
    ax.set_xlabel("KV cache kept (MiB" + (", log scale)" if log else ")"))
    ax.set_ylabel(f"average score (%), {LEVEL:.0%} interval")
    ax.set_title(PLOTS[path.name])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    plots: list[Path]  # empty when plots_skipped says why
    summary: Summary
    plots_skipped: str | None = None  # why no plots were drawn, and how to get them
    failed_rows: int = 0  # rows the last run gave up on (failed.jsonl): not in the tables; a rerun computes them


def failed_note(n: int) -> str:
    """What the report says of `n` failed rows ('' for none)."""
    if not n:
        return ""
    return (f"{n} row(s) could not be computed in the last run (their worker died too often; see {FAILED}): "
            "the tables leave them out, and rerunning the same bench command computes them.")  # fmt: skip


def write_report(results_dir: str | Path) -> ReportFiles:
    """Write report.md, report.html and the plots into `results_dir` (which holds results.jsonl). Without matplotlib,
    the pages only (ReportFiles.plots_skipped says so)."""
    out = Path(results_dir)
    if not (out / RESULTS).is_file():
        raise ValueError(f"{str(out)!r} holds no {RESULTS}: run `kvsqueeze bench --out {out}` first")
    summary = summarize(read_jsonl(out / RESULTS, key=report_key), read_config(out))
    drawn = can_plot()
    plots = plot(summary, out) if drawn else []
    md, page = out / "report.md", out / "report.html"
    failed = len(read_jsonl(out / FAILED))
    note = f"\n> {failed_note(failed)}\n" if failed else ""
    md.write_text(render_markdown(summary, plots) + note, encoding="utf-8")
    page.write_text(render_html(summary, plots), encoding="utf-8")
    return ReportFiles(md, page, plots, summary, None if drawn else PLOTS_SKIPPED, failed)
