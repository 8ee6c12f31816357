"""The calibration pipeline: time the grid, fit each op class and the energy model, write a profile.

Method. Shapes come from calibrate.grid (one model at one TP size), are timed by
calibrate.kernels, and get their FLOPs and bytes from the cost model itself; calibrate.fit then
fits each class's (compute_eff, memory_eff, overhead_s) on all but one shape in k and reports
the error on those held out. On a GPU the preset's datasheet peaks are kept and NVML energy
windows are fitted (calibrate.energy); on the CPU the peaks are measured first (a large matmul,
a DRAM copy) and energy keeps the `cpu` preset's figures. Classes the grid cannot reach
(collectives on one device, experts of a dense model) keep the default profile's parameters.
Last, the engine runs whole iterations of the model and the time its kernels do not explain is
fitted as per-iteration and per-layer host overhead (calibrate.host; skipped, with the reason
in provenance, where the model does not fit on the device).
The profile is written once, atomically, at the end: an interrupted run writes nothing.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calibrate.energy import EnergyWindow, NvmlMeter, fit_energy
from calibrate.fit import OpFit, Sample, fit_op_class
from calibrate.grid import Dims, build_grid, counting_model, grid_summary, quantities
from calibrate.host import measure_host_overhead
from costmodel import OP_CLASSES, EnergyParams, OpParams, Profile, default_profile, load_gpu, load_model
from costmodel.profile import save_profile

ONCE_PER_ITERATION = ("lm_head", "embedding")
Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, label: str) -> None:
    pass


def _rotating(fn: Callable[..., Any], sets: list[Any]) -> Callable[[], None]:
    """fn on the next input set at each call (for energy windows)."""
    state = [0]

    def call() -> None:
        state[0] += 1
        fn(*sets[state[0] % len(sets)])
    return call


def run_calibration(model: str = "qwen3-30b-a3b", tp: int = 1, device: str = "cuda:0",
                    quick: bool = False, out: str | Path | None = None,
                    progress: Progress | None = None, cpu_threads: int = 1) -> Profile:
    """Calibrate `device` ("cpu" or "cuda:N") on shapes of `model` at TP `tp`; write `out`."""
    import torch  # optional dependency: imported on use, so `import calibrate.run` never needs it

    from calibrate import kernels

    progress = progress or _no_progress
    spec = load_model(model)
    cm = counting_model(spec, tp)  # raises ConfigError on a TP the model cannot split by
    dims = Dims.of(spec, tp)
    ctx = kernels.open_device(device, quick, cpu_threads)
    # Attention is timed through the engine's own code, so with the implementation it picks.
    ctx.info["attention"] = kernels.probe_engine_attention(ctx, dims)
    grid = build_grid(spec, tp, ctx.device.type, quick)
    hw = load_gpu(ctx.preset)
    base = default_profile(hw)
    meter = _open_meter(ctx.device.index or 0) if ctx.is_cuda else None
    energy_note = "no NVML on the CPU: energy figures of the 'cpu' preset"
    provenance: dict[str, Any] = {
        "calibrated": True, "device": ctx.name, "device_arg": device,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "python": platform.python_version(), "model": spec.name, "tp": tp, "quick": quick,
        **ctx.info,
    }
    try:
        if spec.is_moe:
            ctx.grouped = kernels.probe_grouped(ctx, dims)
            provenance["expert_gemm_impl"] = ctx.grouped
        peak_flops, bandwidth = hw.peak_flops, hw.hbm_bytes_per_s
        windows: list[EnergyWindow] = []
        if meter is not None:
            provenance.update(meter.info())
            progress(0, len(grid), "idle power")
            try:
                idle_w, idle_window = meter.idle(ctx.sync)
                provenance["idle_power_w"] = idle_w
                windows.append(idle_window)
            except Exception as e:  # NVMLError_NotSupported on boards without the counter
                energy_note = f"NVML energy counter unavailable: {e}"
                meter.close()
                meter = None
        if not ctx.is_cuda:
            progress(0, len(grid), "cpu peaks")
            peak_flops, bandwidth = kernels.measure_cpu_peaks(ctx, quick)
            provenance["measured_peaks"] = {"peak_flops": peak_flops, "hbm_bytes_per_s": bandwidth}

        samples: list[Sample] = []
        for i, shape in enumerate(grid):
            flops, hbm, link, launches = quantities(cm, shape, dims)
            fn, sets = kernels.build(ctx, dims, shape)
            t = kernels.time_kernel(ctx, fn, sets)
            samples.append(Sample(shape.op_class, {"op": shape.op, **shape.params}, flops, hbm, link,
                                  launches, t))
            # Energy on every other shape: ~0.25 s each keeps the full GPU grid within budget.
            if meter is not None and i % 2 == 0:
                windows.append(meter.window(_rotating(fn, sets), ctx.sync, t, flops, hbm))
            del fn, sets  # free this shape's buffers before the next one allocates
            progress(i + 1, len(grid), shape.label())
    finally:
        if meter is not None:
            meter.close()

    holdout = 3 if quick else 4  # coarse grids have fewer shapes per class to spare
    fits: dict[str, OpFit] = {}
    for cls in OP_CLASSES:
        group = [s for s in samples if s.op_class == cls]
        if group:
            p = base.ops[cls]
            # Per-layer ops recur num_layers times an iteration; the LM head and embedding once.
            weights = [1.0 if s.shape["op"] in ONCE_PER_ITERATION else spec.num_layers for s in group]
            fits[cls] = fit_op_class(group, peak_flops, bandwidth, holdout,
                                     init=(p.compute_eff, p.memory_eff, p.overhead_s), weights=weights)
    ops = {c: OpParams(compute_eff=f.compute_eff, memory_eff=f.memory_eff, overhead_s=f.overhead_s)
           for c, f in fits.items()}
    provenance["not_measured"] = [c for c in OP_CLASSES if c not in ops]
    ops = {c: ops.get(c, base.ops[c]) for c in OP_CLASSES}

    energy = base.energy
    if meter is not None:
        try:
            ef = fit_energy(windows)
            energy = EnergyParams(idle_w=ef.idle_w, j_per_flop=ef.j_per_flop,
                                  j_per_hbm_byte=ef.j_per_hbm_byte,
                                  j_per_link_byte=base.energy.j_per_link_byte)
            provenance["energy"] = {"measured": True, "n_windows": ef.n_windows,
                                    "median_rel_err": ef.median_rel_err, "worst_rel_err": ef.worst_rel_err}
        except ValueError as e:
            provenance["energy"] = {"measured": False, "reason": str(e)}
    else:
        provenance["energy"] = {"measured": False, "reason": energy_note}
    provenance["grid"] = {"sizes": {c: sum(s.op_class == c for s in samples) for c in fits},
                          "holdout_every": holdout, "shapes": grid_summary(grid)}
    is_cpu = not ctx.is_cuda
    profile = Profile(
        gpu=ctx.preset,
        peak_flops=peak_flops if is_cpu else None,
        hbm_bytes_per_s=bandwidth if is_cpu else None,
        iteration_overhead_s=0.0, layer_overhead_s=0.0,
        ops=ops, energy=energy, provenance=provenance,
        fit_errors={c: {**f.errors(), "held_out": f.held_out} for c, f in fits.items()},
    )
    # Whole engine iterations, priced by the kernels-only profile above: the rest is host time.
    progress(len(grid), len(grid), "engine iterations (host overhead)")
    host = measure_host_overhead(spec, ctx.device, profile, quick, ctx.sync)
    profile = profile.model_copy(update={
        "provenance": {**provenance, "host_overhead": host.record},
        "iteration_overhead_s": (base.iteration_overhead_s if host.iteration_overhead_s is None
                                 else host.iteration_overhead_s),
        "layer_overhead_s": host.layer_overhead_s or 0.0})
    if out is not None:
        write_profile(profile, out)
    return profile


def _open_meter(index: int) -> NvmlMeter:
    from calibrate.kernels import CalibrationError

    try:
        return NvmlMeter(index)
    except Exception as e:  # pynvml raises its own NVMLError family (no driver, no library)
        raise CalibrationError(f"NVML could not open GPU {index}: {e}") from None


def write_profile(profile: Profile, out: str | Path) -> None:
    """save_profile is atomic; if we are interrupted inside it, also remove its temp file."""
    out = Path(out)
    try:
        save_profile(profile, out)
    except BaseException:
        out.with_name(out.name + ".tmp").unlink(missing_ok=True)
        raise


def format_fit_table(profile: Profile) -> str:
    """Per-class parameters and held-out errors, as printed by `calibrate`."""
    pv = profile.provenance
    head = (f"{pv.get('device', profile.gpu)} ({profile.gpu}), model {pv.get('model')} tp={pv.get('tp')}, "
            f"torch {pv.get('torch_version')}")
    lines = [head, f"{'class':<14}{'compute_eff':>12}{'memory_eff':>11}{'overhead_us':>12}"
                   f"{'n_fit':>6}{'n_held':>7}{'median_err':>11}{'worst_err':>10}"]
    for cls in OP_CLASSES:
        p = profile.ops[cls]
        err = profile.fit_errors.get(cls)
        tail = (f"{err['n_fit']:>6}{err['n_held_out']:>7}{err['median_rel_err']:>10.1%}"
                f"{err['worst_rel_err']:>10.1%}") if err else f"{'':>6}{'':>7}{'(default)':>11}"
        lines.append(f"{cls:<14}{p.compute_eff:>12.3f}{p.memory_eff:>11.3f}{p.overhead_s * 1e6:>12.2f}{tail}")
    e = profile.energy
    en = pv.get("energy", {})
    lines.append(f"energy: idle {e.idle_w:.1f} W, {e.j_per_flop * 1e12:.3f} pJ/FLOP, "
                 f"{e.j_per_hbm_byte * 1e12:.1f} pJ/byte"
                 + (f" (median err {en['median_rel_err']:.1%}, {en['n_windows']} windows)"
                    if en.get("measured") else " (not measured)"))
    host = pv.get("host_overhead", {})
    if host.get("measured"):
        lines.append(f"host overhead: {profile.iteration_overhead_s * 1e6:.0f} us per iteration + "
                     f"{profile.layer_overhead_s * 1e6:.0f} us per active layer, fitted on "
                     f"{len(host['plans'])} engine iterations: median err "
                     f"{host['median_rel_err']:.1%}, worst {host['worst_rel_err']:.1%} "
                     f"(kernels alone: median {host['kernel_only_median_rel_err']:.1%})")
    elif host:
        lines.append(f"host overhead: not measured ({host.get('reason')}); "
                     f"{profile.iteration_overhead_s * 1e6:.0f} us per iteration (default)")
    if profile.peak_flops:
        lines.append(f"measured peaks: {profile.peak_flops / 1e9:.1f} GFLOP/s, "
                     f"{(profile.hbm_bytes_per_s or 0) / 1e9:.1f} GB/s")
    return "\n".join(lines)
