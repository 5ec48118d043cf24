"""Compile and cache every numba kernel the margin engine uses on the configured accounts (all models,
SPAN included), so the first `marginflow calc` after an install starts in seconds. `make` runs it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from calc.engine import MarginEngine, load_positions, warm_up
from marginflow import config


def main() -> int:
    t0 = time.perf_counter()
    warm_up()
    calc = config.load().calc
    eng = MarginEngine.from_config(calc)
    eng.changed_rows()
    positions = load_positions(calc.positions_file)
    first: dict[str, str] = {}
    for account, sym in zip(positions.account, positions.sym, strict=True):
        first.setdefault(account, sym)
    for seq, (account, sym) in enumerate(first.items(), start=1):
        for side in ("B", "S"):  # a fill and its reverse: state ends where it began
            eng.apply_fills(
                [account],
                [sym],
                [side],
                np.array([1.0]),
                np.array([100.0]),
                np.array([2 * seq + (side == "S")]),
            )
            eng.changed_rows()
        eng.what_if(account, [{"sym": sym, "qty": 1.0}])
    eng.full_recompute()
    print(f"numba kernels compiled and cached in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
