"""The report page of a search: one self-contained HTML file (plotly.js inlined, offline).

It reads only the search's own search.json (search/output.py), so it is rewritten the same from
the same folder: the ranked table with each configuration's capacity interval, the pruned
configurations with their reasons, and two scatter plots, cost per million tokens against p99
TTFT and against energy per token, with each Pareto front drawn as a line. Fixed div ids, no
timestamps: the same folder gives the same bytes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from costmodel.files import atomic_write
from reports.html import _CONFIG, _CSS

_COLUMNS = (("config", "configuration", "{}"), ("rate_per_replica", "req/s per replica", "{:.3f}"),
            ("rate_per_replica_low", "CI low", "{:.3f}"), ("rate_per_replica_high", "CI high", "{:.3f}"),
            ("gpus", "GPUs", "{}"), ("cost_per_million_tokens", "$ / M tokens", "{:.4f}"),
            ("energy_per_token_j", "J / token", "{:.4f}"), ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"))


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


# a split search's rows: each configuration's cheapest prefill/decode split at the target rate
_SPLIT_COLUMNS = (("config", "configuration", "{}"), ("prefill_replicas", "prefill workers", "{}"),
                  ("decode_replicas", "decode workers", "{}"),
                  ("slo_attainment", "attainment", "{:.1%}"),
                  ("slo_attainment_low", "attainment CI low", "{:.1%}"), *_COLUMNS[4:])


def ranked_table(rows: list[dict[str, Any]]) -> str:
    columns = _SPLIT_COLUMNS if rows and "prefill_replicas" in rows[0] else _COLUMNS
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for i, r in enumerate(rows, 1):
        rank = str(i) if r.get("found") else "-"
        cells = "".join(f"<td>{_cell(r.get(k), f)}</td>" for k, _, f in columns)
        body.append(f"<tr><td>{rank}</td>{cells}</tr>")
    return (f'<div class="wrap"><table id="search-ranked" class="fit"><thead><tr><th>rank</th>'
            f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def pruned_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>None: every configuration of the grid could run.</p>"
    body = "".join(f"<tr><td>{html.escape(r['config'])}</td><td>{html.escape(r['reason'])}</td></tr>"
                   for r in rows)
    return (f'<div class="wrap"><table id="search-pruned" class="kv"><tbody>{body}</tbody>'
            "</table></div>")


def front_figure(rows: list[dict[str, Any]], front: list[str], ykey: str, ytitle: str) -> go.Figure:
    pts = [r for r in rows if r.get("cost_per_million_tokens") is not None and r.get(ykey) is not None]
    on = set(front)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[r["cost_per_million_tokens"] for r in pts], y=[r[ykey] for r in pts], mode="markers",
        text=[r["config"] for r in pts], name="configurations",
        marker={"color": ["#1f77b4" if r["config"] in on else "#bbbbbb" for r in pts], "size": 9},
        hovertemplate="%{text}<br>$%{x:.4f} / M tokens<br>%{y:.4g}<extra></extra>"))
    fr = sorted((r for r in pts if r["config"] in on), key=lambda r: r["cost_per_million_tokens"])
    fig.add_trace(go.Scatter(x=[r["cost_per_million_tokens"] for r in fr], y=[r[ykey] for r in fr],
                             mode="lines", line={"dash": "dot", "color": "#1f77b4"},
                             name="Pareto front", hoverinfo="skip"))
    fig.update_layout(xaxis_title="$ per million tokens (conservative capacity)",
                      yaxis_title=ytitle, height=420, margin={"t": 30}, template="plotly_white")
    return fig


def _ranked_at(method: dict[str, Any]) -> str:
    if "target_rate" in method:  # a split search
        return (f"of the cheapest prefill/decode split at {html.escape(str(method['target_rate']))}"
                " req/s")
    return "at the conservative end of the capacity interval"


def render(data: dict[str, Any], title: str) -> str:
    rows, fronts = data.get("ranked", []), data.get("fronts", {})
    method = data.get("method", {})
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>",
             f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{len(rows)} configurations ranked by cost {_ranked_at(method)} '
             f"({html.escape(str(method.get('seeds', 1)))} seeds, "
             f"{html.escape(str(method.get('confidence', '')))} confidence); "
             f"{len(data.get('pruned', []))} pruned</p>",
             "<h2>Ranked configurations</h2>", ranked_table(rows)]
    for div_id, key, ykey, ytitle in (
            ("fig-front-ttft", "cost_vs_p99_ttft", "p99_ttft_ms", "p99 TTFT (ms)"),
            ("fig-front-energy", "cost_vs_energy", "energy_per_token_j", "energy per token (J)")):
        fig = front_figure(rows, fronts.get(key, []), ykey, ytitle)
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          div_id=div_id, config=_CONFIG)
        parts.append(f'<h2>Cost against {html.escape(ytitle)}</h2><figure>{div}<figcaption>Each '
                     "configuration at its conservative capacity; blue points are on the Pareto "
                     "front (no other is cheaper and better on this axis).</figcaption></figure>")
    parts += ["<h2>Pruned before running</h2>", pruned_table(data.get("pruned", [])),
              "</body>", "</html>", ""]
    return "\n".join(parts)


def write_search_report(folder: str | Path) -> Path:
    folder = Path(folder)
    data = json.loads((folder / "search.json").read_text())
    text = render(data, f"layersim search: {folder.resolve().name}")
    return atomic_write(folder / "report.html", lambda tmp: tmp.write_text(text, encoding="utf-8"))
