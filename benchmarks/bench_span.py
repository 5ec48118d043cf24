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
    ap.add_argument("--engine-accounts", type=int, default=1000, help="SPAN accounts in the engine section")
    ap.add_argument("--engine-fills", type=int, default=50_000)
    ap.add_argument(
        "--engine-batch", type=int, default=100, help="fills per changed_rows() in the engine section"
    )
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
        f"| parse Takasbank SPAN XML (median of 5) | {t_parse * 1e3:.0f} ms wall, "
        f"{cpu_parse * 1e3:.0f} ms CPU | - | target <= 1000 ms |"
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
    engine_section(params, args, rng)
    return 0


# ---------------------------------------------------------------- SPAN accounts in the streaming engine


class _Stateless:
    """The `span` model without `evaluate_account`: the engine then re-evaluates a changed account from
    scratch (a fresh SpanBook of its positions) - the naive way, for the comparison."""

    def __init__(self, model) -> None:
        self.model = model
        self.param_id = model.param_id

    def instrument(self, sym: str):
        return self.model.instrument(sym)

    def evaluate(self, syms, qty, price, multiplier):
        return self.model.evaluate(syms, qty, price, multiplier)


def engine_section(params, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Fills for SPAN accounts through MarginEngine (validation, slots, per-account SpanBook update, margin
    rows with drivers), batches of `--engine-batch` fills each followed by changed_rows(), as calc does per
    publish; against the same engine re-evaluating each changed account from scratch."""
    from calc.engine import MarginEngine
    from calc.inputs import AccountSpec, Positions, params_from_config
    from calc.models import EXTERNAL_MODELS, register_model
    from calc.span import SpanModel, format_key
    from marginflow import config

    calc = config.load().calc
    risk = params_from_config(calc)
    book, universes = make_book(
        params, args.engine_accounts, args.positions, rng
    )  # fresh start-of-day positions
    n_acct = args.engine_accounts
    names = book.accounts
    pos_a, pos_s, pos_q = [], [], []
    for a in names:
        for key, q in book.positions(a).items():
            pos_a.append(a)
            pos_s.append(format_key(key))
            pos_q.append(q)
    positions = Positions(pos_a, pos_s, np.array(pos_q))
    register_model("span_stateless", lambda c: _Stateless(SpanModel.from_config(c)))

    def run(model: str, n_fills: int) -> tuple[float, int, MarginEngine]:
        eng = MarginEngine(risk, [AccountSpec(a, model, 1e6) for a in names], positions, calc_config=calc)
        eng.changed_rows()
        acct, con, dq = fills_for(universes[:n_acct], n_fills, rng)
        syms = [format_key(params.keys[k]) for k in con]
        accts = [names[a] for a in acct]
        side = np.where(dq > 0, "B", "S").tolist()
        qty, px, seq = np.abs(dq), np.ones(n_fills), np.arange(1, n_fills + 1)
        b = args.engine_batch
        rows = 0
        t0 = time.perf_counter()
        for i in range(0, n_fills, b):
            eng.apply_fills(
                accts[i : i + b],
                syms[i : i + b],
                side[i : i + b],
                qty[i : i + b],
                px[i : i + b],
                seq[i : i + b],
            )
            rows += len(eng.changed_rows()["account"])
        return time.perf_counter() - t0, rows, eng

    try:
        t_inc, rows_inc, eng = run("span", args.engine_fills)
        t_naive, rows_naive, _ = run("span_stateless", args.engine_fills // 10)
    finally:
        EXTERNAL_MODELS.pop("span_stateless", None)
    np.testing.assert_allclose(eng.compute_full()["margin"], eng.margin, rtol=1e-9, atol=1e-6)
    inc, naive = args.engine_fills / t_inc, (args.engine_fills // 10) / t_naive
    print(
        f"\nSPAN accounts in the streaming engine (MarginEngine, model span): {n_acct} accounts, "
        f"{len(pos_a)} positions, batches of {args.engine_batch} fills, each followed by changed_rows()\n"
    )
    print("| measure | incremental (SpanModel.evaluate_account) | from scratch per changed account | ratio |")
    print("|---|---|---|---|")
    print(
        f"| fills/s, end to end to margin rows ({args.engine_fills:,} / {args.engine_fills // 10:,} fills) "
        f"| {inc:,.0f} fills/s ({rows_inc / t_inc:,.0f} rows/s) | {naive:,.0f} fills/s "
        f"({rows_naive / t_naive:,.0f} rows/s) | {inc / naive:.1f}x |"
    )


if __name__ == "__main__":
    sys.exit(main())
