"""`calibrate` / `layersim calibrate`: parse flags, run the pipeline with a progress bar, print the fit.

Method. Everything optional (torch, pynvml, a GPU) is checked at run time and reported as one
line `calibrate: error: ...` with exit status 2, never a traceback; Ctrl-C exits 130 with no
profile written (the file is only written, atomically, once the fit is done).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from costmodel import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser(prog: str = "calibrate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Time every operation class the cost model prices on this device "
        "and fit a hardware profile (JSON) for `layersim --profile`.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="N|NAME", help="CUDA device index (default: 0); with "
                       "--from-tables, the GPU whose tables to fit: h100, h200 or a100")
    where.add_argument("--device", metavar="DEV", help="'cpu' or 'cuda:N'")
    p.add_argument("--model", default="qwen3-30b-a3b", help="model preset or config.json whose "
                   "shapes make the grid (default: qwen3-30b-a3b)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: shapes are those of one "
                   "GPU of the group (default: 1)")
    p.add_argument("--quick", action="store_true", help="a coarse grid (minutes become seconds)")
    p.add_argument("--out", metavar="FILE", help="profile to write (default: profile-<gpu|cpu>.json)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads with --device "
                   "cpu (default: 1, the reproducible choice on shared machines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-tables", metavar="DIR", help="fit to published per-kernel tables "
                   "(the kernels/ folder of shared/gpu-data) instead of timing this machine")
    p.add_argument("--framework-version", metavar="V", help="with --from-tables: the vLLM "
                   "version whose tables to read (default: the newest there)")
    p.add_argument("--engine-overhead-from", metavar="PROFILE", help="with --from-tables: take "
                   "the serving engine's overhead fitted in another GPU's profile (the engine's "
                   "host time does not depend on the GPU's kernels)")
    p.add_argument("--silicon", metavar="CSV", help="with --from-tables: fit the serving engine's "
                   "overhead to these measured vLLM runs (AIConfigurator silicon format) and hold "
                   "out every model but Llama-3.1-70B to report its error")
    return p


def _from_tables(args: argparse.Namespace, fail: Callable[[str], int]) -> int:
    """No torch: read the tables, check each class on held-out shapes, write the profile."""
    from pathlib import Path

    from calibrate.tables import GPU_FOLDERS, profile_from_tables, summary
    from costmodel import save_profile

    if args.gpu not in GPU_FOLDERS:
        return fail(f"--gpu {args.gpu}: with --from-tables give one of {', '.join(GPU_FOLDERS)}")
    out = Path(args.out or f"profile-{args.gpu}.json")
    if not out.parent.is_dir():  # checked before the work, not after
        return fail(f"--out {out}: folder {out.parent} does not exist")
    try:
        profile = profile_from_tables(Path(args.from_tables), args.gpu, args.framework_version)
        if args.silicon:
            from calibrate.tables import with_engine_overhead

            profile = with_engine_overhead(profile, Path(args.silicon))
        if args.engine_overhead_from:
            from calibrate.tables import engine_overhead_from
            from costmodel import load_profile

            profile = engine_overhead_from(profile, load_profile(args.engine_overhead_from))
    except ConfigError as e:
        return fail(str(e))
    except (OSError, ValueError, KeyError) as e:  # a damaged or foreign table
        return fail(f"--from-tables {args.from_tables}: {type(e).__name__}: {e}")
    save_profile(profile, out)
    print(f"{profile.provenance['source']}\nheld-out relative error per class "
          f"(targets: median <= 5%, p90 <= 15%):\n{summary(profile)}")
    energy = profile.fit_errors.get("energy", {})
    held = energy.get("held_out")
    err = (f"; held-out power error median {held['median_rel_err']:.0%}, p90 {held['p90_rel_err']:.0%}"
           if held else "")
    e = profile.energy
    busy = f"{e.busy_w:.0f} W busy, " if e.busy_w is not None else ""
    print(f"energy: {energy.get('source', 'datasheet guess')}{err}\n        {busy}{e.idle_w:.0f} W "
          f"idle, {e.j_per_flop * 1e12:.2f} pJ/FLOP, {e.j_per_hbm_byte * 1e12:.0f} pJ/HBM byte")
    engine = profile.fit_errors.get("engine_overhead")
    if engine:
        held = engine["held_out"]
        print(f"engine overhead: {profile.iteration_overhead_s * 1e6:.1f} us per iteration + "
              f"{profile.request_overhead_s * 1e6:.2f} us per request, fitted on "
              f"{engine['fit']['rows']} vLLM runs ({', '.join(engine['fit'].get('models', []))}); "
              f"held out {held['rows']} runs: |error| TTFT median "
              f"{held.get('ttft_median_abs_err', float('nan')):.0%} p90 "
              f"{held.get('ttft_p90_abs_err', float('nan')):.0%}, TPOT median "
              f"{held.get('tpot_median_abs_err', float('nan')):.0%} p90 "
              f"{held.get('tpot_p90_abs_err', float('nan')):.0%}")
    print(f"wrote {out}")
    return 0


def _bar(enabled: bool) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """Progress created on the first report, when the grid size is known (sim/progress.py)."""
    from sim.progress import Progress

    state: dict[str, Progress] = {}

    def report(done: int, total: int, label: str) -> None:
        if not enabled:
            return
        if "bar" not in state:
            state["bar"] = Progress(total, "calibrating", "shape")
        state["bar"].update(done, label)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()
    return report, close


def main(argv: list[str] | None = None, prog: str = "calibrate") -> int:
    args = build_parser(prog).parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    if args.from_tables is not None:
        return _from_tables(args, fail)
    if args.framework_version is not None:
        return fail("--framework-version needs --from-tables")
    if args.gpu is not None and not str(args.gpu).isdigit():
        return fail(f"--gpu {args.gpu}: a CUDA device index (a GPU name needs --from-tables)")
    device = args.device or f"cuda:{args.gpu if args.gpu is not None else 0}"
    if args.tp < 1 or args.threads < 1:
        return fail(f"--tp and --threads must be >= 1, got {args.tp} and {args.threads}")
    try:
        import torch  # noqa: F401  (checked here so that a missing torch is one line)
    except ImportError:
        return fail("calibration needs torch: pip install 'layersim[cpu]' (or 'layersim[gpu]')")
    from calibrate.run import format_fit_table, run_calibration

    out = args.out
    if out is None:
        out = f"profile-{_device_tag(device)}.json"
    from pathlib import Path

    if not Path(out).parent.is_dir():  # before the run, not after it
        return fail(f"--out {out}: folder {Path(out).parent} does not exist")
    report, close = _bar(not args.no_progress)
    try:
        profile = run_calibration(args.model, args.tp, device, args.quick, out, report,
                                  cpu_threads=args.threads)
    except ConfigError as e:
        close()
        return fail(str(e))
    except KeyboardInterrupt:
        close()
        print(f"{prog}: interrupted; no profile written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError) as e:  # CUDA out of memory, NVML failures, unwritable --out
        close()
        return fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    close()
    print(format_fit_table(profile))
    print(f"wrote {out}")
    return 0


def _device_tag(device: str) -> str:
    """'cpu', or the GPU's preset name when torch can see it (profile-h200.json)."""
    if device == "cpu":
        return "cpu"
    try:
        import torch

        from calibrate.kernels import GPU_PRESETS
        index = int(device.partition(":")[2] or 0)
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            name = torch.cuda.get_device_name(index).upper()
            return next((p for key, p in GPU_PRESETS if key in name), f"cuda{index}")
    except (ImportError, ValueError, RuntimeError):
        pass
    return "gpu"


if __name__ == "__main__":
    sys.exit(main())
