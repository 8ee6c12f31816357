"""HTML tables of the report: the per-run summary and the capacity answer and probes.

Every value carries its unit, either in its column header or in the text itself; raw keys and
Python reprs (`found True`) never reach the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from reports.load import Run, as_float

# (column header, metric key, scale, format) for the summary table.
SUMMARY: tuple[tuple[str, str, float, str], ...] = (
    ("requests", "num_requests", 1, "{:,.0f}"),
    ("finished", "completed", 1, "{:,.0f}"),
    ("mean TTFT ms", "mean_ttft_ms", 1, "{:,.1f}"),
    ("p99 TTFT ms", "p99_ttft_ms", 1, "{:,.1f}"),
    ("mean TPOT ms", "mean_tpot_ms", 1, "{:.2f}"),
    ("p99 ITL ms", "p99_itl_ms", 1, "{:.2f}"),
    ("p99 E2E ms", "p99_e2el_ms", 1, "{:,.0f}"),
    ("req/s", "request_throughput", 1, "{:.3f}"),
    ("output tok/s", "output_throughput", 1, "{:,.1f}"),
    ("SLO attainment", "slo_attainment", 100, "{:.1f}%"),
    ("goodput req/s", "goodput", 1, "{:.3f}"),
    ("energy J/token", "energy_per_token_j", 1, "{:.4f}"),
    ("expert GB/request", "expert_bytes_per_request", 1e-9, "{:,.2f}"),
    ("preemptions", "preemptions", 1, "{:,.0f}"),
)

# (key, column header, scale, format) for the capacity probes.
_PROBES: tuple[tuple[str, str, float, str], ...] = (
    ("rate", "rate req/s", 1, "{:g}"),
    ("replicas", "replicas", 1, "{:,.0f}"),
    ("gpus", "GPUs", 1, "{:,.0f}"),
    ("slo_attainment", "SLO attainment", 100, "{:.1f}%"),
    ("mean_ttft_ms", "mean TTFT ms", 1, "{:,.0f}"),
    ("p99_itl_ms", "P99 ITL ms", 1, "{:.1f}"),
    ("energy_per_token_j", "energy J/token", 1, "{:.4f}"),
)


def _fmt(v: float | None, scale: float, fmt: str) -> str:
    return "—" if v is None else fmt.format(v * scale)


def summary_table(runs: Sequence[Run]) -> str:
    """One row per run, in the order given (study order); headers wrap so it fits 1,400 px."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, *_ in SUMMARY)
    rows = []
    for r in runs:
        cells = "".join(f"<td>{_fmt(r.metric(key), scale, fmt)}</td>" for _, key, scale, fmt in SUMMARY)
        label = html.escape(r.label).replace(":", ":<wbr>").replace("/", "/<wbr>")
        rows.append(f"<tr><td>{label}</td>{cells}</tr>")
    return (f'<div class="wrap"><table id="summary" class="fit"><thead><tr><th>run</th>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table></div>")


def _pct(v: float) -> str:
    return f"{v * 100:.1f}%" if v <= 1 else f"{v:.1f}%"


def _humanize(key: str) -> str:
    return key.replace("_", " ")


def _plain(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    f = as_float(v)
    if f is not None and not isinstance(v, str):
        return f"{f:,.6g}"
    return str(v)


def answer_rows(answer: Mapping[str, Any], target: float | None) -> list[tuple[str, str]]:
    """(label, text with units) for the capacity answer; unknown keys are kept, humanised."""
    a = dict(answer)
    num = {k: as_float(a.get(k)) for k in ("rate", "rate_per_replica", "gpus", "replicas",
                                           "slo_attainment", "energy_per_token_j",
                                           "cost_per_million_tokens", "price_per_gpu_hour")}
    out: list[tuple[str, str]] = []
    kind = a.pop("kind", None)
    found = a.pop("found", None)
    if a.get("policy") is not None:
        out.append(("Policy", str(a.pop("policy"))))
    gpus, reps = num["gpus"], num["replicas"]
    on = (f" on {gpus:,.0f} GPU{'s' if gpus != 1 else ''}" if gpus is not None else "") + (
        f" ({reps:,.0f} replica{'s' if reps != 1 else ''})" if reps is not None else "")
    if found is False:
        out.append(("Answer", "no probed point met the target"))
    elif kind == "min-gpus-split" and gpus is not None:
        split = f"{a.pop('prefill_replicas', '?')} prefill + {a.pop('decode_replicas', '?')} decode"
        at = f" for {num['rate']:g} req/s" if num["rate"] is not None else ""
        out.append(("Fewest GPUs meeting the target", f"{gpus:,.0f} GPUs ({split} workers){at}"))
        low = as_float(a.pop("slo_attainment_low", None))
        if low is not None:
            out.append(("SLO attainment, lower end over seeds", _pct(low)))
    elif kind == "min-gpus" and gpus is not None:
        at = f" for {num['rate']:g} req/s" if num["rate"] is not None else ""
        out.append(("Fewest GPUs meeting the target", f"{on.strip()}{at}"))
    elif num["rate"] is not None:
        per = num["rate_per_replica"]
        text = f"{num['rate']:.3f} req/s"
        if per is not None and reps not in (None, 1.0):
            text += f" ({per:.3f} req/s per replica)"
        out.append(("Highest rate meeting the target", text + on))
    goal = target if target is not None else as_float(a.get("target"))
    if num["slo_attainment"] is not None:
        out.append(("SLO attainment at the answer", _pct(num["slo_attainment"])
                    + (f" (target {_pct(goal)})" if goal is not None else "")))
    elif goal is not None:
        out.append(("Target SLO attainment", _pct(goal)))
    if num["energy_per_token_j"] is not None:
        out.append(("Energy", f"{num['energy_per_token_j']:.4f} J per token"))
    if num["cost_per_million_tokens"] is not None:
        price = num["price_per_gpu_hour"]
        out.append(("Cost", f"${num['cost_per_million_tokens']:,.3f} per million tokens"
                    + (f" at ${price:g} per GPU-hour" if price is not None else "")))
    shown = set(num) | {"target", "policy"}
    out += [(_humanize(k).capitalize(), _plain(v)) for k, v in a.items()
            if k not in shown and not isinstance(v, (dict, list))]
    return out


def answer_table(answer: Mapping[str, Any], target: float | None) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in answer_rows(answer, target))
    return f'<div class="wrap"><table id="capacity-answer" class="kv">{rows}</table></div>'


def probes_table(search: pd.DataFrame) -> str:
    """The capacity search's probes in the order they were tried."""
    cols = [c for c in _PROBES if c[0] in search.columns]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in cols)
    meets = "meets" in search.columns
    body = []
    for i, (_, row) in enumerate(search.iterrows(), start=1):
        cells = "".join(f"<td>{_fmt(as_float(row[k]), s, f)}</td>" for k, _, s, f in cols)
        verdict = ""
        if meets:
            ok = bool(row["meets"])
            verdict = f'<td class="{"ok" if ok else "bad"}">{"meets" if ok else "misses"}</td>'
        body.append(f"<tr><td>{i}</td>{cells}{verdict}</tr>")
    return (f'<div class="wrap"><table id="capacity-probes"><thead><tr><th>probe</th>{head}'
            f"{'<th>verdict</th>' if meets else ''}</tr></thead><tbody>{''.join(body)}</tbody>"
            "</table></div>")
