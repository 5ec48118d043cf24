"""The read-only sandbox every client query runs in: DuckDB locked down (no files but the HDB, no extensions,
configuration frozen), a statement allow-list checked on the parsed statement, a time limit and a row limit.

Layers, each enough on its own for the attacks it names, together for the rest:
- `lock_down` (database-wide, once): external access off except reading `allowed_directories` (the HDB),
  no extension install/autoload, no spilling outside a chosen folder, then `lock_configuration`.
  DuckDB's allowed directories also permit writes, which is why the statement check below matters.
- `check` (per query): exactly one statement; its parsed type must be SELECT (which is how DuckDB parses
  WITH, DESCRIBE, SHOW, SUMMARIZE, FROM-first and VALUES) or EXPLAIN of such a statement (EXPLAIN ANALYZE
  executes its statement, so the inner one is checked too); the statement's syntax tree (DuckDB's own
  `json_serialize_sql`) must call no function in DENIED_FUNCTIONS (functions with side effects, raw
  pointers or SQL hidden in a string).
- `run` (per query): a watchdog thread (one for all queries) interrupts the query at the time limit;
  results are streamed in small batches and cut at the row limit and at the byte limit, so a huge result
  is never materialised.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

# What DuckDB's parser says each allowed statement is. WITH / DESCRIBE / SHOW / SUMMARIZE / VALUES /
# FROM-first all parse as SELECT; EXPLAIN is allowed only around a statement that is itself allowed.
ALLOWED_TYPES = {duckdb.StatementType.SELECT: "SELECT", duckdb.StatementType.EXPLAIN: "EXPLAIN"}
ALLOWED_WORDS = "SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, SUMMARIZE"

# Table or scalar functions a SELECT could call for an effect other than reading: state changes
# (checkpoint, logs, profiling, grammar, external resources), raw memory pointers (the *_scan functions
# take addresses and would crash the process on a bad one), or SQL hidden in a string that the syntax-tree
# check could not see (query, json_execute_serialized_sql).
DENIED_FUNCTIONS = frozenset(
    {
        "checkpoint",
        "force_checkpoint",
        "truncate_duckdb_logs",
        "enable_logging",
        "disable_logging",
        "enable_profiling",
        "disable_profiling",
        "add_grammar_extension",
        "remove_grammar_extension",
        "create_external_resource",
        "register_external_resource",
        "register_external_resource_type",
        "deregister_external_resource",
        "destroy_external_resource",
        "json_execute_serialized_sql",
        "query",
        "arrow_scan",
        "arrow_scan_dumb",
        "python_arrow_scan",
        "pandas_scan",
        "python_map_function",
        "setseed",
        "nextval",
    }
)

_EXPLAIN_PREFIX = re.compile(
    r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*EXPLAIN\s+(?:ANALY[SZ]E\s+|\([^()]*\)\s*)?",
    re.IGNORECASE | re.DOTALL,
)


class QueryError(Exception):
    """A query refused or failed. `kind` is a short word (like q's 'type): refused, parse, timeout, sql,
    limit; `str()` is one line: "<kind>: <reason>"."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{kind}: {self.reason}")


def lock_down(
    con: duckdb.DuckDBPyConnection, read_dirs: Sequence[str | Path], spill_dir: str | Path | None = None
) -> None:
    """Lock the whole database (every cursor of `con`): files only under `read_dirs` (created if missing),
    spilling only to `spill_dir` (None: no spilling), no extension install or autoload, configuration frozen.
    Call once, after any other configuration; nothing can change settings afterwards."""
    dirs = []
    for d in read_dirs:
        p = Path(d).resolve()
        p.mkdir(parents=True, exist_ok=True)
        dirs.append(str(p) + "/")
    if spill_dir:  # DuckDB creates it when it first spills
        con.execute("SET temp_directory = ?", [str(Path(spill_dir).resolve())])
    else:
        con.execute("SET temp_directory = ''")
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET python_enable_replacements = false")  # no Python variable is ever scanned as a table
    con.execute("SET lock_configuration = true")


