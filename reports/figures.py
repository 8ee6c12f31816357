"""One plotly figure per report section, each built from loaded results (reports/load.py).

Every function returns None when its data is absent, so the report simply leaves the plot out.
Trace data is thinned (CDF quantiles, per-time-bin extremes) so the HTML stays small for long runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from reports.load import Capacity, Run, as_float

PALETTE = qualitative.Plotly
CDF_POINTS = 500  # quantiles per CDF trace: smooth enough, and size independent of run length
TIMELINE_POINTS = 5000  # per run
# Single plots keep plotly's legend on the right, clear of the title.
_LAYOUT: dict[str, Any] = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))
# Subplot titles sit just above the plot area: lift the legend clear of them.
_SUBPLOT_LAYOUT: dict[str, Any] = _LAYOUT | dict(margin=dict(l=60, r=20, t=90, b=50),
                                                 legend=dict(orientation="h", yanchor="top",
                                                             y=0.995, x=0, yref="container"))


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """1-2-3-5 tick values (fewer when the range spans many decades), each labelled in full.

    Plotly's default log axis labels minor ticks with their bare leading digit ("6" for 60),
    which reads as a value next to a target line.
    """
    lo, hi = max(min(lo, hi), 1e-9), max(lo, hi, 1e-9)
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mantissas in ((1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
        vals = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in mantissas]
        # One tick beyond each end of the data, so the autoranged axis is labelled to its edges.
        below = [v for v in vals if v <= lo][-1:]
        above = [v for v in vals if v >= hi][:1]
        vals = below + [v for v in vals if lo < v < hi] + above
        if len(vals) <= 8:
            break
    return vals, [_tick_text(v) for v in vals]


def _tick_text(v: float) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:.10g}"


def _nice_floor(v: float) -> float:
    """v rounded down to two significant digits."""
    if v <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(v)) - 1)
    return math.floor(v / step) * step


def bar_range(values: Sequence[float]) -> tuple[float, float] | None:
    """A y range whose baseline shows differences of a few percent; None when 0 already does."""
    lo, hi = min(values), max(values)
    if lo <= 0 or lo < 0.8 * hi:  # differences of 20% and more show on a zero baseline
        return None
    spread = max(hi - lo, 0.02 * hi)
    return _nice_floor(lo - spread), hi + 0.35 * spread


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    keep: list[int] = []
    best_y = float("inf")
    for i in order:
        if points[i][1] < best_y:
            keep.append(i)
            best_y = points[i][1]
    return keep


def pareto(runs: Sequence[Run], ttft: str = "mean") -> go.Figure | None:
    """TTFT against P99 ITL (the TBT tail), one point per run, with the non-dominated frontier."""
    ykey = f"{ttft}_ttft_ms"
    pts: list[tuple[float, float]] = []
    names: list[str] = []
    for r in runs:
        # Streamed runs may lack pooled ITL percentiles; per-request TPOT is the nearest stand-in.
        x = r.metric("p99_itl_ms") or r.metric("p99_tpot_ms")
        y = r.metric(ykey)
        if x is not None and y is not None:
            pts.append((x, y))
            names.append(r.label)
    if not pts:
        return None
    fig = go.Figure()
    front = frontier(pts)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[pts[i][0] for i in front], y=[pts[i][1] for i in front],
                                 mode="lines", name="Pareto frontier", hoverinfo="skip",
                                 line=dict(color="#888", dash="dot")))
    on_front = set(front)
    for i, ((x, y), name) in enumerate(zip(pts, names, strict=True)):
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers+text", name=name, text=[name], textposition="top center",
            marker=dict(size=12 if i in on_front else 9, color=_color(i),
                        symbol="circle" if i in on_front else "circle-open", line=dict(width=2)),
            hovertemplate=f"{name}<br>P99 ITL %{{x:.1f}} ms<br>{ttft} TTFT %{{y:.1f}} ms<extra></extra>"))
    off = _slo_lines(fig, runs, max(p[0] for p in pts), max(p[1] for p in pts))
    title = f"{ttft.capitalize()} TTFT vs P99 inter-token latency"
    if off:
        title += f" <span style='font-size:12px'>(off scale: {', '.join(off)})</span>"
    fig.update_layout(**_LAYOUT, title=title, showlegend=False, height=450)
    fig.update_xaxes(title="P99 ITL / TBT (ms)", rangemode="tozero")
    fig.update_yaxes(title=f"{ttft} TTFT (ms)", rangemode="tozero")
    return fig


def _slo_lines(fig: go.Figure, runs: Sequence[Run], x_max: float, y_max: float) -> list[str]:
    """Draw the SLO targets near the data; return those left out as far off scale.

    A target many times above every run would squash all the points into one corner.
    """
    off = []
    slo_itl = _common(runs, "slo_itl_ms")
    slo_ttft = _common(runs, "slo_ttft_ms")
    if slo_itl is not None:
        if slo_itl <= 2 * x_max:
            fig.add_vline(x=slo_itl, line=dict(color="crimson", dash="dash", width=1),
                          annotation_text=f"ITL SLO {slo_itl:g} ms", annotation_position="top right")
        else:
            off.append(f"ITL SLO {slo_itl:g} ms")
    if slo_ttft is not None:
        if slo_ttft <= 2 * y_max:
            fig.add_hline(y=slo_ttft, line=dict(color="crimson", dash="dash", width=1),
                          annotation_text=f"TTFT SLO {slo_ttft:g} ms", annotation_position="top left")
        else:
            off.append(f"TTFT SLO {slo_ttft:g} ms")
    return off


def _common(runs: Sequence[Run], key: str) -> float | None:
    """The value every run agrees on (first one if they differ: targets are normally shared)."""
    vals = [v for r in runs if (v := r.metric(key)) is not None]
    return vals[0] if vals else None


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values)
    if len(v) <= CDF_POINTS:
        return v, np.arange(1, len(v) + 1) / len(v)
    q = np.linspace(0.0, 1.0, CDF_POINTS)
    return np.quantile(v, q), q


def latency_cdfs(runs: Sequence[Run]) -> go.Figure | None:
    """CDFs of TTFT, E2E latency and each request's own P99 ITL, one colour per run."""
    panels = (("ttft_ms", "TTFT (ms)"), ("e2el_ms", "E2E latency (ms)"),
              ("p99_itl_ms", "per-request P99 ITL (ms)"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    drawn = False
    spans: dict[int, list[float]] = {}
    for i, r in enumerate(runs):
        df = r.requests
        if df is None or "finished" not in df:
            continue
        done = df[df["finished"].astype(bool)]
        if "warmup" in done:  # warm-up requests are in no metric
            done = done[~done["warmup"].astype(bool)]
        for col, (key, title) in enumerate(panels, start=1):
            if key not in done:
                continue
            v = pd.to_numeric(done[key], errors="coerce").to_numpy(dtype=float)
            # Log axes: non-positive values (a 1-token request has no gaps, so P99 ITL 0) can't show.
            v = v[np.isfinite(v) & (v > 0)]
            if not len(v):
                continue
            x, y = _ecdf(v)
            spans.setdefault(col, []).extend((float(v.min()), float(v.max())))
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", name=r.label, legendgroup=r.label, showlegend=col == 1,
                line=dict(color=_color(i), shape="hv"),
                hovertemplate=f"{r.label}<br>{title} %{{x:.1f}}<br>fraction %{{y:.3f}}<extra></extra>"),
                row=1, col=col)
            drawn = True
    if not drawn:
        return None
    fig.update_layout(**_SUBPLOT_LAYOUT, height=440)
    fig.update_xaxes(type="log")
    for col, span in spans.items():
        vals, text = log_ticks(min(span), max(span))
        fig.update_xaxes(tickvals=vals, ticktext=text, row=1, col=col)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_yaxes(title="fraction of finished requests", row=1, col=1)
    return fig


