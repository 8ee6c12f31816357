"""Fit the host overhead of the serving engine: what whole iterations cost beyond their kernels.

Method. The kernel grid times each operation alone; the engine (engine.executor.Engine) also
spends host time per layer (Python, ~45 small unfused kernels, page gathers, metadata) and per
iteration that no micro-benchmark sees. Here the engine runs real plans on the calibrated
model: whole-stack decodes at several batch sizes and contexts (every layer active), partial
stacks (single-token tiles and a short prefill through layers [0, 1) and [0, L/2)) and decodes
with a prefill tile on [0, L/2). Each plan is timed as the median of repeats after a warm-up
(execute() synchronises a GPU itself). From each time we subtract the kernel-only cost model's
price (the profile fitted so far with both host overheads 0) and fit

    residual = iteration_overhead_s + layer_overhead_s * (layers with any tile)

by non-negative least squares on relative residuals (each plan divided by its measured time,
so a 2 ms plan counts as much as a 60 ms one). Varying the active layer count at similar work
is what separates the two terms. A model that does not fit on the device is skipped, with the
reason in the returned record, and both overheads stay at their defaults.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

from costmodel import CostModel, Profile, Tile, decode_tile
from costmodel.errors import ConfigError
from costmodel.model import ModelSpec

# Per device kind and grid size: decode batch sizes, decode contexts, repeats and seconds per
# plan. The CPU axes stay small so that `calibrate --quick` on tiny-moe adds only seconds.
_AXES: dict[tuple[str, bool], tuple[tuple[int, ...], tuple[int, ...], int, float]] = {
    ("cpu", True): ((1, 4, 16), (128, 1024), 7, 0.15),
    ("cpu", False): ((1, 4, 16, 32), (128, 1024, 2048), 11, 0.4),
    # The largest GPU plan (64 decodes at 8k) needs ~55 GB of KV for qwen3-30b-a3b; with its
    # 61 GB of weights that fits an H200 (141 GB). Where it does not, _fits skips the step.
    ("cuda", True): ((1, 8, 64), (256, 4096), 10, 0.2),
    ("cuda", False): ((1, 8, 32, 64), (256, 2048, 8192), 20, 0.5),
}
PREFILL_TOKENS = 64  # short enough that host time, not FLOPs, dominates the partial stacks


@dataclass(frozen=True)
class HostFit:
    iteration_overhead_s: float | None  # None: not measured (see record["reason"])
    layer_overhead_s: float | None
    record: dict[str, Any]  # for the profile's provenance: what was timed and how well it fits

    @classmethod
    def skipped(cls, reason: str) -> HostFit:
        return cls(None, None, {"measured": False, "reason": reason})


def _plans(L: int, batches: Sequence[int], contexts: Sequence[int]) -> list[tuple[str, list[Tile]]]:
    """(label, plan) pairs; request ids are unique across plans so KV pages never collide."""
    out: list[tuple[str, list[Tile]]] = []
    rid = 0

    def ids(n: int) -> list[int]:
        nonlocal rid
        rid += n
        return list(range(rid - n, rid))

    for b in batches:
        for c in contexts:
            out.append((f"decode b={b} ctx={c}", [decode_tile(r, c, L) for r in ids(b)]))
    c, half = contexts[0], max(1, L // 2)
    for l1 in sorted({1, half} - {L}):  # partial stacks: fewer active layers, same kind of work
        for b in (1, batches[len(batches) // 2]):
            out.append((f"single-token b={b} layers 0:{l1}",
                        [Tile(r, c, c + 1, 0, l1, c, False) for r in ids(b)]))
        out.append((f"prefill {PREFILL_TOKENS} layers 0:{l1}",
                    [Tile(ids(1)[0], 0, PREFILL_TOKENS, 0, l1, 0, False)]))
    out.append((f"prefill {PREFILL_TOKENS} layers 0:{L}",
                [Tile(ids(1)[0], 0, PREFILL_TOKENS, 0, L, 0, False)]))
    b = batches[len(batches) // 2]
    out.append((f"decode b={b} ctx={c} + prefill {PREFILL_TOKENS} layers 0:{half}",
                [decode_tile(r, c, L) for r in ids(b)]
                + [Tile(ids(1)[0], 0, PREFILL_TOKENS, 0, half, 0, False)]))
    return out


def _active_layers(plan: Sequence[Tile]) -> int:
    return len({layer for t in plan for layer in range(t.l0, t.l1)})


def _kv_tokens(plans: Sequence[tuple[str, list[Tile]]], page: int) -> int:
    """KV pool for the largest plan (each plan's requests are released before the next) plus
    the warm-up's two requests."""
    return max(sum(-(-(t.t1 + 1) // page) * page for t in plan) for _, plan in plans) + 4 * page


def _fits(spec: ModelSpec, device: Any, kv_tokens: int) -> str | None:
    """Why the engine cannot hold the model and the plans' KV on this GPU, or None if it can."""
    if device.type != "cuda":
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    kv = kv_tokens * 2 * spec.num_layers * spec.kv_dim * 2  # K and V, bf16
    need = spec.weight_bytes_total + kv + 8e9  # 8 GB for activations and the allocator
    if need > free:
        return (f"{spec.name} needs {need / 1e9:.0f} GB (weights, KV, activations) and the GPU "
                f"has {free / 1e9:.0f} GB free")
    return None


def measure_host_overhead(spec: ModelSpec, device: Any, kernel_profile: Profile, quick: bool,
                          sync: Callable[[], None]) -> HostFit:
    """Time engine iterations and fit the host overheads (HostFit.skipped where it cannot).

    `kernel_profile` is the fitted profile with both host overheads 0; `device` a torch.device,
    already set up by calibrate.kernels.open_device (threads on the CPU included), so the
    engine runs with the thread count `validate` will give it (provenance torch_threads)."""
    import torch

    from engine.executor import Engine
    from engine.kvcache import PAGE_SIZE

    batches, all_contexts, max_reps, budget = _AXES[(device.type, quick)]
    contexts = [c for c in all_contexts if c < spec.max_context] or [spec.max_context // 2]
    plans = _plans(spec.num_layers, batches, contexts)
    try:
        cm = CostModel(spec, kernel_profile.gpu, kernel_profile)  # the engine runs tp=1
    except ConfigError as e:
        return HostFit.skipped(f"the engine runs the whole model on one device: {e}")
    kv_tokens = _kv_tokens(plans, PAGE_SIZE)
    why = _fits(spec, device, kv_tokens)
    if why is not None:
        return HostFit.skipped(why)
    engine = None
    try:
        engine = Engine(spec, device, kv_tokens=kv_tokens)
        engine.warmup()
        rows = [_time_plan(engine, label, plan, max_reps, budget, sync) for label, plan in plans]
        info = {"engine_attention": engine.attn_impl, "engine_experts": engine.expert_impl,
                "engine_dtype": str(engine.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads() if device.type == "cpu" else None}
    except torch.OutOfMemoryError as e:
        return HostFit.skipped(f"out of memory running the engine: {str(e).splitlines()[0]}")
    finally:
        del engine  # free weights and KV before the caller goes on
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return fit_host_overhead(rows, cm, info)


def _time_plan(engine: Any, label: str, plan: list[Tile], max_reps: int, budget: float,
               sync: Callable[[], None]) -> tuple[str, list[Tile], float]:
    for t in plan:  # contexts exist without running their prefill; ids are unique per plan
        if t.num_cached:
            engine.fake_context(t.req_id, t.num_cached)
        else:
            engine.add_request(t.req_id, t.t1)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        engine.execute(plan)  # synchronises the device before returning
        dt = time.perf_counter() - t0
        for t in plan:  # partial stacks leave hidden states for a next tile that never comes
            engine.pieces.pop(t.req_id, None)
        return dt

    est = run()  # warm-up: this plan's shapes, allocator growth
    reps = int(min(max_reps, max(3, budget / max(est, 1e-6))))
    times = [run() for _ in range(reps)]
    for t in plan:
        engine.release(t.req_id)
    return label, plan, statistics.median(times)


def fit_host_overhead(rows: Sequence[tuple[str, Sequence[Tile], float]], cm: CostModel,
                      info: dict[str, Any] | None = None) -> HostFit:
    """NNLS of measured - kernel-only price on (1, active layers), relative to measured time.

    `cm` must price kernels only (iteration and layer overhead 0)."""
    t = np.array([r[2] for r in rows])
    kern = np.array([cm.price(r[1]).latency_s for r in rows])
    nl = np.array([_active_layers(r[1]) for r in rows], dtype=float)
    A = np.stack([np.ones_like(t), nl], axis=1) / t[:, None]
    (per_iter, per_layer), _ = nnls(A, (t - kern) / t)
    pred = kern + per_iter + per_layer * nl
    rel, rel0 = pred / t - 1, kern / t - 1
    record = {
        "measured": True, **(info or {}),
        "method": "engine iterations minus kernel-only cost model, NNLS on (1, active layers)",
        "iteration_overhead_s": float(per_iter), "layer_overhead_s": float(per_layer),
        "median_rel_err": float(np.median(np.abs(rel))), "worst_rel_err": float(np.abs(rel).max()),
        "kernel_only_median_rel_err": float(np.median(np.abs(rel0))),
        "plans": [{"plan": label, "active_layers": int(n), "measured_s": float(m),
                   "kernel_only_s": float(k), "predicted_s": float(p), "rel_err": float(e)}
                  for (label, _, m), n, k, p, e in zip(rows, nl, kern, pred, rel, strict=True)],
    }
    return HostFit(float(per_iter), float(per_layer), record)
