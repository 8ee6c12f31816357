"""End-to-end time of three commands from the shell, against the start-up targets (issue 15).

Targets: `layersim --help` <= 0.5 s, `layersim explain --decode 8` <= 0.5 s, and `layersim
compare` (the default study, two policies simulated) <= 1 s. Each command runs N times (default
7) after one untimed run (which warms the file cache); printed are the median and the fastest
wall time, and the median CPU time of the child (user + system), which a busy machine inflates
less than wall time. Wall time is what the targets are about.

    python benchmarks/startup.py [N]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {  # arguments -> target wall time, s
    ("--help",): 0.5,
    ("explain", "--decode", "8"): 0.5,
    ("compare",): 1.0,
}


def layersim() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else python -m cli.main."""
    script = Path(sys.executable).parent / "layersim"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, child CPU s) of one run; output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="?", type=int, default=7)
    n = ap.parse_args().runs
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{n} runs per command after one untimed run; wall and child CPU time in seconds")
    base = layersim()
    for args, target in COMMANDS.items():
        cmd = [*base, *args]
        timed(cmd)
        runs = [timed(cmd) for _ in range(n)]
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        verdict = "meets" if wall <= target else "MISSES"
        print(f"layersim {' '.join(args):<22} median {wall:5.2f} s  best {min(w for w, _ in runs):5.2f} s"
              f"  CPU {cpu:5.2f} s  target <= {target:.1f} s: {verdict}")


if __name__ == "__main__":
    main()
