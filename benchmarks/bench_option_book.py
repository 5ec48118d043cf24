"""Benchmark of full revaluation in the streaming engine (issue #14): one underlying with 1,000 option
contracts (20% American) held by 1,000 accounts (10 contracts and the stock each), 1,000 HS scenarios.
A tick of the underlying reprices every contract and updates every holder's margin; measured against a
full recompute of the same engine (the naive way: every account's P&L rebuilt), and the what-if of an
option trade. With `--baseline-tree DIR` (a checkout of another commit) that tree's engine runs each book
too, in a child process right after this tree's. Prints markdown tables.

    .venv/bin/python benchmarks/bench_option_book.py [--ticks 40] [--what-ifs 300] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TREE = os.environ.get("MF_BENCH_TREE") or str(Path(__file__).resolve().parent.parent)  # the code measured
sys.path.insert(0, TREE)

from calc.engine import MarginEngine  # noqa: E402
from calc.inputs import AccountSpec, Positions  # noqa: E402
from calc.instruments import load_instruments  # noqa: E402
from calc.models import RiskParams  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow.config import calc_defaults  # noqa: E402

N_ACC, N_OPT, N_SCEN, PER_ACC = 1000, 1000, 1000, 10
AS_OF = "2026-01-02"


BOOKS = (
    ("European", 0, "bs2002"),
    ("20% American, BS1993", 5, "bs1993"),
    ("20% American, BS2002", 5, "bs2002"),
)


def book(tmp: Path, american_every: int, method: str, seed: int = 3) -> MarginEngine:
    """The engine: a stock U at 100 and N_OPT listed options on it (strikes 60..140, four expiries, calls
    and puts, every `american_every`-th American (0: none) under `method`), N_ACC hvar accounts with
    PER_ACC random contracts and some stock."""
    rng = np.random.default_rng(seed)
    expiries = ["2026-02-20", "2026-03-20", "2026-06-19", "2026-12-18"]
    lines = [
        "sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield",
        "U,equity,,,,,1,,,,",
    ]
    for i in range(N_OPT):
        right = "CP"[i % 2]
        ex = "american" if american_every and i % american_every == 0 else "european"
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
    calc = calc_defaults(alerts=[], stress=[], resync_events=0, price_band={"default": 0.0}, american=method)
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


def run(eng: MarginEngine, ticks: int, what_ifs: int) -> dict[str, float]:
    """Ticks of U back to back, each timed to every holder's margin row; then as many ticks each followed
    by a full recompute (the naive way); what-ifs of one option trade; the drift against a full recompute."""
    eng.changed_rows()
    rng = np.random.default_rng(7)
    tick, full, wi = [], [], []
    px = 100.0
    for k in range(ticks):  # back to back, as a live feed ticks
        px *= float(np.exp(rng.normal(0, 0.002)))
        t0 = time.perf_counter()
        eng.apply_prices(["U"], np.array([px]), np.array([k + 1]))
        rows = eng.changed_rows(drivers=False)
        tick.append(time.perf_counter() - t0)
        assert len(rows["account"]) == N_ACC, "every holder republishes"
    for k in range(ticks):  # then the naive way, in its own loop
        px *= float(np.exp(rng.normal(0, 0.002)))
        t0 = time.perf_counter()
        eng.apply_prices(["U"], np.array([px]), np.array([ticks + k + 1]))
        eng.full_recompute()
        eng.changed_rows(drivers=False)
        full.append(time.perf_counter() - t0)
    check = eng.compute_full()["margin"]
    for k in range(what_ifs):
        c = int(rng.integers(N_OPT))
        t0 = time.perf_counter()
        eng.what_if(f"A{k % N_ACC:04d}", [{"sym": f"O{c:04d}", "qty": float(rng.integers(-20, 20) or 1)}])
        wi.append(time.perf_counter() - t0)
    drift = float(np.max(np.abs(eng.margin - check) / np.maximum(check, 1.0)))
    return {
        "tick50": pct(tick, 50),
        "tick99": pct(tick, 99),
        "full50": pct(full, 50),
        "wi50": pct(wi, 50),
        "wi99": pct(wi, 99),
        "drift": drift,
    }


def run_book(index: int, ticks: int, what_ifs: int) -> dict[str, float]:
    """run() on BOOKS[index]'s engine."""
    _name, every, method = BOOKS[index]
    with tempfile.TemporaryDirectory() as tmp:
        eng = book(Path(tmp), every, method)
    return run(eng, ticks, what_ifs)


def baseline_run(tree: str, index: int, ticks: int, what_ifs: int) -> dict[str, float]:
    """run_book in a child process that imports `tree`'s code (its engine and kernels, this script's book)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(index),
        "--ticks",
        str(ticks),
        "--what-ifs",
        str(what_ifs),
    ]
    env = {**os.environ, "MF_BENCH_TREE": tree, "PYTHONPATH": tree}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--what-ifs", type=int, default=300)
    ap.add_argument("--baseline-tree", help="a checkout of another tree: its engine on the same books")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one book's run(), as JSON
    opts = ap.parse_args()
    warm_up()
    if opts.child is not None:
        print(json.dumps(run_book(opts.child, opts.ticks, opts.what_ifs)))
        return 0
    print(
        f"## Full revaluation: {N_OPT:,} options on one underlying, {N_ACC:,} accounts x {PER_ACC} "
        f"contracts, {N_SCEN:,} scenarios (targets: a tick <= 50 ms, what-if p99 <= 2 ms)\n"
    )
    print(
        "| book | tick -> every holder's row p50 / p99 ms | naive (tick + full recompute) p50 ms | ratio "
        "| what-if p50 / p99 ms | incremental vs full |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for index, (name, _every, _method) in enumerate(BOOKS):
        runs = [(name, run_book(index, opts.ticks, opts.what_ifs))]
        if opts.baseline_tree:
            runs.append(
                (f"{name}, baseline tree", baseline_run(opts.baseline_tree, index, opts.ticks, opts.what_ifs))
            )
        for label, r in runs:
            print(
                f"| {label} | {r['tick50']:.1f} / {r['tick99']:.1f} | {r['full50']:.1f} | "
                f"{r['full50'] / r['tick50']:.1f}x | {r['wi50']:.2f} / {r['wi99']:.2f} | {r['drift']:.0e} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
