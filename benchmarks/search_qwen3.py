"""The README's worked searches: examples/search_qwen3.yaml (or --study, e.g.
examples/search_split.yaml) on the local process pool, timed.

Runs `layersim search` (python -m cli.search until cli/main.py registers it) with a fresh probe
store, so that every probe is simulated and the wall time is the whole search, and writes the
command's full output to benchmarks/results/search_qwen3.log under a header line: date, machine,
commit and load. Usage: python benchmarks/search_qwen3.py [--study FILE --log FILE] [--jobs N]
[--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "development machine, 2-core AMD EPYC VM, CPU only"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=None, help="pool processes (default: the CPUs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results folder here")
    ap.add_argument("--study", default="examples/search_qwen3.yaml")
    ap.add_argument("--log", type=Path, default=ROOT / "benchmarks" / "results" / "search_qwen3.log")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as store:
        cmd = ["layersim", "search", args.study, "--store", store, "--no-progress"]
        if args.jobs is not None:
            cmd += ["--jobs", str(args.jobs)]
        if args.out is not None:
            cmd += ["--out", str(args.out)]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cli.search", *cmd[2:]], cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.monotonic() - start
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = f"load average before {load_before:.2f}"
    shown = " ".join(c if c != store else "FRESH_STORE" for c in cmd)
    log = (f"# {date}, {MACHINE}, commit {commit}, {load}\n$ {shown}\n{proc.stdout}{proc.stderr}"
           f"# wall time {wall:.0f} s including start-up (exit status {proc.returncode})\n")
    args.log.write_text(log)
    print(log, end="")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
