"""The validation section: each compared metric predicted (simulator) against measured (engine).

validation.json (engine/validate.py) holds one row per policy and metric with predicted,
measured, rel_error, bound and within. The report shows them as a table with units, and as a
dot plot of predicted ÷ measured on a log axis, where 1× is a perfect prediction and a grey bar
is the bound the metric is held to.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

from reports.figures import _LAYOUT, _color, log_ticks
from reports.load import as_float

_STATS = {"mean": "mean", "median": "median", "p99": "P99"}
_LATENCY = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2el_ms": "E2E latency"}
# metric -> (label, unit, scale, format)
_OTHER: dict[str, tuple[str, str, float, str]] = {
    "request_throughput": ("request throughput", "req/s", 1, "{:,.3f}"),
    "output_throughput": ("output throughput", "tok/s", 1, "{:,.1f}"),
    "total_token_throughput": ("total token throughput", "tok/s", 1, "{:,.1f}"),
    "energy_per_token_j": ("energy per token", "J", 1, "{:.4g}"),
    "expert_bytes_per_request": ("expert bytes per request", "MB", 1e-6, "{:,.1f}"),
}


_FINE = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


def metric_info(metric: str) -> tuple[str, str, float, str]:
    """(label, unit, scale, format) for a compared metric; unknown ones keep their key."""
    if metric in _OTHER:
        return _OTHER[metric]
    stat, _, rest = metric.partition("_")
    if stat in _STATS and rest in _LATENCY:
        return f"{_STATS[stat]} {_LATENCY[rest]}", "ms", 1, "{:,.2f}"
    return metric, "", 1, "{:.4g}"


def rows(validation: Mapping[str, Any]) -> list[dict[str, Any]]:
    data = validation.get("rows")
    return [r for r in data if isinstance(r, dict) and "metric" in r] if isinstance(data, list) else []


def _value(v: Any, metric: str) -> str:
    f = as_float(v)
    if f is None:
        return "not measured" if metric.startswith("energy") else "n/a"
    _, unit, scale, fmt = metric_info(metric)
    return fmt.format(f * scale) + (f" {unit}" if unit else "")


def validation_table(validation: Mapping[str, Any]) -> str:
    """Policy, metric, predicted, measured, error, bound and verdict, one row per metric."""
    body = []
    last = None
    for r in rows(validation):
        metric = str(r["metric"])
        policy = str(r.get("policy", ""))
        err, bound = as_float(r.get("rel_error")), as_float(r.get("bound"))
        within = r.get("within")
        verdict = ("within" if within else "outside") if isinstance(within, bool) else "no bound"
        cls = {"within": "ok", "outside": "bad"}.get(verdict, "")
        body.append(
            f"<tr><td>{html.escape(policy) if policy != last else ''}</td>"
            f"<td>{html.escape(metric_info(metric)[0])}</td>"
            f"<td>{html.escape(_value(r.get('predicted'), metric))}</td>"
            f"<td>{html.escape(_value(r.get('measured'), metric))}</td>"
            f"<td>{'—' if err is None else f'{err:+.1%}'}</td>"
            f"<td>{'—' if bound is None else f'±{bound:.0%}'}</td>"
            f'<td class="{cls}">{verdict}</td></tr>')
        last = policy
    head = "".join(f"<th>{h}</th>" for h in ("policy", "metric", "predicted (simulator)",
                                             "measured (engine)", "error", "bound", "verdict"))
    return (f'<div class="wrap"><table id="validation-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def validation_figure(validation: Mapping[str, Any] | None) -> go.Figure | None:
    """Predicted ÷ measured per metric (log axis), one colour per policy, bounds as grey bars."""
    if validation is None:
        return None
    pts: dict[str, list[tuple[str, float]]] = {}
    bounds: dict[str, float] = {}
    for r in rows(validation):
        p, m = as_float(r.get("predicted")), as_float(r.get("measured"))
        if p is None or m is None or p <= 0 or m <= 0:
            continue
        label = metric_info(str(r["metric"]))[0]
        pts.setdefault(str(r.get("policy", "")), []).append((label, p / m))
        if (b := as_float(r.get("bound"))) is not None and 0 < b < 1:
            bounds[label] = b
    if not pts:
        return None
    order = list(dict.fromkeys(label for data in pts.values() for label, _ in data))
    fig = go.Figure()
    if bounds:
        xs: list[float | None] = []
        ys: list[str | None] = []
        for label, b in bounds.items():
            xs += [1 - b, 1 + b, None]
            ys += [label, label, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="bound", hoverinfo="skip",
                                 line=dict(color="rgba(0,0,0,0.15)", width=10)))
    for i, (policy, data) in enumerate(pts.items()):
        fig.add_trace(go.Scatter(
            x=[v for _, v in data], y=[lab for lab, _ in data], mode="markers", name=policy,
            marker=dict(size=10, color=_color(i)),
            hovertemplate=f"{policy}<br>%{{y}}<br>predicted = %{{x:.3f}} × measured<extra></extra>"))
    ratios = [v for data in pts.values() for _, v in data] + [1 - b for b in bounds.values()] \
        + [1 + b for b in bounds.values()]
    lo, hi = min(min(ratios), 0.9), max(max(ratios), 1.1)
    if hi / lo > 10:
        vals, text = log_ticks(lo, hi)
    else:  # a narrow range: finer steps than 1-2-5
        vals = [v for v in _FINE if lo <= v <= hi]
        text = [f"{v:g}" for v in vals]
    fig.add_vline(x=1, line=dict(color="#444", width=1))
    fig.update_layout(**(_LAYOUT | dict(margin=dict(l=180, r=20, t=50, b=50))),
                      title="Predicted ÷ measured (1× = exact; grey = bound)",
                      height=120 + 26 * len(order))
    fig.update_xaxes(type="log", title="simulator ÷ engine", tickvals=vals,
                     ticktext=[t + "×" for t in text],
                     range=[math.log10(lo) - 0.05, math.log10(hi) + 0.05])
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    return fig
