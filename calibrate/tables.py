"""`calibrate --from-tables DIR --gpu GPU`: a profile from published per-kernel tables.

The tables (AIConfigurator's collector output, one folder per GPU, framework and version:
`<gpu>_sxm/<op>/<framework>/<version>/*.parquet`) are read into the cost model's table format
(costmodel/kernel_tables.py): dense GEMMs, vLLM's fused MoE layer, FlashAttention prefill and
decode, vLLM's all-reduce and NCCL's all-to-all. Each class's error is measured on held-out
shapes (see `held_out_errors`) before the whole table is stored in the profile; energy comes
from the NVML power columns where a table has them (calibrate/power_fit.py).

Choices the data forces, stated once:
- latency is in ms in the tables, seconds in the profile;
- GEMMs: bf16 and per-tensor fp8 (`fp8`, as fp8 Llama checkpoints run); MoE: bf16,
  block-scaled fp8 (`fp8_block`, as fp8 Qwen3 and DeepSeek checkpoints run) and GPT-OSS's MXFP4
  (`w4a16_mxfp4`); other recipes (per-tensor fp8 MoE, int4) are left out;
- attention: full-attention and sliding-window rows (`window` a key); FA4 rows are left out on
  Hopper where FA3 is what vLLM runs; decode context is `step + 1` keys;
- collectives: `message_size` counts 2-byte (half / bf16) elements, not bytes as the data's
  README says (NCCL's half row at X elements matches its int8 row at 2X);
- all-reduce: per message size the faster of vLLM's custom all-reduce (CUDA-graph variant) and
  NCCL, since vLLM picks between them by size;
- collectives: a message can always be padded to a larger one, so latency cannot fall as the
  message grows; a reading above that of a larger message is noise (NCCL's small-message rows
  show isolated 2-3x spikes) and is replaced by it (the running minimum from the largest down).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from calibrate.power_fit import fit_energy
from costmodel import ConfigError, EnergyParams, Profile, default_profile, load_gpu
from costmodel.held_out import held_out_errors, held_out_mask
from costmodel.kernel_tables import SPECS, Hardware, KernelTable, Roofline

GPU_FOLDERS = {"h100": "h100_sxm", "h200": "h200_sxm", "a100": "a100_sxm"}
LICENSE = ("Apache-2.0; measured by NVIDIA's AIConfigurator collector (github.com/ai-dynamo/"
           "aiconfigurator, snapshot 2026-08-21); see costmodel/presets/profiles/NOTICE")
# layersim's fp8 experts are the block-scaled kind (Qwen3-FP8, DeepSeek checkpoints, which vLLM
# runs with its block-scaled fused MoE); the per-tensor ModelOpt rows are another recipe
MOE_DTYPES = {"bfloat16": "bfloat16", "fp8_block": "fp8", "w4a16_mxfp4": "mxfp4"}
TARGET_MEDIAN, TARGET_P90 = 0.05, 0.15


def _version_dir(root: Path, gpu_dir: str, op: str, framework: str, version: str | None) -> Path:
    base = root / gpu_dir / op / framework
    if not base.is_dir():
        raise ConfigError(f"--from-tables {root}: no folder {base.relative_to(root)}")
    versions = sorted((p.name for p in base.iterdir() if p.is_dir()),
                      key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
    if version is not None:
        if version not in versions:
            raise ConfigError(f"--framework-version {version}: {base.relative_to(root)} has "
                              f"{', '.join(versions)}")
        return base / version
    return base / versions[-1]


def _comm_version(root: Path, gdir: str, version: str | None) -> str | None:
    """vLLM's all-reduce tables exist for fewer versions than its kernels: the asked one, else
    the newest there."""
    base = root / gdir / "comm" / "vllm"
    return version if version is not None and (base / version).is_dir() else None


def _source(root: Path, path: Path, rows: int) -> dict[str, Any]:
    rel = path.relative_to(root)
    return {"file": str(rel), "framework": rel.parts[2], "version": rel.parts[3], "rows": rows}


def _table(op_class: str, frame: pd.DataFrame, sources: list[dict[str, Any]]) -> KernelTable:
    spec = SPECS[op_class]
    cols = [*spec.keys, *spec.axes, spec.x]
    columns = {c: frame[c].to_numpy() for c in cols}
    for c in cols:  # numeric axes as floats, keys as their own type
        if c in spec.axes or c == spec.x:
            columns[c] = columns[c].astype(float)
    latency = frame["latency"].to_numpy(dtype=float) / 1e3
    return KernelTable(spec, columns, latency, {"tables": sources, "license": LICENSE})


def read_tables(root: Path, gpu: str, version: str | None = None) -> dict[str, KernelTable]:
    gdir = GPU_FOLDERS[gpu]
    out: dict[str, KernelTable] = {}
    vdir = _version_dir(root, gdir, "gemm", "vllm", version)
    g = pd.read_parquet(vdir / "gemm_perf.parquet")
    g = g[g.gemm_dtype.isin(["bfloat16", "fp8"])].rename(columns={"gemm_dtype": "dtype"})
    out["dense_gemm"] = _table("dense_gemm", g, [_source(root, vdir / "gemm_perf.parquet", len(g))])

    vdir = _version_dir(root, gdir, "moe", "vllm", version)
    m = pd.read_parquet(vdir / "moe_perf.parquet")
    m = m[m.moe_dtype.isin(list(MOE_DTYPES))].copy()
    m["dtype"] = m.moe_dtype.map(MOE_DTYPES)
    m = m.rename(columns={"hidden_size": "hidden", "inter_size": "inter"})
    m["inter_per_gpu"] = m.inter / m.moe_tp_size
    m["experts_per_gpu"] = m.num_experts / m.moe_ep_size
    out["expert_gemm"] = _table("expert_gemm", m, [_source(root, vdir / "moe_perf.parquet", len(m))])

    vdir = _version_dir(root, gdir, "attention", "vllm", version)
    for name, cls, x in (("context", "prefill_attn", "isl"), ("generation", "decode_attn", "step")):
        path = vdir / f"{name}_attention_perf.parquet"
        a = pd.read_parquet(path)
        a = a if "window_size" in a else a.assign(window_size=0)
        a = a[a.kernel_source != "vllm_flash_attn_fa4"].rename(columns={"window_size": "window"})
        a = a.rename(columns={"kv_cache_dtype": "kv_dtype", "batch_size": "batch",
                              "num_key_value_heads": "num_kv_heads"})
        if x == "step":
            a = a.assign(context=a.step + 1)
        out[cls] = _table(cls, a, [_source(root, path, len(a))])

    ndir = _version_dir(root, gdir, "comm", "nccl", None)
    nccl = pd.read_parquet(ndir / "nccl_perf.parquet")
    nccl = nccl[nccl.nccl_dtype == "half"]
    nccl = nccl.assign(message_bytes=nccl.message_size * 2)  # message_size counts 2-byte elements
    cdir = _version_dir(root, gdir, "comm", "vllm", _comm_version(root, gdir, version))
    custom = pd.read_parquet(cdir / "custom_allreduce_perf.parquet")
    custom = custom[custom.backend == "vllm_graph"]
    custom = custom.assign(message_bytes=custom.message_size * 2)  # bf16 elements
    ar = pd.concat([nccl[nccl.op_name == "all_reduce"][["num_gpus", "message_bytes", "latency"]],
                    custom[["num_gpus", "message_bytes", "latency"]]])
    ar = _monotone(ar.groupby(["num_gpus", "message_bytes"], as_index=False).latency.min())
    out["allreduce"] = _table("allreduce", ar, [
        _source(root, ndir / "nccl_perf.parquet", int((nccl.op_name == "all_reduce").sum())),
        _source(root, cdir / "custom_allreduce_perf.parquet", len(custom))])
    a2a = _monotone(nccl[nccl.op_name == "alltoall"][["num_gpus", "message_bytes", "latency"]])
    out["alltoall"] = _table("alltoall", a2a, [_source(root, ndir / "nccl_perf.parquet", len(a2a))])
    return out


def fit_roofline(table: KernelTable, hw: Hardware, rows: np.ndarray) -> Roofline:
    """Efficiencies and launch cost minimising the squared log error on `rows`.

    The fitted roofline is what the interpolation normalises by (a smoother ratio to
    interpolate) and what prices shapes outside the measured grid."""
    from scipy.optimize import least_squares

    work = table.spec.work({k: v[rows] for k, v in table.columns.items()})
    t = table.latency_s[rows]

    def resid(p: np.ndarray) -> np.ndarray:
        r = Roofline(*np.exp(p)).time_s(work, hw)
        return np.asarray(np.log(r / t))

    start = np.log([0.5, 0.5, 5e-6])
    lo, hi = np.log([1e-3, 1e-3, 1e-7]), np.log([1.5, 1.5, 1e-3])
    fit = least_squares(resid, start, bounds=(lo, hi))
    ce, me, o = np.exp(fit.x)
    return Roofline(float(f"{ce:.4g}"), float(f"{me:.4g}"), float(f"{o:.4g}"))


def _check(table: KernelTable, hw: Hardware) -> tuple[KernelTable, dict[str, Any]]:
    """Held-out error with a roofline fitted without the held-out rows; then refit on all."""
    held = held_out_mask(table)
    errors = held_out_errors(table.with_roofline(fit_roofline(table, hw, ~held)), hw)
    return table.with_roofline(fit_roofline(table, hw, np.ones(len(table), dtype=bool))), errors


def _monotone(frame: pd.DataFrame) -> pd.DataFrame:
    """Latency non-decreasing in message size per GPU count (see the module's notes)."""
    frame = frame.sort_values(["num_gpus", "message_bytes"], ascending=[True, False]).copy()
    frame["latency"] = frame.groupby("num_gpus").latency.cummin()
    return frame.sort_values(["num_gpus", "message_bytes"]).reset_index(drop=True)


def profile_from_tables(root: Path, gpu: str, version: str | None = None,
                        today: dt.date | None = None) -> Profile:
    """Read, check on held-out shapes, and store every class's table in a profile."""
    if gpu not in GPU_FOLDERS:
        raise ConfigError(f"--gpu {gpu}: tables exist for {', '.join(GPU_FOLDERS)}")
    if not root.is_dir():
        raise ConfigError(f"--from-tables {root}: not a folder")
    spec = load_gpu(gpu)
    hw = Hardware(spec.peak_flops, spec.hbm_bytes_per_s, spec.link_bytes_per_s)
    tables, errors = {}, {}
    for cls, raw in read_tables(root, gpu, version).items():
        tables[cls], errors[cls] = _check(raw, hw)
    base = default_profile(spec)
    energy, energy_note = _energy(root, gpu, base.energy)
    versions = sorted({f"{s['framework']} {s['version']}" for t in tables.values()
                       for s in t.source["tables"]})
    return base.model_copy(update={
        "tables": {cls: t.to_json() for cls, t in tables.items()},
        "energy": energy,
        "fit_errors": {**errors, "energy": energy_note,
                       "targets": {"median_rel_err": TARGET_MEDIAN, "p90_rel_err": TARGET_P90}},
        "provenance": {
            "calibrated": True,
            "source": f"measured kernel tables ({', '.join(versions)}) for {gpu}",
            "kind": "measured-kernel tables",
            "framework_versions": versions,
            "date": (today or dt.date.today()).isoformat(),
            "license": LICENSE,
            "priced_by": {cls: "table" for cls in tables} | {"elementwise": "datasheet roofline (guess)"},
            "iteration_overhead_s": "datasheet guess, not measured: kernel tables hold no engine time",
        },
    })


def _power_version(gpu_dir: Path) -> str | None:
    """The newest framework version whose GEMM table has NVML power readings."""
    for path in sorted(gpu_dir.glob("gemm/vllm/*/gemm_perf.parquet"), reverse=True):
        if "power" in pq.read_schema(path).names:
            return path.parent.name
    return None


# H100 and H200 are one chip (GH100) at one 700 W limit; only their HBM differs (HBM3 vs HBM3e).
ENERGY_DONOR = {"h100": "h200"}


def _energy(root: Path, gpu: str, datasheet: EnergyParams) -> tuple[EnergyParams, dict[str, Any]]:
    """Energy from NVML power where the tables have it, else from a sibling GPU's, else a guess."""
    donor = gpu if _power_version(root / GPU_FOLDERS[gpu]) else ENERGY_DONOR.get(gpu)
    version = _power_version(root / GPU_FOLDERS[donor]) if donor else None
    if donor is None or version is None:
        return datasheet, {"source": "datasheet guess: no power measurements for this GPU"}
    fit = fit_energy(root, GPU_FOLDERS[donor], version)
    energy = EnergyParams(idle_w=round(fit["near_idle_w"], 1), busy_w=round(fit["idle_w"], 1),
                          j_per_flop=float(f"{fit['j_per_flop']:.4g}"),
                          j_per_hbm_byte=float(f"{fit['j_per_hbm_byte']:.4g}"),
                          j_per_link_byte=datasheet.j_per_link_byte)
    how = "fitted to NVML power" if donor == gpu else (
        f"fitted to {donor.upper()} NVML power, transferred (same GH100 chip and 700 W limit; "
        f"not measured on {gpu.upper()})")
    return energy, {
        "source": f"{how}: {GPU_FOLDERS[donor]} vllm {version}",
        "held_out": fit["held_out"], "fit_rows": fit["fit_rows"],
        "min_latency_ms": fit["min_latency_ms"], "tables": fit["source"],
        "idle_w": "the lowest readings (loops of ~10 us kernels, GPU mostly waiting)",
        "busy_w": "the fit's intercept: static power while kernels run",
        "j_per_link_byte": "datasheet guess (no link power measured)"}


def summary(profile: Profile) -> str:
    """One line per class: held-out error against the targets."""
    lines = []
    for cls, e in profile.fit_errors.items():
        if not isinstance(e, dict) or "median_rel_err" not in e or cls == "targets":
            continue
        ok = e["median_rel_err"] <= TARGET_MEDIAN and e["p90_rel_err"] <= TARGET_P90
        lines.append(f"  {cls:<13} held-out median {e['median_rel_err']:6.1%}  p90 "
                     f"{e['p90_rel_err']:6.1%}  ({e['held_out_rows']} of {e['rows']} rows, by "
                     f"{e['held_out_axis']}){'' if ok else '  ABOVE TARGET'}")
    return "\n".join(lines)




# Models whose vLLM runs fit the engine overhead (split by model, not at random): the dense one,
# whose kernels carry no routing assumption; every other model's runs are held out.
OVERHEAD_FIT_MODELS = ("meta-llama/Llama-3.1-70B",)


def with_engine_overhead(profile: Profile, silicon_csv: Path,
                         fit_models: tuple[str, ...] = OVERHEAD_FIT_MODELS) -> Profile:
    """Fit iteration and per-request engine overhead to measured vLLM serving runs
    (sim/silicon.py), and record the error on the runs of the other models."""
    import tempfile

    from costmodel import save_profile
    from costmodel.profile import forget_profile_files
    from sim.silicon import DEFAULT_PROTOCOL, errors, fit_overhead, read_rows, replay

    frame = read_rows(silicon_csv)
    frame = frame[frame.backend == "vllm"]
    fit_rows = frame[frame.model_path.isin(fit_models)]
    held_rows = frame[~frame.model_path.isin(fit_models)]
    bare = profile.model_copy(update={"iteration_overhead_s": 0.0, "request_overhead_s": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bare.json.gz"
        save_profile(bare, path)
        fitted = replay(fit_rows, profile.gpu, "vllm", str(path))
        iteration_s, request_s = fit_overhead(fitted)
        tuned = profile.model_copy(update={"iteration_overhead_s": round(iteration_s, 7),
                                           "request_overhead_s": round(request_s, 8)})
        path = Path(tmp) / "tuned.json.gz"
        save_profile(tuned, path)
        held = errors(replay(held_rows, profile.gpu, "vllm", str(path)))
        fit_err = errors(replay(fit_rows, profile.gpu, "vllm", str(path)))
    forget_profile_files()  # the two temporary profiles, read once each (~85 MB apiece)

    def stats(t: pd.DataFrame) -> dict[str, Any]:
        if not len(t):
            return {"rows": 0}
        return {"rows": len(t), "models": sorted(set(t.model)),
                "ttft_median_abs_err": float(t.ttft_err.abs().median()),
                "ttft_p90_abs_err": float(t.ttft_err.abs().quantile(0.9)),
                "tpot_median_abs_err": float(t.tpot_err.abs().median()),
                "tpot_p90_abs_err": float(t.tpot_err.abs().quantile(0.9))}

    provenance = {**profile.provenance, "iteration_overhead_s": (
        f"fitted with request_overhead_s (2 parameters) to the mean TPOT of {len(fit_err)} vLLM "
        f"serving runs of {', '.join(fit_models)} in {silicon_csv.name}, replayed with the "
        f"'{DEFAULT_PROTOCOL}' protocol (sim/silicon.py)")}
    return tuned.model_copy(update={"provenance": provenance, "fit_errors": {
        **profile.fit_errors, "engine_overhead": {"fit": stats(fit_err), "held_out": stats(held),
                                                  "file": silicon_csv.name,
                                                  "protocol": DEFAULT_PROTOCOL}}})


def engine_overhead_from(profile: Profile, donor: Profile) -> Profile:
    """The donor's fitted engine overhead, said to be transferred (not fitted on this GPU)."""
    fitted = donor.fit_errors.get("engine_overhead")
    if not fitted:
        raise ConfigError("--engine-overhead-from: that profile has no fitted engine overhead")
    how = donor.provenance.get("iteration_overhead_s", "")
    return profile.model_copy(update={
        "iteration_overhead_s": donor.iteration_overhead_s,
        "request_overhead_s": donor.request_overhead_s,
        "provenance": {**profile.provenance, "iteration_overhead_s":
                       f"transferred from the {donor.gpu} profile, where it was {how}"},
        "fit_errors": {**profile.fit_errors, "engine_overhead": {
            **fitted, "transferred_from": donor.gpu}}})
