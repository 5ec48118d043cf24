"""The plain-numpy drivers ranking (argsort, numpy sums) that the kernels' ranking (kernels.top_slots,
calc/drivers.py) is checked against: an independent second method, used by tests only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calc.models import OTHER


def top_drivers(
    syms: Sequence[str], exposure: np.ndarray, contrib: np.ndarray, n: int
) -> list[dict[str, Any]]:
    """The n positions with the largest |contribution| (largest first), then one `*other*` entry
    summing the rest, so the list adds up to the number the contributions sum to."""
    held = np.flatnonzero((exposure != 0) | (contrib != 0))
    order = held[np.argsort(-np.abs(contrib[held]), kind="stable")]
    top, rest = order[:n], order[n:]
    out = [{"sym": syms[i], "exposure": float(exposure[i]), "contribution": float(contrib[i])} for i in top]
    if len(rest):
        out.append(
            {
                "sym": OTHER,
                "exposure": float(exposure[rest].sum()),
                "contribution": float(contrib[rest].sum()),
            }
        )
    return out
