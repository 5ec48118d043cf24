"""Desk restriction in the rdb: a caller allowed only TECH01 gets only TECH01's rows of fill, margin and alert
(today's tables, the HDB views of past days and latest.*), or a refusal, through every SQL and qSQL route
tried here; unrestricted callers see everything, and their queries are not rewritten."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pyarrow as pa
import pytest

from rdb import hdb, query
from rdb.service import Service
from rdb.store import Store
from schemas.rdb import Error, Query, QueryResult
from schemas.tables import TABLES

T0 = 1_705_312_800_000_000_000  # 2024-01-15 10:00 UTC
ROWS = {"TECH01": 2, "TECH02": 3, "ENER01": 4}  # rows per account per table per day: counts tell who was read
OTHERS = ("TECH02", "ENER01")
DESK = frozenset({"TECH01"})


def rows(table: str, seq0: int, t0: int) -> pa.Table:
    """ROWS[a] rows of `table` for each account a, every text column naming the account."""
    schema = TABLES[table].arrow_schema
    accts = [a for a, n in ROWS.items() for _ in range(n)]
    n = len(accts)
    cols = []
    for f in schema:
        if f.name == "time":
            cols.append(pa.array([t0 + i for i in range(n)], pa.int64()).cast(f.type))
        elif f.name == "seq":
            cols.append(pa.array(range(seq0, seq0 + n), pa.int64()))
        elif f.name == "side":
            cols.append(pa.array(["B"] * n))
        elif f.name == "state":
            cols.append(pa.array(["raised"] * n))
        elif pa.types.is_string(f.type):
            cols.append(pa.array(accts if f.name == "account" else [f"{a}-{f.name}" for a in accts]))
        elif pa.types.is_floating(f.type):
            cols.append(pa.array([1.0 + i for i in range(n)]))
        else:
            cols.append(pa.array([1 + i for i in range(n)], pa.int64()))
    return pa.Table.from_arrays(cols, schema=schema)


def fill_day(store: Store, t0: int) -> None:
    seq = 1
    for t in ("fill", "margin", "alert"):
        store.append(t, rows(t, seq, t0))
        seq += sum(ROWS.values())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="1GB", threads=2)
    fill_day(s, T0)
    hdb.end_of_day(s, next_date="2024-01-16")  # 2024-01-15 is in the HDB now
    fill_day(s, T0 + 86_400_000_000_000)
    yield s
    s.close()


def ask(store: Store, sql: str, accounts: frozenset[str] | None = DESK, fmt: str = "arrow") -> pa.Table:
    ans = query.run(store, sql, fmt=fmt, timeout_s=5, max_rows=10_000, accounts=accounts)  # type: ignore[arg-type]
    assert ans.table is not None
    return ans.table


def leaked(t: pa.Table) -> list[str]:
    """Other accounts' names found in any value of `t` (every text column of the test rows names one)."""
    text = str(query.to_json_rows(t)) + str(t.column_names)
    return [a for a in OTHERS if a in text]