def thin_timeline(it: pd.DataFrame, max_points: int = TIMELINE_POINTS) -> pd.DataFrame:
    """At most max_points rows: in each time bin the slowest and the fastest iteration.

    Keeping extremes rather than a random sample keeps every latency spike above the target visible.
    """
    if len(it) <= max_points:
        return it
    bins = max(max_points // 2, 1)
    t = it["start_s"].to_numpy(dtype=float)
    edges = np.linspace(t.min(), t.max(), bins + 1)
    key = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    g = it.groupby(key, sort=True)["per_iter_ms"]
    idx = pd.Index(g.idxmax()).union(pd.Index(g.idxmin()))
    return it.loc[idx].sort_values("start_s", kind="stable")


def timeline(runs: Sequence[Run]) -> go.Figure | None:
    """Per run: latency of each iteration over time, split by whether it carried prefill work."""
    rows = [r for r in runs if r.iterations is not None and len(r.iterations)
            and {"start_s", "latency_s"} <= set(r.iterations.columns)]
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, subplot_titles=[r.label for r in rows],
                        vertical_spacing=min(0.08, 0.3 / len(rows)))
    for n, r in enumerate(rows, start=1):
        assert r.iterations is not None
        it = r.iterations.copy()
        count = it["iterations"].clip(lower=1) if "iterations" in it else 1
        # A fast-forwarded row totals several identical decode steps; plot one step's latency.
        it["per_iter_ms"] = it["latency_s"] / count * 1e3
        it = it[np.isfinite(it["per_iter_ms"]) & (it["per_iter_ms"] > 0)]  # log axis
        if not len(it):
            continue
        it = thin_timeline(it.reset_index(drop=True))
        prefill = it["prefill_tokens"] if "prefill_tokens" in it else pd.Series(0, index=it.index)
        decode = it["decode_tokens"] if "decode_tokens" in it else pd.Series(0, index=it.index)
        # A layered pass through middle layers carries prompt work but embeds no new token:
        # split on the prompt's layer-tokens, not on the tokens entering the stack.
        prompt_work = (it["prefill_layer_tokens"] if "prefill_layer_tokens" in it else prefill) > 0
        for kind, mask, color in (("decode only", ~prompt_work, "#1f77b4"),
                                  ("with prefill", prompt_work, "#ff7f0e")):
            part = it[mask]
            if not len(part):
                continue
            fig.add_trace(go.Scatter(
                x=part["start_s"], y=part["per_iter_ms"], mode="markers", name=kind, legendgroup=kind,
                showlegend=n == 1, marker=dict(size=4, color=color, opacity=0.7),
                customdata=np.column_stack([prefill[mask], decode[mask]]),
                hovertemplate=("t %{x:.3f} s<br>%{y:.2f} ms<br>prefill %{customdata[0]} tok"
                               "<br>decode %{customdata[1]} tok<extra>" + kind + "</extra>")),
                row=n, col=1)
        target = r.metric("slo_itl_ms")
        lo, hi = float(it["per_iter_ms"].min()), float(it["per_iter_ms"].max())
        if target is not None:
            # A trace, not add_hline: hline annotations on a log axis take log10(y) and blow up the range.
            t = it["start_s"]
            fig.add_trace(go.Scatter(
                x=[t.min(), t.max()], y=[target, target], mode="lines", name="TBT target",
                legendgroup="target", showlegend=n == 1, line=dict(color="crimson", dash="dash", width=1),
                hovertemplate=f"TBT target {target:g} ms<extra></extra>"), row=n, col=1)
            # The target's value written on its line; annotations on a log axis take log10(y).
            fig.add_annotation(x=float(t.max()), y=math.log10(target), text=f"TBT target {target:g} ms",
                               showarrow=False, xanchor="right", yanchor="bottom",
                               font=dict(color="crimson", size=11), row=n, col=1)
            lo, hi = min(lo, target), max(hi, target)
        vals, text = log_ticks(lo, hi)
        fig.update_yaxes(title="ms / iteration", type="log", tickvals=vals, ticktext=text, row=n, col=1)
    fig.update_xaxes(title="time (s)", row=len(rows), col=1)
    fig.update_layout(**_SUBPLOT_LAYOUT, height=140 + 260 * len(rows))
    return fig


