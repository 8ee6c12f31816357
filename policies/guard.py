"""Running a user's code (import, `__init__`, `schedule`) under guard.

Three things can go wrong in code the simulator does not trust, and each must end as one line
that names the policy and the user's file:line, never a traceback and never a hang:

* it raises anything at all, `BaseException`s included (`SystemExit(0)` would otherwise end the
  run silently with status 0, `GeneratorExit` would escape SimPy's generator machinery);
* it never returns: a watchdog interrupts it after a time limit (SCHEDULE_LIMIT_S per
  `schedule` call, LOAD_LIMIT_S for import plus `__init__`) and says where it was;
* it raises `KeyboardInterrupt` itself. A real Ctrl-C must still stop the run, so the two are
  told apart: while the user's code runs, SIGINT goes to a handler that notes the signal before
  raising; a `KeyboardInterrupt` without that note came from the user's code and is reported
  like any other exception, one with it propagates as the interruption it is.

The watchdog is SIGALRM from `signal.setitimer(ITIMER_REAL)`: it interrupts pure-Python loops and
`time.sleep`, not a single long call into C (e.g. `sum(range(10**12))`), which runs to its end.
Signals can only be handled in the main thread: called from any other thread (or where the
platform has no SIGALRM) the code runs without a time limit, though its exceptions are still
caught. Any previous SIGALRM/SIGINT handler and interval timer are restored afterwards; a timer
that would have expired meanwhile fires right after. Arming costs a few system calls, small
beside a schedule call (measured: under 1% of a checked-mode run).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

SCHEDULE_LIMIT_S = 10.0  # one `schedule(state)` call
LOAD_LIMIT_S = 30.0  # importing the user's file and constructing the policy
_RETRY_S = 0.5  # after the limit, interrupt again this often (a user's bare `except:` ate one)
_MAX_MESSAGE = 200  # characters of the user's exception message kept in the one line

try:  # the C functions: `signal.signal` wraps them in enum conversions costing microseconds
    import _signal as _sig
except ImportError:  # pragma: no cover - not CPython
    _sig = signal  # type: ignore[assignment]

_HAS_ALARM = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")
_SIGALRM = int(getattr(signal, "SIGALRM", 0))
_SIGINT = int(signal.SIGINT)


class PolicyTimeout(BaseException):
    """Raised inside the user's code by the watchdog. A BaseException so that a policy's own
    `except Exception:` does not swallow it."""


class _Watchdog:
    """Arms SIGALRM (and a noting SIGINT handler) around one call in the main thread."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.armed = False
        self.timed_out = False
        self.sigint = False  # a real Ctrl-C arrived while the user's code ran
        self._active = False
        self._prev_alarm: Any = None
        self._prev_int: Any = None
        self._prev_timer = (0.0, 0.0)
        self._t0 = 0.0

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.timed_out = True
            raise PolicyTimeout()

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        self.sigint = True
        raise KeyboardInterrupt()

    def __enter__(self) -> _Watchdog:
        if (not _HAS_ALARM or self.limit_s <= 0
                or threading.current_thread() is not threading.main_thread()):
            return self
        if _sig.getsignal(_SIGALRM) is None:  # installed from C: we could not put it back
            return self
        self._active = True
        self._prev_alarm = _sig.signal(_SIGALRM, self._on_alarm)
        if _sig.getsignal(_SIGINT) is signal.default_int_handler:
            self._prev_int = _sig.signal(_SIGINT, self._on_int)
        self._t0 = time.monotonic()
        self.armed = True
        self._prev_timer = _sig.setitimer(signal.ITIMER_REAL, self.limit_s, _RETRY_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False  # first: an alarm from here on is ignored, not raised in our code
        if not self._active:
            return
        self._active = False
        delay, interval = self._prev_timer
        if delay > 0:  # someone else's timer (e.g. a test runner's): give it its remaining time
            delay = max(1e-6, delay - (time.monotonic() - self._t0))
        _sig.setitimer(signal.ITIMER_REAL, delay, interval)
        _sig.signal(_SIGALRM, self._prev_alarm)
        if self._prev_int is not None:
            _sig.signal(_SIGINT, self._prev_int)
            self._prev_int = None


def call_guarded(fn: Callable[[], Any], limit_s: float) -> tuple[Any, BaseException | None, bool]:
    """Run `fn()` with a time limit: (its value, None, False), or (None, what it raised, whether
    it ran out of time). A real Ctrl-C is re-raised as KeyboardInterrupt."""
    dog = _Watchdog(limit_s)
    try:
        with dog:
            try:
                return fn(), None, False
            except BaseException as e:  # noqa: B036 - the user's code: everything is reported
                err: BaseException = e
    except PolicyTimeout as e:  # the alarm landed between the call's end and the disarm
        err = e
    if dog.sigint and isinstance(err, KeyboardInterrupt):
        raise KeyboardInterrupt() from None
    return None, err, dog.timed_out or isinstance(err, PolicyTimeout)


def where(err: BaseException, user_file: str | None, fallback: str | None = None) -> str:
    """'file:line' of the deepest frame in the user's file; else `fallback` (where the user's
    function is defined: a call with the wrong arguments fails before entering it); else the
    deepest frame. A SyntaxError names its own file and line."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = list(traceback.walk_tb(err.__traceback__))
    mine = [f for f in frames if user_file and _same_file(f[0].f_code.co_filename, user_file)]
    if mine or (frames and not fallback):
        frame, lineno = (mine or frames)[-1]
        return f"{frame.f_code.co_filename}:{lineno}"
    return fallback or user_file or "?"


def defined_at(cls: object, attr: str) -> str | None:
    """'file:line' where `cls` defines the function `attr`, if it is a plain Python function."""
    try:
        code = getattr(inspect.getattr_static(cls, attr, None), "__code__", None)
        return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None
    except Exception:
        return None


def _same_file(a: str, b: str) -> bool:
    return a == b or os.path.abspath(a) == os.path.abspath(b)


def describe(err: BaseException, timed_out: bool, limit_s: float, user_file: str | None,
             fallback: str | None = None) -> str:
    """One line: what the user's code raised (or how long it ran) and where (see `where`)."""
    at = where(err, user_file, fallback)
    if timed_out:
        return f"did not return within {limit_s:g} s (stopped at {at})"
    try:
        text = str(err)
    except BaseException:  # noqa: B036 - a user's __str__ may raise anything
        text = "<unprintable message>"
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    name = type(err).__name__
    return f"raised {name}{': ' + text if text else ''} ({at})"


def source_file(obj: object) -> str | None:
    """The file defining `obj`'s class, to point at the user's line rather than ours."""
    try:
        module = sys.modules.get(type(obj).__module__)
        path = getattr(module, "__file__", None)
        return path if isinstance(path, str) else None
    except Exception:
        return None


def read_attr(obj: object, attr: str, limit_s: float = SCHEDULE_LIMIT_S) -> tuple[Any, str | None]:
    """`obj.attr` read under guard: (value, None), or (None, why it could not be read) when a
    property raised or never returned. A missing attribute reads as None."""
    value, err, timed_out = call_guarded(lambda: getattr(obj, attr, None), limit_s)
    if err is not None:
        return None, describe(err, timed_out, limit_s, source_file(obj))
    return value, None


def policy_label(policy: object) -> str:
    """The policy's name for messages: its `name` if that reads as a str, else its class."""
    name, _ = read_attr(policy, "name", 1.0)
    if not isinstance(name, str):
        return type(policy).__name__
    # join reads a str subclass's characters without calling its methods; one line, not long
    text = " ".join("".join((name,)).split())[:80]
    return text or type(policy).__name__


__all__ = ["SCHEDULE_LIMIT_S", "LOAD_LIMIT_S", "PolicyTimeout", "call_guarded", "describe",
           "where", "source_file", "read_attr", "policy_label"]
