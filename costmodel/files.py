"""Atomic file writes: every result layersim writes appears whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden sibling, then rename it over `path` (atomic on POSIX).

    An interrupted run leaves the old file (or none) and no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
