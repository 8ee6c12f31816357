"""The probe store: every finished probe, kept at once, keyed by its configuration hash.

Layout: ROOT/probes/KK/KEY.json, KEY the probe's SHA-256 (search/probe.py), KK its first two
hex digits (so no folder holds millions of entries). One file per probe rather than appended
parquet parts or a database: a probe is written to a hidden temp file in its final folder,
flushed and fsync'd, then renamed over KEY.json (atomic on POSIX) and the folder fsync'd, so a
kill -9 or power loss at any moment leaves either the whole record or none, and never touches
another probe's record. Writes need no lock (each key has one writer at a time, and two writers
of one key write the same bytes). A reader checks that the record names its own key; a damaged
one (a disk fault, a hand edit) counts as missing and is computed again. Temp files of dead
processes are removed when a store is opened (sim.results.clean_leftovers).

The store never decides whether a result is stale: the key covers every input, so a changed
input is another key. It can be shared between searches and deleted at any time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from costmodel.errors import ConfigError
from sim.results import clean_leftovers


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "layersim" / "search"


class ProbeStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.probes = self.root / "probes"
        try:
            self.probes.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--store {root}: cannot create the probe store "
                              f"({e.strerror or e})") from None
        for sub in sorted(self.probes.iterdir()):
            if sub.is_dir():
                clean_leftovers(sub)

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a probe key: {key!r}")
        return self.probes / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # damaged: computed again and rewritten
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        if record.get("key") != key:
            raise ValueError("a probe record must carry its own key")
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.probes.glob("??/*.json"))


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable: without it a crash may forget a renamed file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
