"""Users' policies that misbehave in every way the fuzz campaign found end as one line naming the
policy and the user's file:line, never a traceback, a hang or a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.blocks import BlockTable
from costmodel.errors import ConfigError
from costmodel.plan import Tile
from policies import ChunkedPrefill, make_policy
from policies.base import decode_tiles
from policies.registry import is_trusted
from policies.state import PlanError, ReplicaState, RequestState
from sim import simulate
from tests.helpers import ConstantCost
from traces.request import Request

HERE = "test_edges_policies.py"


def _run(make: type, n: int = 4):  # type: ignore[no-untyped-def]
    return simulate([Request(i, 0.01 * i, 40 + 7 * i, 3) for i in range(n)], ConstantCost(0.01), make)


class User(ChunkedPrefill):
    """A user's policy: chunked prefill, then whatever `twist` does to the plan."""

    def __init__(self) -> None:
        super().__init__(16)
        self.name = f"user-{type(self).__name__}"

    def schedule(self, state):  # type: ignore[no-untyped-def]
        return self.twist(state, super().schedule(state))

    def twist(self, state, plan):  # type: ignore[no-untyped-def]
        return plan


def _one_line_error(exc_info: pytest.ExceptionInfo, *parts: str) -> str:  # type: ignore[type-arg]
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# ---- tile fields ---------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "shown"), [
    ("t1", 0.5, "float"), ("l0", None, "NoneType None"), ("req_id", "0", "str '0'"),
    ("num_cached", True, "bool True"), ("logits", 1, "int 1"),
])
def test_tile_fields_of_the_wrong_type_are_named(field, value, shown):
    class Odd(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            t = plan[0]
            v = t.t1 - 0.5 if field == "t1" else value  # a prompt chunk ending at token 15.5
            return (t._replace(**{field: v}), *plan[1:])

    with pytest.raises(PlanError) as e:
        _run(Odd)
    _one_line_error(e, "policy user-Odd", f"tile field {field} is {shown}")


def test_numpy_integers_in_tiles_are_plain_ints_to_the_simulator():
    class Numpy(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            return [Tile(*(np.int64(v) for v in t[:6]), np.bool_(t[6])) for t in plan]

    res = _run(Numpy)
    assert res.metrics["completed"] == 4
    assert res.metrics == _run(User).metrics | {"policy": "user-Numpy"}


# ---- exceptions of every kind ----------------------------------------------------------------
@pytest.mark.parametrize("exc", [SystemExit(0), SystemExit(3), GeneratorExit(), KeyboardInterrupt(),
                                 BaseException("base"), StopIteration(), RecursionError("deep"),
                                 ValueError("a message\nof two lines")])
def test_anything_schedule_raises_names_the_policy_and_line(exc):
    class Raises(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            raise exc

    with pytest.raises(PlanError) as e:
        _run(Raises)
    _one_line_error(e, "policy user-Raises raised", type(exc).__name__, f"{HERE}:")


def test_an_exception_whose_message_cannot_be_printed_is_still_one_line():
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Raises(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            raise Unprintable()

    with pytest.raises(PlanError) as e:
        _run(Raises)
    _one_line_error(e, "raised Unprintable: <unprintable message>")


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "raise KeyboardInterrupt",
                                  "raise GeneratorExit", "raise BaseException('x')", "1/0"])
@pytest.mark.parametrize("where", ["import", "init"])
def test_import_and_init_failures_are_config_errors_with_the_line(tmp_path, body, where):
    src = tmp_path / "pol.py"
    init = f"    def __init__(self):\n        {body}\n" if where == "init" else ""
    top = f"{body}\n" if where == "import" else ""
    src.write_text(f"{top}class P:\n    name = 'p'\n    stall_free = True\n{init}"
                   "    def schedule(self, state):\n        return ()\n")
    with pytest.raises(ConfigError) as e:
        make_policy(f"{src}:P")
    _one_line_error(e, f"{src}:", "raised")


def test_errors_before_the_users_first_line_point_at_the_users_definition(tmp_path):
    src = tmp_path / "pol.py"
    src.write_text("class P:\n    name = 'p'\n    stall_free = True\n    def __init__(self):\n"
                   "        pass\n    def schedule(self):\n        return ()\nclass S:\n    x = (\n")
    with pytest.raises(ConfigError) as e:  # the whole file fails to compile
        make_policy(f"{src}:P")
    _one_line_error(e, "raised SyntaxError", f"{src}:9")
    src.write_text(src.read_text()[:-len("class S:\n    x = (\n")])
    with pytest.raises(ConfigError) as e:  # P() given an argument it does not take
        make_policy(f"{src}:P:extra")
    _one_line_error(e, "P() raised TypeError", f"{src}:4")
    with pytest.raises(PlanError) as e:  # schedule(self) without the state
        simulate([Request(0, 0.0, 10, 2)], ConstantCost(0.01), make_policy(f"{src}:P").__class__)
    _one_line_error(e, "policy p raised TypeError", f"{src}:6")


def test_a_name_or_flag_property_that_raises_is_a_config_error(tmp_path):
    src = tmp_path / "pol.py"
    src.write_text("class P:\n    stall_free = True\n    @property\n    def name(self):\n"
                   "        raise SystemExit(0)\n    def schedule(self, state):\n        return ()\n"
                   "class Q:\n    name = 'q'\n    @property\n    def stall_free(self):\n"
                   "        raise KeyError('flag')\n    def schedule(self, state):\n        return ()\n")
    with pytest.raises(ConfigError) as e:
        make_policy(f"{src}:P")
    _one_line_error(e, "reading its 'name' raised SystemExit", f"{src}:5")
    with pytest.raises(ConfigError) as e:
        make_policy(f"{src}:Q")
    _one_line_error(e, "reading its 'stall_free' raised KeyError", f"{src}:12")


@pytest.mark.parametrize(("attr", "value", "says"), [
    ("name", None, "'name' became NoneType"), ("stall_free", "yes", "'stall_free' became str")])
def test_a_policy_may_not_turn_its_name_or_flag_into_something_else(attr, value, says):
    class Turns(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            setattr(self, attr, value)
            return plan

    with pytest.raises(PlanError) as e:
        _run(Turns)
    _one_line_error(e, "policy ", says)


def test_a_steady_decode_promise_that_raises_is_an_error():
    class Steady(User):
        @property
        def steady_decode(self) -> bool:
            raise SystemExit(1)

    with pytest.raises(PlanError) as e:
        _run(Steady)
    _one_line_error(e, "policy user-Steady: reading its 'steady_decode' raised SystemExit", f"{HERE}:")


# ---- state mutations -------------------------------------------------------------------------
MUTATIONS = {
    "num_total_blocks": lambda s: setattr(s, "num_total_blocks", s.num_total_blocks + 1),
    "block_size": lambda s: setattr(s, "block_size", 1),
    "now_s": lambda s: setattr(s, "now_s", -1.0),
    "cost_model": lambda s: setattr(s, "cost_model", None),
    "num_preemptions": lambda s: setattr(s, "num_preemptions", 7),
    "new attribute": lambda s: setattr(s, "extra", 1),
    "queue": lambda s: s.waiting.reverse() if len(s.waiting) > 1 else s.waiting.append(s.waiting[0]),
    "max_tokens": lambda s: setattr(s.waiting[0], "max_tokens", 99),
    "arrival_s": lambda s: setattr(s.waiting[0], "arrival_s", -2666.0),
    "block_table": lambda s: setattr(s.waiting[0], "block_table", BlockTable()),
    "first_token_s": lambda s: setattr(s.waiting[0], "first_token_s", 0.0),
    "itl_s": lambda s: s.waiting[0].itl_s.append(-1.0),
    "layer_tokens": lambda s: setattr(s.waiting[0], "layer_tokens", [1] * s.num_layers),
    "deleted": lambda s: delattr(s.waiting[0], "arrival_s"),
}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_every_state_mutation_is_the_documented_rule_violation(field):
    class Mutates(User):
        def schedule(self, state):  # type: ignore[no-untyped-def]
            if state.waiting:
                MUTATIONS[field](state)
            return super().schedule(state)

    with pytest.raises(PlanError) as e:
        _run(Mutates)
    msg = _one_line_error(e, "policy user-Mutates changed the replica state",
                          "a policy may only read the state")
    named = {"new attribute": "extra", "queue": "queue", "deleted": "arrival_s",
             "itl_s": "itl_s", "layer_tokens": "layer_tokens"}.get(field, field)
    assert named in msg


def test_the_decodes_list_a_policy_edits_is_dropped_after_the_call():
    class ClearsDecodes(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            state.decodes.clear()  # the cached list: a stall-free check must not believe it
            return tuple(t for t in plan if t.t0 < state.running[0].num_prompt_tokens) if (
                state.running) else plan

    with pytest.raises(PlanError, match="skipped the decode"):
        _run(ClearsDecodes)


def test_a_running_requests_gap_history_may_not_change():
    class Gaps(User):
        steady_decode = False  # called for every decode step, not fast-forwarded

        def schedule(self, state):  # type: ignore[no-untyped-def]
            for r in state.running:
                if r.itl_s:
                    r.itl_s[-1] = -5.0
            return super().schedule(state)

    with pytest.raises(PlanError, match="changed the replica state"):
        simulate([Request(0, 0.0, 40, 20)], ConstantCost(0.01), Gaps)


# ---- plans the checks refuse before the simulator trips on them -------------------------------
def test_a_plan_beyond_the_free_kv_blocks_is_refused_by_check():
    st = ReplicaState(num_layers=4, num_total_blocks=2, block_size=16)
    st.waiting.append(RequestState(0, 0.0, 100, 5))
    with pytest.raises(PlanError, match="needs 4 more KV blocks for request 0, only 2 free"):
        st.check((Tile(0, 0, 64, 0, 4, 0, False),), stall_free=True)
    st.check((Tile(0, 0, 32, 0, 4, 0, False),), stall_free=True)


def test_logits_must_mark_exactly_the_tiles_that_emit_a_token():
    st = ReplicaState(num_layers=4, num_total_blocks=100, block_size=16)
    st.waiting.append(RequestState(0, 0.0, 32, 5))
    with pytest.raises(PlanError, match="logits must be True exactly"):
        st.check((Tile(0, 0, 16, 0, 4, 0, True),), stall_free=True)
    with pytest.raises(PlanError, match="logits must be True exactly"):
        st.check((Tile(0, 0, 32, 0, 4, 0, False),), stall_free=True)
    st.check((Tile(0, 0, 32, 0, 4, 0, True),), stall_free=True)


@pytest.mark.parametrize("value", [None, 3, "plan", {0: 1}, iter(())])
def test_a_plan_that_is_not_a_tuple_is_named(value):
    class Returns(User):
        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            return value

    with pytest.raises(PlanError) as e:
        _run(Returns)
    _one_line_error(e, "policy user-Returns returned", "a plan is a tuple of Tile")


# ---- the registry ----------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "says"), [
    ("prefill-first:5", "prefill-first takes no parameter"),
    ("layered:", "nothing after ':'"), ("chunked:", "nothing after ':'"),
    ("adaptive: ", "nothing after ':'"), ("chunked:0", "must be >= 1"),
    ("chunked:-5", "must be >= 1"), ("chunked:abc", "must be an integer"),
    ("hybrid:1.5", "must be an integer"), ("adaptive:nan", "positive number"),
    ("adaptive:inf", "positive number"), ("adaptive:-1", "positive number"),
])
def test_builtin_parameters_are_checked(spec, says):
    with pytest.raises(ConfigError) as e:
        make_policy(spec)
    _one_line_error(e, says)


def test_builtin_parameters_that_mean_something():
    policy = make_policy("adaptive:1e2")  # 100 ms, in the usual float notation
    assert policy.tbt_s == pytest.approx(0.1) and policy.name == "adaptive:100"  # type: ignore[attr-defined]
    assert make_policy("chunked:64").max_num_batched_tokens == 64  # type: ignore[attr-defined]


def test_only_the_registrys_builtins_are_trusted():
    assert is_trusted(make_policy("chunked:512")) and is_trusted(make_policy("prefill-first"))

    class Claims(ChunkedPrefill):
        _layersim_builtin = True  # the old patch: no longer a way in

    assert not is_trusted(Claims())
    assert not is_trusted(ChunkedPrefill())  # built by the user, perhaps with odd arguments
    tampered = make_policy("chunked:512")
    tampered.schedule = lambda state: ()  # type: ignore[method-assign]
    assert not is_trusted(tampered)

    class ClaimsAndMutates(User):
        _layersim_builtin = True

        def twist(self, state, plan):  # type: ignore[no-untyped-def]
            state.now_s = -1.0
            return plan

    with pytest.raises(PlanError, match="changed the replica state"):
        _run(ClaimsAndMutates)


# ---- property: any misbehaviour ends in a completed run or one named line ----------------------
VALUES = st.one_of(st.integers(-2, 70), st.floats(allow_nan=True), st.none(), st.text(max_size=2),
                   st.booleans(), st.integers(0, 40).map(np.int64))
EXCEPTIONS = [ValueError, TypeError, IndexError, KeyError, AttributeError, ZeroDivisionError,
              StopIteration, RecursionError, MemoryError, SystemExit, GeneratorExit,
              KeyboardInterrupt, BaseException, PlanError, ConfigError]
TARGETS = [f"state.{f}" for f in ("num_layers", "num_total_blocks", "block_size", "now_s", "cost_model",
                                   "num_free_blocks", "num_preemptions", "waiting", "running",
                                   "hidden_blocks_per_token")] + [f"req.{f}" for f in RequestState.__slots__]
ACTIONS = st.one_of(
    st.just(("ok",)), st.just(("empty",)), st.just(("decodes-only",)),
    st.tuples(st.just("tiles"), st.lists(st.builds(Tile, *[VALUES] * 7), max_size=3)),
    st.tuples(st.just("perturb"), st.integers(0, 3), st.sampled_from(Tile._fields), VALUES),
    st.tuples(st.just("mutate"), st.sampled_from(TARGETS), VALUES),
    st.tuples(st.just("raise"), st.sampled_from(EXCEPTIONS)),
    st.tuples(st.just("attr"), st.sampled_from(["name", "stall_free"]), st.one_of(st.none(), st.integers())),
    st.tuples(st.just("return"), st.sampled_from([None, 3, "x", {}, [1], (None,), 2.5])),
)


def _misbehaving(actions: list[tuple], stall_free: bool, steady: bool) -> type:  # type: ignore[type-arg]
    """A user's policy that follows `actions` in turn, one per schedule call."""
    class Fuzzed(User):
        def __init__(self) -> None:
            super().__init__()
            self.name, self.stall_free, self.steady_decode, self.calls = "fuzzed", stall_free, steady, 0

        def schedule(self, state):  # type: ignore[no-untyped-def]
            kind, *args = actions[self.calls % len(actions)]
            self.calls += 1
            if kind == "mutate":
                owner, attr = args[0].split(".")
                reqs = [*state.waiting, *state.running]
                setattr(state if owner == "state" else reqs[0], attr, args[1]) if (
                    owner == "state" or reqs) else None
            elif kind == "attr":  # its name or flag turned into something else
                setattr(self, *args)
            plan = super().schedule(state)
            if kind == "raise":
                raise args[0]("fuzzed")
            return {"empty": (), "decodes-only": tuple(decode_tiles(state)), "tiles": args and args[0],
                    "return": args and args[0],
                    "perturb": args and tuple(t._replace(**{args[1]: args[2]}) if i == args[0] else t
                                              for i, t in enumerate(plan))}.get(kind, plan)
    return Fuzzed


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(actions=st.lists(ACTIONS, min_size=1, max_size=5), stall_free=st.booleans(),
       steady=st.booleans())
def test_misbehaving_policies_complete_or_fail_in_one_named_line(actions, stall_free, steady):
    reqs = [Request(i, 0.01 * i, 20 + 9 * i, 3) for i in range(3)]
    try:
        res = simulate(reqs, ConstantCost(0.01), _misbehaving(actions, stall_free, steady))
    except (PlanError, ConfigError) as e:
        assert "\n" not in str(e) and "fuzzed" in str(e).lower(), str(e)
        return
    assert sorted(res.requests["req_id"]) == [0, 1, 2]  # every request accounted for
    assert res.metrics["completed"] + res.metrics["unfinished"] == 3
    done = res.requests[res.requests["finished"]]
    assert (done["ttft_ms"] >= 0).all() and (done["output_tokens"] == 3).all()
