"""The q forms a q user types daily (issue #17): each translated query, run by DuckDB, equals hand-written SQL
or a hand calculation on the fixture of test_qsql (rows stored out of seq order, equal times) plus `px`, a
table without seq built for ties and nulls; empty results; each form's wrong use gets a one-line error; the
forms never write (they run in the sandbox, the day's rows unchanged) and keep a desk's restriction."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from rdb import qsql, query
from rdb.qsql import QError, like_regex
from rdb.store import Store
from schemas.tables import TABLES
from tests.rdb.test_qsql import GENERAL, QUOTES, TRADES, ts

# px: no seq (storage order is its order); ties on k and on v, a null k and a null v
PX = [
    ("b", 2.0, 1),
    ("a", 1.0, 2),
    ("b", 2.0, 3),
    (None, 5.0, 4),
    ("a", 3.0, 5),
    ("b", None, 6),
    ("a", 3.0, 7),
]
# wj: kx's worked example (code.kx.com/q/ref/wj, its seconds as timestamps of one day) and a fixture of
# ties and empty windows (wq stored out of time order; no seq: ties in time go by arrival = storage order)
KT = [("ibm", "10:01:01", 100), ("ibm", "10:01:04", 101), ("ibm", "10:01:08", 105)]
KQ_ASK = [101, 103, 103, 104, 104, 107, 108, 107, 108]
KQ_BID = [98, 99, 102, 103, 103, 104, 106, 106, 107]
KQ = [("ibm", f"10:01:0{1 + i}", a, b) for i, (a, b) in enumerate(zip(KQ_ASK, KQ_BID, strict=True))]
WT = [("A", "10:00:05", 1), ("A", "10:00:10", 2), ("B", "10:00:10", 3), ("A", "10:00:30", 4),
      ("C", "10:00:00", 5), ("B", "09:00:00", 6), ("A", "10:00:10", 7)]  # fmt: skip
WQ = [("A", "10:00:03", 1, 1.0), ("A", "10:00:03", 2, 2.0), ("A", "10:00:08", 5, 0.5),
      ("A", "10:00:08", 3, 3.5), ("B", "10:00:09", 7, 7.0), ("A", "10:00:11", 9, 9.0),
      ("B", "10:00:04", 6, 6.0)]  # fmt: skip
_TS, _SYM = "TIMESTAMP_NS", "VARCHAR"
CATALOG = {
    **GENERAL,
    "px": {"k": "VARCHAR", "v": "DOUBLE", "n": "BIGINT"},
    "kt": {"sym": _SYM, "time": _TS, "price": "BIGINT"},
    "kq": {"sym": _SYM, "time": _TS, "ask": "BIGINT", "bid": "BIGINT"},
    "wt": {"sym": _SYM, "time": _TS, "n": "BIGINT"},
    "wq": {"sym": _SYM, "time": _TS, "ask": "BIGINT", "bid": "DOUBLE"},
}
NOW = 1_705_313_100_123_456_789  # 2024-01-15 10:05:00.123456789 UTC


def translate(text: str) -> qsql.Translation:
    return qsql.translate(text, CATALOG, now_ns=NOW)


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    for t in TABLES.values():
        c.execute(t.ddl())
    for r in TRADES:
        c.execute(f"INSERT INTO trade VALUES ({ts(r[0])}, ?, ?, ?, ?)", list(r[1:]))
    for r in QUOTES:
        c.execute(f"INSERT INTO quote VALUES ({ts(r[0])}, ?, ?, ?, ?, ?, ?)", list(r[1:]))
    c.execute("CREATE TABLE px (k VARCHAR, v DOUBLE, n BIGINT)")
    c.executemany("INSERT INTO px VALUES (?, ?, ?)", PX)
    for name, rows in (("kt", KT), ("kq", KQ), ("wt", WT), ("wq", WQ)):
        cols = ", ".join(f"{n} {t}" for n, t in CATALOG[name].items())
        c.execute(f"CREATE TABLE {name} ({cols})")
        for r in rows:
            c.execute(f"INSERT INTO {name} VALUES (?, {ts(r[1])}{', ?' * (len(r) - 2)})", [r[0], *r[2:]])
    return c


def q(con: duckdb.DuckDBPyConnection, text: str) -> list[tuple]:
    return con.sql(translate(text).sql).fetchall()


def sql(con: duckdb.DuckDBPyConnection, text: str) -> list[tuple]:
    return con.sql(text).fetchall()


def stored(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple]:
    return sql(con, f"SELECT * FROM {table}")


# ---- n#t, -n#t ---------------------------------------------------------------------------------------------
def test_take_first_and_last_rows(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "3#trade") == stored(con, "trade")[:3]
    assert q(con, "-3#trade") == stored(con, "trade")[-3:]  # a table's order: as stored (arrival, in the rdb)
    assert q(con, "2#select seq, price from trade where sym=`A") == [(1, 10.0), (5, 12.0)]
    assert q(con, "-2#select seq from trade where sym=`A") == [(3,), (7,)]
    assert q(con, "-2#px") == stored(con, "px")[-2:]  # no seq: the stored order
    keyed = translate("2#select last price by sym from trade")
    assert keyed.keys == 1 and con.sql(keyed.sql).fetchall() == [("A", 13.0), ("B", 22.0)]
    assert q(con, "2#`sym xdesc trade") == sql(con, "SELECT * FROM trade WHERE seq IN (6, 2)")[::-1]


def test_take_more_than_there_is_repeats_and_empty_gives_nulls(con: duckdb.DuckDBPyConnection) -> None:
    b = [(2,), (4,), (8,)]  # B's seqs
    assert q(con, "7#select seq from trade where sym=`B") == (b * 3)[:7]
    assert q(con, "-5#select seq from trade where sym=`B") == [(4,), (8,), (2,), (4,), (8,)]  # q: -5#2 4 8
    assert q(con, "2#select seq, sym from trade where sym=`Z") == [(None, None), (None, None)]
    assert q(con, "0#trade") == []
    assert q(con, "count 5#trade") == [(5,)]
    tr = translate("-2#exec price from trade where sym=`A")
    assert tr.shape == "list" and con.sql(tr.sql).fetchall() == [(11.0,), (13.0,)]  # stored: 10 12 11 13


# ---- count each, first / last ------------------------------------------------------------------------------
def test_count_each(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("count each (trade;quote;select from trade where sym=`Z;px)")
    assert tr.shape == "list"
    assert con.sql(tr.sql).fetchall() == [(8,), (7,), (0,), (7,)]


def test_first_last_of_a_table_is_one_row_dict(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("first trade")
    assert (tr.shape, tr.columns) == ("dict", ("time", "seq", "sym", "price", "size"))
    assert con.sql(tr.sql).fetchall() == stored(con, "trade")[:1]
    assert q(con, "last px") == stored(con, "px")[-1:]
    assert q(con, "last select seq, sym from trade where price<20") == [(7, "A")]
    # of a keyed table: the value columns of its first row
    tr = translate("first select mx:max price, n:count i by sym from trade")
    assert tr.columns == ("mx", "n") and con.sql(tr.sql).fetchall() == [(13.0, 4)]
    assert q(con, "first select from trade where sym=`Z") == [(None,) * 5]
    tr = translate("last exec price from trade where sym=`A")
    assert tr.shape == "atom" and con.sql(tr.sql).fetchall() == [(13.0,)]


def test_exec_by_is_a_dictionary_from_each_key_to_its_value(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("exec price by sym from trade")
    assert (tr.shape, tr.keys, tr.columns) == ("dict", 1, ("sym", "price"))
    assert con.sql(tr.sql).fetchall() == sql(
        con, "SELECT sym, list(price ORDER BY seq) FROM trade GROUP BY sym ORDER BY sym"
    )  # a list per key, in arrival order: A -> 10 11 12 13
    assert q(con, "exec last price by sym from trade where size>=20") == sql(
        con, "SELECT sym, arg_max(price, seq) FROM trade WHERE size >= 20 GROUP BY sym ORDER BY sym"
    )
    assert q(con, "exec n:count i by k from px") == [(None, 1), ("a", 3), ("b", 3)]  # a null key sorts first
    assert q(con, "exec sum size by sym from trade where sym=`Z") == []
    with pytest.raises(QError, match="nyi: exec ... by takes one column and one key"):
        translate("exec price, size by sym from trade")


# ---- xasc / xdesc: stable, q's null order ------------------------------------------------------------------
def test_xasc_xdesc_stable_with_ties_and_nulls(con: duckdb.DuckDBPyConnection) -> None:
    rows = stored(con, "trade")
    assert q(con, "`sym xasc trade") == sorted(rows, key=lambda r: r[2])  # Python's sort is stable too
    assert q(con, "`sym xdesc trade") == sorted(rows, key=lambda r: r[2], reverse=True)
    assert q(con, "`sym`price xdesc trade") == sorted(rows, key=lambda r: (r[2], r[3]), reverse=True)
    px = stored(con, "px")
    # q: nulls are the least value, first ascending, last descending; ties keep their stored order
    asc = sorted(px, key=lambda r: (r[1] is not None, r[1] or 0))
    assert q(con, "`v xasc px") == asc
    assert [r[2] for r in asc] == [6, 2, 1, 3, 5, 7, 4]
    assert q(con, "`v xdesc px") == sorted(px, key=lambda r: (r[1] is not None, r[1] or 0), reverse=True)
    assert q(con, "`k`v xasc px") == sorted(px, key=lambda r: (r[0] or "", r[1] is not None, r[1] or 0))
    assert q(con, "`sym xasc select from trade where sym=`Z") == []


# ---- keyed tables and lj / ij ------------------------------------------------------------------------------
def test_xkey_and_bang_key_a_table(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("`sym xkey select seq, sym from quote")
    assert (tr.keys, tr.columns) == (1, ("sym", "seq"))
    assert con.sql(tr.sql).fetchall() == sql(con, "SELECT sym, seq FROM quote")
    assert translate("2!quote").keys == 2 and translate("0!select last bid by sym from quote").keys == 0


def test_lj_ij_take_the_first_row_of_each_key(con: duckdb.DuckDBPyConnection) -> None:
    # u has several rows per sym: lj takes the first (as q's find); C has none: lj keeps the row with a null
    # bid, ij drops it; price is common to both: u's value replaces t's when matched, t's stays otherwise
    got = q(con, "trade lj `sym xkey select sym, price:bid, bid from quote where sym<>`C")
    ordered = sql(con, "SELECT *, row_number() OVER () AS o FROM quote")  # storage order
    first = {}
    for r in ordered:
        if r[2] != "C":
            first.setdefault(r[2], r[3])
    want = [(r[0], r[1], r[2], first.get(r[2], r[3]), r[4], first.get(r[2])) for r in stored(con, "trade")]
    assert got == want
    assert q(con, "trade ij `sym xkey select sym, price:bid, bid from quote where sym<>`C") == [
        r for r in want if r[2] != "C"
    ]
    # the keyed side as select ... by: one row per key already
    got = q(con, "trade lj select qbid:last bid, nq:count i by sym from quote")
    want = sql(
        con,
        "SELECT t.*, u.b, u.n FROM (SELECT *, row_number() OVER () AS o FROM trade) t LEFT JOIN (SELECT sym, "
        "arg_max(bid, seq) AS b, count(*) AS n FROM quote GROUP BY sym) u USING (sym) ORDER BY o",
    )
    assert got == [w[:5] + w[6:] for w in want]
    assert q(con, "(select from trade where sym=`Z) lj 1!select sym, bid from quote") == []
    assert q(con, "trade ij 1!select sym, bid from quote where sym=`Z") == []


# ---- fby ---------------------------------------------------------------------------------------------------
def test_fby_with_ties(con: duckdb.DuckDBPyConnection) -> None:
    # a: 1, 3, 3 -> both 3s; b: 2, 2, null -> both 2s; the null k is its own group
    got = q(con, "select from px where v=(max;v) fby k")
    want = sql(con, "SELECT * FROM px p WHERE v = (SELECT max(v) FROM px WHERE k IS NOT DISTINCT FROM p.k)")
    assert got == want and [r[2] for r in got] == [1, 3, 4, 5, 7]
    assert q(con, "select from trade where price=(max;price) fby sym") == sql(
        con, "SELECT * FROM trade t WHERE price = (SELECT max(price) FROM trade WHERE sym = t.sym)"
    )
    # left to right: the fby sees only B and C's rows
    assert q(con, "exec seq from trade where sym<>`B, size=(min;size) fby sym") == [(5,), (6,)]
    assert q(con, "exec seq from trade where 2<(count;i) fby sym") == sql(
        con, "SELECT seq FROM trade WHERE sym IN ('A', 'B')"
    )
    assert q(con, "exec seq from trade where price=(last;price) fby sym") == [(6,), (7,), (8,)]
    assert q(con, "select from trade where sym=`Z, price=(max;price) fby sym") == []
    assert q(con, "select seq, m:(max;price) fby sym from trade where sym=`B") == [
        (2, 22.0),
        (4, 22.0),
        (8, 22.0),
    ]


# ---- update / delete return a changed copy -----------------------------------------------------------------
def test_update_returns_a_changed_copy(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "update x:2*price from trade") == sql(con, "SELECT *, 2 * price AS x FROM trade")
    assert q(con, "update price:2*price from trade where sym=`A") == sql(
        con, "SELECT * REPLACE (CASE WHEN sym = 'A' THEN 2 * price ELSE price END AS price) FROM trade"
    )
    assert translate("update price:0, y:1 from trade").columns == ("time", "seq", "sym", "price", "size", "y")
    # aggregates over the rows the where keeps, per by group
    assert q(con, "update m:max price, n:count i by sym from trade where size>20") == sql(
        con,
        "SELECT *, CASE WHEN size > 20 THEN max(price) FILTER (WHERE size > 20) OVER (PARTITION BY sym) END, "
        "CASE WHEN size > 20 THEN count(*) FILTER (WHERE size > 20) OVER (PARTITION BY sym) END FROM trade",
    )
    assert q(con, "update l:last price by sym from trade")[2] == (*stored(con, "trade")[2], 13.0)
    assert q(con, "update x:1 from trade where sym=`Z") == sql(con, "SELECT *, NULL::INTEGER FROM trade")
    # a where with an fby (or an aggregate): constraints left to right, then the update of the rows kept
    assert q(con, "update top:1b from trade where price=(max;price) fby sym") == sql(
        con, "SELECT *, CASE WHEN seq IN (6, 7, 8) THEN TRUE END FROM trade"
    )
    assert [r[-1] for r in q(con, "update pos:i from px where i<2")] == [0, 1, None, None, None, None, None]
    assert [r[-1] for r in q(con, "update pos:i from trade where sym=`A")] == [
        0,
        None,
        4,
        2,
        None,
        None,
        6,
        None,
    ]
    assert q(con, "trade") == stored(con, "trade")  # the table itself is unchanged


def test_delete_columns_or_rows(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "delete price, size from trade") == sql(con, "SELECT time, seq, sym FROM trade")
    assert q(con, "delete from trade where sym=`A") == sql(con, "SELECT * FROM trade WHERE sym <> 'A'")
    # constraints left to right: the average is over A's rows (12.5)
    assert q(con, "delete from trade where sym=`A, price>avg price") == sql(
        con, "SELECT * FROM trade WHERE seq NOT IN (5, 7)"
    )
    assert q(con, "delete from px where null v") == stored(con, "px")[:5] + stored(con, "px")[6:]
    assert q(con, "delete from trade where sym=`Z") == stored(con, "trade")
    assert q(con, "delete from trade") == []


def test_forms_never_write_the_day(tmp_path: Path) -> None:
    store = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="512MB")
    n = len(TRADES)
    t0 = dt.datetime(2024, 1, 15, 10)
    store.append("trade", pa.table({
        "time": pa.array([t0 + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("ns")),
        "seq": pa.array([r[1] for r in TRADES], pa.int64()), "sym": [r[2] for r in TRADES],
        "price": [r[3] for r in TRADES], "size": pa.array([r[4] for r in TRADES], pa.int64()),
    }))  # fmt: skip
    before = query.run(store, "SELECT * FROM trade ORDER BY seq", timeout_s=5, max_rows=100).table
    for text in ["update price:0n from trade", "delete from trade where sym=`A", "delete price from trade",
                 "`price xdesc trade", "3#trade", "trade lj `sym xkey trade"]:  # fmt: skip
        tr = qsql.translate(text)
        assert tr.sql.startswith("SELECT")
        query.run(store, tr.sql, timeout_s=5, max_rows=100)  # the sandbox admits it: read-only
    after = query.run(store, "SELECT * FROM trade ORDER BY seq", timeout_s=5, max_rows=100).table
    assert after.equals(before)
    store.close()


# ---- distinct ----------------------------------------------------------------------------------------------
def test_distinct_keeps_first_occurrences_in_order(con: duckdb.DuckDBPyConnection) -> None:
    tr = translate("exec distinct sym from trade")
    assert tr.shape == "list" and con.sql(tr.sql).fetchall() == [("A",), ("B",), ("C",)]
    assert q(con, "exec distinct k from px") == [("b",), ("a",), (None,)]  # one null, where it first comes
    assert q(con, "select distinct k, v from px") == [
        ("b", 2.0),
        ("a", 1.0),
        (None, 5.0),
        ("a", 3.0),
        ("b", None),
    ]
    assert q(con, "select distinct from px") == stored(con, "px")  # every row differs (n)
    assert q(con, "select distinct sym from trade where size>50") == sql(
        con, "SELECT DISTINCT sym FROM trade WHERE size > 50 ORDER BY sym"
    )  # A (seq 1) then B (seq 2)
    assert q(con, "exec distinct sym from trade where sym=`Z") == []


# ---- within, in, like, .z ----------------------------------------------------------------------------------
def test_within_in_like(con: duckdb.DuckDBPyConnection) -> None:
    assert q(con, "exec seq from trade where time within (2024.01.15D10:03:00;2024.01.15D10:07:00)") == sql(
        con, f"SELECT seq FROM trade WHERE time BETWEEN {ts('10:03:00')} AND {ts('10:07:00')}"
    )
    assert q(con, "exec seq from trade where time within 2024.01.15 2024.01.16") == sql(
        con, "SELECT seq FROM trade"
    )
    assert q(con, "exec seq from trade where time within (.z.p-0D00:05:00;.z.p)") == [(5,), (3,)]
    assert q(con, "exec seq from trade where price within 12 21, sym in `A`B") == [(2,), (5,), (4,), (7,)]
    assert q(con, "exec seq from trade where sym in (exec sym from quote where bid>20)") == sql(
        con, "SELECT seq FROM trade WHERE sym IN ('B', 'C')"
    )
    assert q(con, "exec seq from trade where not sym in (exec distinct sym from quote where sym<>`A)") == sql(
        con, "SELECT seq FROM trade WHERE sym = 'A'"
    )
    assert q(con, 'exec seq from trade where sym like "[^A]"') == sql(
        con, "SELECT seq FROM trade WHERE sym <> 'A'"
    )
    assert q(con, 'exec k from px where k like "?"') == [("b",), ("a",), ("b",), ("a",), ("b",), ("a",)]


@pytest.mark.parametrize(
    ("pattern", "text", "match"),
    [
        ("A*", "ABC", True), ("A*", "BA", False), ("?B", "AB", True), ("?B", "B", False),
        ("[AC]*", "CX", True), ("[^AC]*", "CX", False), ("[^AC]*", "BX", True), ("[a-c]x", "bx", True),
        ("a[*]b", "a*b", True), ("a[*]b", "axb", False), ("a.b", "a.b", True), ("a.b", "axb", False),
        ("x+(y)", "x+(y)", True), ("[ab", "[ab", True), ("*", "", True), ("ab", "AB", False),
        ("a\\b", "a\\b", True), ("*[?]", "why?", True),
    ],
)  # fmt: skip
def test_like_is_q_glob(con: duckdb.DuckDBPyConnection, pattern: str, text: str, match: bool) -> None:
    assert con.execute("SELECT regexp_full_match(?, ?)", [text, like_regex(pattern)]).fetchall() == [(match,)]


def test_z_clock_is_utc_at_translation(con: duckdb.DuckDBPyConnection) -> None:
    for text, want in [
        (".z.p", dt.datetime(2024, 1, 15, 10, 5, 0, 123456)),
        (".z.d", dt.date(2024, 1, 15)),
        (".z.t", dt.time(10, 5, 0, 123000)),
        (".z.p-0D00:05:00", dt.datetime(2024, 1, 15, 10, 0, 0, 123456)),
    ]:
        tr = translate(text)
        assert tr.shape == "atom" and con.sql(tr.sql).fetchall() == [(want,)], text
    assert "10:05:00.123456789" in translate(".z.p").sql  # the nanoseconds reach DuckDB's TIMESTAMP_NS
    assert q(con, "exec seq from trade where time<.z.p") == [(1,), (2,), (5,), (3,)]
    assert q(con, "count select from trade where time.date=.z.d") == [(8,)]
    now = qsql.translate(".z.p")  # no now_ns: the wall clock
    got = duckdb.connect().sql(now.sql).fetchall()[0][0]
    assert abs((got - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()) < 60


# ---- a desk restriction still applies ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fills(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = Store(tmp_path_factory.mktemp("hdb"), date="2024-01-15", memory_limit="512MB")
    n = 6
    t0 = dt.datetime(2024, 1, 15, 10)
    store.append("fill", pa.table({
        "time": pa.array([t0 + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("ns")),
        "seq": pa.array(range(1, n + 1), pa.int64()), "account": ["A1", "B1", "A1", "B1", "A2", "B1"],
        "sym": ["X", "Y", "X", "X", "Y", "Y"], "side": ["B", "S", "B", "B", "S", "B"],
        "qty": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "price": [10.0, 11.0, 12.0, 13.0, 14.0, 15.0],
        "order_id": [f"o{i}" for i in range(n)], "exec_id": [f"e{i}" for i in range(n)],
    }))  # fmt: skip
    yield store
    store.close()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("-2#fill", ["A1", "A2"]),
        ("5#`qty xdesc fill", ["A2", "A1", "A1", "A2", "A1"]),
        ("exec distinct account from fill", ["A1", "A2"]),
        ("fill lj `sym xkey select sym, px:price from fill", ["A1", "A1", "A2"]),
        ("update q2:2*qty from fill where sym=`X", ["A1", "A1", "A2"]),
        ("delete from fill where qty>4", ["A1", "A1"]),
        ("select from fill where qty=(max;qty) fby sym", ["A1", "A2"]),
    ],
)
def test_desk_restriction_applies_to_every_form(fills: Store, text: str, want: list[str]) -> None:
    tr = qsql.translate(text)
    got = query.run(fills, tr.sql, timeout_s=5, max_rows=100, accounts=frozenset({"A1", "A2"})).table
    col = got.column(0 if tr.shape == "list" else "account").to_pylist()
    assert col == want


# ---- wrong use: one line, naming what was refused ----------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x#trade", "type: # needs a whole number on the left"),
        ("2.5#trade", "type: # needs a whole number"),
        ("5#", "parse: # needs a table on the right"),
        ("5#nope", "nope: no such table"),
        ("`nope xasc trade", "nope: no such column; columns are time, seq, sym, price, size"),
        ("5 xasc trade", "type: xasc needs column names as symbols"),
        ("`sym xkey 5", "type: expected a table, got a int literal"),
        ("9!trade", "length: 9!t needs 0 <= n <= 5"),
        ("-20000000#trade", "limit: -20000000#t: take at most 10000000 rows"),
        ("trade lj quote", "type: lj needs a keyed table on the right"),
        ("trade ij `bid xkey quote", "bid: ij key column missing from the left table"),
        ("count each trade", "type: count each needs a list of tables"),
        ("count each (trade;nope)", "nope: no such table"),
        ("first 5", "type: expected a table"),
        ("first exec sym, price from trade", "nyi: first of an exec of 2 columns"),
        ("select from trade where price=(foo;price) fby sym", "type: fby needs (aggregate;column)"),
        ("select from trade where time within 10:00 10:05", "type: within: time is ts, a bound is time"),
        ("select from trade where price within 1 2 3", "length: within needs two bounds"),
        ("select from trade where sym in (select sym, bid from quote)", "length: in needs one column"),
        ("select from trade where sym like 5", "type: like needs a pattern"),
        ("exec distinct sym, price from trade", "length: exec distinct takes one column, got 2"),
        ("select distinct max price from trade", "nyi: distinct with by or an aggregate"),
        ("select d:distinct sym from trade", "nyi: distinct here"),
        ("update from trade", "parse: update needs at least one column"),
        ("update x:nope from trade", "nope: no such column"),
        ("delete price from trade where sym=`A", "nyi: delete takes columns or a where, not both"),
        ("delete 2*price from trade", "type: delete takes column names"),
        ("delete nope from trade", "nope: no such column"),
        ("delete time, seq, sym, price, size from trade", "length: delete would leave no columns"),
        ("delete by sym from trade", "nyi: delete ... by"),
        ("exec price by sym from trade lj quote", "parse: unexpected 'lj'"),
        ("`sym xasc exec price by sym from trade", "type: exec ... by is a dictionary"),
        (".z.q", "parse: unexpected '.'"),
    ],
)
def test_wrong_use_is_one_line(text: str, message: str) -> None:
    with pytest.raises(QError) as e:
        translate(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def readme_forms() -> list[str]:
    """The q forms in the README's console table (its first column's code spans, commands aside)."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    table = text[text.index("| q form | what it does |") :].split("\n\n")[0]
    forms = []
    for line in table.splitlines()[2:]:
        first = line.split(" | ")[0]
        forms += [a or b for a, b in re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", first)]
    return [f for f in forms if not f.startswith("\\")]


def test_readme_forms_run_in_the_sandbox(fills: Store) -> None:
    forms = readme_forms()
    assert len(forms) >= 25 and "5#trade" in forms and "`sym`price xdesc trade" in forms
    for text in forms:
        tr = qsql.translate(text)
        query.run(fills, tr.sql, timeout_s=5, max_rows=100)  # runs: no QueryError


# ---- wj / wj1 ----------------------------------------------------------------------------------------------
def _at(hms: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2024-01-15 {hms}")


def test_wj_is_kx_worked_example(con: duckdb.DuckDBPyConnection) -> None:
    # q)w:-2 1+\\:t.time   q)wj[w;f;t;(q;(max;`ask);(min;`bid))]  (seconds: here nanoseconds of timestamps)
    want = [("ibm", _at("10:01:01"), 100, 103, 98), ("ibm", _at("10:01:04"), 101, 104, 99),
            ("ibm", _at("10:01:08"), 105, 108, 104)]  # fmt: skip
    for w in ("-2000000000 1000000000+\\:kt.time", "-0D00:00:02 0D00:00:01+\\:kt`time",
              "(-0D00:00:02;0D00:00:01)", "-2000000000 1000000000"):  # fmt: skip
        assert q(con, f"wj[{w};`sym`time;kt;(kq;(max;`ask);(min;`bid))]") == want, w
        wj1 = q(con, f"wj1[{w};`sym`time;kt;(kq;(max;`ask);(min;`bid))]")
        assert wj1 == want, w  # (the same here: a quote at each window's start)
    # a window starting between quotes: wj takes the prevailing quote (10:01:02's), wj1 only those inside
    w = "(-0D00:00:01.500;0D00:00:01)"
    assert q(con, f"wj[{w};`sym`time;kt;(kq;(max;`ask);(min;`bid))]")[1][3:] == (104, 99)
    assert q(con, f"wj1[{w};`sym`time;kt;(kq;(max;`ask);(min;`bid))]")[1][3:] == (104, 102)


def _hand_wj(con: duckdb.DuckDBPyConnection, inside_only: bool) -> list[tuple]:
    """wj / wj1 written by hand: per row of wt, wq's rows of its sym with time <= end and, for wj, from the
    prevailing row on (the last, by time then arrival, at or before the start), for wj1 time >= start."""
    window = "q.time >= t.time - INTERVAL 2 SECOND" if inside_only else (
        "(t.ptime IS NULL OR q.time > t.ptime OR (q.time = t.ptime AND q.arr >= t.parr))")  # fmt: skip
    rows = f"FROM qa AS q WHERE q.sym = t.sym AND q.time <= t.time + INTERVAL 1 SECOND AND {window}"
    return sql(
        con,
        f"""
        WITH qa AS (SELECT *, row_number() OVER () AS arr FROM wq),
        tb AS (SELECT w.*, row_number() OVER () AS rn,
            (SELECT p.time FROM qa p WHERE p.sym = w.sym AND p.time <= w.time - INTERVAL 2 SECOND
             ORDER BY p.time DESC, p.arr DESC LIMIT 1) AS ptime,
            (SELECT p.arr FROM qa p WHERE p.sym = w.sym AND p.time <= w.time - INTERVAL 2 SECOND
             ORDER BY p.time DESC, p.arr DESC LIMIT 1) AS parr FROM wt w)
        SELECT t.sym, t.time, t.n,
            (SELECT coalesce(max(q.ask), -9223372036854775807) {rows}),
            (SELECT coalesce(min(q.bid), 'inf'::DOUBLE) {rows}),
            (SELECT count(*) {rows}),
            (SELECT q.ask {rows} ORDER BY q.time, q.arr LIMIT 1),
            (SELECT coalesce(sum(q.ask), 0) {rows})
        FROM tb AS t ORDER BY t.rn""",
    )


def test_wj_and_wj1_equal_hand_written_sql_with_ties_and_empty_windows(
    con: duckdb.DuckDBPyConnection,
) -> None:
    aggs = "(wq;(max;`ask);(min;`bid);(count;`ask);(first;`ask);(sum;`ask))"
    got = q(con, f"wj[(-0D00:00:02;0D00:00:01);`sym`time;wt;{aggs}]")
    assert got == _hand_wj(con, inside_only=False)
    got1 = q(con, f"wj1[(-0D00:00:02;0D00:00:01);`sym`time;wt;{aggs}]")
    assert got1 == _hand_wj(con, inside_only=True)
    inf = float("inf")
    # A 10:00:05, window [03, 06]: two quotes at exactly the start: wj takes the last (q's bin), wj1 both
    assert got[0][3:] == (2, 2.0, 1, 2, 2) and got1[0][3:] == (2, 1.0, 2, 1, 3)
    assert got[1][3:] == got[6][3:] == (9, 3.5, 2, 3, 12)  # ties inside and in t: the prevailing 08's last
    assert got1[1][3:] == (9, 0.5, 3, 5, 17)
    assert got[3][3:] == (9, 9.0, 1, 9, 9)  # A 10:00:30: only the prevailing quote
    empty = (-(2**63) + 1, inf, 0, None, 0)  # q's max / min / count / first / sum of nothing: -0W 0w 0 0N 0
    assert got1[3][3:] == got[4][3:] == got1[4][3:] == got[5][3:] == got1[5][3:] == empty
    assert [r[2] for r in got] == [1, 2, 3, 4, 5, 6, 7]  # t's rows, in t's order
    tr = translate(f"wj[(-0D00:00:02;0D00:00:01);`sym`time;wt;{aggs}]")
    assert tr.columns == (
        "sym",
        "time",
        "n",
        "ask",
        "bid",
        "ask1",
        "ask2",
        "ask3",
    )  # repeated names: 1, 2, ...
    sub = q(con, "wj[(-0D00:00:02;0D00:00:01);`sym`time;(select from wt where sym=`A);(wq;(max;`ask))]")
    assert [r[3] for r in sub] == [2, 9, 9, 9]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("wj[`sym`time;wt;(wq;(max;`ask))]", "rank: wj[w;`sym`time;t;(q;(f0;c0);(f1;c1))] takes 4 arguments"),
        ("wj[1 2 3;`sym`time;wt;(wq;(max;`ask))]", "type: wj's window is a pair of offsets"),
        (
            "wj[1 2+\\:kt.time;`sym`time;wt;(wq;(max;`ask))]",
            "nyi: wj's window lo hi+\\:x needs x to be t's time",
        ),
        ("wj[1 2;`sym`time;wt;wq]", "type: wj's last argument is (q;(f0;c0);(f1;c1);...)"),
        ("wj[1 2;`sym`time;wt;(wq;(wavg;`ask))]", "nyi: wj's (f;c) takes an aggregate"),
        ("wj1[1 2;`sym`time;wt;(wq;(max;`nope))]", "nope: no such column in wj1's q"),
        ("wj[1 2;`sym`nope;wt;(wq;(max;`ask))]", "nope: join column missing from t"),
    ],
)
def test_wj_errors_are_one_line(text: str, error: str) -> None:
    with pytest.raises(QError) as e:
        translate(text)
    assert str(e.value).startswith(error) and "\n" not in str(e.value)


def test_wj_on_the_days_tables_orders_quotes_by_seq(con: duckdb.DuckDBPyConnection) -> None:
    got = q(con, "wj[-0D00:01:00 0D00:00:00+\\:trade.time;`sym`time;trade;(quote;(last;`bid);(count;`bid))]")
    want = sql(
        con,
        """
        SELECT t.*, (SELECT q.bid FROM quote q WHERE q.sym = t.sym AND q.time <= t.time
                     ORDER BY q.time DESC, q.seq DESC LIMIT 1),
               (SELECT count(*) FROM quote q WHERE q.sym = t.sym AND q.time <= t.time AND (q.time, q.seq) >=
                   coalesce((SELECT (p.time, p.seq) FROM quote p WHERE p.sym = t.sym
                             AND p.time <= t.time - INTERVAL 1 MINUTE
                             ORDER BY p.time DESC, p.seq DESC LIMIT 1),
                            (q.time, q.seq)))
        FROM trade t ORDER BY t.seq""",
    )
    assert got == want and len(got) == len(stored(con, "trade"))