PART = "{hdb}/margin/date=2024-01-15/part-0.parquet"
# (sql, what TECH01 must get: an int = the value of the first cell, None = any rows without other accounts)
READS = [
    ("SELECT count(*) FROM margin", 2),
    ("SELECT count(*) FROM main.margin", 2),
    ("SELECT count(*) FROM memory.margin", 2),
    ("SELECT count(*) FROM memory.main.margin", 2),
    ('SELECT count(*) FROM "MaRgIn"', 2),
    ('SELECT count(*) FROM memory."main"."margin"', 2),
    ("SELECT count(*) FROM days.margin", 4),
    ("SELECT count(*) FROM memory.days.fill WHERE date = DATE '2024-01-15'", 2),
    ("SELECT count(*) FROM latest.alert", 1),
    ("SELECT count(*) FROM fill", 2),
    ("SELECT count(*) FROM alert", 2),
    ("SELECT * FROM margin", None),
    ("SELECT * FROM days.alert", None),
    ("FROM margin", None),
    ("TABLE fill", None),
    ("SELECT count(*) OVER () AS n, account FROM margin", None),
    ("WITH x AS (SELECT * FROM margin) SELECT count(*) FROM x", 2),
    ("WITH b AS (SELECT * FROM memory.main.fill), a AS (SELECT * FROM b) SELECT count(*) FROM a", 2),
    (
        "WITH RECURSIVE r(a) AS (SELECT account FROM margin UNION ALL SELECT a FROM r WHERE false) "
        "SELECT count(*) FROM r",
        2,
    ),
    ("SELECT count(*) FROM (SELECT * FROM (SELECT * FROM alert) s) t", 2),
    ("SELECT count(*) FROM margin m JOIN fill f USING (account)", 4),
    ("SELECT count(*) FROM trade, margin", 0),
    (
        "SELECT count(*) FROM (SELECT account FROM margin UNION ALL SELECT account FROM days.fill "
        "UNION ALL SELECT account FROM latest.alert)",
        2 + 4 + 1,
    ),
    ("SELECT (SELECT string_agg(account, ',') FROM memory.main.margin) AS a", None),
    ("SELECT (SELECT count(*) FROM memory.days.margin) AS a", 4),
    ("SELECT count(*) FROM range(3) WHERE 'ENER01' IN (SELECT account FROM alert)", 0),
    ("SELECT EXISTS (SELECT 1 FROM fill WHERE account = 'TECH02')::INT AS e", 0),
    ("SELECT x.account FROM range(1), LATERAL (SELECT * FROM margin) x", None),
    ("SELECT count(*) FROM unnest((SELECT list(account) FROM memory.main.margin))", 2),
    ("SELECT * FROM (VALUES ((SELECT max(account) FROM alert))) v(a)", None),
    ("SELECT count(*) FROM margin TABLESAMPLE 100%", 2),
    ("SELECT count(*) FROM margin AS m(a, b)", 2),
    ("SUMMARIZE margin", None),
    ("SUMMARIZE SELECT * FROM days.fill", None),
    ("DESCRIBE margin", None),
    ("SELECT * FROM information_schema.tables", None),
    ("SELECT max(account), min(account), count(DISTINCT account) FROM days.margin", None),
    (
        "SELECT count(*) FROM margin, "
        "LATERAL (SELECT * FROM memory.main.fill f WHERE f.account <> margin.account)",
        0,
    ),
    ("SELECT count(*) FROM margin POSITIONAL JOIN memory.main.fill", 2),
    ("SELECT count(*) FROM margin ASOF JOIN fill USING (account, time)", 2),
    ("WITH t AS MATERIALIZED (SELECT * FROM margin) SELECT count(*) FROM t, t t2", 4),
    ("SELECT count(*) FROM unnest(['TECH02', 'ENER01']) u(account) JOIN days.margin USING (account)", 0),
    ("SELECT count(*) FROM generate_series(1, (SELECT count(*) FROM memory.main.margin))", 2),
    ("SELECT count(*) FROM (SELECT * FROM margin UNION ALL BY NAME FROM days.alert)", 6),
    ("SELECT * FROM margin WHERE account = 'TECH02' OR true", None),
    ("SELECT count(*) FROM margin m1 JOIN margin m2 ON m1.account != m2.account", 0),
    ("SUMMARIZE latest.margin", None),
    # literals and names that hold SQL stay literal through the rebuilt text
    ("SELECT 'a''b'' FROM memory.main.margin --' AS x, account FROM margin", None),
    ('SELECT 1 AS "x"" FROM memory.main.margin --", account FROM margin', None),
    ("SELECT E'\\' UNION SELECT account FROM memory.main.margin --' AS x, account FROM margin", None),
    ("SELECT $$ ' $$ || account AS x FROM margin", None),
    ('SELECT count(*) FROM margin m("acc""x", b)', 2),
]


@pytest.mark.parametrize(("sql", "want"), READS)
def test_desk_reads_only_its_accounts(store: Store, sql: str, want: int | None) -> None:
    t = ask(store, sql.format(hdb=store.hdb_dir))
    assert not leaked(t), t.to_pylist()
    if want is not None:
        assert t.column(0).to_pylist()[0] == want
    # unrestricted: the same query sees every account
    every = ask(store, sql.format(hdb=store.hdb_dir), accounts=None)
    if want:
        assert every.column(0).to_pylist()[0] > want


def test_pivot_shows_other_accounts_as_nothing(store: Store) -> None:
    t = ask(store, "PIVOT (SELECT account FROM margin) ON account IN ('TECH01', 'TECH02') USING count(*)")
    assert t.column("TECH01").to_pylist() == [2] and t.column("TECH02").to_pylist() in ([0], [None])


REFUSED = [
    ("SELECT * FROM read_parquet('{hdb}/margin/*/*.parquet')", "table function read_parquet()"),
    ("SELECT * FROM parquet_scan('" + PART + "')", "table function parquet_scan()"),
    ("SELECT * FROM '" + PART + "'", "table {hdb}/margin"),
    ('SELECT * FROM "' + PART + '"', "table {hdb}/margin"),
    ("SELECT * FROM read_arrow('{hdb}/../journal/2024-01-16/margin.arrow')", "table function read_arrow()"),
    ("SELECT * FROM glob('{hdb}/*')", "table function glob()"),
    ("SELECT * FROM parquet_metadata('" + PART + "')", "table function parquet_metadata()"),
    ("SELECT * FROM query_table('margin')", "table function query_table()"),
    ("SELECT * FROM pragma_storage_info('margin')", "table function pragma_storage_info()"),
    ("SELECT * FROM duckdb_tables()", "table function duckdb_tables()"),
    ("SELECT * FROM duckdb_tables", "table duckdb_tables"),
    ("SELECT * FROM system.main.margin", "table system.main.margin"),
    ("SELECT * FROM temp.main.margin", "table temp.main.margin"),
    ("SELECT * FROM pg_catalog.pg_class", "table pg_catalog.pg_class"),
    ("WITH margin AS (SELECT 1) SELECT * FROM margin", "a CTE named 'margin'"),
    ('WITH "x.parquet" AS (SELECT 1) SELECT * FROM "x.parquet"', "a CTE named 'x.parquet'"),
    ("EXPLAIN SELECT * FROM margin", "desk-restricted query must be a SELECT"),
    ("EXPLAIN ANALYZE SELECT * FROM margin", "desk-restricted query must be a SELECT"),
]


