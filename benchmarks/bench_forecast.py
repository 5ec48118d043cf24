"""Benchmark of the forecast of the call (calc/projection.py) inside the engine's publish loop: events/s of
bench_calc's universe (1,000 accounts x 2,000 instruments, 500-scenario HS, ticks and fills 95/5) with the
forecast off and on, in the same run, at calc's default 100 ms publish (each publish: changed_rows, then
project with the event clock); and the cost of one account's forecast. Prints a markdown table.

    .venv/bin/python benchmarks/bench_forecast.py [--cycles 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calc import N_ACC, Events, universe  # noqa: E402

from calc.cycles import ns_of  # noqa: E402
from calc.engine import MarginEngine  # noqa: E402
from calc.inputs import AccountSpec  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow import config  # noqa: E402
from marginflow.config import calc_defaults  # noqa: E402

PER_PUBLISH = 10_000  # events per 100 ms publish: 100,000 events/s offered
PUBLISH_NS = 100_000_000
START = ns_of(dt.datetime(2024, 1, 3, 15, 0, tzinfo=dt.UTC))  # Wednesday 10:00 New York


def build(forecast: bool) -> MarginEngine:
    params, pos, prices = universe()
    specs = [AccountSpec(f"A{a:04d}", "hvar", 1e7) for a in range(N_ACC)]
    ccps = config.load().calc.ccps if forecast else []
    calc = calc_defaults(alerts=[], stress=[], resync_events=0, ccps=ccps)
    return MarginEngine(params, specs, pos, prices=prices, calc_config=calc)


def run(eng: MarginEngine, ev: Events, cycles: int) -> tuple[float, int]:
    """Events/s through apply + publish (changed_rows + project) and the forecast rows produced."""
    batches = list(ev.batches(PER_PUBLISH, 0, PER_PUBLISH * cycles))
    rows = 0
    t0 = time.perf_counter()
    for k, (ticks, fills) in enumerate(batches):
        t = START + k * PUBLISH_NS
        eng.apply_prices(*ticks, np.full(len(ticks[0]), t))
        eng.apply_fills(*fills, np.full(len(fills[0]), t))
        rows += len(eng.project(eng.changed_rows()).get("account", ()))
    return len(batches) * PER_PUBLISH / (time.perf_counter() - t0), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=40, help="100 ms publishes per run (10,000 events each)")
    args = ap.parse_args(argv)
    warm_up()
    off, on = build(False), build(True)
    ev = Events(off, PER_PUBLISH * args.cycles)
    for eng in (off, on):  # warm: the first publish of every account
        eng.project(eng.changed_rows())
    rates: dict[str, list[float]] = {"off": [], "on": []}
    made = 0
    for _ in range(3):  # interleaved, best of three: the machine's noise hits both alike
        rates["off"].append(run(off, ev, args.cycles)[0])
        r, made = run(on, ev, args.cycles)
        rates["on"].append(r)
    p = on.projector
    assert p is not None
    t0 = time.perf_counter()
    n = 20
    for k in range(n):
        p.forecast_rows(START + (args.cycles + k) * PUBLISH_NS, 0, force=True)
    per_account = (time.perf_counter() - t0) / n / N_ACC
    best_off, best_on = max(rates["off"]), max(rates["on"])
    print(f"| forecast | events/s (best of 3, {args.cycles} x 10,000-event publishes) | vs off |")
    print("| --- | ---: | ---: |")
    print(f"| off | {best_off:,.0f} | 1.00 |")
    print(f"| on (DEMO-CCP, replica band) | {best_on:,.0f} | {best_on / best_off:.3f} |")
    print(
        f"\nforecast rows per run: {made:,}; one account's forecast (3 horizons): {per_account * 1e6:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
