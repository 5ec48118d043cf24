"""SPAN on the real Takasbank file: parse time; full SPAN for 1,000 accounts x 50 positions; incremental fill
updates/s; each beside a naive per-account pure-Python loop (calc.span.reference) in the same run.
Prints a markdown table. Usage: python benchmarks/bench_span.py [--accounts 1000] [--fills 200000]"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calc.span import SpanBook, load_span_file  # noqa: E402
from calc.span.reference import ReferenceSpan  # noqa: E402

SPN = Path(__file__).resolve().parent.parent / "data" / "span" / "takasbank_2016-05-17.spn"


def timed(fn, repeat: int = 1) -> float:
    """Median wall seconds of `repeat` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def make_book(params, n_acct: int, n_pos: int, rng: np.random.Generator) -> tuple[SpanBook, list[np.ndarray]]:
    """Each account holds n_pos contracts drawn from 4 CCs (futures and options), quantities -20..20."""
    by_cc: dict[int, np.ndarray] = {}
    for c in range(len(params.cc_names)):
        rows = np.flatnonzero(params.c_cc == c)
        if rows.size >= 5:
            by_cc[c] = rows
    ccs = np.array(sorted(by_cc))
    book = SpanBook(params, [f"acct{i:04d}" for i in range(n_acct)], capacity=n_acct)
    universes = []
    rows = []
    for a in range(n_acct):
        pool = np.concatenate([by_cc[c] for c in rng.choice(ccs, 4, replace=False)])
        picks = rng.choice(pool, min(n_pos, pool.size), replace=False)
        universes.append(pool)
        q = rng.integers(1, 21, picks.size) * rng.choice([-1, 1], picks.size)
        rows += [(book.accounts[a], params.keys[k], float(x)) for k, x in zip(picks, q, strict=True)]
    book.set_positions(rows)
    return book, universes


def fills_for(universes: list[np.ndarray], n: int, rng: np.random.Generator):
    acct = rng.integers(0, len(universes), n)
    con = np.array([universes[a][rng.integers(0, universes[a].size)] for a in acct])
    dq = rng.integers(1, 6, n) * rng.choice([-1.0, 1.0], n)
    return acct.astype(np.int64), con.astype(np.int64), dq


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--positions", type=int, default=50)
    ap.add_argument("--fills", type=int, default=200_000)
    ap.add_argument("--naive-fills", type=int, default=2_000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(20160517)

    t_parse = timed(lambda: load_span_file(SPN), repeat=5)
    c0 = time.process_time()
    for _ in range(5):
        load_span_file(SPN)
    cpu_parse = (time.process_time() - c0) / 5  # CPU time: less sensitive to other processes on the box
    params = load_span_file(SPN)

    book, universes = make_book(params, args.accounts, args.positions, rng)  # also warms the numba cache
    n_pos = int(sum(len(book.positions(a)) for a in book.accounts))
    t_full = timed(book.recompute_full, repeat=5)

    ref = ReferenceSpan(params)
    positions = [book.positions(a) for a in book.accounts]
    naive_totals: list[float] = []
    t_naive_full = timed(
        lambda: naive_totals.extend(ref.margin(p)["total"].get("TRY", 0.0) for p in positions)
    )
    np.testing.assert_allclose(book.totals()[:, 0], naive_totals, rtol=1e-9, atol=1e-6)

    # incremental: batched fills through the numba kernel (warm-up batch first)
    acct, con, dq = fills_for(universes, args.fills, rng)
    book.apply_fills(acct[:1000], con[:1000], dq[:1000])
    t0 = time.perf_counter()
    book.apply_fills(acct, con, dq)
    t_inc = time.perf_counter() - t0
    # the same state by full recompute: the incremental path must agree
    after = book.totals().copy()
    book.recompute_full()
    drift = float(np.abs(after - book.totals()).max())
    # one fill per call through the Python API (what a caller without batching gets)
    n_single = 20_000
    a1, c1, d1 = fills_for(universes, n_single, rng)
    keys = [params.keys[k] for k in c1]
    names = [book.accounts[a] for a in a1]
    t0 = time.perf_counter()
    for i in range(n_single):
        book.fill(names[i], keys[i], d1[i])
    t_single = time.perf_counter() - t0
    # naive incremental: a pure-Python recompute of the account after each fill
    an, cn, dn = fills_for(universes, args.naive_fills, rng)
    held = [dict(p) for p in positions]
    t0 = time.perf_counter()
    for i in range(an.size):
        pos = held[an[i]]
        key = params.keys[cn[i]]
        pos[key] = pos.get(key, 0.0) + dn[i]
        ref.margin(pos)
    t_naive_inc = time.perf_counter() - t0

    inc_rate = acct.size / t_inc
    single_rate = n_single / t_single
    naive_rate = an.size / t_naive_inc
    print(f"SPAN benchmark: {SPN.name} ({params.n_contracts} contracts, {len(params.cc_names)} CCs), "
          f"{args.accounts} accounts, {n_pos} positions\n")  # fmt: skip
    print("| measure | marginflow (numba) | naive pure Python | ratio |")
    print("|---|---|---|---|")
    print(
        f"| parse Takasbank SPAN XML (median of 5) | {t_parse * 1e3:.0f} ms wall, {cpu_parse * 1e3:.0f} ms CPU "
        f"| - | target <= 1000 ms |"
    )
    print(
        f"| full SPAN, {args.accounts} accounts x {args.positions} positions | {t_full * 1e3:.1f} ms "
        f"| {t_naive_full * 1e3:.0f} ms | {t_naive_full / t_full:.0f}x |"
    )
    print(
        f"| incremental fills, batched ({acct.size:,} fills) | {inc_rate:,.0f} fills/s "
        f"| {naive_rate:,.0f} fills/s | {inc_rate / naive_rate:.0f}x |"
    )
    print(
        f"| incremental fills, one `SpanBook.fill` call each | {single_rate:,.0f} fills/s "
        f"| {naive_rate:,.0f} fills/s | {single_rate / naive_rate:.0f}x |"
    )
    print(f"\nincremental vs full recompute after {acct.size:,} fills: max |diff| of totals = {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