@pytest.mark.parametrize(("sql", "text"), REFUSED)
def test_desk_refused_where_it_could_read_around_the_filter(store: Store, sql: str, text: str) -> None:
    from rdb.sandbox import QueryError

    with pytest.raises(QueryError) as e:
        ask(store, sql.format(hdb=store.hdb_dir))
    assert e.value.kind == "refused" and text.format(hdb=store.hdb_dir) in str(e.value), str(e.value)
    assert "desk-restricted" in str(e.value)


def test_qualified_column_of_the_real_table_does_not_bind(store: Store) -> None:
    from rdb.sandbox import QueryError

    try:
        t = ask(store, "SELECT main.margin.account FROM main.margin")
    except QueryError:
        return
    assert not leaked(t)


def test_desk_of_two_and_empty_desk_and_star(store: Store) -> None:
    assert ask(store, "SELECT count(*) FROM margin", frozenset({"TECH01", "ENER01"})).column(
        0
    ).to_pylist() == [6]
    assert ask(store, "SELECT count(*) FROM days.margin", frozenset()).column(0).to_pylist() == [0]
    assert ask(store, "SELECT count(*) FROM margin", frozenset({"*"})).column(0).to_pylist() == [9]
    assert ask(store, "SELECT count(*) FROM margin", frozenset({"O'Brien"})).column(0).to_pylist() == [0]
    # tables not keyed by account are whole for a desk too
    store.append(
        "trade",
        pa.table(
            {
                "time": pa.array([T0], pa.timestamp("ns")),
                "seq": [100],
                "sym": ["A"],
                "price": [1.0],
                "size": [1],
            }
        ),
    )
    assert ask(store, "SELECT count(*) FROM trade").column(0).to_pylist() == [1]


def service_ask(service: Service, q: Query, accounts: frozenset[str] | None) -> QueryResult | Error:
    reply = service.handle(msgspec.msgpack.encode(q), accounts)
    return msgspec.msgpack.decode(reply, type=QueryResult | Error)  # type: ignore[arg-type]


QSQL = [
    ("count margin", 2),
    ("count select from days.margin", 4),
    ("select n: count i by account from fill", None),
    ("select last margin by account from margin", None),  # the latest.margin path
    ("exec account from days.alert", None),
    ("margin", None),
    ("select from memory.main.margin", None),
]


@pytest.mark.parametrize(("text", "want"), QSQL)
def test_desk_through_the_service_in_q_and_json(store: Store, text: str, want: int | None) -> None:
    service = Service(store, timeout_s=5, max_rows=1000)
    for fmt in ("arrow", "json"):
        r = service_ask(service, Query(sql=text, lang="q", format=fmt), DESK)  # type: ignore[arg-type]
        if isinstance(r, Error):  # a refusal is fine (e.g. a name qSQL does not know); a leak is not
            assert "TECH02" not in r.reason and "ENER01" not in r.reason
            continue
        got = (
            query.from_ipc(r.arrow)
            if fmt == "arrow"
            else pa.table({c: [row[i] for row in r.data] for i, c in enumerate(r.columns)})
        )
        assert not leaked(got), got.to_pylist()
        if want is not None:
            assert got.column(0).to_pylist()[0] == want
    every = service_ask(service, Query(sql=text, lang="q"), None)
    assert isinstance(every, QueryResult | Error)


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_unrestricted_is_not_rewritten_and_restricted_costs_little(store: Store) -> None:
    sql = "SELECT account, count(*) AS n FROM days.margin GROUP BY account ORDER BY account"
    every = ask(store, sql, accounts=None).to_pylist()
    assert every == [
        {"account": "ENER01", "n": 8},
        {"account": "TECH01", "n": 4},
        {"account": "TECH02", "n": 6},
    ]
    assert ask(store, sql).to_pylist() == [{"account": "TECH01", "n": 4}]

    def timed(accounts: frozenset[str] | None) -> float:
        t0 = time.perf_counter()
        for _ in range(20):
            ask(store, sql, accounts=accounts)
        return (time.perf_counter() - t0) / 20 * 1e3

    timed(None), timed(DESK)  # warm
    plain, restricted = timed(None), timed(DESK)
    print(f"unrestricted {plain:.2f} ms, restricted {restricted:.2f} ms per query")
    assert restricted < plain + 50  # the rewrite is a few ms at most


