"""Benchmark of full revaluation in the streaming engine (issue #14): one underlying with 1,000 option
contracts (20% American) held by 1,000 accounts (10 contracts and the stock each), 1,000 HS scenarios.
A tick of the underlying reprices every contract and updates every holder's margin; measured against a
full recompute of the same engine (the naive way: every account's P&L rebuilt), and the what-if of an
option trade. Prints markdown tables.

    .venv/bin/python benchmarks/bench_option_book.py [--ticks 40] [--what-ifs 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calc.engine import MarginEngine  # noqa: E402
from calc.inputs import AccountSpec, Positions  # noqa: E402
from calc.instruments import load_instruments  # noqa: E402
from calc.models import RiskParams  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow.config import calc_defaults  # noqa: E402

N_ACC, N_OPT, N_SCEN, PER_ACC = 1000, 1000, 1000, 10
AS_OF = "2026-01-02"


def book(tmp: Path, seed: int = 3) -> MarginEngine:
    """The engine: a stock U at 100 and N_OPT listed options on it (strikes 60..140, four expiries, calls
    and puts, every fifth American), N_ACC hvar accounts with PER_ACC random contracts and some stock."""
    rng = np.random.default_rng(seed)
    expiries = ["2026-02-20", "2026-03-20", "2026-06-19", "2026-12-18"]
    lines = [
        "sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield",
        "U,equity,,,,,1,,,,",
    ]
    for i in range(N_OPT):
        right = "CP"[i % 2]
        ex = "american" if i % 5 == 0 else "european"
        strike, vol = 60 + (i // 8) % 81, rng.uniform(0.2, 0.5)
        lines.append(f"O{i:04d},option,U,{expiries[i % 4]},{strike},{right},100,{ex},{vol:.4f},0.03,0.01")
    path = tmp / "instruments.csv"
    path.write_text("\n".join(lines) + "\n")
    master = load_instruments(path)
    daily = rng.standard_t(4, N_SCEN) * 0.012
    vol_ratio = np.exp(rng.normal(0, 0.05, (N_SCEN, 1)))
    params = RiskParams(
        ["U"], np.array([[daily.var()]]), np.expm1(daily)[:, None], 0.99, 1, "bench", vol_ratio=vol_ratio
    )
    acc, sym, qty = [], [], []
    for a in range(N_ACC):
        for c in rng.choice(N_OPT, PER_ACC, replace=False):
            acc.append(f"A{a:04d}")
            sym.append(f"O{c:04d}")
            qty.append(float(rng.integers(1, 50) * rng.choice([-1, 1])))
        acc.append(f"A{a:04d}")
        sym.append("U")
        qty.append(float(rng.integers(-5000, 5000)))
    specs = [AccountSpec(f"A{a:04d}", "hvar", 1e7) for a in range(N_ACC)]
    calc = calc_defaults(alerts=[], stress=[], resync_events=0, price_band={"default": 0.0})
    return MarginEngine(
        params,
        specs,
        Positions(acc, sym, np.array(qty)),
        prices={"U": 100.0},
        calc_config=calc,
        master=master,
        as_of=AS_OF,
    )


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--what-ifs", type=int, default=300)
    opts = ap.parse_args()
    warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        eng = book(Path(tmp))
        build_s = time.perf_counter() - t0
    eng.changed_rows()
    rng = np.random.default_rng(7)
    tick, full = [], []
    px = 100.0
    for k in range(opts.ticks):
        px *= float(np.exp(rng.normal(0, 0.002)))
        t0 = time.perf_counter()
        eng.apply_prices(["U"], np.array([px]), np.array([2 * k + 1]))
        rows = eng.changed_rows(drivers=False)
        tick.append(time.perf_counter() - t0)
        assert len(rows["account"]) == N_ACC, "every holder republishes"
        px *= float(np.exp(rng.normal(0, 0.002)))
        t0 = time.perf_counter()  # the naive way: the same tick, then every account rebuilt from scratch
        eng.apply_prices(["U"], np.array([px]), np.array([2 * k + 2]))
        eng.full_recompute()
        eng.changed_rows(drivers=False)
        full.append(time.perf_counter() - t0)
    check = eng.compute_full()["margin"]
    drift = float(np.max(np.abs(eng.margin - check) / np.maximum(check, 1.0)))
    wi = []
    for k in range(opts.what_ifs):
        c = int(rng.integers(N_OPT))
        t0 = time.perf_counter()
        eng.what_if(f"A{k % N_ACC:04d}", [{"sym": f"O{c:04d}", "qty": float(rng.integers(-20, 20) or 1)}])
        wi.append(time.perf_counter() - t0)
    print(
        f"## Full revaluation: {N_OPT:,} options on one underlying, {N_ACC:,} accounts x {PER_ACC}, "
        f"{N_SCEN:,} scenarios\n"
    )
    print(
        f"engine built in {build_s:.2f} s; incremental vs full recompute at the end: "
        f"max rel. difference {drift:.1e}\n"
    )
    print("| step | p50 ms | p99 ms | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| a tick -> every holder's margin row | {pct(tick, 50):.1f} | {pct(tick, 99):.1f} | <= 50 ms |")
    print(
        f"| a tick, then a full recompute of every account (naive) | {pct(full, 50):.1f} | "
        f"{pct(full, 99):.1f} | |"
    )
    print(f"| what-if of one option trade | {pct(wi, 50):.2f} | {pct(wi, 99):.2f} | <= 2 ms p99 |")
    print(f"\nratio full / incremental at p50: {pct(full, 50) / pct(tick, 50):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
