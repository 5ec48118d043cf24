"""Warm-up of the numba kernels: `warm_up()` compiles (or loads from numba's cache) every kernel on a
tiny engine (calc and the backtest call it at start); `python -m calc.warm` also runs the configured
accounts (all models, SPAN included), so the first `marginflow calc` after an install starts in seconds.
`make` runs it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from calc import kernels
from calc.engine import MarginEngine
from calc.inputs import AccountSpec, Positions, load_positions
from calc.models import RiskParams
from marginflow import config


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel on a tiny engine; returns seconds taken."""
    t0 = time.perf_counter()
    syms = ["A", "B", "C"]
    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, (40, 3))
    params = RiskParams(syms, np.cov(r.T), np.expm1(r), 0.99, 1, "warm-up")
    specs = [AccountSpec("v", "var", 1e6), AccountSpec("h", "hvar", 1e6), AccountSpec("s", "stress", 1e6)]
    pos = Positions(["v", "h", "s"], ["A", "B", "C"], np.array([10.0, -5.0, 3.0]))
    stress = [{"name": "x", "default_shock": -0.1}]
    eng = MarginEngine(
        params,
        specs,
        pos,
        prices={"A": 10.0, "B": 20.0, "C": 30.0},
        calc_config=config.calc_defaults(stress=stress, sectors={}, alerts=[]),
    )
    eng.apply_fills(
        ["v", "h"], ["B", "C"], ["B", "S"], np.array([1.0, 2.0]), np.array([20.0, 30.0]), np.array([1, 2])
    )
    eng.apply_prices(["A", "C"], np.array([11.0, 29.0]), np.array([3, 4]))
    readonly = np.array([11.5])
    readonly.flags.writeable = False  # prices straight from Arrow buffers are read-only: that variant too
    eng.apply_prices(["A"], readonly, np.array([6]))
    eng.changed_rows()
    eng.what_if("s", [{"sym": "A", "qty": 1.0}])
    i1, f1 = np.zeros(1, np.int64), np.zeros(1)  # drivers of an external model's account: called directly
    kernels.top_slots(np.ones(1), np.ones(1), 1, i1, f1, f1.copy(), np.zeros(2, np.int64), np.zeros(2))
    return time.perf_counter() - t0


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
