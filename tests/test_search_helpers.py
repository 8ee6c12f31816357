"""Shared set-up of the search tests: a grid with a closed-form answer.

Constant-latency servers: a profile whose every kernel is free (peaks 1e30, no launch cost) and
whose iteration costs `iteration_overhead_s` = D, so each iteration takes D whatever it holds.
With one-token requests arriving evenly (arrival fixed, fixed:32:1) and prefill-first admitting
up to max_num_seqs prompts per iteration, a replica serves max_num_seqs / D req/s (D/D/1 with
batches): below that every request waits at most one iteration, above it the queue grows
without bound and the TTFT target is soon missed. h100 here takes D = 20 ms, h200 10 ms.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import search.runner
from costmodel.gpu import load_gpu
from costmodel.profile import EnergyParams, default_profile, save_profile

ROOT = Path(__file__).resolve().parents[1]
D = {"h100": 0.02, "h200": 0.01}  # seconds per iteration
PRICE = {"h100": 1.0, "h200": 1.5}  # dollars per GPU-hour
TOKENS = 33  # prompt + output tokens per request


def capacity(gpu: str, seqs: int) -> float:
    return seqs / D[gpu]


def constant_profile(gpu: str, path: Path) -> Path:
    p = default_profile(load_gpu(gpu))
    ops = {k: v.model_copy(update={"overhead_s": 0.0, "compute_eff": 1.0, "memory_eff": 1.0})
           for k, v in p.ops.items()}
    p = p.model_copy(update={"iteration_overhead_s": D[gpu], "peak_flops": 1e30,
                             "hbm_bytes_per_s": 1e30, "link_bytes_per_s": 1e30, "ops": ops,
                             "energy": EnergyParams(idle_w=0, busy_w=100.0 * D[gpu], j_per_flop=0,
                                                    j_per_hbm_byte=0, j_per_link_byte=0)})
    save_profile(p, path)
    return path


def write_study(tmp: Path, duration_s: float = 2.5, **search: object) -> Path:
    """The closed-form study file in `tmp` (profiles beside it); `search` overrides grid keys."""
    profiles = {g: str(constant_profile(g, tmp / f"{g}-constant.json")) for g in D}
    grid = {"gpu": ["h100", "h200"], "ep": [1, 3], "max_num_seqs": [1, 2], "profile": profiles,
            "price_per_gpu_hour": PRICE, "target_rate": 400.0, "rel_tol": 0.05,
            "max_probes": 12, "jobs": 0, "store": str(tmp / "store")}
    grid.update(search)
    study = {"model": "tiny-moe", "tp": 1, "workload": "fixed:32:1", "arrival": "fixed",
             "duration_s": duration_s, "policies": ["prefill-first"], "slo_ttft_ms": 50.0,
             "slo_itl_ms": 1e6, "start_rate": 25.0, "target": 0.9, "search": grid}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_cli(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.search", *args], cwd=ROOT,
                          capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(name="counted")
def counted_fixture(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the probes simulated in this process (the serial executor runs them here)."""
    ran: list[str] = []
    real = search.runner.run_probe

    def run_probe(task, requests):  # type: ignore[no-untyped-def]
        ran.append(task.key)
        return real(task, requests)
    monkeypatch.setattr(search.runner, "run_probe", run_probe)
    return ran
