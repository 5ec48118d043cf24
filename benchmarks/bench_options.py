"""Option revaluations per second (issue #14 item 2): a book of contracts repriced under historical
scenarios by calc.options.scenario_rows, the engine's kernel (numba, parallel over contracts and
single-thread; the contracts on UNDERLYINGS underlyings, each scenario's spot and vol multipliers per
underlying, as the engine's are), beside a vectorised
numpy/scipy Black-Scholes-Merton and a QuantLib loop (a sample of revaluations, extrapolated), in the same
run. Three books: all-European (BSM and Black-76), and 20% American priced by Bjerksund-Stensland 2002 (the
engine's model: 20 bivariate normals a price) or 1993 (`method=BS1993`; the QuantLib loop uses QuantLib's
Bjerksund-Stensland engine, the 1993 version, for both, having no 2002 one). With `--baseline-tree DIR` (a
checkout of another commit) that tree's kernels price the same books in a child process right after this
tree's, each book in turn. Prints a markdown table.
Usage: python benchmarks/bench_options.py [--contracts 1000] [--scenarios 1000] [--baseline-tree DIR]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
from scipy.special import ndtr

TREE = os.environ.get("MF_BENCH_TREE") or str(Path(__file__).resolve().parent.parent)  # the code measured
sys.path.insert(0, TREE)

from calc import options  # noqa: E402


def book(n: int, american_share: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """n contracts around spot 100: strikes 70..130, 1 day..2 years, vols 10..80%, calls and puts."""
    return (
        (rng.random(n) < 0.2).astype(np.int64),  # 20% Black-76
        rng.uniform(80.0, 120.0, n),
        rng.uniform(70.0, 130.0, n),
        rng.uniform(1 / 365, 2.0, n),
        rng.uniform(0.0, 0.05, n),
        rng.uniform(0.0, 0.04, n),
        rng.uniform(0.1, 0.8, n),
        rng.random(n) < 0.5,
        rng.random(n) < american_share,
    )


def best_seconds(fn, repeat: int) -> float:
    """Fastest wall time of `repeat` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def scenario_pnl(
    b: tuple[np.ndarray, ...], spot_mult: np.ndarray, vol_mult: np.ndarray, method: int
) -> np.ndarray:
    """calc.options.scenario_rows of one unit of each contract (multiplier 1) on its underlying's column."""
    n = b[1].shape[0]
    v0 = options.price_greeks(*b, method)[0]
    col = np.arange(n, dtype=np.int64) % UNDERLYINGS
    return options.scenario_rows(*b, np.ones(n), v0, col, spot_mult, vol_mult, method)


def one_thread(
    b: tuple[np.ndarray, ...], spot_mult: np.ndarray, vol_mult: np.ndarray, method: int
) -> np.ndarray:
    """`scenario_pnl` with numba limited to one thread."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return scenario_pnl(b, spot_mult, vol_mult, method)
    finally:
        numba.set_num_threads(threads)


UNDERLYINGS = 20  # the demo's universe: contract i is on underlying i % UNDERLYINGS


def multipliers(n_s: int) -> tuple[np.ndarray, np.ndarray]:
    """The (scenarios x underlyings) spot and vol multipliers, the same in every run and tree."""
    rng = np.random.default_rng(14)
    return np.exp(rng.normal(0.0, 0.03, (n_s, UNDERLYINGS))), np.exp(
        rng.normal(0.0, 0.08, (n_s, UNDERLYINGS))
    )


def per_contract(n: int, mult: np.ndarray) -> np.ndarray:
    """(scenarios x contracts): each contract's column of the per-underlying multipliers."""
    return np.ascontiguousarray(mult[:, np.arange(n) % UNDERLYINGS])


BOOKS = (
    ("European", 0.0, options.BS2002),
    ("20% American, BS2002", 0.2, options.BS2002),
    ("20% American, BS1993", 0.2, options.BS1993),
)


def book_of(index: int, n: int) -> tuple[np.ndarray, ...]:
    """BOOKS[index]'s contracts (its own seed, so that a child process builds the same book)."""
    return book(n, BOOKS[index][1], np.random.default_rng(15 + index))


def numba_seconds(index: int, n: int, n_s: int, repeat: int) -> tuple[float, float]:
    """(parallel, one thread) best seconds of `scenario_pnl` on BOOKS[index]."""
    b, (spot_mult, vol_mult), method = book_of(index, n), multipliers(n_s), BOOKS[index][2]
    return (
        best_seconds(lambda: scenario_pnl(b, spot_mult, vol_mult, method), repeat),
        best_seconds(lambda: one_thread(b, spot_mult, vol_mult, method), repeat),
    )


def baseline_seconds(tree: str, index: int, n: int, n_s: int, repeat: int) -> tuple[float, float]:
    """numba_seconds in a child process that imports `tree`'s calc (its kernels, this script's books)."""
    cmd = [sys.executable, __file__, "--child", str(index), "--contracts", str(n), "--scenarios", str(n_s)]
    env = {**os.environ, "MF_BENCH_TREE": tree, "PYTHONPATH": tree}
    out = subprocess.run([*cmd, "--repeat", str(repeat)], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.splitlines()[-1]))


