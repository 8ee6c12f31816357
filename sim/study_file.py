"""Reading a study file: YAML, refused in one line naming the file when it is not a flat mapping.

PyYAML composes nodes recursively and keeps the last of two equal keys without a word, so the
parser's flat events are checked first: nesting deeper than MAX_DEPTH and a key given twice are
errors naming their lines, before the composer runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from costmodel.errors import ConfigError

if TYPE_CHECKING:
    import yaml

MAX_DEPTH = 16  # a study's deepest value is a list in the mapping (depth 2)


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
