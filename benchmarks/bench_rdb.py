"""rdb: rows/s applied (Arrow batches at 1 ms and 100 ms publish intervals) vs INSERT per row and INSERT
per batch; `select last bid by sym from quote` on 10M rows (from latest.quote, and by a full scan) vs a
window query and a Python loop; as-of join of 1M trades against 10M quotes vs a window forward-fill and a
correlated subquery. Prints a markdown table.
Usage: python benchmarks/bench_rdb.py [--quotes 10000000] [--trades 1000000] [--rate 1000000]"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdb import query  # noqa: E402
from rdb.qsql import default_catalog, translate  # noqa: E402
from rdb.store import Store  # noqa: E402
from schemas.tables import TABLES  # noqa: E402

T0 = 1_705_311_000_000_000_000  # 2024-01-15 09:30 UTC
SYMS = np.array([f"S{i:03d}" for i in range(100)])


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best wall seconds of `repeat` calls (the machine is shared: the minimum is the least disturbed), and
    the last result."""
    out, res = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        out.append(time.perf_counter() - t0)
    return min(out), res


def quotes(n: int, seq0: int, rng: np.random.Generator, stamp_every: int = 8) -> pa.Table:
    """n quotes, seq seq0.., one time stamp per `stamp_every` rows (as a tickerplant stamps a message)."""
    i = np.arange(n, dtype=np.int64)
    mid = 100 + rng.standard_normal(n).cumsum() * 0.01
    return pa.table({
        "time": pa.array(T0 + (seq0 + i) // stamp_every * 2_000_000, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(seq0 + i), "sym": pa.array(SYMS[rng.integers(0, len(SYMS), n)]),
        "bid": pa.array(mid - 0.01), "ask": pa.array(mid + 0.01),
        "bid_size": pa.array(rng.integers(1, 1000, n)), "ask_size": pa.array(rng.integers(1, 1000, n)),
    })  # fmt: skip


def ipc_batches(t: pa.Table, rows: int) -> list[bytes]:
    """The table cut into Arrow IPC messages of `rows` rows, as the tickerplant publishes them."""
    out = []
    for b in t.to_batches(max_chunksize=rows):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, b.schema) as w:
            w.write_batch(b)
        out.append(sink.getvalue().to_pybytes())
    return out