ERRORS = [
    "SELECT * FROM margin WHERE CAST(account AS INT) = 1",
    "SELECT * FROM margin WHERE error(account) IS NULL",
    "SELECT list(account::INT) FROM fill",
    "SELECT * FROM days.margin WHERE account::INT = 1",
    "SELECT * FROM days.alert WHERE date = DATE '2024-01-15' AND account::INT = 1",
    "SELECT * FROM latest.margin WHERE account::INT = 1",
    "SELECT * FROM margin WHERE json(account) IS NULL",
    "SELECT * FROM margin WHERE strptime(account, '%Y') IS NULL",
    "SELECT * FROM margin m JOIN fill f ON m.account::INT = f.seq",
    "SELECT * FROM margin WHERE account::INT = 1 AND account = 'TECH02'",
]


def test_errors_never_name_other_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The desk filter applies before any expression of the query: an error raised by a value (a cast,
    error(), json()) names only the desk's own rows, even with other accounts' rows first in the table."""
    from rdb.sandbox import QueryError

    monkeypatch.setattr("tests.rdb.test_desk.ROWS", {"TECH02": 3000, "ENER01": 4000, "TECH01": 2000})
    s = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="1GB", threads=2)
    try:
        fill_day(s, T0)
        hdb.end_of_day(s, next_date="2024-01-16")
        fill_day(s, T0 + 86_400_000_000_000)
        for sql in ERRORS:
            with pytest.raises(QueryError) as every:
                ask(s, sql, accounts=None)
            assert any(a in str(every.value) for a in OTHERS), (
                sql
            )  # unrestricted: the first bad row is another's
            try:
                ask(s, sql)
            except QueryError as e:
                assert not any(a in str(e) for a in OTHERS), (sql, str(e))
    finally:
        s.close()


def test_status_for_a_desk_counts_no_account_keyed_rows(store: Store) -> None:
    from schemas.rdb import Status, StatusRequest

    service = Service(store)
    frame = msgspec.msgpack.encode(StatusRequest())
    every = msgspec.msgpack.decode(service.handle(frame), type=Status)
    mine = msgspec.msgpack.decode(service.handle(frame, DESK), type=Status)
    assert every.rows["margin"] == 9 and set(every.rows) == set(TABLES)
    assert set(mine.rows) == {"trade", "quote", "param"} and "margin" not in mine.extra["max_seq"]


def test_a_rebuilt_text_that_reads_around_the_filter_is_refused(store: Store) -> None:
    """The check the other way round: the rebuilt SQL is parsed again and every account-keyed reference must
    be the desk-filtered subquery; anything else (here, texts the rewrite never produces) is refused."""
    from rdb import desk
    from rdb.sandbox import QueryError

    cur = store.cursor()
    good = desk.restrict(cur, "SELECT * FROM margin JOIN days.fill USING (account)", DESK)
    rw = desk._Rewriter(cur, DESK, frozenset())
    desk._verify(desk._serialize(cur, good), rw.where_tree())
    for text in [
        "SELECT * FROM memory.main.margin",
        "SELECT * FROM (SELECT * FROM memory.main.margin WHERE account IN ('TECH02')) m",
        "SELECT * FROM (SELECT * FROM memory.main.margin WHERE account IN ('TECH01') OR true) m",
        "SELECT * FROM (SELECT * FROM memory.main.margin, fill WHERE account IN ('TECH01')) m",
    ]:
        with pytest.raises(QueryError, match="did not rebuild to a filtered one"):
            desk._verify(desk._serialize(cur, text), rw.where_tree())
    cur.close()


def test_data_alerts_for_every_desk_are_readable_by_every_desk(store: Store) -> None:
    """calc's data alerts (a suspect price) concern an instrument, not an account: their account is "*"
    (calc.alerts.ALL_ACCOUNTS), and every desk reads them; other desks' rows stay hidden."""
    row = rows("alert", 500, T0 + 86_400_000_000_000).slice(0, 1)
    store.append("alert", row.set_column(row.schema.get_field_index("account"), "account", pa.array(["*"])))
    got = ask(store, "SELECT account, count(*) AS n FROM alert GROUP BY 1 ORDER BY 1")
    assert dict(zip(got.column(0).to_pylist(), got.column(1).to_pylist(), strict=True)) == {
        "*": 1,
        "TECH01": 2,
    }
    assert ask(store, "SELECT count(*) FROM alert", frozenset()).column(0).to_pylist() == [1]
