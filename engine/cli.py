"""`layersim validate`: engine vs simulator on one trace, for each policy.

Parses the flags, builds the workload spec, calls engine.validate.validate and prints the
comparison table (or, with --json, the whole report as one JSON object). User errors (bad
flags, unknown model or policy, no torch, no GPU) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from costmodel.errors import ConfigError
from sim.results import MARKER, check_out, layersim_version, results_folder
from traces.errors import TraceError
from traces.workload import WorkloadSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(prog: str = "layersim validate") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, allow_abbrev=False,
                description="Run the real engine and the simulator on the same trace "
                "and compare predicted with measured serving metrics.")
    p.add_argument("--model", default="tiny-moe", help="model preset or config.json (default tiny-moe)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--profile", default=None,
                   help="hardware profile JSON from `calibrate` (default: datasheet figures)")
    p.add_argument("--policies", default="chunked:512,layered",
                   help="comma-separated policies (default chunked:512,layered)")
    p.add_argument("--workload", default="fixed:1024:16", help="workload name or trace file")
    p.add_argument("--rate", type=float, default=None, help="arrival rate, requests/s")
    p.add_argument("--arrival", default="poisson", help="arrival process (default poisson)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--duration", type=float, default=None, help="arrival window in seconds")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap prompt + output tokens (default: the model's context, at most 16384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing-skew", type=float, default=0.0,
                   help="expert popularity skew of the engine's router and of the simulator's model "
                        "(default 0: the near-uniform routing of random router weights)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop each engine run after this many seconds (unfinished are reported)")
    p.add_argument("--out", default=None, help="directory for the tables and validation.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def validate_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error already printed (2)
        return int(e.code or 0)
    prog = parser.prog
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if not policies:
        return _error(prog, "--policies: give at least one policy")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        return _error(prog, f"--device {args.device}: expected cpu or cuda:N")
    try:
        import torch
    except ImportError:
        return _error(prog, "the engine needs torch (pip install 'layersim[cpu]' or 'layersim[gpu]')")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _error(prog, f"--device {args.device}: no CUDA GPU visible to torch {torch.__version__}")
    try:
        check_out(Path(args.out) if args.out else None)  # before any engine work
        from costmodel.model import load_model
        from engine.validate import format_table, validate

        for pol in policies:  # fail on a bad policy name before any engine work
            from policies.registry import make_policy
            make_policy(pol)
        spec = load_model(args.model)
        max_context = args.max_context or min(spec.max_context, 16384)
        wl = WorkloadSpec(args.workload, rate=args.rate, arrival=args.arrival,
                          num_requests=args.num_requests, duration_s=args.duration, seed=args.seed,
                          max_context=max_context)
        log = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))

        def run(out_dir: Path | None) -> dict:  # type: ignore[type-arg]
            return validate(args.model, args.device, args.profile, policies, wl, out_dir,
                            seed=args.seed, time_limit_s=args.time_limit, log=log,
                            routing_skew=args.routing_skew)
        if args.out is None:
            report = run(None)
        else:  # a results folder like every other: whole or nothing, and what produced it
            with results_folder(Path(args.out)) as folder:
                report = run(folder)
                (folder / MARKER).write_text(json.dumps({
                    "layersim_version": layersim_version(),
                    "command": ["layersim", "validate", *(argv or sys.argv[1:])],
                    "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                }, indent=2, sort_keys=True, default=str) + "\n")
    except (ConfigError, TraceError) as e:
        return _error(prog, str(e))
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(format_table(report))
    return 0


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(validate_main())
