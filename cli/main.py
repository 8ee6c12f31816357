"""`layersim <command>`: parse flags, call the packages, print. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from costmodel.errors import ConfigError
from policies.state import PlanError


class _Parser(argparse.ArgumentParser):
    """Flag mistakes as one line, like every other error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(_fail(self.prog, f"{message} (see {self.prog} --help)"))


def _fail(prog: str, msg: str) -> int:
    # one line whatever the message quotes (an argument typed with a newline in it, say)
    msg = "\\n".join(msg.splitlines())
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _guard(prog: str, fn: Callable[[], int]) -> int:
    """Users see one line for their mistakes, never a traceback."""
    try:
        return fn()
    except (ConfigError, PlanError) as e:
        return _fail(prog, str(e))
    except ValueError as e:  # TraceError and the reports' input errors are ValueErrors
        return _fail(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except BrokenPipeError:  # `layersim ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's flush is quiet
        return 0
    except FileNotFoundError as e:
        return _fail(prog, f"{e.filename}: not found")
    except OSError as e:  # e.g. --out naming a file, or a folder we may not write
        return _fail(prog, f"{e.filename or ''}: {e.strerror or e}")
    except KeyboardInterrupt:  # --out folders appear whole or not at all (sim/results.py)
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _delegate(module: str, func: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        mod = __import__(module, fromlist=[func])
        return int(getattr(mod, func)(argv))
    return run


# Commands implemented in their own packages' cli modules take their raw arguments.
DELEGATED: dict[str, tuple[str, str, str]] = {
    "calibrate": ("calibrate.cli", "main", "fit the cost model to this machine's kernels"),
    "validate": ("engine.cli", "validate_main", "run a trace on the real engine and the simulator"),
    "report": ("reports.cli", "report_main", "turn a results folder into one offline HTML file"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DELEGATED:
        module, func, _ = DELEGATED[args[0]]
        try:
            return _delegate(module, func)(args[1:])
        except ImportError as e:
            return _fail(f"layersim {args[0]}", f"needs an optional dependency: {e.name or e} "
                         "(pip install -e '.[cpu]' or '.[gpu]')")
    from cli import capacity, explain, silicon, simulate

    parser = _Parser(prog="layersim", allow_abbrev=False, description=(
        "Capacity planning and scheduling-policy design for MoE LLM serving."))
    from sim.results import layersim_version

    parser.add_argument("--version", action="version", version=f"layersim {layersim_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    simulate.add_parsers(sub)
    explain.add_parser(sub)
    capacity.add_parser(sub)
    silicon.add_parser(sub)
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    ns = parser.parse_args(args)
    ns.argv = args  # recorded in results folders (sim/results.py)
    if ns.command is None:
        parser.print_help()
        return 0
    return _guard(f"layersim {ns.command}", lambda: int(ns.handler(ns)))


def calibrate_main() -> int:
    """The `calibrate` console script: the same as `layersim calibrate`."""
    return main(["calibrate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