def _function_names(tree: Any) -> Iterator[str]:
    """Every function name called anywhere in a json_serialize_sql tree (scalar, aggregate, table)."""
    if isinstance(tree, dict):
        name = tree.get("function_name")
        if isinstance(name, str):
            yield name.lower()
        for v in tree.values():
            yield from _function_names(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _function_names(v)


def _single(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError("parse", str(e).splitlines()[0]) from None
    if not statements:
        raise QueryError("refused", "empty query: no statement given")
    if len(statements) > 1:
        raise QueryError("refused", f"one statement per query; got {len(statements)}")
    return statements[0]


def _check_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    tree = json.loads(text)
    if tree.get("error"):
        raise QueryError("parse", tree.get("error_message", "statement could not be inspected"))
    denied = sorted(set(_function_names(tree)) & DENIED_FUNCTIONS)
    if denied:
        raise QueryError("refused", f"function {denied[0]}() is not allowed in a read-only query")


_ACCEPTED: dict[str, str] = {}  # SQL text -> its accepted statement (the check is a function of the text)
_ACCEPTED_MAX = 1024


def check(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The query's single statement if the sandbox accepts it, else QueryError naming the reason. An
    accepted text is remembered (a dashboard or an IPC client asks the same queries again and again: the
    check, two parses by DuckDB, cost ~1.4 ms of a 3.7 ms `count trade`); a refused one is checked each
    time."""
    if not isinstance(sql, str):
        raise QueryError("refused", f"query must be text, got {type(sql).__name__}")
    hit = _ACCEPTED.get(sql)
    if hit is not None:
        return hit
    stmt = _check(con, sql)
    if len(_ACCEPTED) >= _ACCEPTED_MAX:
        _ACCEPTED.clear()
    _ACCEPTED[sql] = stmt
    return stmt


def _check(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    st = _single(con, sql)
    if st.type not in ALLOWED_TYPES:
        word = st.type.name + (
            " (e.g. PIVOT without an IN list)" if st.type == duckdb.StatementType.MULTI else ""
        )
        raise QueryError("refused", f"{word} statements are not allowed; only {ALLOWED_WORDS} (read-only)")
    if st.type == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN_PREFIX.match(st.query)
        if not m:
            raise QueryError("refused", "EXPLAIN must be followed directly by the statement it explains")
        inner = _single(con, st.query[m.end() :])
        if inner.type != duckdb.StatementType.SELECT:
            raise QueryError("refused", f"EXPLAIN of {inner.type.name} is not allowed; only {ALLOWED_WORDS}")
        _check_select(con, inner.query)
    else:
        _check_select(con, st.query)
    return st.query


def _interrupt(cur: duckdb.DuckDBPyConnection) -> None:
    try:
        cur.interrupt()
    except duckdb.Error:  # the query finished and the cursor closed as the timer fired
        pass


class Watchdog:
    """One thread that interrupts each watched cursor at its deadline unless released first (a
    threading.Timer per query started a thread each time: ~0.3 ms of a small query)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, token)
        self._cursors: dict[int, duckdb.DuckDBPyConnection] = {}  # token -> cursor, while watched
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None

    def watch(self, cur: duckdb.DuckDBPyConnection, timeout_s: float) -> int:
        """Interrupt `cur` in `timeout_s` seconds unless `release(token)` is called first."""
        token = next(self._tokens)
        with self._cond:
            heapq.heappush(self._deadlines, (time.monotonic() + timeout_s, token))
            self._cursors[token] = cur
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rdb-query-watchdog", daemon=True)
                self._thread.start()
            elif self._deadlines[0][1] == token:  # the earliest deadline now: wake the thread for it
                self._cond.notify()
        return token

    def release(self, token: int) -> None:
        with self._cond:
            self._cursors.pop(token, None)
            if not self._cursors:
                self._deadlines.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._deadlines and self._deadlines[0][1] not in self._cursors:
                    heapq.heappop(self._deadlines)  # released
                if not self._deadlines:
                    self._cond.wait()
                    continue
                deadline, token = self._deadlines[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._deadlines)
                cur = self._cursors.pop(token)
            _interrupt(cur)


_WATCHDOG = Watchdog()


@dataclass
class Result:
    """A query's result: the rows (cut at the row or byte limit), DuckDB's column types, whether it was cut
    (`cut`: "" | "rows" | "bytes"), and the time from start of execution to the last row fetched."""

    table: pa.Table
    types: list[str]
    truncated: bool
    elapsed_ms: float
    cut: str = ""
    note: str = ""

    @property
    def columns(self) -> list[str]:
        return self.table.column_names


BATCH_ROWS = (
    2048  # rows per fetched Arrow batch (DuckDB's vector size): how far a result can overshoot the byte cap
)


def _fetch(reader: pa.RecordBatchReader, max_rows: int, max_bytes: int) -> tuple[list[pa.RecordBatch], str]:
    """Batches from `reader` up to `max_rows` rows (+1, to know more exist) and `max_bytes` bytes of
    Arrow buffers; stops reading (so DuckDB stops producing) as soon as either is reached.
    Returns (batches, cut)."""
    batches: list[pa.RecordBatch] = []
    n = size = 0
    for b in reader:
        nbytes = b.get_total_buffer_size()
        if max_bytes and size + nbytes > max_bytes:
            if b.num_rows:  # keep the part of this batch that fits, at its average row size
                fit = int((max_bytes - size) / (nbytes / b.num_rows))
                if fit > 0:
                    batches.append(b.slice(0, min(fit, max_rows + 1 - n)))
            return batches, "bytes"
        batches.append(b)
        n += b.num_rows
        size += nbytes
        if n > max_rows:
            return batches, "rows"
    return batches, ""


def run(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    timeout_s: float,
    max_rows: int,
    max_bytes: int = 0,
    batch_rows: int = BATCH_ROWS,
    rewrite: Callable[[duckdb.DuckDBPyConnection, str], str] | None = None,
) -> Result:
    """Check `sql` and run it on a fresh cursor of `con` (after `rewrite(cursor, statement)` if given, e.g.
    rdb.desk.restrict); interrupt it after `timeout_s` seconds; return at most `max_rows` rows and about
    `max_bytes` bytes of Arrow data (0: no byte cap), fetched in batches so a huge result is never
    materialised whole (the Result says when it was cut, and by what). Raises QueryError."""
    if max_rows < 0:
        raise QueryError("limit", f"max_rows must be >= 0, got {max_rows}")
    cur = con.cursor()
    try:
        stmt = check(cur, sql)
        if rewrite is not None:
            stmt = rewrite(cur, stmt)
        return _execute(
            cur, stmt, timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes, batch_rows=batch_rows
        )
    finally:
        cur.close()


def _execute(
    cur: duckdb.DuckDBPyConnection,
    stmt: str,
    *,
    timeout_s: float,
    max_rows: int,
    max_bytes: int,
    batch_rows: int,
) -> Result:
    watch = _WATCHDOG.watch(cur, timeout_s) if timeout_s > 0 else 0
    t0 = time.perf_counter()
    try:
        rel = cur.sql(stmt)
        types = [str(t) for t in rel.types]
        reader = rel.to_arrow_reader(max(1, min(batch_rows, max_rows + 1)))
        batches, cut = _fetch(reader, max_rows, max_bytes)
        reader.close()
    except duckdb.InterruptException:
        raise QueryError("timeout", f"query ran longer than {timeout_s:g} s and was interrupted") from None
    except duckdb.Error as e:
        kind = "refused" if isinstance(e, duckdb.PermissionException) else "sql"
        raise QueryError(kind, str(e).splitlines()[0]) from None
    finally:
        if watch:
            _WATCHDOG.release(watch)
    elapsed = (time.perf_counter() - t0) * 1e3
    table = pa.Table.from_batches(batches, schema=reader.schema)
    if table.num_rows > max_rows:
        table, cut = table.slice(0, max_rows), "rows"
    note = ""
    if cut == "rows":
        note = f"cut at {max_rows} rows (the row limit)"
    elif cut == "bytes":
        note = f"cut by bytes: at {table.num_rows} rows, the byte limit of {max_bytes} bytes of Arrow data"
    return Result(table, types, bool(cut), elapsed, cut, note)
