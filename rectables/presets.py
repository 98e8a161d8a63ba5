"""Known data-set shapes and per-method sizing for a byte budget."""
from __future__ import annotations

import math

#: ids per categorical feature C1..C26 of Criteo Kaggle DAC (as used by DLRM); 33,762,577 in all
CRITEO_KAGGLE = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
CRITEO_FEATURES = [f"C{i}" for i in range(1, 27)]
PRESETS = {"criteo-kaggle": CRITEO_KAGGLE}

#: a compressed table never gets fewer rows than this (or than its ids, if fewer)
MIN_ROWS = 16


def rows_for(num_ids: int, fraction: float) -> int:
    """Rows a table of ``num_ids`` ids gets at ``fraction`` of its full size."""
    return min(num_ids, max(MIN_ROWS, math.ceil(num_ids * fraction)))


def parse_fraction(text: str) -> float:
    """'1/4' -> 0.25, '0.5' -> 0.5."""
    num, _, den = text.partition("/")
    value = float(num) / float(den) if den else float(num)
    if not 0 < value <= 1:
        raise ValueError(f"budget {text!r} must lie in (0, 1]")
    return value
