"""The page `layersim replay-silicon --out DIR` writes: predicted against measured serving runs.

A scatter per metric (mean TTFT, mean TPOT) of the simulator's prediction against the measured
value on log axes, one colour per model and one marker per backend, with the line of perfect
prediction and the ±10% and ±25% bands the error targets are stated in; then the median and
P90 of |error| per backend and per model, and the rows skipped with their reasons. The page is
self-contained (plotly inlined) and byte-identical for the same table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from reports.figures import _SUBPLOT_LAYOUT, _color

_MARKERS = ("circle", "square", "diamond", "triangle-up", "x")
_METRICS = (("ttft", "mean TTFT (ms)"), ("tpot", "mean TPOT (ms)"))
_BANDS = ((0.10, "±10%", "dash"), (0.25, "±25%", "dot"))
_CSS = ("body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; "
        "margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }"
        "table { border-collapse: collapse; font-size: 0.9em; margin-bottom: 16px; }"
        "th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }"
        "th:first-child, td:first-child { text-align: left; }")


def scatter(table: pd.DataFrame) -> go.Figure | None:
    """Predicted against measured, TTFT left and TPOT right; None with no simulated row."""
    if not len(table):
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=[label for _, label in _METRICS],
                        horizontal_spacing=0.08)
    models = sorted(table["model"].unique())
    backends = sorted(table["backend"].unique())
    for col, (key, label) in enumerate(_METRICS, start=1):
        measured, predicted = table[f"measured_{key}_ms"], table[f"predicted_{key}_ms"]
        lo = float(min(measured.min(), predicted.min())) / 1.5
        hi = float(max(measured.max(), predicted.max())) * 1.5
        line = [lo, hi]
        fig.add_trace(go.Scatter(x=line, y=line, mode="lines", line=dict(color="#444", width=1),
                                 name="predicted = measured", legendgroup="exact",
                                 showlegend=col == 1, hoverinfo="skip"), row=1, col=col)
        for frac, name, dash in _BANDS:
            for sign in (1, -1):
                fig.add_trace(go.Scatter(
                    x=line, y=[v * (1 + sign * frac) for v in line], mode="lines",
                    line=dict(color="#999", width=1, dash=dash), name=name, legendgroup=name,
                    showlegend=col == 1 and sign == 1, hoverinfo="skip"), row=1, col=col)
        for m_idx, model in enumerate(models):
            for b_idx, backend in enumerate(backends):
                part = table[(table["model"] == model) & (table["backend"] == backend)]
                if not len(part):
                    continue
                err = part[f"{key}_err"]
                fig.add_trace(go.Scatter(
                    x=part[f"measured_{key}_ms"], y=part[f"predicted_{key}_ms"], mode="markers",
                    name=f"{model} ({backend})", legendgroup=f"{model}/{backend}",
                    showlegend=col == 1,
                    marker=dict(color=_color(m_idx), symbol=_MARKERS[b_idx % len(_MARKERS)],
                                size=7, opacity=0.8),
                    customdata=list(zip(part["row"], part["isl"], part["osl"], part["clients"],
                                        part["tp"], err * 100, strict=True)),
                    hovertemplate=("row %{customdata[0]}: ISL %{customdata[1]} OSL %{customdata[2]}"
                                   " · %{customdata[3]} clients · TP%{customdata[4]}<br>measured "
                                   "%{x:.1f} ms, predicted %{y:.1f} ms (%{customdata[5]:+.0f}%)"
                                   f"<extra>{html.escape(label)}</extra>")), row=1, col=col)
        axis = dict(type="log", range=[math.log10(lo), math.log10(hi)])
        fig.update_xaxes(title_text=f"measured {label}", row=1, col=col, **axis)
        fig.update_yaxes(title_text=f"predicted {label}", row=1, col=col, **axis)
    fig.update_layout(**_SUBPLOT_LAYOUT, height=560)
    return fig


def _summary_html(summary: pd.DataFrame, by: str) -> str:
    head = "".join(f"<th>{h}</th>" for h in (by, "rows", "TTFT median", "TTFT P90",
                                             "TPOT median", "TPOT P90"))
    body = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{int(r['rows'])}</td>"
        + "".join(f"<td>{r[c]:.1%}</td>" for c in ("ttft_median", "ttft_p90", "tpot_median",
                                                   "tpot_p90")) + "</tr>"
        for name, r in summary.iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(table: pd.DataFrame, summaries: Mapping[str, pd.DataFrame],
                skipped: Mapping[str, int], source: str, protocol: str = "") -> str:
    """The whole page: scatter, |error| per backend and per model, skipped rows."""
    title = f"layersim replay-silicon: {source}"
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>",
             f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(table)} rows simulated; error = predicted / measured − 1"
             + (f"; replayed with the {html.escape(protocol)} protocol" if protocol else "")
             + ".</p>"]
    fig = scatter(table)
    if fig is not None:
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                                 div_id="fig-silicon", config={"displaylogo": False}))
    for by, summary in summaries.items():
        if len(summary):
            parts += [f"<h2>|error| by {html.escape(by)}</h2>", _summary_html(summary, by)]
    if skipped:
        items = "".join(f"<li>{n} × {html.escape(reason)}</li>" for reason, n in skipped.items())
        parts += [f"<h2>Skipped: {sum(skipped.values())} rows</h2>", f"<ul>{items}</ul>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
