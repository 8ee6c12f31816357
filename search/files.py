"""Study files with keys beyond the Study model's: `seeds`/`confidence` for capacity, `search:`.

The Study model (sim/study.py) forbids unknown keys, so the extra keys are taken out of the
file's mapping first, checked here with one-line errors naming the file and key, and the rest is
validated as a study exactly as `load_study` would (flags win over the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from costmodel.errors import ConfigError
from sim.study import Study
from sim.study_file import make_study, read_yaml

MAX_SEEDS = 1000  # each seed is a full search


def read_with_extras(path: str | Path | None, extra_keys: tuple[str, ...],
                     flags: dict[str, Any]) -> tuple[Study, dict[str, Any]]:
    """(the study, {extra key: value from the file}); flags override the study's keys."""
    if path is None:
        return make_study(flags), {}
    raw = read_yaml(Path(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys to values")
    extras = {k: raw.pop(k) for k in extra_keys if k in raw}
    return make_study({**raw, **flags}, source=str(path)), extras


def check_seeds(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEEDS:
        raise ConfigError(f"{where}: seeds must be a whole number from 1 to {MAX_SEEDS}, "
                          f"got {value!r}")
    return value


def check_confidence(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"{where}: confidence must be a number between 0 and 1 (e.g. 0.9), "
                          f"got {value!r}")
    return float(value)
