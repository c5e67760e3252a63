"""The benchmark report: from a results directory, Markdown and HTML pages with the methods x ratios table and
PNG plots (score vs compression ratio, KV bytes vs ratio, prefill time per method). The plots are written next to
the pages; report.html also embeds them (data URIs), so it is one self-contained file. Plots need matplotlib (the
`plot` extra): without it the pages are still written and say the plots were skipped.

Scores are RULER string-match scores in %, averaged per task, then over tasks (each task weighs the same). Time and
memory figures come from the runner's cost pass (one real run per method, ratio and length), averaged over lengths.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from kvsqueeze.bench.results import NONE, RESULTS, read_config, read_jsonl, report_key

MIB = 2**20
PLOTS_SKIPPED = "matplotlib is not installed; to draw them: pip install 'kvsqueeze[plot]', then `kvsqueeze report DIR`"
PLOTS = {
    "score_vs_ratio.png": "Score vs compression ratio",
    "kv_bytes_vs_ratio.png": "KV cache size vs compression ratio",
    "prefill_time.png": "Prefill time per method",
}


@dataclass
class Cell:
    """The aggregate of one (method, ratio): scores per task and length, mean bytes and cost figures."""

    scores: dict[str, float]  # task -> mean score in [0, 1]
    by_length: dict[int, float]  # context length -> mean score over tasks
    kv_before: float
    kv_after: float
    prefill_s: float
    compression_s: float
    decode_tps: float
    peak_bytes: float
    rows: int

    @property
    def average(self) -> float:
        return mean(self.scores.values())


@dataclass
class Summary:
    cells: dict[tuple[str, float], Cell]  # (method label, ratio) -> aggregate
    methods: list[str]  # labels in first-seen order, 'none' first
    ratios: list[float]
    tasks: list[str]
    lengths: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


def method_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """method repr -> a short label: the registry name, or the repr without its ratio where options differ."""
    strip = {r["method"]: re.sub(r"ratio=[^,()]*(, )?", "", r["method"]).replace(", )", ")") for r in rows}
    variants: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        variants[r.get("method_name", r["method"])].add(strip[r["method"]])
    return {
        r["method"]: (r.get("method_name", r["method"]) if len(variants[r.get("method_name", r["method"])]) == 1
                      else strip[r["method"]])
        for r in rows
    }  # fmt: skip


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Summary:
    if not rows:
        raise ValueError("no result rows to report")
    labels = method_labels(rows)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(labels[r["method"]], float(r["ratio"]))].append(r)
    cells = {key: _cell(rs) for key, rs in groups.items()}
    order = list(dict.fromkeys(labels[r["method"]] for r in rows))
    methods = sorted(order, key=lambda m: (m != NONE, order.index(m)))
    return Summary(
        cells=cells,
        methods=methods,
        ratios=sorted({k[1] for k in cells}),
        tasks=sorted({r["task"] for r in rows}),
        lengths=sorted({int(r["context_length"]) for r in rows}),
        meta=meta or {},
    )


def _cell(rows: list[dict[str, Any]]) -> Cell:
    per_task: dict[str, list[float]] = defaultdict(list)
    per_length: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per_task[r["task"]].append(float(r["score"]))
        per_length[int(r["context_length"])][r["task"]].append(float(r["score"]))
    costs = list({r.get("group", r["context_length"]): r for r in rows}.values())  # one cost pass per length
    return Cell(
        scores={t: mean(v) for t, v in per_task.items()},
        by_length={n: mean(mean(v) for v in tasks.values()) for n, tasks in per_length.items()},
        kv_before=mean(float(r["kv_bytes_before"]) for r in rows),
        kv_after=mean(float(r["kv_bytes_after"]) for r in rows),
        prefill_s=mean(float(r["prefill_seconds"]) for r in costs),
        compression_s=mean(float(r["compression_seconds"]) for r in costs),
        decode_tps=mean(float(r["decode_tokens_per_second"]) for r in costs),
        peak_bytes=mean(float(r["peak_memory_bytes"]) for r in costs),
        rows=len(rows),
    )


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def tables(s: Summary) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report, as text cells."""
    ratio_cols = [f"{r:g}" for r in s.ratios]
    pivot = [[m] + [_pct(s.cells[(m, r)].average) if (m, r) in s.cells else "" for r in s.ratios] for m in s.methods]
    head = ["method", "ratio", *s.tasks, "average", "KV MiB before", "KV MiB after", "prefill s", "compression s",
            "decode tok/s", "peak MiB", "rows"]  # fmt: skip
    details = []
    for m in s.methods:
        for r in s.ratios:
            c = s.cells.get((m, r))
            if c is None:
                continue
            scores = [_pct(c.scores.get(t)) for t in s.tasks] + [_pct(c.average)]
            kv = [f"{c.kv_before / MIB:.2f}", f"{c.kv_after / MIB:.2f}"]
            times = [f"{c.prefill_s:.2f}", f"{c.compression_s:.3f}", f"{c.decode_tps:.1f}"]
            details.append([m, f"{r:g}", *scores, *kv, *times, f"{c.peak_bytes / MIB:.1f}", str(c.rows)])
    out = [
        ("Average score (%), methods × compression ratios", ["method", *ratio_cols], pivot),
        ("Per task (score %), KV cache and timings", head, details),
    ]
    if len(s.lengths) > 1:
        rows = [[m, f"{r:g}", *(_pct(s.cells[(m, r)].by_length.get(n)) for n in s.lengths)]
                for m in s.methods for r in s.ratios if (m, r) in s.cells]  # fmt: skip
        out.append(("Average score (%) by context length", ["method", "ratio", *map(str, s.lengths)], rows))
    return out


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

    def series(method: str, value: Any) -> tuple[list[float], list[float]]:
        xs = [r for r in s.ratios if (method, r) in s.cells]
        return xs, [value(s.cells[(method, r)]) for r in xs]

    paths = []
    for name, ylabel, value in (
        ("score_vs_ratio.png", "average score (%)", lambda c: 100 * c.average),
        ("kv_bytes_vs_ratio.png", "KV cache after compression (MiB)", lambda c: c.kv_after / MIB),
    ):
        fig, ax = _figure()
        for m in s.methods:
            xs, ys = series(m, value)
            if m == NONE:
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="none (uncompressed)")
            else:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel("compression ratio (fraction of KV entries removed)")
        ax.set_ylabel(ylabel)
        ax.set_title(PLOTS[name])
        ax.set_ylim(bottom=0, top=105 if name.startswith("score") else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / name))
    paths.append(_prefill_plot(s, out_dir / "prefill_time.png"))
    return paths


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
    md.write_text(render_markdown(summary, plots), encoding="utf-8")
    page.write_text(render_html(summary, plots), encoding="utf-8")
    return ReportFiles(md, page, plots, summary, None if drawn else PLOTS_SKIPPED)