def bench_append(tmp: Path, rate: int, total: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    rows = []
    data = quotes(total, 1, rng)
    per_batch = {}
    for interval_ms in (1, 100):
        size = max(1, rate * interval_ms // 1000)
        msgs = ipc_batches(data, size)
        store = Store(tmp / f"a{interval_ms}", memory_limit="2GB")

        def apply(store: Store = store, msgs: list[bytes] = msgs) -> int:
            for m in msgs:
                store.append("quote", pa.ipc.open_stream(m).read_all())
            return store.flush()

        t0 = time.perf_counter()
        apply()
        dt = time.perf_counter() - t0
        assert store.rows()["quote"] == total
        per_batch[interval_ms] = (size, len(msgs))
        rows.append((f"apply {total:,} quote rows, {interval_ms} ms publishes "
                     f"({size:,} rows/batch, {len(msgs):,} batches), coalesced Arrow appends",
                     f"{total / dt:,.0f} rows/s", ""))  # fmt: skip
        store.close()
        # the same batches, one INSERT each (no coalescing)
        if interval_ms == 1:
            store = Store(tmp / "b", memory_limit="2GB")
            n = min(len(msgs), 2000)

            def per_insert(store: Store = store, msgs: list[bytes] = msgs[:n]) -> None:
                for m in msgs:
                    store.con.register("__b", pa.ipc.open_stream(m).read_all())
                    store.con.execute("INSERT INTO quote SELECT * FROM __b")
                    store.con.unregister("__b")

            t0 = time.perf_counter()
            per_insert()
            dt1 = time.perf_counter() - t0
            rows.append((f"  same 1 ms batches, one INSERT per batch ({n:,} batches)",
                         f"{n * size / dt1:,.0f} rows/s",
                         f"coalesced is {total / dt / (n * size / dt1):.1f}x"))  # fmt: skip
            store.close()
    # naive: one INSERT statement per row
    store = Store(tmp / "c", memory_limit="2GB")
    n = 2_000
    cols = TABLES["quote"].column_names
    pyrows = data.slice(0, n).to_pylist()
    ins = f"INSERT INTO quote VALUES ({', '.join('?' for _ in cols)})"
    t0 = time.perf_counter()
    for r in pyrows:
        store.con.execute(ins, [r[c] for c in cols])
    dtn = time.perf_counter() - t0
    naive = n / dtn
    store.close()
    rows.append((f"  naive: one INSERT per row ({n:,} rows)", f"{naive:,.0f} rows/s", ""))
    for r in range(len(rows)):
        if rows[r][0].startswith("apply"):
            rate_r = float(rows[r][1].split()[0].replace(",", ""))
            rows[r] = (rows[r][0], rows[r][1], f"{rate_r / naive:,.0f}x naive")
    return rows


def bench_queries(
    tmp: Path, n_quotes: int, n_trades: int, rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    rows = []
    store = Store(tmp / "q", memory_limit="6GB")
    t0 = time.perf_counter()
    chunk = 1_000_000
    for s in range(0, n_quotes, chunk):
        store.append("quote", quotes(min(chunk, n_quotes - s), 1 + s, rng))
    # trades spread over the same period; their seq interleave with the quotes' (odd offsets above them)
    tr_i = np.sort(rng.choice(n_quotes, n_trades, replace=False)).astype(np.int64)
    trade = pa.table({
        "time": pa.array(T0 + (1 + tr_i) // 8 * 2_000_000, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(n_quotes + 1 + np.arange(n_trades, dtype=np.int64)),
        "sym": pa.array(SYMS[rng.integers(0, len(SYMS), n_trades)]),
        "price": pa.array(100 + rng.standard_normal(n_trades)),
        "size": pa.array(rng.integers(1, 1000, n_trades)),
    })  # fmt: skip
    store.append("trade", trade)
    store.flush()
    load = time.perf_counter() - t0
    del trade
    gc.collect()

    # last bid by sym (the quote table has bid/ask, no price)
    text = "select last bid by sym from quote"
    tr = translate(text)  # the rdb's translation: reads latest.quote, the last row per sym kept at each flush
    assert "latest" in tr.sql
    ours, res = timed(lambda: query.run(store, tr.sql, timeout_s=600, max_rows=10_000), repeat=5)
    scan_cat = {k: v for k, v in default_catalog().items() if not k.startswith("latest.")}
    scan = translate(text, scan_cat)  # the general path: arg_max_null(bid, seq) over the whole table
    ours_scan, sres = timed(lambda: query.run(store, scan.sql, timeout_s=600, max_rows=10_000), repeat=5)
    assert sres.table.equals(res.table)
    cur = store.cursor()
    window_sql = (
        "SELECT sym, bid FROM quote "
        "QUALIFY row_number() OVER (PARTITION BY sym ORDER BY seq DESC) = 1 ORDER BY sym"
    )
    win, wres = timed(lambda: cur.sql(window_sql).to_arrow_table(), repeat=3)
    assert wres.column("bid").to_pylist() == res.table.column("bid").to_pylist()

    def python_loop() -> dict:
        t = cur.sql("SELECT sym, seq, bid FROM quote").to_arrow_table()
        last: dict[str, tuple[int, float]] = {}
        for s, q, b in zip(
            t.column(0).to_pylist(), t.column(1).to_pylist(), t.column(2).to_pylist(), strict=True
        ):
            if s not in last or q > last[s][0]:
                last[s] = (q, b)
        return last

    loop, lres = timed(python_loop, repeat=1)
    assert [lres[s][1] for s in sorted(lres)] == res.table.column("bid").to_pylist()
    rows.append((f"`select last bid by sym from quote`, {n_quotes:,} rows, {len(SYMS)} syms: "
                 "from latest.quote",
                 f"{ours * 1e3:,.1f} ms", f"window row_number: {win * 1e3:,.0f} ms ({win / ours:,.0f}x); "
                 f"Python loop: {loop * 1e3:,.0f} ms ({loop / ours:,.0f}x)"))  # fmt: skip
    rows.append(("  same query, general path: arg_max_null(bid, seq) scanning every row",
                 f"{ours_scan * 1e3:,.0f} ms", f"window row_number: {win / ours_scan:.1f}x; Python loop: "
                 f"{loop / ours_scan:.0f}x"))  # fmt: skip

    # as-of join
    aj = translate("aj[`sym`time;trade;quote]")
    ours_aj, ares = timed(lambda: query.run(store, aj.sql, timeout_s=600, max_rows=n_trades), repeat=3)
    assert ares.rows == n_trades
    bid_sum = np.nansum(ares.table.column("bid").to_numpy(zero_copy_only=False))
    ff_sql = """
        WITH u AS (
            SELECT sym, time, seq, 1 AS is_trade, NULL::DOUBLE AS bid FROM trade
            UNION ALL SELECT sym, time, seq, 0, bid FROM quote)
        SELECT seq, last_value(bid IGNORE NULLS) OVER (PARTITION BY sym ORDER BY time, is_trade, seq
                                                       ROWS UNBOUNDED PRECEDING) AS bid
        FROM u QUALIFY is_trade = 1"""
    ff, fres = timed(lambda: cur.sql(ff_sql).to_arrow_table(), repeat=1)
    assert fres.num_rows == n_trades
    assert abs(np.nansum(fres.column("bid").to_numpy(zero_copy_only=False)) - bid_sum) < 1e-6 * abs(bid_sum)
    k = 200
    corr_sql = f"""
        SELECT t.seq, (SELECT q.bid FROM quote q WHERE q.sym = t.sym AND q.time <= t.time
                       ORDER BY q.time DESC, q.seq DESC LIMIT 1) AS bid
        FROM (SELECT * FROM trade ORDER BY seq LIMIT {k}) t"""
    corr, _ = timed(lambda: cur.sql(corr_sql).to_arrow_table(), repeat=1)
    corr_full = corr / k * n_trades
    rows.append((f"`aj[`sym`time;trade;quote]`: {n_trades:,} trades x {n_quotes:,} quotes "
                 "(ASOF on time, ties by seq)",
                 f"{ours_aj * 1e3:,.0f} ms",
                 f"window forward-fill: {ff * 1e3:,.0f} ms ({ff / ours_aj:.1f}x); correlated subquery: "
                 f"{corr * 1e3:,.0f} ms for {k} trades = ~{corr_full:,.0f} s for all "
                 f"({corr_full / ours_aj:,.0f}x)"))  # fmt: skip
    rows.append((f"(setup: {n_quotes + n_trades:,} rows loaded in {load:.1f} s)", "", ""))
    cur.close()
    store.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quotes", type=int, default=10_000_000)
    ap.add_argument("--trades", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=1_000_000, help="publish rate simulated, rows/s")
    ap.add_argument("--append-rows", type=int, default=2_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = bench_append(tmp, args.rate, args.append_rows, rng)
        gc.collect()
        rows += bench_queries(tmp, args.quotes, args.trades, rng)
    print(
        f"\nrdb benchmark ({os.cpu_count()} cores; load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end)\n"
    )
    print("| measurement | result | naive way, same run |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
