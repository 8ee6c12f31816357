"""Render a results folder as ONE self-contained HTML file that works offline.

plotly.js is inlined exactly once in <head>; each figure is a div plus its Plotly.newPlot call.
No CDN, no MathJax, no external fonts. Output is deterministic for the same inputs (fixed div ids,
no timestamps unless the caller passes one) and written atomically (temp file, then rename).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from costmodel.files import atomic_write
from reports import figures
from reports.load import Results, Run, as_float, load_results

_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 32px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; position: sticky; top: 0; }
.wrap { overflow-x: auto; }
figure { margin: 0 0 24px 0; } figcaption { color: #555; font-size: 0.9em; margin-top: 4px; }
.notes { color: #8a4b00; }
"""

# (column header, metric key, scale, format) for the summary table.
_SUMMARY: tuple[tuple[str, str, float, str], ...] = (
    ("requests", "num_requests", 1, "{:.0f}"),
    ("finished", "completed", 1, "{:.0f}"),
    ("mean TTFT ms", "mean_ttft_ms", 1, "{:.1f}"),
    ("p99 TTFT ms", "p99_ttft_ms", 1, "{:.1f}"),
    ("mean TPOT ms", "mean_tpot_ms", 1, "{:.2f}"),
    ("p99 ITL ms", "p99_itl_ms", 1, "{:.2f}"),
    ("p99 E2E ms", "p99_e2el_ms", 1, "{:.0f}"),
    ("req/s", "request_throughput", 1, "{:.3f}"),
    ("output tok/s", "output_throughput", 1, "{:.1f}"),
    ("SLO attainment", "slo_attainment", 100, "{:.1f}%"),
    ("goodput req/s", "goodput", 1, "{:.3f}"),
    ("energy J/token", "energy_per_token_j", 1, "{:.4f}"),
    ("expert GB/request", "expert_bytes_per_request", 1e-9, "{:.2f}"),
    ("preemptions", "preemptions", 1, "{:.0f}"),
)

# (div id, builder, caption). Ids are fixed so the same inputs give byte-identical HTML.
_FIGURES: tuple[tuple[str, Callable[[Results], go.Figure | None], str], ...] = (
    ("fig-pareto", lambda r: figures.pareto(r.runs),
     "Mean TTFT against P99 inter-token latency per run; the dotted line joins runs no other run "
     "beats on both (filled markers); dashed lines are the SLO targets when near the data."),
    ("fig-cdf", lambda r: figures.latency_cdfs(r.runs),
     "Distributions over finished requests of TTFT, end-to-end latency and each request's own "
     "P99 inter-token latency (log scale)."),
    ("fig-timeline", lambda r: figures.timeline(r.runs),
     "Latency of each iteration over time, split by whether it carried prefill work, against the "
     f"TBT target; long runs keep each time bin's slowest and fastest iteration "
     f"(at most {figures.TIMELINE_POINTS} points per run)."),
    ("fig-traffic-energy", lambda r: figures.traffic_energy(r.runs),
     "Expert-weight bytes read from HBM per finished request, and energy per (prompt + output) token."),
    ("fig-slo-rate", lambda r: figures.slo_vs_rate(r.sweep),
     "Fraction of requests meeting both the TTFT and the ITL target, across the sweep's arrival rates."),
    ("fig-capacity", lambda r: figures.capacity(r.capacity),
     "Points probed by the capacity search with their SLO attainment; the dashed line is the target."),
)


def build_figures(results: Results) -> list[tuple[str, go.Figure, str]]:
    """(div id, figure, caption) for every figure whose data is present."""
    out = []
    for div_id, build, caption in _FIGURES:
        fig = build(results)
        if fig is not None:
            out.append((div_id, fig, caption))
    return out


def render_report(results: Results, title: str | None = None, generated: str | None = None) -> str:
    title = title or f"layersim report: {results.root.resolve().name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        # Inline, once, before any figure: the file must render with no network at all.
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{html.escape(_subtitle(results, generated))}</p>',
    ]
    if results.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in results.notes)
        parts.append(f'<div class="notes"><p>Skipped while loading:</p><ul>{items}</ul></div>')
    if results.runs:
        parts += ["<h2>Summary</h2>", summary_table(results.runs)]
    if results.capacity is not None and results.capacity.answer:
        parts += ["<h2>Capacity answer</h2>", kv_table(results.capacity.answer)]
    if results.validation is not None:
        parts += ["<h2>Validation</h2>", kv_table(results.validation)]
    for div_id, fig, caption in build_figures(results):
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          div_id=div_id, config=_CONFIG)
        parts.append(f'<figure id="{div_id}-section">{div}'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _subtitle(results: Results, generated: str | None) -> str:
    bits = [f"{len(results.runs)} run{'s' if len(results.runs) != 1 else ''}"]
    if results.sweep is not None:
        bits.append(f"sweep of {len(results.sweep)} points")
    if results.capacity is not None:
        bits.append(f"capacity search of {len(results.capacity.search)} probes")
    if generated:
        bits.append(f"generated {generated}")
    return " · ".join(bits)


def _fmt(v: float | None, scale: float, fmt: str) -> str:
    return "—" if v is None else fmt.format(v * scale)


def summary_table(runs: tuple[Run, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, *_ in _SUMMARY)
    rows = []
    for r in runs:
        cells = "".join(f"<td>{_fmt(r.metric(key), scale, fmt)}</td>" for _, key, scale, fmt in _SUMMARY)
        rows.append(f"<tr><td>{html.escape(r.label)}</td>{cells}</tr>")
    return (f'<div class="wrap"><table id="summary"><thead><tr><th>run</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def kv_table(data: dict[str, Any]) -> str:
    """A flat key/value table; nested values are shown as compact JSON."""
    rows = []
    for k, v in data.items():
        if isinstance(v, (dict, list)):
            text = json.dumps(v, sort_keys=True, default=str)
            text = text if len(text) <= 300 else text[:297] + "..."
        else:
            f = as_float(v)
            text = f"{f:.6g}" if f is not None and not isinstance(v, int) else str(v)
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(text)}</td></tr>")
    return f'<div class="wrap"><table>{"".join(rows)}</table></div>'


def write_report(results_dir: str | Path, out_path: str | Path | None = None, *,
                 title: str | None = None, generated: str | None = None) -> Path:
    """Write the report for results_dir (default DIR/report.html) and return its path.

    Raises ValueError, naming the path, when the folder is missing or holds no results.
    """
    results = load_results(results_dir)
    out = Path(out_path) if out_path is not None else Path(results_dir) / "report.html"
    text = render_report(results, title=title, generated=generated)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
