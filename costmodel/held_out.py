"""How well a kernel table's interpolation rule predicts shapes it did not see (kernel_tables.py).

Along the spec's held-out axis, within each group of rows that share every other key and shape
axis, every second interior value is held out whole (never random rows of a shape) and predicted
from its measured neighbours on either side. Those then lie twice as far apart as in use, so the
estimate is pessimistic. `calibrate` fits each class's roofline without the held-out rows and
reports these errors beside the table it stores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from costmodel.kernel_tables import Hardware, KernelTable


def _held_out_groups(table: KernelTable) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """(rows below, held-out rows, rows above, weight) for every held-out slice.

    Along the spec's held-out axis, within each group of rows that share every other key and
    shape axis, every second interior value is held out whole: never random rows of a shape."""
    spec = table.spec
    others = [c for c in (*spec.keys, *spec.axes) if c != spec.held_out_axis]
    keys = np.array(["|".join(str(table.columns[c][i]) for c in others) for i in range(len(table))])
    out = []
    for g in np.unique(keys):
        gi = np.nonzero(keys == g)[0]
        axis_vals = table.columns[spec.held_out_axis][gi].astype(float)
        vals = np.unique(axis_vals)
        for j in range(1, len(vals) - 1, 2):
            lo, v, hi = vals[j - 1], vals[j], vals[j + 1]
            w = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
            out.append((gi[axis_vals == lo], gi[axis_vals == v], gi[axis_vals == hi], w))
    return out


def held_out_mask(table: KernelTable) -> np.ndarray:
    mask = np.zeros(len(table), dtype=bool)
    for _, held, _, _ in _held_out_groups(table):
        mask[held] = True
    return mask


def held_out_errors(table: KernelTable, hw: Hardware) -> dict[str, Any]:
    """Relative errors on the held-out rows, each predicted by the interpolation rule from its
    measured neighbours on the held-out axis (which then lie twice as far apart as in use, so
    the estimate is pessimistic). The table's roofline should be fitted without those rows."""
    spec = table.spec
    e_all = table.log_ratio(hw)
    xcol = table.columns[spec.x].astype(float)
    errs: list[float] = []
    for lo, held, hi, w in _held_out_groups(table):
        if spec.held_out_axis == spec.x:  # one point each side
            pred = (1 - w) * e_all[lo].mean() + w * e_all[hi].mean()
            errs += np.abs(np.exp(pred - e_all[held]) - 1).tolist()
            continue
        e_lo = dict(zip(xcol[lo], e_all[lo], strict=True))
        e_hi = dict(zip(xcol[hi], e_all[hi], strict=True))
        for x, e_true in zip(xcol[held], e_all[held], strict=True):
            if x in e_lo and x in e_hi:
                errs.append(abs(math.exp((1 - w) * e_lo[x] + w * e_hi[x] - e_true) - 1))
    arr = np.array(errs) if errs else np.array([float("nan")])
    return {"median_rel_err": float(np.median(arr)), "p90_rel_err": float(np.quantile(arr, 0.9)),
            "held_out_rows": len(errs), "rows": len(table), "held_out_axis": spec.held_out_axis}
