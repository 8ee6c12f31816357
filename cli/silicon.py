"""`layersim replay-silicon FILE`: measured serving runs against the simulator's predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from costmodel import ConfigError
from sim.results import check_out, results_folder
from sim.silicon import DEFAULT_PROTOCOL, VLLM_CHUNK, check_protocol, errors, read_rows, replay, summary


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("replay-silicon", allow_abbrev=False,
                       help="simulate measured serving runs and print the error of each",
                       description="Simulate every supported row of a serving-benchmark CSV "
                       "(AIConfigurator's silicon format) with the shipped profile of its GPU and "
                       "compare mean TTFT and TPOT with what was measured.")
    p.add_argument("file", type=Path, help="the CSV (e.g. ../shared/gpu-data/silicon_h100.csv)")
    p.add_argument("--backend", default=None, help="only this backend's rows: vllm, sglang, "
                   "trtllm (default: all)")
    p.add_argument("--gpu", default="h100", help="the GPU the runs used (default: h100)")
    p.add_argument("--profile", default=None, help="a profile file, or 'datasheet' (default: the "
                   "one shipped for --gpu)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL,
                   help="how the runs were measured, which the rows do not record: inferencex "
                   "(InferenceX's recipe: lengths uniform in [int(0.8 L), L], --max-num-seqs = "
                   "clients, no prefix caching, async scheduling) | vllm-random:R (vllm bench "
                   "serve --random-range-ratio R against vLLM's defaults) (default: inferencex)")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.add_argument("--out", type=Path, help="write replay.csv here (a results folder)")
    p.set_defaults(handler=run)


def run(ns: argparse.Namespace) -> int:
    for flag in ("backend", "gpu", "profile", "protocol"):  # empty: a typo (--gpu=), never a choice
        if getattr(ns, flag) is not None and not getattr(ns, flag).strip():
            raise ConfigError(f"--{flag}: empty; give a value or leave the flag out for its default")
    check_out(ns.out)
    check_protocol(ns.protocol)
    replays = replay(read_rows(ns.file), ns.gpu, ns.backend, ns.profile, ns.protocol)
    table = errors(replays)
    skipped: dict[str, int] = {}
    for r in replays:
        if r.skipped is not None:
            skipped[r.skipped] = skipped.get(r.skipped, 0) + 1
    skipped = dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    summaries = {by: summary(table, by) for by in ("backend", "model")}
    if ns.out is not None:
        from reports.silicon import render_page  # plotly: loaded only for --out

        with results_folder(ns.out) as folder:
            table.to_csv(folder / "replay.csv", index=False)
            (folder / "report.html").write_text(
                render_page(table, summaries, skipped, ns.file.name, ns.protocol), encoding="utf-8")
            (folder / "run.json").write_text(json.dumps(
                {"command": ["layersim", *getattr(ns, "argv", [])], "file": str(ns.file),
                 "protocol": ns.protocol}) + "\n")
    if ns.json:
        for r in table.to_dict("records"):
            print(json.dumps(r, sort_keys=True))
        return 0 if len(table) else 1
    cols = ["row", "backend", "model", "isl", "osl", "clients", "tp", "measured_ttft_ms",
            "predicted_ttft_ms", "ttft_err", "measured_tpot_ms", "predicted_tpot_ms", "tpot_err"]
    if len(table):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        for by, frame in summaries.items():
            print(f"\n|error| by {by}:")
            print(frame.to_string(float_format=lambda v: f"{v:.1%}"))
        others = sorted(set(table["backend"]) - {"vllm"})
        if others:
            print(f"\n{', '.join(others)}: simulated with vLLM's scheduler (chunked prefill, "
                  f"{VLLM_CHUNK} tokens); their own schedulers are not modelled and nothing is "
                  "fitted to their rows, so their errors stand apart.")
    print(f"\nsimulated {len(table)} rows with the {ns.protocol} protocol; skipped "
          f"{sum(skipped.values())}:")
    for reason, n in skipped.items():
        print(f"  {n:>4}  {reason}")
    return 0 if len(table) else 1  # nothing compared: not a success
