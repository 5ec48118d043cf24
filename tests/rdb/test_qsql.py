"""qSQL translator: each translated query, run by DuckDB, equals a hand-written SQL query (or a hand
calculation) on a fixture built to catch order mistakes: rows stored out of seq order, equal times, quotes
arriving after a trade with the same time, a sym with no quote, seq restarting on the next day."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from rdb import hdb, qsql, query
from rdb.qsql import QError, tokenize
from rdb.store import Store
from schemas.tables import TABLES

D = "2024-01-15"
# the plain fixture below has no latest.* tables: every query takes the general (scanning) path
GENERAL = {k: v for k, v in qsql.default_catalog().items() if not k.startswith("latest.")}


def translate(text: str) -> qsql.Translation:
    return qsql.translate(text, GENERAL)


def ts(hms: str) -> str:
    return f"TIMESTAMP_NS '{D} {hms}'"


# (time, seq, sym, price, size), stored in this physical order: seq is NOT increasing down the table, so
# "last row stored" and "last arrived" differ; A has two trades at 10:03:00 (seq 5 then 3 stored)
TRADES = [
    ("10:00:00", 1, "A", 10.0, 100),
    ("10:00:00", 2, "B", 20.0, 200),
    ("10:03:00", 5, "A", 12.0, 50),
    ("10:03:00", 3, "A", 11.0, 300),
    ("10:07:00", 4, "B", 21.0, 10),
    ("10:07:30", 6, "C", 30.0, 5),
    ("10:13:59.999999999", 7, "A", 13.0, 70),
    ("10:14:00", 8, "B", 22.0, 20),
]
# (time, seq, sym, bid, ask, bid_size, ask_size): two A quotes at 10:00:00 stored seq 12 before 11; an A quote
# at 10:03:00 that arrived after the 10:03 trades (seq 20 > 5) still counts for them (aj matches on time);
# C has no quote at or before its trade
QUOTES = [
    ("09:59:00", 10, "A", 9.9, 10.1, 1, 1),
    ("10:00:00", 12, "A", 9.95, 10.2, 2, 2),
    ("10:00:00", 11, "A", 9.8, 10.0, 3, 3),
    ("10:03:00", 20, "A", 10.9, 11.1, 4, 4),
    ("10:05:00", 13, "B", 20.5, 21.5, 5, 5),
    ("10:08:00", 21, "C", 29.0, 31.0, 6, 6),
    ("10:14:00", 9, "B", 21.5, 22.5, 7, 7),
]


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    for t in TABLES.values():
        c.execute(t.ddl())
    for r in TRADES:
        c.execute(f"INSERT INTO trade VALUES ({ts(r[0])}, ?, ?, ?, ?)", list(r[1:]))
    for r in QUOTES:
        c.execute(f"INSERT INTO quote VALUES ({ts(r[0])}, ?, ?, ?, ?, ?, ?)", list(r[1:]))
    return c


def q(con: duckdb.DuckDBPyConnection, text: str) -> list[tuple]:
    return con.sql(translate(text).sql).fetchall()


def sql(con: duckdb.DuckDBPyConnection, text: str) -> list[tuple]:
    return con.sql(text).fetchall()


# ---- first / last follow seq, by results are keyed and sorted ----------------------------------------------
def test_last_by_sym_follows_seq_not_storage_order(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("select last price by sym from trade")
    assert (tr.keys, tr.shape, tr.columns) == (1, "table", ("sym", "price"))
    want = sql(
        con,
        "SELECT sym, price FROM trade "
        "QUALIFY row_number() OVER (PARTITION BY sym ORDER BY seq DESC) = 1 ORDER BY sym",
    )
    assert q(con, "select last price by sym from trade") == want == [("A", 13.0), ("B", 22.0), ("C", 30.0)]
    # storage order would give A's 10:03 pair reversed: the first A price by seq is 10.0, second by seq 11.0
    assert q(con, "select first price by sym from trade") == [("A", 10.0), ("B", 20.0), ("C", 30.0)]
    assert q(con, "select last price by sym from trade where time<=2024.01.15D10:03:00") == [
        ("A", 12.0),
        ("B", 20.0),
    ]


def test_select_by_without_columns_is_last_row_per_group(con: duckdb.DuckDBPyConnection) -> None:
    want = sql(
        con,
        "SELECT sym, time, seq, price, size FROM trade "
        "QUALIFY row_number() OVER (PARTITION BY sym ORDER BY seq DESC) = 1 ORDER BY sym",
    )
    assert q(con, "select by sym from trade") == want
    assert translate("select by sym from trade").columns == ("sym", "time", "seq", "price", "size")


def test_aggregates_by_sym_equal_group_by_sql(con: duckdb.DuckDBPyConnection) -> None:
    got = q(
        con,
        "select vwap:size wavg price, n:count i, hi:max price, lo:min price, tot:sum size, av:avg price "
        "by sym from trade",
    )
    want = sql(
        con,
        "SELECT sym, sum(size * price) / sum(size), count(*), max(price), min(price), sum(size), avg(price) "
        "FROM trade GROUP BY sym ORDER BY sym",
    )
    assert got == want
    # vwap by hand for A: (100*10 + 300*11 + 50*12 + 70*13) / 520
    assert got[0][1] == pytest.approx((1000 + 3300 + 600 + 910) / 520)


def test_non_aggregate_column_in_by_is_a_list_in_seq_order(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "select price by sym from trade") == [
        ("A", [10.0, 11.0, 12.0, 13.0]),
        ("B", [20.0, 21.0, 22.0]),
        ("C", [30.0]),
    ]


def test_multi_key_by_sorted_by_keys(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "select sum size by sym, 0D00:05:00 xbar time from trade")
    # by hand: 5-minute buckets from midnight
    rows: dict[tuple[str, dt.datetime], int] = {}
    for hms, _, sym, _, size in TRADES:
        t = dt.datetime.fromisoformat(f"{D}T{hms[:15]}")
        b = t.replace(minute=t.minute - t.minute % 5, second=0, microsecond=0)
        rows[(sym, b)] = rows.get((sym, b), 0) + size
    assert got == [(k[0], k[1], v) for k, v in sorted(rows.items())]


# ---- xbar buckets from midnight ----------------------------------------------------------------------------
def test_xbar_minutes_aligned_from_midnight(con: duckdb.DuckDBPyConnection) -> None:
    # 7 does not divide 1440: buckets anchored anywhere but midnight would differ
    got = q(con, "select n:count i, s:sum size by 7 xbar time.minute from trade")
    buckets: dict[dt.time, list[int]] = {}
    for hms, _, _, _, size in TRADES:
        h, m = int(hms[:2]), int(hms[3:5])
        mins = (h * 60 + m) // 7 * 7
        buckets.setdefault(dt.time(mins // 60, mins % 60), []).append(size)
    assert got == [(k, len(v), sum(v)) for k, v in sorted(buckets.items())]
    tr = translate("select count i by 7 xbar time.minute from trade")
    assert tr.columns == ("minute", "x")


def test_xbar_timestamp_keeps_nanoseconds_and_numeric_xbar(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "select t:0D00:07:00 xbar time, p:5 xbar price, s:100 xbar size from trade where seq=7")
    # 10:13:59.999999999 = minute 613.99 of the day -> 7-minute buckets from midnight: ... 602, 609, 616
    # -> 10:09
    assert got == [(dt.datetime(2024, 1, 15, 10, 9), 10.0, 0)]
    assert q(con, "select s:2 xbar time.second from trade where seq=7") == [(dt.time(10, 13, 58),)]


# ---- where: comma-separated constraints, left to right -----------------------------------------------------
def test_where_constraints_apply_left_to_right(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "select seq from trade where sym=`A, price>avg price")
    want = sql(
        con,
        "SELECT seq FROM trade WHERE sym = 'A' AND price > (SELECT avg(price) FROM trade WHERE sym = 'A')",
    )
    assert sorted(got) == sorted(want) == [(5,), (7,)]
    # the other order: the average over all rows (17.375), then sym
    assert q(con, "select seq from trade where price>avg price, sym=`B") == [(2,), (4,), (8,)]


def test_where_operators(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "exec seq from trade where sym in `A`C, size within 50 300") == sql(
        con, "SELECT seq FROM trade WHERE sym IN ('A', 'C') AND size BETWEEN 50 AND 300"
    )
    assert q(con, 'exec seq from trade where sym like "[AC]*", not size<60') == [(1,), (3,), (7,)]
    # plain selects keep the stored order (here deliberately not seq order)
    assert q(con, "exec seq from trade where time.minute within 10:03 10:07") == [(5,), (3,), (4,), (6,)]
    assert q(con, "exec seq from trade where i within 1 2") == [(2,), (3,)]  # rows 1 and 2 in seq order


def test_exec_shapes(con: duckdb.DuckDBPyConnection) -> None:
    assert translate("exec price from trade").shape == "list"
    assert translate("exec last price from trade").shape == "atom"
    assert q(con, "exec last price from trade") == [(22.0,)]
    assert translate("exec sym, price from trade").shape == "dict"
    assert translate("count trade").shape == "atom"
    assert q(con, "count trade") == [(8,)]
    assert q(con, "count select from trade where sym=`A") == [(4,)]


def test_mixed_select_broadcasts_aggregate(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "select seq, mx:max price, l:last size from trade where sym=`B")
    assert sorted(got) == [(2, 22.0, 20), (4, 22.0, 20), (8, 22.0, 20)]


def test_select_limits(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "select[2] seq from trade") == [(1,), (2,)]
    assert q(con, "select[-2] seq, price from trade") == [(7, 13.0), (8, 22.0)]
    assert q(con, "select[-3] seq from trade where sym=`A") == [(3,), (5,), (7,)]


def test_names_and_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    assert translate("select max price, min price, price*2 from trade").columns == (
        "price",
        "price1",
        "price2",
    )
    assert translate("select count i from trade").columns == ("x",)
    assert q(con, "select max price, min price from trade") == [(30.0, 10.0)]


# ---- aj ----------------------------------------------------------------------------------------------------
AS_OF = "FROM quote q WHERE q.sym = t.sym AND q.time <= t.time ORDER BY q.time DESC, q.seq DESC LIMIT 1"
AJ_REFERENCE = f"""
SELECT t.time,
       coalesce((SELECT q.seq {AS_OF}), t.seq),
       t.sym, t.price, t.size,
       (SELECT q.bid {AS_OF}),
       (SELECT q.ask {AS_OF}),
       (SELECT q.bid_size {AS_OF}),
       (SELECT q.ask_size {AS_OF})
