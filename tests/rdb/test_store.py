"""rdb store, sandbox and end of day: appends in bulk with seq de-duplication, every attack query refused,
allowed queries (also over HDB partitions) answered, Parquet HDB read back equal by polars and DuckDB."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from rdb import hdb, query, sandbox
from rdb.store import Store
from schemas.tables import TABLES
from tests.support.rows import T0, trade_table


def run(store: Store, sql: str, **kw) -> pa.Table:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("max_rows", 100_000)
    return query.run(store, sql, **kw).table


# ---- appends -------------------------------------------------------------------------------------------
def test_append_dedupes_by_seq_and_coalesces(store: Store) -> None:
    rng = np.random.default_rng(1)
    a = trade_table(1, 600, rng)
    b = trade_table(401, 600, rng)  # seq 401..1000: 200 already held
    assert store.append("trade", a) == 600
    assert store.pending_rows == 600  # below flush_rows: queued, not yet inserted
    assert store.append("trade", b.to_batches()[0]) == 400
    assert store.pending_rows == 0  # 1000 queued >= flush_rows: flushed in one go
    assert store.max_seq["trade"] == 1000
    got = store.fetch("trade")
    assert got.column("seq").to_pylist() == list(range(1, 1001))
    want = pa.concat_tables([a, b.slice(200)])
    assert got.equals(want)
    assert store.append("trade", a) == 0  # replay of old rows: nothing added


def _margin_rows(seq0: int, rows: list[tuple[str, int, float]]) -> pa.Table:
    """margin rows (account, last_seq, margin) at seqs seq0.., the other columns filled in."""
    schema = TABLES["margin"].arrow_schema
    n = len(rows)
    given = {
        "account": [r[0] for r in rows],
        "last_seq": [r[1] for r in rows],
        "margin": [r[2] for r in rows],
    }
    cols = []
    for f in schema:
        if f.name in given:
            cols.append(pa.array(given[f.name], f.type))
        elif f.name == "seq":
            cols.append(pa.array(range(seq0, seq0 + n), pa.int64()))
        elif f.name == "time":
            cols.append(pa.array([T0 + i for i in range(n)], pa.int64()).cast(f.type))
        elif pa.types.is_string(f.type):
            cols.append(pa.array(["hvar"] * n))
        elif pa.types.is_floating(f.type):
            cols.append(pa.array([1.0] * n))
        else:
            cols.append(pa.array([1] * n, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def test_a_margin_row_repeating_its_account_s_last_state_is_kept_once(store: Store) -> None:
    """Two publishers of one account (shards overlapping at a failover): the second copy of a row (same
    account, last_seq and margin) is dropped, within a batch and across batches; a row that moved is kept,
    at the same last_seq too; other accounts are independent; a new day starts afresh."""
    first = _margin_rows(1, [("A", 10, 100.0), ("B", 10, 50.0), ("A", 10, 100.0)])  # A repeated in the batch
    assert store.append("margin", first) == 2
    again = [("A", 10, 100.0), ("B", 12, 50.0), ("A", 10, 101.0), ("C", 10, 100.0), ("A", 10, 101.0)]
    assert store.append("margin", _margin_rows(4, again)) == 3  # B moved on, A's margin moved, C is new
    assert store.repeats["margin"] == 3 and store.max_seq["margin"] == 8
    got = store.fetch("margin")
    cols = [got.column(c).to_pylist() for c in ("seq", "account", "last_seq", "margin")]
    assert list(zip(*cols, strict=True)) == [
        (1, "A", 10, 100.0),
        (2, "B", 10, 50.0),
        (5, "B", 12, 50.0),
        (6, "A", 10, 101.0),
        (7, "C", 10, 100.0),
    ]
    assert store.append("margin", _margin_rows(4, again)) == 0  # a replay: by seq, as every table
    store.roll("2024-01-16")
    assert store.append("margin", _margin_rows(1, [("A", 10, 101.0)])) == 1


def test_query_flushes_queued_rows_first(store: Store) -> None:
    store.append("trade", trade_table(1, 10, np.random.default_rng(2)))
    assert store.pending_rows == 10
    assert run(store, "SELECT count(*) AS n FROM trade").column("n").to_pylist() == [10]


def test_append_refuses_bad_batches_naming_the_column(store: Store) -> None:
    t = trade_table(1, 4, np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"trade: missing columns \['size'\]"):
        store.append("trade", t.drop_columns(["size"]))
    with pytest.raises(ValueError, match=r"unknown columns \['extra'\]"):
        store.append("trade", t.append_column("extra", pa.array([1, 2, 3, 4])))
    with pytest.raises(ValueError, match=r"trade\.price: type string cannot be double"):
        store.append("trade", t.set_column(3, "price", pa.array(["a", "b", "c", "d"])))
    with pytest.raises(ValueError, match=r"trade\.sym: 1 null values"):
        store.append("trade", t.set_column(2, "sym", pa.array(["a", None, "c", "d"])))
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        store.append("nope", t)
    # a compatible type is cast (int32 size -> int64)
    assert store.append("trade", t.set_column(4, "size", t.column("size").cast(pa.int32()))) == 4
    assert store.rows()["trade"] == 4


# ---- sandbox: attacks ----------------------------------------------------------------------------------
ATTACKS = [
    ("SELECT * FROM read_csv('/etc/passwd')", "refused", "disabled by configuration"),
    ("SELECT * FROM read_text('/etc/hostname')", "refused", "disabled by configuration"),
    ("SELECT * FROM glob('/etc/*')", "refused", "disabled by configuration"),
    ("COPY trade TO '/tmp/stolen.csv'", "refused", "COPY statements are not allowed"),
    ("COPY (SELECT 1) TO '{hdb}/x.parquet'", "refused", "COPY statements are not allowed"),
    ("EXPLAIN ANALYZE COPY trade TO '{hdb}/x.csv'", "refused", "EXPLAIN of COPY is not allowed"),
    ("ATTACH '/tmp/other.db' AS o", "refused", "ATTACH statements are not allowed"),
    ("DETACH memory", "refused", "DETACH statements are not allowed"),
    ("INSTALL httpfs", "refused", "LOAD statements are not allowed"),
    ("LOAD httpfs", "refused", "LOAD statements are not allowed"),
    ("SET threads = 1", "refused", "SET statements are not allowed"),
    ("RESET memory_limit", "refused", "SET statements are not allowed"),
    ("PRAGMA enable_profiling", "refused", "PRAGMA statements are not allowed"),
    ("CALL checkpoint()", "refused", "CALL statements are not allowed"),
    ("CREATE TABLE x (a INT)", "refused", "CREATE statements are not allowed"),
    ("CREATE MACRO m(a) AS a", "refused", "CREATE statements are not allowed"),
    ("INSERT INTO trade SELECT * FROM trade", "refused", "INSERT statements are not allowed"),
    ("DELETE FROM trade", "refused", "DELETE statements are not allowed"),
    ("UPDATE trade SET price = 0", "refused", "UPDATE statements are not allowed"),
    ("DROP TABLE trade", "refused", "DROP statements are not allowed"),
    ("ALTER TABLE trade ADD COLUMN x INT", "refused", "ALTER statements are not allowed"),
    ("EXPORT DATABASE '{hdb}/dump'", "refused", "EXPORT statements are not allowed"),
    ("SELECT 1; DROP TABLE trade", "refused", "one statement per query; got 2"),
    ("SELECT 1; SELECT 2", "refused", "one statement per query; got 2"),
    ("SELECT * FROM checkpoint()", "refused", "function checkpoint() is not allowed"),
    ("SELECT * FROM query('SELECT 1')", "refused", "function query() is not allowed"),
    ("SELECT * FROM arrow_scan(1, 2, 3)", "refused", "function arrow_scan() is not allowed"),
    ("SELECT (SELECT count(*) FROM truncate_duckdb_logs())", "refused", "function truncate_duckdb_logs()"),
    ("", "refused", "empty query"),
    ("SELEC 1", "parse", "syntax error"),
]


@pytest.mark.parametrize(("sql", "kind", "text"), ATTACKS)
def test_sandbox_refuses_attacks(store: Store, sql: str, kind: str, text: str) -> None:
    store.append("trade", trade_table(1, 10, np.random.default_rng(4)))
    with pytest.raises(sandbox.QueryError) as e:
        run(store, sql.format(hdb=store.hdb_dir))
    assert e.value.kind == kind
    assert text in str(e.value)
    assert "\n" not in str(e.value)
    # nothing changed, nothing written
    assert run(store, "SELECT count(*) AS n FROM trade").column("n").to_pylist() == [10]
    assert not any(p.is_file() for p in store.hdb_dir.rglob("*"))
    assert not Path("/tmp/stolen.csv").exists()


def test_configuration_is_locked(store: Store) -> None:
    # even the store's own connection cannot undo the sandbox
    with pytest.raises(duckdb.InvalidInputException, match="configuration has been locked"):
        store.con.execute("SET enable_external_access = true")
    got = run(store, "SELECT current_setting('enable_external_access') AS v").column("v").to_pylist()
    assert got == [False]


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_never_ending_query_is_interrupted(store: Store) -> None:
    t0 = time.perf_counter()
    with pytest.raises(
        sandbox.QueryError, match=r"^timeout: query ran longer than 0\.5 s and was interrupted$"
    ):
        run(store, "SELECT count(*) FROM range(1000000000000) a(i) WHERE i % 7 = 3", timeout_s=0.5)
    elapsed = time.perf_counter() - t0
    assert 0.5 <= elapsed < 5.0
    # the database still answers
    assert run(store, "SELECT 42 AS x").column("x").to_pylist() == [42]


def test_row_limit_cuts_and_says_so(store: Store) -> None:
    ans = query.run(store, "SELECT * FROM range(1000) t(i)", max_rows=7, timeout_s=5)
    assert ans.rows == 7 and ans.truncated
    assert query.from_ipc(ans.arrow).column("i").to_pylist() == list(range(7))
    ans = query.run(store, "SELECT * FROM range(7) t(i)", max_rows=7, timeout_s=5)
    assert ans.rows == 7 and not ans.truncated


ALLOWED = [
    ("WITH x AS (SELECT 2 AS a) SELECT a * 3 AS b FROM x", [[6]]),
    ("DESCRIBE trade", None),
    ("SHOW TABLES", None),
    ("SUMMARIZE trade", None),
    ("EXPLAIN SELECT count(*) FROM trade", None),
    ("EXPLAIN ANALYZE SELECT count(*) FROM trade", None),
    ("FROM trade SELECT count(*)", [[10]]),
    ("VALUES (1, 'a')", [[1, "a"]]),
    ("  -- a comment\n  SELECT sum(size) = (SELECT sum(size) FROM trade) FROM trade;", [[True]]),
]


@pytest.mark.parametrize(("sql", "rows"), ALLOWED)
def test_sandbox_allows_read_queries(store: Store, sql: str, rows: list | None) -> None:
    store.append("trade", trade_table(1, 10, np.random.default_rng(5)))
    ans = query.run(store, sql, fmt="json", timeout_s=5, max_rows=1000)
    assert ans.rows > 0
    if rows is not None:
        assert ans.data == rows


def test_json_and_arrow_answers_agree(store: Store) -> None:
    t = trade_table(1, 5, np.random.default_rng(6))
    store.append("trade", t)
    a = query.run(store, "SELECT * FROM trade ORDER BY seq", fmt="arrow", timeout_s=5, max_rows=100)
    j = query.run(store, "SELECT * FROM trade ORDER BY seq", fmt="json", timeout_s=5, max_rows=100)
    assert a.columns == j.columns == TABLES["trade"].column_names
    assert a.types == j.types == ["TIMESTAMP_NS", "BIGINT", "VARCHAR", "DOUBLE", "BIGINT"]
    assert query.from_ipc(a.arrow).equals(t)
    assert j.data[0][0] == "2024-01-15 10:00:00.000000000"  # ns kept as ISO text
    assert [r[1:] for r in j.data] == [list(r.values())[1:] for r in t.to_pylist()]


# ---- end of day and HDB --------------------------------------------------------------------------------
def test_end_of_day_parquet_reads_back_equal_and_views_span_days(store: Store) -> None:
    rng = np.random.default_rng(7)
    day1 = trade_table(1, 3000, rng)
    # arrival order is not the HDB order: shuffle rows inside the day (seq stays with its row)
    day1 = day1.take(rng.permutation(day1.num_rows))
    store.append("trade", day1)
    rep = hdb.end_of_day(store, next_date="2024-01-16")
    assert rep.rows["trade"] == 3000 and rep.rows["quote"] == 0
    part = store.hdb_dir / "trade" / "date=2024-01-15"
    assert rep.paths["trade"] == str(part)
    assert [p.name for p in part.iterdir()] == ["part-0.parquet"]
    assert not [p for p in store.hdb_dir.iterdir() if p.name.startswith(".eod")]
    assert store.date == "2024-01-16" and store.rows()["trade"] == 0 and store.max_seq["trade"] == -1

    # the file is sorted by key, time, seq and holds exactly the day's rows: check with polars and DuckDB
    want = pl.from_arrow(day1).sort(["sym", "time", "seq"])
    by_polars = pl.read_parquet(part / "part-0.parquet")
    assert by_polars.equals(want)
    hive = pl.read_parquet(store.hdb_dir / "trade" / "**" / "*.parquet", hive_partitioning=True)
    assert hive.columns == ["time", "seq", "sym", "price", "size", "date"]
    assert hive["date"].cast(pl.Utf8).unique().to_list() == ["2024-01-15"]
    by_duckdb = duckdb.sql(f"SELECT * FROM read_parquet('{part}/*.parquet', hive_partitioning = false)").pl()
    assert by_duckdb.equals(want)

    # the next day, one query spans the HDB and today through days.trade
    day2 = trade_table(1, 500, rng, t0=T0 + 86_400_000_000_000)
    store.append("trade", day2)
    got = run(store, "SELECT date, count(*) AS n, sum(size) AS s FROM days.trade GROUP BY date ORDER BY date")
    assert got.to_pylist() == [
        {"date": dt.date(2024, 1, 15), "n": 3000, "s": pc_sum(day1, "size")},
        {"date": dt.date(2024, 1, 16), "n": 500, "s": pc_sum(day2, "size")},
    ]
    # reading HDB files directly is allowed too (read-only)
    n = run(store, f"SELECT count(*) AS n FROM read_parquet('{part}/*.parquet')").column("n").to_pylist()
    assert n == [3000]


def pc_sum(t: pa.Table, col: str) -> int:
    return int(np.sum(t.column(col).to_numpy()))


def test_end_of_day_rerun_replaces_partition_and_survives_leftovers(store: Store) -> None:
    rng = np.random.default_rng(8)
    first = trade_table(1, 100, rng)
    store.append("trade", first)
    hdb.end_of_day(store, "2024-01-15", "2024-01-16")
    # a crash during an earlier attempt left a half-written work folder; a replay rebuilt the day
    (store.hdb_dir / ".eod-2024-01-15" / "trade").mkdir(parents=True)
    (store.hdb_dir / ".eod-2024-01-15" / "trade" / "part-0.parquet").write_bytes(b"torn")
    store.roll("2024-01-15")
    again = trade_table(1, 250, rng)
    store.append("trade", again)
    # while the day is in memory again, days.trade does not count 2024-01-15 twice
    n = run(store, "SELECT count(*) AS n FROM days.trade").column("n").to_pylist()
    assert n == [250]
    hdb.end_of_day(store, next_date="2024-01-16")
    back = pl.read_parquet(store.hdb_dir / "trade" / "date=2024-01-15" / "part-0.parquet")
    assert back.equals(pl.from_arrow(again).sort(["sym", "time", "seq"]))
    assert sorted(os.listdir(store.hdb_dir)) == sorted(TABLES)


def test_end_of_day_refuses_bad_dates(store: Store) -> None:
    with pytest.raises(ValueError, match="next_date: '2024-13-01' is not a date"):
        hdb.end_of_day(store, next_date="2024-13-01")
