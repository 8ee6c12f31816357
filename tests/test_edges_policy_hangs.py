"""Users' policies that hang or make no progress end as one line naming the policy and the
user's file:line, never a hang or a livelock (tests/test_edges_policies.py: the rest)."""

from __future__ import annotations

import signal
import time

import pytest

from costmodel.errors import ConfigError
from policies import guard, make_policy
from policies.base import decode_tiles, schedule_checked
from policies.state import PlanError, ReplicaState
from tests.test_edges_policies import User, _one_line_error, _run

HERE = "test_edges_policy_hangs.py"


# ---- hangs -----------------------------------------------------------------------------------
@pytest.fixture
def short_limits(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(guard, "SCHEDULE_LIMIT_S", 0.2)
    monkeypatch.setattr(guard, "LOAD_LIMIT_S", 0.2)
    before = signal.getsignal(signal.SIGALRM)
    yield
    assert signal.getsignal(signal.SIGALRM) is before  # the previous handler is back
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # and no timer left running


@pytest.mark.parametrize("how", ["loop", "sleep", "swallow"])
def test_a_schedule_that_never_returns_is_stopped(short_limits, how):
    class Hangs(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            while True:
                if how == "sleep":
                    time.sleep(100)
                elif how == "swallow":  # eats the first interruption; the watchdog fires again
                    try:
                        time.sleep(100)
                    except BaseException:
                        pass
                    time.sleep(100)

    with pytest.raises(PlanError) as e:
        _run(Hangs)
    _one_line_error(e, "policy user-Hangs did not return within 0.2 s", f"{HERE}:")


@pytest.mark.parametrize("where", ["import", "init"])
def test_an_import_or_constructor_that_never_returns_is_stopped(tmp_path, short_limits, where):
    src = tmp_path / "pol.py"
    loop = "while True:\n    pass\n" if where == "import" else ""
    init = "    def __init__(self):\n        while True:\n            pass\n" if where == "init" else ""
    src.write_text(f"{loop}class P:\n    name = 'p'\n    stall_free = True\n{init}")
    with pytest.raises(ConfigError) as e:
        make_policy(f"{src}:P")
    _one_line_error(e, "did not return within 0.2 s", f"{src}:")


def test_a_previous_alarm_keeps_its_handler_and_fires_after(short_limits):
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        st = ReplicaState(num_layers=4, num_total_blocks=100)
        schedule_checked(User(), st)  # arms and disarms its own watchdog meanwhile
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # the earlier timer still runs
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_real_ctrl_c_still_interrupts_but_a_raised_one_is_the_policys():
    class CtrlC(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            signal.raise_signal(signal.SIGINT)  # as the terminal would send it
            time.sleep(5)

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here")
    with pytest.raises(KeyboardInterrupt):
        _run(CtrlC)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- no progress -----------------------------------------------------------------------------
def test_a_livelock_of_restarted_prompts_is_an_error():
    class DecodesOnlyWhilePartWay(User):
        stall_free = False

        def schedule(self, state):  # type: ignore[no-untyped-def]
            if any(0 < r.num_computed_tokens < r.num_prompt_tokens for r in state.running):
                return tuple(decode_tiles(state))  # nothing, and the prompt is preempted
            return super().schedule(state)

    with pytest.raises(PlanError) as e:
        _run(DecodesOnlyWhilePartWay)
    _one_line_error(e, "policy user-DecodesOnlyWhilePartWay makes no progress", "preemptions in a row")


def test_a_policy_that_never_schedules_is_an_error():
    class Idle(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            return ()

    with pytest.raises(PlanError) as e:
        _run(Idle)
    _one_line_error(e, "policy user-Idle finished none of the 4 requests")


def test_a_policy_that_stops_part_way_leaves_counted_unfinished_requests():
    class FirstOnly(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            return tuple(t for t in plan if t.req_id == 0)

    res = _run(FirstOnly)
    assert res.metrics["completed"] == 1 and res.metrics["unfinished"] == 3
    assert sorted(res.requests["req_id"]) == [0, 1, 2, 3]