def traffic_energy(runs: Sequence[Run]) -> go.Figure | None:
    """Expert-weight traffic per request and energy per token, one bar per run."""
    gb = [(r.label, v / 1e9) for r in runs if (v := r.metric("expert_bytes_per_request")) is not None]
    joule = [(r.label, v) for r in runs if (v := r.metric("energy_per_token_j")) is not None]
    if not gb and not joule:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=["expert weight traffic per request (GB)",
                                                        "energy per token (J)"])
    color = {r.label: _color(i) for i, r in enumerate(runs)}
    for col, data, unit, fmt in ((1, gb, "GB", "{:,.2f}"), (2, joule, "J", "{:.4f}")):
        if not data:
            continue
        ys = [d[1] for d in data]
        # Each bar says its value and its difference from the first run (the study's baseline):
        # a 2% difference is then readable even where the bars look alike.
        base = ys[0]
        text = [fmt.format(y) + ("" if len(ys) == 1 or base == 0 else "<br>baseline" if i == 0
                                 else f"<br>{(y - base) / abs(base):+.1%}")
                for i, y in enumerate(ys)]
        fig.add_trace(go.Bar(x=[d[0] for d in data], y=ys, text=text, textposition="outside",
                             cliponaxis=False, marker_color=[color[d[0]] for d in data],
                             showlegend=False,
                             hovertemplate="%{x}<br>%{y:.4g} " + unit + "<extra></extra>"), row=1, col=col)
        span = bar_range(ys)
        if span is None:
            fig.update_yaxes(title=unit, rangemode="tozero", row=1, col=col)
        else:  # a non-zero baseline, and the axis title says so
            fig.update_yaxes(title=f"{unit} (axis starts at {span[0]:g}, not 0)", range=list(span),
                             row=1, col=col)
    fig.update_layout(**(_LAYOUT | dict(margin=dict(l=70, r=20, t=60, b=60))), height=440)
    return fig