FROM trade t ORDER BY t.seq
"""


def test_aj_equals_correlated_subquery(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("aj[`sym`time;trade;quote]")
    assert tr.columns == ("time", "seq", "sym", "price", "size", "bid", "ask", "bid_size", "ask_size")
    got = con.sql(tr.sql).fetchall()
    assert got == sql(con, AJ_REFERENCE)
    by_seq = {r[3]: r for r in got}  # keyed by trade price (unique)
    assert len(got) == len(TRADES)  # every trade row kept
    assert by_seq[10.0][5] == 9.95  # tie at 10:00:00: seq 12 (stored first) beats 11 — last arrival wins
    assert (
        by_seq[11.0][5] == 10.9 and by_seq[12.0][5] == 10.9
    )  # quote at the same time, arrived later: counts
    assert by_seq[30.0][5:] == (None, None, None, None) and by_seq[30.0][1] == 6  # C: no quote yet, keeps seq
    assert by_seq[22.0][5] == 21.5  # B at 10:14:00 equal time quote, lower seq
    assert by_seq[13.0][0] == dt.datetime(2024, 1, 15, 10, 13, 59, 999999)  # t's time kept (aj, not aj0)


def test_aj0_takes_quote_time_and_aj_on_subselects(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "aj0[`sym`time;trade;quote]")
    times = {r[3]: r[0] for r in got}
    assert times[13.0] == dt.datetime(2024, 1, 15, 10, 3)  # the A quote's time
    assert times[30.0] == dt.datetime(2024, 1, 15, 10, 7, 30)  # unmatched keeps t's
    sub = q(con, "aj[`sym`time;(select from trade where sym=`B);(select time, sym, bid from quote)]")
    assert [(r[2], r[3], r[5]) for r in sub] == [("B", 20.0, None), ("B", 21.0, 20.5), ("B", 22.0, 21.5)]


# ---- meta, tables, bare names, days view -------------------------------------------------------------------
def test_meta_and_tables(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("meta fill")
    assert tr.keys == 1
    assert q(con, "meta fill") == [
        ("time", "p", "", ""), ("seq", "j", "", ""), ("account", "s", "", ""), ("sym", "s", "", ""),
        ("side", "s", "", ""), ("qty", "f", "", ""), ("price", "f", "", ""), ("order_id", "s", "", ""),
        ("exec_id", "s", "", ""),
    ]  # fmt: skip
    assert ("source", "C", "", "") in q(con, "meta param")  # a text column, not a symbol
    assert [r[0] for r in q(con, "tables[]")] == sorted(TABLES)
    assert q(con, "trade") == sql(con, "SELECT * FROM trade")


def test_last_over_days_view_orders_by_date_then_seq(tmp_path: Path) -> None:
    store = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="512MB")
    t0 = 1_705_312_800_000_000_000

    def batch(seqs: list[int], prices: list[float], day: int) -> pa.Table:
        n = len(seqs)
        return pa.table({
            "time": pa.array(np.full(n, t0 + day * 86_400_000_000_000), pa.int64()).cast(pa.timestamp("ns")),
            "seq": pa.array(seqs, pa.int64()), "sym": ["A"] * n, "price": prices,
            "size": pa.array([1] * n, pa.int64()),
        })  # fmt: skip

    store.append("trade", batch([100, 101], [1.0, 2.0], 0))
    hdb.end_of_day(store, next_date="2024-01-16")
    store.append("trade", batch([1, 2], [3.0, 4.0], 1))  # seq restarts on the new day
    tr = translate("select last price, first price, n:count i by sym from days.trade")
    ans = query.run(store, tr.sql, timeout_s=5, max_rows=10)
    assert ans.table.to_pylist() == [{"sym": "A", "price": 4.0, "price1": 1.0, "n": 4}]
    ans = query.run(
        store, translate("select last price by date from days.trade").sql, timeout_s=5, max_rows=10
    )
    assert ans.table.column("price").to_pylist() == [2.0, 4.0]
    store.close()


# ---- errors and tokens -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("select from nope", "nope: no such table"),
        ("select nope from trade", "nope: no such column; columns are time, seq, sym, price, size"),
        ("select price from", "parse: unexpected end of input"),
        ("select price trade", "parse: unexpected 'trade' after 'price'"),
        ("select from trade where", "parse: where needs at least one constraint"),
        ("select 5 xbar sym from trade", "type: a numeric xbar"),
        ("aj[`sym`time;trade]", "rank: aj[`c1`c2;t;q] takes 3 arguments, got 2"),
        ("aj[`sym`bid;trade;quote]", "bid: join column missing from t"),
        ("select sym.minute from trade", "type: sym.minute needs a time column"),
        ("foo bar", "nyi:"),
        ("select price by sum size from trade", "type: a by column cannot be an aggregate"),
        ("select from trade where sym=`A ~ 1", "parse: unexpected '~'"),
        ("", "parse: empty expression"),
    ],
)
def test_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(QError) as e:
        translate(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_tokens_negative_numbers_and_vectors() -> None:
    kinds = [(t.kind, t.text) for t in tokenize("x-1")]
    assert kinds == [("name", "x"), ("op", "-"), ("number", "1")]
    assert [t.text for t in tokenize("1 -2 3")] == ["1", "-2", "3"]
    assert [t.text for t in tokenize("a: -2.5e1")] == ["a", ":", "-2.5e1"]
    assert [t.kind for t in tokenize("2024.01.15D09:30:00.5 0D00:05 09:30 `a`b \"s\" / comment")] == [
        "timestamp", "timespan", "time", "syms", "string",
    ]  # fmt: skip


def test_literals_in_sql(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "exec seq from trade where price>-1e3, size<>1j, price<>0n") == sql(
        con, "SELECT seq FROM trade"
    )
    assert q(con, "exec seq from trade where time>2024.01.15D10:07:00, time.date=2024.01.15") == [
        (6,),
        (7,),
        (8,),
    ]
    assert q(con, 'exec x:string sym from trade where sym="C"') == [("C",)]


def test_time_attributes_truncate_like_q(con: duckdb.DuckDBPyConnection) -> None:
    # 10:13:59.999999999: DuckDB's own casts would round this up to 10:14; q truncates
    got = q(
        con,
        "select time.date, time.time, time.minute, time.second, time.hh, time.mm, time.ss "
        "from trade where seq=7",
    )
    assert got == [
        (dt.date(2024, 1, 15), dt.time(10, 13, 59, 999000), dt.time(10, 13), dt.time(10, 13, 59), 10, 13, 59)
    ]


# ---- latest.* : the last row per key kept by the store -----------------------------------------------------
def test_latest_path_equals_general_path(tmp_path: Path) -> None:
    store = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="512MB", flush_rows=50)
    rng = np.random.default_rng(3)
    seq = 0

    def batch(n: int) -> pa.Table:
        nonlocal seq
        s = np.arange(seq + 1, seq + n + 1)
        seq += n
        return pa.table({
            "time": pa.array(1_705_312_800_000_000_000 + s // 4 * 1000, pa.int64()).cast(pa.timestamp("ns")),
            "seq": pa.array(s, pa.int64()), "sym": rng.choice(["A", "B", "C", "D"], n),
            "price": rng.uniform(1, 2, n),
            "size": pa.array(rng.integers(1, 9, n), pa.int64()),
        })  # fmt: skip

    cases = [
        "select last price by sym from trade",
        "select px:last price, last size by sym from trade",
        "select by sym from trade",
    ]
    for n in (7, 40, 3, 120, 1):  # flushes at 50 queued rows and before every query
        b = batch(n)
        store.append("trade", b)
        store.append("trade", b.slice(0, 2))  # replayed rows: dropped
        for text in cases:
            fast = qsql.translate(text)  # the default catalog has latest.trade
            assert "latest" in fast.sql
            slow = translate(text)
            assert "latest" not in slow.sql and fast.columns == slow.columns
            got = query.run(store, fast.sql, timeout_s=5, max_rows=100).table
            assert got.equals(query.run(store, slow.sql, timeout_s=5, max_rows=100).table)
    # not the key, a where, a non-last column: the general path
    for text in ["select last price by size from trade", "select last price by sym from trade where size>2",
                 "select max price by sym from trade",
                 "select last price by sym from days.trade"]:  # fmt: skip
        assert "latest" not in qsql.translate(text).sql
    hdb.end_of_day(store, next_date="2024-01-16")  # a new day: latest starts empty
    assert query.run(store, qsql.translate(cases[0]).sql, timeout_s=5, max_rows=10).rows == 0
    store.close()
