"""Each operation's roofline over the coefficient tensor: as matrix rows that price a plan in one
product (linear_forms), and as the per-operation breakdown of a priced plan (op_table).

An op's time is max(c, m) + launches * overhead_s, with c its compute seconds and m its memory
(or link) seconds, each linear in the features (coefficients.Features). As
max(c, m) = (c + m)/2 + |c - m|/2, the iteration's kernel time is the `seconds` row (launch
overheads, host time per layer with work, and (c + m)/2 of every op) plus the sum of |row| over
the rows after the _LINEAR ones, one per op: (c - m)/2. The breakdown prices each op alone, the
bound its larger term (or its launch overhead, where that is larger still), and shows the host
overhead per layer as a `host_overhead` row (class "host") when non-zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from costmodel.coefficients import _EXPERTS, _HBM, _LINK_OPS, _QUANTITIES, FEATURES, OPS
from costmodel.cost import OpCost
from costmodel.measured_ops import measured_op_sources, measured_op_times_s

if TYPE_CHECKING:
    from costmodel.price import CostModel

# The figures linear in the features, the first rows of CostModel._forms: the linear part of
# the kernels' time, then per-GPU totals of these _QUANTITIES.
_LINEAR = ("seconds", "flops", "wbytes", "kvr", "kvw", "act", "link")


def linear_forms(cm: CostModel, is_link: np.ndarray) -> np.ndarray:
    """The roofline pricing as one matrix over the features: one product prices a plan.

    Totals count expert FLOPs and activations without the busiest-group inflation."""
    K = cm._K
    q = {name: i for i, name in enumerate(_QUANTITIES)}
    balanced = K.copy()
    balanced[:, _EXPERTS, :] /= cm.ep_imbalance
    totals = [balanced[q[name]].sum(axis=0) for name in _LINEAR if name != "seconds"]
    launches = K[q["launches"]]
    runs = launches.any(axis=1)  # the ops this model launches
    traffic = np.where(is_link[:, None], K[q["link"]], sum(K[q[name]] for name in _HBM))
    inv_traffic = np.where(is_link, cm._inv_link, cm._inv_memory)
    compute_s = (K[q["flops"]] * cm._inv_compute[:, None])[runs]
    memory_s = (traffic * inv_traffic[:, None])[runs]
    seconds = cm._overhead @ launches + (compute_s + memory_s).sum(axis=0) / 2
    seconds[FEATURES.index("nl")] += cm.profile.layer_overhead_s
    return np.vstack([seconds, *totals, (compute_s - memory_s) / 2])


def op_table(cm: CostModel, x: tuple[float, ...], measured: Any = None) -> tuple[OpCost, ...]:
    """The per-operation breakdown for a feature vector (Features, or a tuple in its order).

    With measured tables, `time_s` is the tables' and `bound` says what priced the op."""
    per_op = dict(zip(_QUANTITIES, (cm._K @ np.array(x)).tolist(), strict=True))
    flops, link, launches = per_op["flops"], per_op["link"], per_op["launches"]
    hbm_bytes = [sum(by_quantity) for by_quantity in zip(*(per_op[q] for q in _HBM), strict=True)]
    inv_compute, inv_memory = cm._inv_compute.tolist(), cm._inv_memory.tolist()
    inv_link, overhead = cm._inv_link.tolist(), cm._overhead.tolist()
    mk = cm.measured if measured is not None else None  # what priced this plan, if tables
    tables = mk is not None
    times = measured_op_times_s(mk, *measured) if mk is not None else {}
    sources = measured_op_sources(mk, *measured[:2]) if mk is not None else {}
    out = []
    for i, (name, cls) in enumerate(OPS):
        if not launches[i]:
            continue
        hbm = hbm_bytes[i]
        if tables:
            source = sources.get(name, sources.get(cls, "datasheet roofline"))
            out.append(OpCost(name, cls, flops[i], hbm, link[i], times.get(name, 0.0), source))
            continue
        t_c = flops[i] * inv_compute[i]
        t_m = hbm * inv_memory[i] + link[i] * inv_link[i]
        t_o = launches[i] * overhead[i]
        roof = max(t_c, t_m)
        mem_kind = "link" if cls in _LINK_OPS else "memory"
        bound = "overhead" if t_o > roof else ("compute" if t_c >= t_m else mem_kind)
        out.append(OpCost(name, cls, flops[i], hbm, link[i], roof + t_o, bound))
    host = cm.profile.layer_overhead_s * x[FEATURES.index("nl")]
    if host:
        out.append(OpCost("host_overhead", "host", 0.0, 0.0, 0.0, host, "overhead"))
    return tuple(out)
