"""`layersim search STUDY.yaml`: the cheapest configuration of a grid that meets the SLO."""

from __future__ import annotations

import argparse
from typing import Any

from cli.flags import add_study_flags, study_values
from costmodel import ConfigError
from search import session
from search.grid import AXES

_NULLS = ("null", "none")


def _list(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        items = [s.strip() for s in text.split(",")]
        return [None if s.lower() in _NULLS else kind(s) for s in items]
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def _mapping_or(kind: type) -> Any:
    """'2.5' (every GPU type) or 'h100=2.5,h200=3.1' (per type)."""
    def parse(text: str) -> Any:
        if "=" not in text:
            return kind(text)
        pairs = [p.split("=", 1) for p in text.split(",")]
        keys = [k.strip().lower() for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a GPU type given twice")
        return {k.strip(): kind(v.strip()) for k, v in pairs}
    parse.__name__ = f"{kind.__name__} or GPU={kind.__name__},..."
    return parse


_AXIS_HELP = {"gpu": "GPU types", "tp": "tensor-parallel sizes", "ep": "expert-parallel sizes",
              "replicas": "replicas per probed fleet", "policies": "policy specs with their "
              "parameter (chunked:512, layered:8, adaptive:60, ...)", "max_num_seqs": "vLLM "
              "max_num_seqs values (null: the policy's own)", "dtype": "weight data types",
              "expert_dtype": "expert data types", "kv_cache_dtype": "KV cache data types",
              "decode_tp": "decode workers' tensor-parallel sizes (with --split-pools; null: --tp)"}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("search", allow_abbrev=False, conflict_handler="resolve",
                       help="the cheapest configuration of a grid that meets the SLO",
                       description="Bisect the highest rate per replica meeting the SLO for every "
                       "configuration of the grid (study key search:, or the list flags below), "
                       "per seed, and rank them by cost at the conservative end of a Student-t "
                       "interval over seeds; with --split-pools and --target-rate, find each "
                       "configuration's cheapest prefill/decode split at that rate instead. "
                       "Configurations that cannot run are pruned with the reason. Finished "
                       "probes are kept in a store: a rerun skips them.")
    add_study_flags(p, capacity=True)
    for axis in AXES:  # replace the study's one-value flags: a grid axis takes a list
        kind = int if axis in ("tp", "ep", "replicas", "max_num_seqs", "decode_tp") else str
        p.add_argument(f"--{axis.replace('_', '-')}", dest=f"grid_{axis}", type=_list(kind),
                       metavar="A,B,...", help=f"grid axis: {_AXIS_HELP[axis]} (search.{axis}; "
                       "default: the study's own value)")
    p.add_argument("--price-per-gpu-hour", dest="grid_price_per_gpu_hour", type=_mapping_or(float),
                   metavar="PRICE|GPU=PRICE,...", help="dollars per GPU-hour, one for all or per "
                   "GPU type (search.price_per_gpu_hour; default: none, ranked by GPUs)")
    p.add_argument("--profile", dest="grid_profile", metavar="FILE|GPU=FILE,...",
                   help="hardware profile: one file, or one per GPU type (search.profile; "
                   "default: the profile shipped for each GPU)")
    settings: tuple[tuple[str, Any, str], ...] = (
        ("target_rate", float, "total req/s to size the fleet for (GPUs, cost); default: one "
                               "probed fleet at its capacity"),
        ("seeds", int, "seeds per configuration (seed, seed+1, ...); K > 1 gives a Student-t "
                       "interval over the per-seed capacities, ranked at its lower end (default 1)"),
        ("confidence", float, "two-sided level of that interval (default 0.9)"),
        ("rel_tol", float, "bisection stops when the passing rate is within this of a failing "
                           "one (default 0.05)"),
        ("max_probes", int, "most probes per configuration and seed (default 12)"),
        ("jobs", int, "local pool processes (0: in this process; default: the CPUs)"),
        ("ray_address", str, "run the probes on this existing Ray cluster"),
        ("store", str, "probe store folder (default: ~/.cache/layersim/search)"))
    for key, kind, text in settings:
        p.add_argument(f"--{key.replace('_', '-')}", dest=f"grid_{key}", type=kind,
                       metavar=key.upper(), help=f"{text} (search.{key})")
    p.add_argument("--ray", dest="grid_ray", action="store_true", default=None,
                   help="run the probes on a local Ray instance (pip install 'layersim[ray]'; "
                   "search.ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=run, single=False)


def run(ns: argparse.Namespace) -> int:
    for flag in ("save_result", "check"):
        if getattr(ns, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')}: not an option of layersim search")
    grid = {k.removeprefix("grid_"): v for k, v in vars(ns).items()
            if k.startswith("grid_") and v is not None}
    price = grid.get("price_per_gpu_hour")
    flags = study_values(ns)
    profile = grid.pop("profile", None)
    if profile is not None:  # one file: the study's --profile; GPU=FILE pairs: the grid's
        if "=" in profile:
            grid["profile"] = _mapping_or(str)(profile)
        else:
            flags["profile"] = profile
    if isinstance(price, float):  # one price: the study's own key, as capacity takes it
        flags["price_per_gpu_hour"] = grid.pop("price_per_gpu_hour")
    return session.run(ns.study, flags, grid, out=ns.out, as_json=ns.json,
                       progress=not ns.no_progress, command=getattr(ns, "argv", []))


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.search ...`: the command on its own (as `layersim search ...`)."""
    import sys

    parser = argparse.ArgumentParser(prog="layersim", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = ["search", *(sys.argv[1:] if argv is None else argv)]
    ns = parser.parse_args(args)
    ns.argv = args
    try:
        return int(ns.handler(ns))
    except ConfigError as e:
        print(f"layersim search: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
