"""A byte budget that means the same bytes for every method.

``Table.for_budget`` sizes a method's weights; what a table holds, and what
``memory_report`` and ``compare`` report, is weights + optimizer state + buffers (a
dynamic table's map).  ``tables_for_budget`` sizes on that total: it searches the weight
fraction whose tables hold at most ``budget`` times the total of ``full``'s tables with
the same optimizer (e.g. ``unified``'s two 8-wide chunks keep twice the rows of a 16-wide
table, so twice the row-wise optimizer state: sized on weights it held 1/3.8, not 1/4).
Bytes come from shapes, no storage is built.  Shapes: M rows, D dim.
"""
from __future__ import annotations

import math

from rectables.optim import SparseOptimizer
from rectables.storage import stored_dim
from rectables.table import Table


def table_bytes(tables: list[Table], optimizer: SparseOptimizer) -> int:
    """Weights (rows padded to fbgemm's multiple of 4, as stored), optimizer state and
    buffers of ``tables``, as ``memory_report`` counts them once they are in a collection."""
    total = 0
    for t in tables:
        for m, d in t.physical_shapes():
            total += 4 * m * stored_dim(d) + 4 * optimizer.state_floats(m, stored_dim(d))
        total += sum(b.nbytes for b in list(t.buffers()) + list(t.parameters()))
    return total


def tables_for_budget(cls, dim: int, features: list[str], num_ids: list[int], budget: float,
                      optimizer: SparseOptimizer, steps: int = 16) -> list[Table]:
    """``cls``'s tables (``for_budget_all``) holding at most ``budget`` of the bytes of
    ``full``'s tables, weights + optimizer state + buffers; the largest such.  Where
    per-method floors (``MIN_ROWS``) make the budget unreachable, the smallest tables the
    search met (a table's size need not shrink with the fraction: QR's m grows)."""
    from rectables.registry import table_class

    if budget >= 1 or cls.method == "full":
        return cls.for_budget_all(dim, features, num_ids, budget)
    target = budget * table_bytes(table_class("full").for_budget_all(dim, features, num_ids, 1.0), optimizer)
    lo, hi = math.log(budget) - math.log(64), 0.0  # log of the weight fraction
    best, smallest = None, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        tables = cls.for_budget_all(dim, features, num_ids, math.exp(mid))
        size = table_bytes(tables, optimizer)
        if smallest is None or size < smallest[0]:
            smallest = (size, tables)
        if size <= target:
            best, lo = tables, mid
        else:
            hi = mid
    return best if best is not None else smallest[1]
