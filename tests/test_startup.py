"""Start-up: what each command imports (no timing here; benchmarks/startup.py times them).

`layersim --help` builds only the top-level parser and imports none of the heavy libraries;
`explain` prices with numpy and pydantic but loads no pandas, SimPy or scipy; `compare`
simulates without scipy, plotly or PyYAML. Each check runs in a fresh interpreter, since this
test process has long imported everything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "pandas", "pyarrow", "plotly", "simpy", "numpy", "pydantic", "yaml", "tqdm",
         "torch")


def loaded_after(argv: list[str]) -> set[str]:
    """The top-level packages of HEAVY that `layersim ARGV` leaves in sys.modules."""
    code = f"""
import contextlib, io, json, sys
from cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main({argv!r})
    except SystemExit as e:
        code = e.code
heavy = {HEAVY!r}
print(json.dumps([code, sorted({{m.split('.')[0] for m in sys.modules}} & set(heavy))]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    code, loaded = json.loads(out.splitlines()[-1])
    assert code in (0, None), (argv, out)
    return set(loaded)


@pytest.mark.parametrize("argv", [["--help"], [], ["--version"]])
def test_help_and_version_import_nothing_heavy(argv):
    assert loaded_after(argv) == set()


def test_explain_prices_without_pandas_simpy_or_scipy():
    assert loaded_after(["explain", "--decode", "8"]) <= {"numpy", "pydantic"}


def test_compare_runs_without_scipy_plotly_or_yaml():
    loaded = loaded_after(["compare", "--num-requests", "3", "--policies", "chunked:512"])
    assert not loaded & {"scipy", "plotly", "yaml", "torch"}, loaded


@pytest.mark.parametrize("package", ["costmodel", "traces"])
def test_lazy_packages_export_every_name(package):
    """Each name of __all__ loads from its submodule, and nothing else is an attribute."""
    mod = importlib.import_module(package)
    home = {name: module for module, names in mod._MODULES.items() for name in names}
    assert sorted(home) == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is getattr(importlib.import_module(home[name]), name), name
    assert set(mod.__all__) <= set(dir(mod))
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec(f"from {package} import no_such_name")


def full_parser() -> argparse.ArgumentParser:
    """The parser as it was built before start-up was made lazy: every command in full."""
    parser = argparse.ArgumentParser(prog="layersim", allow_abbrev=False, description=(
        "Capacity planning and scheduling-policy design for MoE LLM serving."))
    parser.add_argument("--version", action="version", version="unused")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    added = []
    for module, add, _ in cli_main.COMMANDS.values():
        if module not in added:
            getattr(importlib.import_module(module), add)(sub)
            added.append(module)
    for name, (_, _, help_text) in cli_main.DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def test_top_level_help_is_the_full_parsers(capsys):
    """The commands listed by name only (COMMANDS' help lines) read as the modules build them."""
    with pytest.raises(SystemExit):
        cli_main.main(["--help"])
    assert capsys.readouterr().out == full_parser().format_help()


def test_command_help_lines_match_their_modules():
    sub = next(a for a in full_parser()._actions if isinstance(a, argparse._SubParsersAction))
    built = {a.dest: a.help for a in sub._choices_actions}
    assert list(built)[:len(cli_main.COMMANDS)] == list(cli_main.COMMANDS)
    for name, (_, _, help_text) in cli_main.COMMANDS.items():
        assert built[name] == help_text, name


def test_each_command_builds_in_full_when_given(capsys):
    """`layersim COMMAND --help` shows the command's own flags, built by its module."""
    for name in cli_main.COMMANDS:
        with pytest.raises(SystemExit):
            cli_main.main([name, "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: layersim {name} [-h]"), name
        assert "--" in out.split("options:", 1)[1].replace("--help", ""), name


def test_an_unknown_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main.main(["nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for name in [*cli_main.COMMANDS, *cli_main.DELEGATED]:
        assert f"'{name}'" in err
