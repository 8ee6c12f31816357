"""Progress on stderr: a bar on a terminal, a few plain lines in a log.

A terminal gets a tqdm bar named after what runs (a policy, a calibration grid). Anything else
(a pipe, a CI log, a file) gets one line per quarter of the work, never carriage returns.
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, label: str, unit: str) -> None:
        self.total, self.label, self.unit = max(total, 1), label, unit
        self.done = 0
        self._next_quarter = 1
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=label, file=sys.stderr, leave=False,
                             mininterval=0.5, dynamic_ncols=True)

    def update(self, done: int, note: str = "") -> None:
        """Report `done` of `total` finished."""
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note[:48], refresh=False)
            self._bar.update(done - self._bar.n)
            return
        self.done = done
        while self._next_quarter <= 4 and done * 4 >= self._next_quarter * self.total:
            print(f"{self.label}: {25 * self._next_quarter}% ({done}/{self.total} {self.unit})",
                  file=sys.stderr, flush=True)
            self._next_quarter += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
