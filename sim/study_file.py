"""A Study from a study file or flags: YAML, refused in one line naming the file when it is not a
flat mapping, and keys, refused in one line naming the flag, or the file and the key.

PyYAML composes nodes recursively and keeps the last of two equal keys without a word, so the
parser's flat events are checked first: nesting deeper than MAX_DEPTH and a key given twice are
errors naming their lines, before the composer runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from costmodel.errors import ConfigError
from sim.study import Study
from sim.study_keys import KeyProblem

if TYPE_CHECKING:
    import yaml

MAX_DEPTH = 16  # a study's deepest value is a list in the mapping (depth 2)


def load_study(path: str | Path, **overrides: Any) -> Study:
    """Read a YAML study file; flags given on the command line (`overrides`) win."""
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys to values")
    # an override of None is a flag given as `null`: it unsets the file's key (e.g. --rate null
    # replays a trace the file gave a rate)
    return make_study({**raw, **overrides}, source=str(path))


def make_study(values: dict[str, Any], source: str = "flags") -> Study:
    """A Study from keys and values (flags, a study file's mapping or a Python dict); any
    mistake is a one-line ConfigError naming the flag, or the source and the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a study is a mapping of keys to values, got "
                          f"{type(values).__name__}")
    if isinstance(values.get("policies"), str):  # comma-separated; an empty entry is refused
        values = {**values, "policies": [p.strip() for p in values["policies"].split(",")]}
    try:
        return Study.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"]
        key = str(loc[0])[:60] if loc else "study"  # a pasted 100 kB key stays one short line
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, KeyProblem):  # a check across keys names the one at fault
            key = cause.key
        msg = err["msg"].removeprefix("Value error, ")
        if len(loc) > 1 and isinstance(loc[1], int):  # a list's entry
            msg += f" (item {loc[1] + 1})"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (valid keys: {', '.join(Study.model_fields)})"
            if key == "mxfp4_experts":  # the key before dtypes were keys of their own
                msg = "replaced by expert_dtype (mxfp4 or bf16)"
        if source == "flags":  # name the flag the user typed
            flag = {"duration_s": "duration"}.get(key, key).replace("_", "-")
            raise ConfigError(f"--{flag}: {msg}") from None
        raise ConfigError(f"{source}: key '{key}': {msg}") from None



def read_yaml(path: Path) -> Any:
    """The file's YAML, or a one-line ConfigError naming the file (and the line when known)."""
    import yaml  # here: a run without a study file does not load PyYAML

    try:
        text = path.read_text(encoding="utf-8")
        check_events(path, yaml.parse(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ConfigError:  # _check_events' own
        raise
    except ValueError as e:  # Python's int-from-string limit
        why = "a number with more than 4300 digits" if "digits" in str(e) else str(e).split("\n")[0]
        raise ConfigError(f"{path}: not a study file: {why}") from None
    except OSError as e:  # a folder, a file we may not read
        raise ConfigError(f"{path}: cannot read the study file ({e.strerror or e})") from None


def check_events(path: Path, events: Iterator[yaml.Event]) -> None:
    """From the parser's flat events, before PyYAML's recursive composer runs: nesting deeper
    than MAX_DEPTH, and a key given twice (PyYAML would keep the last one without a word)."""
    import yaml

    depth, top_mapping, is_key, keys = 0, False, True, dict[str, int]()
    for event in events:
        line = event.start_mark.line + 1
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
            continue
        if depth == 1 and top_mapping and isinstance(event, yaml.NodeEvent):
            if is_key and isinstance(event, yaml.ScalarEvent):
                if event.value in keys:
                    raise ConfigError(f"{path}: key '{event.value[:60]}' given twice (lines "
                                      f"{keys[event.value]} and {line})")
                keys[event.value] = line
            is_key = not is_key
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            top_mapping = top_mapping or (depth == 0 and isinstance(event, yaml.MappingStartEvent))
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{path}: nested too deeply (line {line}; a study file is a "
                                  "flat mapping of keys to values)")
