"""`layersim <command>`: parse flags, call the packages, print. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from costmodel.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """Flag mistakes as one line, like every other error (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(_fail(self.prog, f"{message} (see {self.prog} --help)"))


def _fail(prog: str, msg: str) -> int:
    # one line whatever the message quotes (an argument typed with a newline in it, say)
    msg = "\\n".join(msg.splitlines())
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _plan_error() -> type[Exception]:
    """A policy's illegal plan (core.state.PlanError), looked up when an error is caught: only
    code that imported core.state can raise it, and `explain` and `--help` import no policy."""
    return getattr(sys.modules.get("core.state"), "PlanError", ConfigError)


def _guard(prog: str, fn: Callable[[], int]) -> int:
    """Users see one line for their mistakes, never a traceback."""
    try:
        return fn()
    except (ConfigError, _plan_error()) as e:  # evaluated only once something is raised
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


class _Version(argparse._VersionAction):
    """--version, looked up when asked for (sim.results reads the installed metadata)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from sim.results import layersim_version

        self.version = f"layersim {layersim_version()}"
        super().__call__(parser, namespace, values, option_string)


# Commands of the cli modules: name -> (module, its function that adds the command's parser,
# the help line). Only the command being run is built in full (its module imported, its flags
# added), so `layersim --help` imports none of them; tests/test_startup.py checks that these
# help lines are the ones the modules give.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "simulate": ("cli.simulate", "add_parsers", "simulate one policy on a workload"),
    "compare": ("cli.simulate", "add_parsers",
                "simulate several policies on the same arrivals (bare: the default study)"),
    "explain": ("cli.explain", "add_parser", "price one iteration and show where its time goes"),
    "capacity": ("cli.capacity", "add_parser",
                 "search the highest rate (or fewest GPUs) meeting the SLO"),
    "replay-silicon": ("cli.silicon", "add_parser",
                       "simulate measured serving runs and print the error of each"),
    "search": ("cli.search", "add_parser",
               "the cheapest configuration of a grid that meets the SLO"),
}

# Commands implemented in their own packages' cli modules take their raw arguments.
DELEGATED: dict[str, tuple[str, str, str]] = {
    "calibrate": ("calibrate.cli", "main", "fit the cost model to this machine's kernels"),
    "validate": ("engine.cli", "validate_main", "run a trace on the real engine and the simulator"),
    "report": ("reports.cli", "report_main", "turn a results folder into one offline HTML file"),
}


def add_commands(sub: argparse._SubParsersAction, command: str | None) -> None:  # type: ignore[type-arg]
    """Every command, `command` (the one given, if any) built by its module and the others
    by name and help line only (enough for `layersim --help` and for argparse's errors)."""
    module, add, _ = COMMANDS.get(command or "", ("", "", ""))
    if module:
        getattr(importlib.import_module(module), add)(sub)
    for name, (other, _, help_text) in COMMANDS.items():
        if other != module:
            sub.add_parser(name, help=help_text)
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DELEGATED:
        module, func, _ = DELEGATED[args[0]]
        try:
            return _delegate(module, func)(args[1:])
        except ImportError as e:
            return _fail(f"layersim {args[0]}", f"needs an optional dependency: {e.name or e} "
                         "(pip install -e '.[cpu]' or '.[gpu]')")
    parser = _Parser(prog="layersim", allow_abbrev=False, description=(
        "Capacity planning and scheduling-policy design for MoE LLM serving."))
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub, next((a for a in args if not a.startswith("-")), None))
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
