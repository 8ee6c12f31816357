"""The comparison table a person reads at a glance: one column per policy.

Requests that were rejected, left unfinished or clipped get a row each, with the reason, right
under "requests finished" whenever any policy has one; nothing vanishes without a word.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sim.cluster import REJECTIONS

ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = ()


def _f(v: Any, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v * scale)


ROWS = (
    ("requests finished", lambda m: f"{m['completed']}/{m['num_requests']}"),
    ("TTFT mean / p99 (ms)", lambda m: f"{_f(m['mean_ttft_ms'])} / {_f(m['p99_ttft_ms'])}"),
    ("TPOT mean (ms)", lambda m: _f(m["mean_tpot_ms"], fmt="{:.1f}")),
    ("ITL median / p99 (ms)", lambda m: f"{_f(m['median_itl_ms'], fmt='{:.1f}')} / "
                                        f"{_f(m['p99_itl_ms'], fmt='{:.1f}')}"),
    ("E2E mean / p99 (ms)", lambda m: f"{_f(m['mean_e2el_ms'])} / {_f(m['p99_e2el_ms'])}"),
    ("throughput (req/s)", lambda m: _f(m["request_throughput"], fmt="{:.2f}")),
    ("output tokens/s", lambda m: _f(m["output_throughput"])),
    ("SLO attainment", lambda m: _f(m["slo_attainment"], 100, "{:.1f}%")),
    ("goodput (req/s)", lambda m: _f(m["goodput"], fmt="{:.2f}")),
    ("energy / token (J)", lambda m: _f(m["energy_per_token_j"], fmt="{:.4f}")),
    ("expert GB / request", lambda m: _f(m["expert_bytes_per_request"], 1e-9, "{:.0f}")),
    ("HBM GB / request", lambda m: _f(m["hbm_bytes_per_request"], 1e-9, "{:.0f}")),
    ("preemptions", lambda m: str(m["preemptions"])),
)
# shown only for disaggregated runs (sim/disagg.py)
KV_ROW = ("KV transfer / after TTFT (ms)",
          lambda m: f"{_f(m.get('mean_kv_transfer_ms'), fmt='{:.1f}')} / "
                    f"{_f(m.get('mean_kv_exposed_ms'), fmt='{:.1f}')}")
# shown only when some run hit the prefix cache (a workload with shared content)
PREFIX_ROW = ("prefix cache hit rate",
              lambda m: _f(m.get("prefix_cache_hit_rate"), 100, "{:.1f}%"))


def _count(key: str) -> Callable[[dict[str, Any]], int]:
    return lambda m: int(m.get(key) or 0)


def _other_unfinished(m: dict[str, Any]) -> int:
    """Accepted but never finished (the run ended first, or a policy stopped scheduling them)."""
    return int(m.get("unfinished") or 0) - sum(int(m.get(k) or 0) for k in REJECTIONS)


COUNT_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], int]], ...] = (
    *((f"rejected ({why})", _count(key)) for key, why in REJECTIONS.items()),
    ("unfinished (run ended)", _other_unfinished),
    ("prompts clipped to context", _count("clipped_prompts")),
)


def _as_cell(count: Callable[[dict[str, Any]], int]) -> Callable[[dict[str, Any]], str]:
    return lambda m: str(count(m))


def format_comparison(metrics: Sequence[dict[str, Any]]) -> str:
    names = [str(m["policy"]) for m in metrics]
    rows = list(ROWS[:1])
    for title, count in COUNT_ROWS:  # shown only when some policy has such requests
        if any(count(m) for m in metrics):
            rows.append((title, _as_cell(count)))
    rows += ROWS[1:]
    if any(m.get("prefix_cache_hits") for m in metrics):
        rows.append(PREFIX_ROW)
    if any("kv_transfers" in m for m in metrics):
        rows.append(KV_ROW)
    cells = [[cell(m) for m in metrics] for _, cell in rows]
    width = max(14, *(len(n) + 2 for n in names), *(len(c) + 2 for row in cells for c in row))
    label = max(len(r[0]) for r in rows) + 2
    lines = [" " * label + "".join(f"{n:>{width}}" for n in names)]
    for (title, _), row in zip(rows, cells, strict=True):
        lines.append(f"{title:<{label}}" + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)