def numpy_bsm(b: tuple[np.ndarray, ...], spot_mult: np.ndarray, vol_mult: np.ndarray) -> np.ndarray:
    """European BSM (Black-76 as q = r) over the whole (scenarios x contracts) matrix with numpy/scipy."""
    model, spot, strike, t, r, q, vol, is_call, _american = b
    q = np.where(model == options.MODEL_BLACK76, r, q)
    s = spot * spot_mult
    sd = vol * vol_mult * np.sqrt(t)
    d1 = (np.log(s / strike) + (r - q) * t) / sd + 0.5 * sd
    d2 = d1 - sd
    sign = np.where(is_call, 1.0, -1.0)
    return sign * (s * np.exp(-q * t) * ndtr(sign * d1) - strike * np.exp(-r * t) * ndtr(sign * d2))


def quantlib_rate(
    b: tuple[np.ndarray, ...], spot_mult: np.ndarray, vol_mult: np.ndarray, sample: int
) -> float:
    """Revaluations per second of a QuantLib loop: per contract one option on quotes, each scenario sets
    the spot and vol quotes and asks the NPV (`sample` revaluations timed, extrapolated)."""
    import QuantLib as ql

    today = ql.Date(1, 6, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    model, spot, strike, t, r, q, vol, is_call, american = b
    n_contracts = min(len(spot), 50)
    per_contract = max(1, min(spot_mult.shape[0], sample // n_contracts))  # at most the scenarios there are
    total = 0.0
    for i in range(n_contracts):
        spot_q, vol_q = ql.SimpleQuote(spot[i]), ql.SimpleQuote(vol[i])
        rate = ql.YieldTermStructureHandle(ql.FlatForward(today, r[i], dc))
        vol_h = ql.BlackVolTermStructureHandle(
            ql.BlackConstantVol(today, ql.NullCalendar(), ql.QuoteHandle(vol_q), dc)
        )
        if model[i] == options.MODEL_BLACK76:
            process = ql.BlackProcess(ql.QuoteHandle(spot_q), rate, vol_h)
        else:
            div = ql.YieldTermStructureHandle(ql.FlatForward(today, q[i], dc))
            process = ql.BlackScholesMertonProcess(ql.QuoteHandle(spot_q), div, rate, vol_h)
        expiry = today + max(1, int(round(t[i] * 365)))
        payoff = ql.PlainVanillaPayoff(ql.Option.Call if is_call[i] else ql.Option.Put, strike[i])
        if american[i]:
            option = ql.VanillaOption(payoff, ql.AmericanExercise(today, expiry))
            option.setPricingEngine(ql.BjerksundStenslandApproximationEngine(process))
        else:
            option = ql.VanillaOption(payoff, ql.EuropeanExercise(expiry))
            option.setPricingEngine(ql.AnalyticEuropeanEngine(process))
        start = time.perf_counter()
        for s in range(per_contract):
            spot_q.setValue(spot[i] * spot_mult[s, i])
            vol_q.setValue(vol[i] * vol_mult[s, i])
            option.NPV()
        total += time.perf_counter() - start
    return n_contracts * per_contract / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contracts", type=int, default=1000)
    ap.add_argument("--scenarios", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quantlib-sample", type=int, default=20000)
    ap.add_argument("--baseline-tree", help="a checkout of another tree: its kernels on the same books")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one book's numba seconds, as JSON
    args = ap.parse_args()
    n, n_s = args.contracts, args.scenarios
    if args.child is not None:
        print(json.dumps(numba_seconds(args.child, n, n_s, args.repeat)))
        return
    spot_mult, vol_mult = (per_contract(n, m) for m in multipliers(n_s))  # (numpy's and QuantLib's)
    threads = numba.get_num_threads()
    revals = n * n_s
    print(
        f"{n} contracts x {n_s} scenarios = {revals:,} revaluations; "
        f"numba threads {threads}, cpus {os.cpu_count()}"
    )
    print()
    print("| book | method | seconds | revaluations/s | per core | vs numba parallel |")
    print("|---|---|---:|---:|---:|---:|")
    for index, (label, share, _method) in enumerate(BOOKS):
        b = book_of(index, n)
        parallel, single = numba_seconds(index, n, n_s, args.repeat)
        rows = [("numba parallel", parallel, threads), ("numba 1 thread", single, 1)]
        if args.baseline_tree:
            parallel, single = baseline_seconds(args.baseline_tree, index, n, n_s, args.repeat)
            rows += [
                ("numba parallel, baseline tree", parallel, threads),
                ("numba 1 thread, baseline tree", single, 1),
            ]
        if share == 0.0:
            rows.append(
                (
                    "numpy/scipy BSM",
                    best_seconds(lambda b=b: numpy_bsm(b, spot_mult, vol_mult), args.repeat),
                    1,
                )
            )
        ql_rate = quantlib_rate(b, spot_mult, vol_mult, args.quantlib_sample)
        rows.append(("QuantLib loop (sampled)", revals / ql_rate, 1))
        base = rows[0][1]
        for name, seconds, cores in rows:
            rate = revals / seconds
            print(
                f"| {label} | {name} | {seconds:.4f} | {rate:,.0f} | {rate / cores:,.0f} "
                f"| {base / seconds:.3f} |"
            )


if __name__ == "__main__":
    main()
