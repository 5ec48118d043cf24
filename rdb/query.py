"""Run one client query against the store and shape its answer: Arrow IPC bytes (msgpack clients) or JSON rows
(browsers), with column names, DuckDB types, elapsed time and whether the row limit cut it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from rdb import desk, sandbox
from rdb.store import Store

Format = Literal["arrow", "json"]


@dataclass
class Answer:
    columns: list[str]
    types: list[str]  # DuckDB type names, e.g. VARCHAR, DOUBLE, TIMESTAMP_NS
    rows: int
    elapsed_ms: float  # flush of queued rows + execution + fetch
    truncated: bool  # more rows existed than were kept (cut at the row or the byte limit)
    arrow: bytes = b""  # format "arrow": one Arrow IPC stream
    data: list[list[Any]] = field(default_factory=list)  # format "json": one list per row
    table: pa.Table | None = None  # the rows themselves, for in-process callers
    note: str = ""  # why it was cut ("cut at N rows ...", "cut by bytes ..."), else ""


def to_ipc(table: pa.Table) -> bytes:
    """An Arrow IPC stream holding `table` (any Arrow reader opens it: pyarrow, polars, DuckDB, arrow-js)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _jsonable(col: pa.ChunkedArray) -> list[Any]:
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return col.cast(pa.string()).to_pylist()  # ISO text keeps nanoseconds, which JSON numbers cannot
    if pa.types.is_decimal(t):
        return col.cast(pa.float64()).to_pylist()
    if pa.types.is_duration(t) or pa.types.is_interval(t) or pa.types.is_dictionary(t):
        return [None if v is None else str(v) for v in col.to_pylist()]
    try:
        return col.to_pylist()
    except (ValueError, pa.ArrowInvalid):
        return [None if v is None else str(v) for v in pc.cast(col, pa.string(), safe=False).to_pylist()]


def to_json_rows(table: pa.Table) -> list[list[Any]]:
    """Rows as lists of JSON-safe values: timestamps, dates and times as ISO text, decimals as floats."""
    cols = [_jsonable(c) for c in table.columns]
    return [list(r) for r in zip(*cols, strict=True)] if cols else []


_RESTRICTED: dict[tuple[str, frozenset[str]], str] = {}  # (statement, accounts) -> its desk rewrite
_RESTRICTED_MAX = 1024


def restrict(con: duckdb.DuckDBPyConnection, sql: str, accounts: frozenset[str]) -> str:
    """rdb.desk.restrict, remembered: the rewrite is a function of the statement and the accounts (three
    DuckDB parses each time otherwise); a refused statement is checked again each time."""
    key = (sql, accounts)
    hit = _RESTRICTED.get(key)
    if hit is None:
        hit = desk.restrict(con, sql, accounts)
        if len(_RESTRICTED) >= _RESTRICTED_MAX:
            _RESTRICTED.clear()
        _RESTRICTED[key] = hit
    return hit


def run(
    store: Store,
    sql: str,
    *,
    fmt: Format = "arrow",
    timeout_s: float = 10.0,
    max_rows: int = 100_000,
    max_bytes: int = 0,
    accounts: frozenset[str] | None = None,
) -> Answer:
    """Flush queued appends, run `sql` in the sandbox (restricted to `accounts`' rows of the account-keyed
    tables unless None: rdb.desk), cut at `max_rows` rows and `max_bytes` bytes (0: no byte cap), and shape
    the answer in `fmt`. Raises sandbox.QueryError (refused / parse / timeout / sql / limit)."""
    if fmt not in ("arrow", "json"):
        raise sandbox.QueryError("refused", f"format: {fmt!r} is not one of 'arrow', 'json'")
    t0 = time.perf_counter()
    try:
        store.flush()
    except duckdb.Error as e:  # never answer without rows already applied: say why instead
        why = str(e).splitlines()[0]
        raise sandbox.QueryError(
            "busy", f"rows received could not be inserted yet ({why}); try again"
        ) from None
    rewrite = functools.partial(restrict, accounts=accounts) if desk.is_restricted(accounts) else None
    res = sandbox.run(
        store.con, sql, timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes, rewrite=rewrite
    )
    ans = Answer(
        res.columns, res.types, res.table.num_rows, 0.0, res.truncated, table=res.table, note=res.note
    )
    if fmt == "arrow":
        ans.arrow = to_ipc(res.table)
    else:
        ans.data = to_json_rows(res.table)
    ans.elapsed_ms = (time.perf_counter() - t0) * 1e3
    return ans
