"""The comparison table a person reads at a glance: one column per policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def format_comparison(metrics: Sequence[dict[str, Any]]) -> str:
    names = [str(m["policy"]) for m in metrics]
    width = max(14, *(len(n) + 2 for n in names))
    label = max(len(r[0]) for r in ROWS) + 2
    lines = [" " * label + "".join(f"{n:>{width}}" for n in names)]
    for title, cell in ROWS:
        lines.append(f"{title:<{label}}" + "".join(f"{cell(m):>{width}}" for m in metrics))
    return "\n".join(lines)
