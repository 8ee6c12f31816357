"""Render a results folder as ONE self-contained HTML file that works offline.

plotly.js is inlined exactly once in <head>; each figure is a div plus its Plotly.newPlot call.
No CDN, no MathJax, no external fonts. Output is deterministic for the same inputs (fixed div ids,
no timestamps unless the caller passes one) and written atomically (temp file, then rename).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from costmodel.files import atomic_write
from reports import figures
from reports.load import Results, load_results
from reports.setup import setup_html
from reports.tables import answer_table, probes_table, summary_table
from reports.validation import validation_figure, validation_table

_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 32px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; position: sticky; top: 0; vertical-align: bottom; }
table.fit thead th { white-space: normal; min-width: 3.5em; }
table.fit td:first-child { white-space: normal; min-width: 7em; max-width: 16em;
                           overflow-wrap: break-word; }
table.kv th { text-align: left; font-weight: normal; color: #555; background: none; }
table.kv td { text-align: left; white-space: normal; }
#validation-table td:nth-child(2), #validation-table th:nth-child(2) { text-align: left; }
td.ok { color: #1a7f37; } td.bad { color: #b42318; font-weight: bold; }
.wrap { overflow-x: auto; margin-bottom: 16px; }
#setup { background: #f7f7f9; border: 1px solid #e3e3e8; border-radius: 6px; padding: 4px 16px 8px; }
#setup h2 { margin-top: 8px; }
dl.setup { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.setup dt { color: #555; } dl.setup dd { margin: 0; } dl.setup dd.missing { color: #999; }
#setup .src { color: #888; font-size: 0.85em; margin: 8px 0 0; }
figure { margin: 0 0 24px 0; } figcaption { color: #555; font-size: 0.9em; margin-top: 4px; }
.notes { color: #8a4b00; }
"""

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
     "Expert-weight bytes read from HBM per finished request, and energy per (prompt + output) token; "
     "each bar is labelled with its difference from the first run. An axis that does not start at "
     "0 says so in its title."),
    ("fig-slo-rate", lambda r: figures.slo_vs_rate(r.sweep),
     "Fraction of requests meeting both the TTFT and the ITL target, across the sweep's arrival rates."),
    ("fig-validation", lambda r: validation_figure(r.validation),
     "Each compared metric as simulator prediction divided by engine measurement (log scale): "
     "1× is exact, right of it the simulator overestimates; grey bars span the bound it is held to."),
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
        setup_html(results.setup),
    ]
    if results.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in results.notes)
        parts.append(f'<div class="notes"><p>Skipped while loading:</p><ul>{items}</ul></div>')
    figs = {div_id: (fig, caption) for div_id, fig, caption in build_figures(results)}
    if results.validation is not None:
        parts += ['<h2 id="validation">Validation: predicted against measured</h2>',
                  validation_table(results.validation), *_figure_html(figs, "fig-validation")]
    if results.capacity is not None:
        if results.capacity.answer:
            parts += ['<h2 id="capacity">Capacity answer</h2>',
                      answer_table(results.capacity.answer, results.capacity.target)]
        parts += _figure_html(figs, "fig-capacity")
        parts += ["<h2>Capacity search probes</h2>", probes_table(results.capacity.search)]
    if results.runs:
        parts += ["<h2>Summary</h2>", summary_table(results.runs)]
    for div_id in list(figs):
        parts += _figure_html(figs, div_id)
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _figure_html(figs: dict[str, tuple[go.Figure, str]], div_id: str) -> list[str]:
    """The figure (taken out of figs) as a <figure>, or nothing when it was not built."""
    if div_id not in figs:
        return []
    fig, caption = figs.pop(div_id)
    div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                      div_id=div_id, config=_CONFIG)
    return [f'<figure id="{div_id}-section">{div}<figcaption>{html.escape(caption)}</figcaption></figure>']


def _subtitle(results: Results, generated: str | None) -> str:
    bits = []
    if results.runs:
        bits.append(f"{len(results.runs)} run{'s' if len(results.runs) != 1 else ''}"
                    " in study order")
    if results.sweep is not None:
        bits.append(f"sweep of {len(results.sweep)} points")
    if results.capacity is not None:
        n = len(results.capacity.search)
        bits.append(f"capacity search of {n} probe{'s' if n != 1 else ''}")
    if results.validation is not None:
        bits.append("engine against simulator")
    if generated:
        bits.append(f"generated {generated}")
    return " · ".join(bits)


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
