"""The simulator's hot-loop shortcuts (issue 15) give exactly what the plain code gave.

Each shortcut is checked against the computation it replaces: the per-request 99th percentile
against numpy's, a table's column-wise frame against pandas' row inference, the memoised
datasheet terms against the roofline written out, and the garbage collector's settings are
restored after a run.
"""

from __future__ import annotations

import gc
import random

import numpy as np
import pandas as pd
import pytest

from core.records import Table, _p99_and_max
from costmodel import CostModel, Parallelism, load_model
from costmodel.coefficients import _HBM, _OP_INDEX, _QUANTITIES, FEATURES
from sim import simulate
from traces import Request


@pytest.mark.parametrize("n", [1, 2, 3, 99, 100, 101, 150, 1000])
def test_p99_and_max_equal_numpy(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        values = [rng.choice([rng.random(), 0.5, -rng.random()]) for _ in range(n)]
        p99, top = _p99_and_max(values)
        v = sorted(values)  # the full sort it replaces, bit for bit
        pos = (n - 1) * 99.0 / 100
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        assert p99 == v[lo] + (v[hi] - v[lo]) * (pos - lo)
        assert p99 == pytest.approx(float(np.percentile(values, 99.0)), rel=1e-12, abs=1e-15)
        assert top == max(values)


def test_table_frame_matches_pandas_row_inference() -> None:
    rows = [(7, 0.5, True, 2**62, float("nan")), (8, 1.5, False, -3, 2.0)]
    t = Table("t", ("a", "b", "flag", "big", "maybe"), ("a", "big"), None, 10)
    for r in rows:
        t.append(r)
    got = t.frame()
    want = pd.DataFrame.from_records(rows, columns=["a", "b", "flag", "big", "maybe"])
    pd.testing.assert_frame_equal(got, want)
    assert list(got.dtypes.astype(str)) == ["int64", "float64", "bool", "int64", "float64"]


def test_datasheet_op_terms_equal_the_roofline_written_out() -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    for op, feature in (("embedding", "embed"), ("norms_elementwise", "tm")):
        i, f = _OP_INDEX[op], FEATURES.index(feature)
        for tokens in (1, 7.5, 512, 65536):
            flops = cm._K[_QUANTITIES.index("flops"), i, f] * tokens
            hbm = sum(cm._K[_QUANTITIES.index(q), i, f] for q in _HBM)
            t_c, t_m = flops * cm._inv_compute[i], hbm * tokens * cm._inv_memory[i]
            assert cm._datasheet_op(op, tokens, feature) == float(cm._overhead[i] + max(t_c, t_m))


def test_a_run_restores_the_garbage_collector() -> None:
    before = gc.get_threshold()
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    simulate([Request(i, 0.1 * i, 64, 8) for i in range(5)], cm, "chunked:512")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