def slo_vs_rate(sweep: pd.DataFrame | None) -> go.Figure | None:
    """SLO attainment against arrival rate from a sweep, one line per policy."""
    if sweep is None or not {"rate", "slo_attainment"} <= set(sweep.columns):
        return None
    df = sweep.assign(rate=pd.to_numeric(sweep["rate"], errors="coerce"),
                      slo_attainment=pd.to_numeric(sweep["slo_attainment"], errors="coerce"))
    df = df.dropna(subset=["rate", "slo_attainment"])
    if df.empty:
        return None
    groups = df.groupby("policy", sort=True) if "policy" in df else [("all", df)]
    fig = go.Figure()
    for i, (name, g) in enumerate(groups):
        g = g.sort_values("rate", kind="stable")
        fig.add_trace(go.Scatter(x=g["rate"], y=g["slo_attainment"] * 100, mode="lines+markers",
                                 name=str(name), line=dict(color=_color(i)),
                                 hovertemplate=f"{name}<br>%{{x:g}} req/s<br>%{{y:.1f}}%<extra></extra>"))
    fig.update_layout(**_LAYOUT, title="SLO attainment vs arrival rate", height=420)
    fig.update_xaxes(title="arrival rate (req/s)")
    fig.update_yaxes(title="SLO attainment (%)", range=[0, 102])
    return fig


def _capacity_axis(cap: Capacity) -> tuple[str, str, str]:
    """(column, axis title, unit) the search varied: the rate, or the GPU count at a fixed rate."""
    cols = set(cap.search.columns)
    for col, title, unit in (("gpus", "GPUs", "GPUs"), ("replicas", "replicas", "replicas")):
        if cap.answer.get("kind") in ("min-gpus", "min-gpus-split") and col in cols:
            return col, title, unit
    if "rate" not in cols:
        return "", "", ""
    rate = pd.to_numeric(cap.search["rate"], errors="coerce")
    if rate.nunique() <= 1 and "gpus" in cols and cap.search["gpus"].nunique() > 1:
        return "gpus", "GPUs", "GPUs"
    return "rate", "arrival rate (req/s)", "req/s"


def capacity(cap: Capacity | None) -> go.Figure | None:
    """The capacity search: each probe's attainment, whether it met the target, and the answer."""
    if cap is None or "slo_attainment" not in cap.search:
        return None
    xcol, xtitle, unit = _capacity_axis(cap)
    if not xcol:
        return None
    df = cap.search.assign(x=pd.to_numeric(cap.search[xcol], errors="coerce"),
                           att=pd.to_numeric(cap.search["slo_attainment"], errors="coerce") * 100)
    df = df.dropna(subset=["x", "att"]).reset_index(drop=True)
    if df.empty:
        return None
    df["step"] = np.arange(1, len(df) + 1)  # probe order, before sorting by x for the line
    meets = df["meets"].astype(bool) if "meets" in df else pd.Series(False, index=df.index)
    fig = go.Figure()
    line = df.sort_values("x", kind="stable")
    fig.add_trace(go.Scatter(x=line["x"], y=line["att"], mode="lines", name="attainment",
                             line=dict(color="#888"), hoverinfo="skip", showlegend=False))
    for label, mask, color in (("meets target", meets, "seagreen"), ("misses target", ~meets, "crimson")):
        part = df[mask]
        if len(part):
            fig.add_trace(go.Scatter(
                x=part["x"], y=part["att"], mode="markers", name=label, customdata=part["step"],
                marker=dict(size=10, color=color),
                hovertemplate=f"probe %{{customdata}}<br>%{{x:g}} {unit}<br>%{{y:.1f}}%<extra></extra>"))
    if cap.target is not None:
        pct = cap.target * 100 if cap.target <= 1 else cap.target
        fig.add_hline(y=pct, line=dict(color="crimson", dash="dash", width=1),
                      annotation_text=f"target {pct:g}%", annotation_position="bottom left")
    keys = (xcol,) if xcol != "rate" else ("rate", "max_rate", "capacity")
    answer = next((v for k in keys if (v := as_float(cap.answer.get(k))) is not None), None)
    if answer is not None and cap.answer.get("found", True):
        fig.add_vline(x=answer, line=dict(color="seagreen", dash="dot", width=1),
                      annotation_text=f"answer {answer:g} {unit}", annotation_position="top right")
    fig.update_layout(**_LAYOUT, title="Capacity search", height=420)
    fig.update_xaxes(title=xtitle)
    fig.update_yaxes(title="SLO attainment (%)", range=[0, 102])
    return fig
