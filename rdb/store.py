"""Today's rows in an in-memory DuckDB, appended as Arrow in bulk, with `days.<table>` views spanning the
Parquet HDB and today, and `latest.<table>` (the last row of each key) kept at every flush.

Schemas: main.<table> is today (one table per schemas.tables entry); days.<table> adds the `date` column and
every HDB partition, so one query reaches every day; latest.<table> is the keyed "latest" table kdb+ rdbs
keep, so `select last ... by sym from quote` does not scan the day.

Appends are coalesced: `append` validates a batch, drops rows whose seq the table already has, and queues it;
`flush` (run when `flush_rows` are queued, and by every query first) inserts all queued batches in one
transaction, one INSERT per table. DuckDB pays ~1-3 ms per statement whatever its size, so one INSERT per
1 ms publish would cap the rdb near 0.3 M rows/s; coalesced it applies over a million.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from marginflow.sql import ident, sql_str
from rdb import sandbox
from schemas.tables import TABLES, Table

DAYS = "days"  # schema holding the views over HDB + today: SELECT ... FROM days.trade
LATEST = "latest"  # schema holding the last row of each key of today's tables: SELECT ... FROM latest.quote
PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
log = logging.getLogger("marginflow.rdb")


def parse_date(date: str, field: str = "date") -> str:
    """`date` as YYYY-MM-DD, or ValueError naming `field`."""
    try:
        return dt.date.fromisoformat(str(date)).isoformat()
    except ValueError:
        raise ValueError(f"{field}: {date!r} is not a date (YYYY-MM-DD)") from None


def partition_dir(hdb_dir: Path, table: str, date: str) -> Path:
    """Where one day of one table lives in the HDB."""
    return Path(hdb_dir) / table / f"date={date}"


def partitions(hdb_dir: Path, table: str) -> dict[str, list[Path]]:
    """date -> sorted Parquet files, for every complete partition of `table` in the HDB (a partition
    directory only appears whole: end of day renames it into place)."""
    out: dict[str, list[Path]] = {}
    root = Path(hdb_dir) / table
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        m = PARTITION.match(d.name)
        if m and d.is_dir():
            files = sorted(d.glob("*.parquet"))
            if files:
                out[m.group(1)] = files
    return out


def _same_type(have: pa.DataType, want: pa.DataType) -> bool:
    strings = (pa.string(), pa.large_string(), pa.string_view())
    return have == want or (want in strings and have in strings)


def check_partition_file(path: Path, schema: pa.Schema) -> str:
    """Why the Parquet file at `path` cannot serve as a partition of a table with `schema` ("" if it can):
    unreadable, not Parquet, a missing column or a column of another type (its footer is read, not its
    data)."""
    try:
        have = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        return f"unreadable: {' '.join(str(e).split())[:200]}"
    for f in schema:
        i = have.get_field_index(f.name)
        if i < 0:
            return f"column {f.name!r} missing (the file has {have.names})"
        if not _same_type(have.field(i).type, f.type):
            return f"column {f.name!r} is {have.field(i).type}, the table's is {f.type}"
    return ""


def merge_latest(held: pa.Table, new: pa.Table, key: str) -> pa.Table:
    """The last row (highest seq) per `key` of `new`, plus the rows of `held` whose key `new` lacks. Every seq
    in `new` is above every seq in `held` (append drops the rest), so a key in `new` replaces the held row."""
    codes = pc.dictionary_encode(new.column(key).combine_chunks()).indices.to_numpy()
    order = np.lexsort((new.column("seq").to_numpy(), codes))  # by key, then seq
    c = codes[order]
    last = new.take(order[np.r_[c[1:] != c[:-1], True]])
    if held.num_rows:
        held = held.filter(pc.invert(pc.is_in(held.column(key), value_set=last.column(key).combine_chunks())))
    return pa.concat_tables([held, last]).combine_chunks()


# A margin row equal to the last kept row of its key (the table's, an account) in these columns repeats a
# state already held: the same account at the same last applied seq with the same margin, from a second
# publisher (two calc shards overlapping for a moment at a failover, #16) or a calc restarted with nothing
# new to apply. Dropped, so the rdb keeps one of them. (A row that moved, at the same last_seq or not, is
# kept.)
REPEATS = {"margin": ("last_seq", "margin")}


class Store:
    """The rdb's database. `con` is the writer connection (used under `lock`); queries use `cursor()`.

    date      the day held in memory (YYYY-MM-DD): the `date` column today's rows have in `days.*` views
    max_seq   table -> highest seq appended (-1: none); rows at or below it are dropped as duplicates
    repeats   rows dropped as a publisher's repeat of the account's last kept row (REPEATS)
    spill_dir where DuckDB may spill when memory_limit is reached (default <hdb>/.spill; "" = never spill)
    """

    def __init__(
        self,
        hdb_dir: str | Path,
        *,
        date: str | None = None,
        tables: Mapping[str, Table] = TABLES,
        memory_limit: str = "4GB",
        threads: int = 0,
        flush_rows: int = 65536,
        spill_dir: str | Path | None = None,
    ) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows: must be >= 1, got {flush_rows}")
        self.hdb_dir = Path(hdb_dir).resolve()
        self.tables: dict[str, Table] = dict(tables)
        self.date = parse_date(date) if date else dt.datetime.now(dt.UTC).date().isoformat()
        self.flush_rows = flush_rows
        self.lock = threading.RLock()
        config = {"memory_limit": memory_limit, **({"threads": threads} if threads else {})}
        try:
            self.con = duckdb.connect(":memory:", config=config)
        except duckdb.Error as e:
            raise ValueError(f"rdb config: {str(e).splitlines()[0]}") from None
        # spilling (big sorts, end of day) goes under the HDB folder, the only one the sandbox can reach
        spill = self.hdb_dir / ".spill" if spill_dir is None else spill_dir
        sandbox.lock_down(self.con, [self.hdb_dir], spill)
        self._schemas = {name: t.arrow_schema for name, t in self.tables.items()}
        self.max_seq: dict[str, int] = {}
        self.repeats: dict[str, int] = {}
        # REPEATS table -> key -> its last kept row's state
        self._last_state: dict[str, dict[str, tuple]] = {}
        self._pending: dict[str, list[pa.Table]] = {}
        self._latest: dict[str, pa.Table] = {}  # table -> its latest.<table> rows, kept here to merge cheaply
        self._pending_rows = 0
        self._checked: dict[
            Path, tuple[tuple[int, int], str]
        ] = {}  # file -> ((mtime_ns, size), why bad or "")
        self._skipped: dict[str, dict[str, str]] = {}  # table -> {file: why it is left out of days.<table>}
        with self.lock:
            self.con.execute(f"CREATE SCHEMA {DAYS}")
            self.con.execute(f"CREATE SCHEMA {LATEST}")
            self._create_tables()

    # ---- tables and views ------------------------------------------------------------------------------
    def _create_tables(self) -> None:
        """(Re)create every table empty and its days view; the caller holds the lock (and a transaction)."""
        for name, t in self.tables.items():
            self.con.execute(f"DROP TABLE IF EXISTS main.{ident(name)}")
            self.con.execute(t.ddl(name))
            if t.key:  # same columns and types as the table, derived from it
                self.con.execute(
                    f"CREATE OR REPLACE TABLE {LATEST}.{ident(name)} AS "
                    f"SELECT * FROM main.{ident(name)} LIMIT 0"
                )
            self.max_seq[name] = -1
            self.repeats[name] = 0
            self._last_state[name] = {}
            self._pending[name] = []
            self._latest[name] = self._schemas[name].empty_table()
            self._create_view(name)
        self._pending_rows = 0

    def _usable(self, name: str, date: str, f: Path) -> str:
        """Why HDB file `f` (table `name`, day `date`) is left out ("" if it is used); checked once per
        version."""
        try:
            st = f.stat()
            version = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        cached = self._checked.get(f)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            parse_date(date)
            why = check_partition_file(f, self._schemas[name])
        except ValueError as e:
            why = str(e)
        self._checked[f] = (version, why)
        if why:
            log.warning("hdb: skipping %s (%s): %s", f, name, why)
        return why

    def skipped_partitions(self) -> dict[str, dict[str, str]]:
        """table -> {file: reason} for every HDB file left out of the days views (bad schema, unreadable)."""
        return {t: dict(v) for t, v in self._skipped.items() if v}

    def _create_view(self, name: str) -> None:
        t = self.tables[name]
        cols = ", ".join(ident(c) for c in t.column_names)
        today = f"SELECT DATE {sql_str(self.date)} AS date, {cols} FROM main.{ident(name)}"
        skipped: dict[str, str] = {}
        files = []
        for d, fs in partitions(self.hdb_dir, name).items():
            if d == self.date:
                continue
            bad = {str(f): why for f in fs if (why := self._usable(name, d, f))}
            if bad:  # the whole day or none of it: never part of a day
                first = next(iter(bad))
                skipped.update({str(f): bad.get(str(f)) or f"same partition as {first}" for f in fs})
            else:
                files += [str(f) for f in fs]
        parts = []
        if files:
            flist = "[" + ", ".join(sql_str(f) for f in files) + "]"
            parts.append(
                f"SELECT date, {cols} FROM read_parquet({flist}, hive_partitioning = true, "
                "hive_types = {'date': DATE}, union_by_name = true)"
            )
        parts.append(today)
        try:
            self.con.execute(f"CREATE OR REPLACE VIEW {DAYS}.{ident(name)} AS " + " UNION ALL ".join(parts))
        except duckdb.Error as e:  # e.g. a file that changed between the check and now: serve today at least
            why = " ".join(str(e).split())[:300]
            log.warning("hdb: days.%s over %d files failed (%s); it holds today only", name, len(files), why)
            skipped.update({f: f"view failed: {why}" for f in files})
            self.con.execute(f"CREATE OR REPLACE VIEW {DAYS}.{ident(name)} AS {today}")
        self._skipped[name] = skipped

    def refresh_views(self) -> None:
        """Rebuild every days view from the partitions now in the HDB."""
        with self.lock:
            for name in self.tables:
                self._create_view(name)

    def roll(self, next_date: str) -> None:
        """Start `next_date`: empty every table, reset max_seq, and rebuild the views (which now include the
        partitions written by end of day) — all in one transaction, so a query sees the old day or the new."""
        next_date = parse_date(next_date, "next_date")
        with self.lock:
            self.con.execute("BEGIN")
            try:
                old, self.date = self.date, next_date
                self._create_tables()
                self.con.execute("COMMIT")
            except BaseException:
                self.date = old
                self.con.execute("ROLLBACK")
                raise

    # ---- appends ---------------------------------------------------------------------------------------
    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise ValueError(f"table: unknown table {name!r}; tables are {sorted(self.tables)}") from None

    def conform(self, name: str, data: pa.RecordBatch | pa.Table) -> pa.Table:
        """`data` with exactly the table's columns, in order and type (safe casts only), or ValueError
        naming the table and column."""
        self.table(name)
        want = self._schemas[name]
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif not isinstance(data, pa.Table):
            raise ValueError(f"{name}: expected a pyarrow RecordBatch or Table, got {type(data).__name__}")
        if (
            data.schema.names == want.names
            and data.schema.types == want.types
            and not any(c.null_count for c in data.columns)
        ):
            # the tickerplant's batches: the table's columns already; only nullability flags may differ
            return data if data.schema.equals(want) else pa.Table.from_arrays(data.columns, schema=want)
        have = set(data.column_names)
        missing = [c for c in want.names if c not in have]
        extra = [c for c in data.column_names if c not in want.names]
        if missing or extra:
            what = f"missing columns {missing}" if missing else f"unknown columns {extra}"
            raise ValueError(f"{name}: {what}; the table's columns are {want.names}")
        cols = []
        for f in want:
            col = data.column(f.name)
            if col.null_count:
                raise ValueError(f"{name}.{f.name}: {col.null_count} null values; every column is required")
            if col.type != f.type:
                try:
                    col = col.cast(f.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ValueError(f"{name}.{f.name}: type {col.type} cannot be {f.type}: {e}") from None
            cols.append(col)
        return pa.Table.from_arrays(cols, schema=want)

    def append(self, name: str, data: pa.RecordBatch | pa.Table) -> int:
        """Queue `data`'s rows for table `name`, dropping rows whose seq is <= the table's max_seq (already
        applied); flush when flush_rows are queued. Returns the number of rows kept."""
        data = self.conform(name, data)
        if data.num_rows == 0:
            return 0
        seq = data.column("seq").to_numpy()
        with self.lock:
            held = self.max_seq[name]
            if seq.min() <= held:  # a replayed or repeated batch: keep only the new rows
                keep = seq > held
                data, seq = data.filter(pa.array(keep)), seq[keep]
            n = data.num_rows
            if n == 0:
                return 0
            self.max_seq[name] = max(held, int(seq.max()))
            if name in REPEATS:
                data = self._without_repeats(name, data)
                n = data.num_rows
                if n == 0:
                    return 0
            self._pending[name].append(data)
            self._pending_rows += n
            if self._pending_rows >= self.flush_rows:
                try:
                    self.flush()
                except duckdb.OutOfMemoryException as e:  # e.g. a big query holds the memory right now
                    log.warning(
                        "flush of %d queued rows deferred: %s", self._pending_rows, str(e).splitlines()[0]
                    )
            return n

    def _without_repeats(self, name: str, data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """`data` less the rows repeating their key's last kept state (REPEATS); the caller holds the lock."""
        key, state = self.tables[name].key, REPEATS[name]
        last = self._last_state[name]
        keep = []
        for k, *st in zip(*(data.column(c).to_pylist() for c in (key, *state)), strict=True):
            st = tuple(st)
            keep.append(last.get(k) != st)
            last[k] = st
        if all(keep):
            return data
        self.repeats[name] += len(keep) - sum(keep)
        return data.filter(pa.array(keep))

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def flush(self) -> int:
        """Insert every queued batch: one INSERT ... SELECT per table over the registered Arrow data, all in
        one transaction. Returns the number of rows inserted."""
        with self.lock:
            if not self._pending_rows:
                return 0
            self.con.execute("BEGIN")
            latest: dict[str, pa.Table] = {}
            try:
                for name, parts in self._pending.items():
                    if not parts:
                        continue
                    # one contiguous chunk per column: DuckDB scans many small Arrow chunks ~3x slower
                    data = pa.concat_tables(parts).combine_chunks()
                    self._insert(f"main.{ident(name)}", data, "INSERT INTO {} SELECT * FROM __append")
                    if key := self.tables[name].key:
                        latest[name] = merge_latest(self._latest[name], data, key)
                        self._insert(
                            f"{LATEST}.{ident(name)}",
                            latest[name],
                            "CREATE OR REPLACE TABLE {} AS SELECT * FROM __append",
                        )
                self.con.execute("COMMIT")
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self._latest.update(latest)
            n = self._pending_rows
            for parts in self._pending.values():
                parts.clear()
            self._pending_rows = 0
            return n

    def _insert(self, target: str, data: pa.Table, sql: str) -> None:
        self.con.register("__append", data)
        try:
            self.con.execute(sql.format(target))
        finally:
            self.con.unregister("__append")

    # ---- reading -----------------------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database, for one reader thread (sandboxed like the whole DB)."""
        return self.con.cursor()

    def rows(self) -> dict[str, int]:
        """table -> rows held today (flushes first)."""
        with self.lock:
            self.flush()
            return {
                n: self.con.execute(f"SELECT count(*) FROM main.{ident(n)}").fetchall()[0][0]
                for n in self.tables
            }

    def fetch(self, name: str, order_by: tuple[str, ...] = ("seq",)) -> pa.Table:
        """Today's rows of table `name` as Arrow, ordered (for tests and end of day checks)."""
        self.table(name)
        with self.lock:
            self.flush()
            order = ", ".join(ident(c) for c in order_by)
            return self.con.sql(f"SELECT * FROM main.{ident(name)} ORDER BY {order}").to_arrow_table()

    def close(self) -> None:
        with self.lock:
            self.con.close()
