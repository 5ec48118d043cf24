"""End of day: write each of today's tables to the Parquet HDB,
<hdb>/<table>/date=<YYYY-MM-DD>/part-0.parquet, sorted by the table's sort_by (key, time, seq),
verify it by reading it back, then clear the day.

Crash-safe: every table is written to <hdb>/.eod-<date>/ and verified (row count and sum of seq), then each
partition is renamed into place (one atomic rename per table) and only then is the day cleared. A crash at
any point leaves either no partition or a whole one for each table; running end_of_day again (after the
journal replay rebuilt the day) replaces them, so the journal must stay until this returns.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from marginflow.sql import ident, sql_str
from rdb.store import Store, parse_date, partition_dir

PART_FILE = "part-0.parquet"


@dataclass
class EodReport:
    date: str
    next_date: str
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows written (and read back)
    paths: dict[str, str] = field(default_factory=dict)  # table -> partition directory


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _next_day(date: str) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()


def end_of_day(store: Store, date: str | None = None, next_date: str | None = None) -> EodReport:
    """Write the day held in `store` (its `date`, or `date` if given) to the HDB, verify, then roll the
    store to `next_date` (default: the day after). Raises RuntimeError, before anything is cleared, if a
    partition does not read back equal; the day stays in memory then."""
    date = parse_date(date, "date") if date else store.date
    next_date = parse_date(next_date, "next_date") if next_date else _next_day(date)
    report = EodReport(date, next_date)
    work = store.hdb_dir / f".eod-{date}"
    with store.lock:
        store.flush()
        shutil.rmtree(work, ignore_errors=True)  # left by a crash during an earlier attempt
        con = store.con
        # 1. write every table, sorted, into the work folder; verify by reading each file back
        for name, t in store.tables.items():
            tmp = work / name
            tmp.mkdir(parents=True)
            out = tmp / PART_FILE
            order = ", ".join(ident(c) for c in t.sort_by)
            con.execute(
                f"COPY (SELECT * FROM main.{ident(name)} ORDER BY {order}) TO {sql_str(str(out))} "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
            want = con.execute(f"SELECT count(*), coalesce(sum(seq), 0) FROM main.{ident(name)}").fetchall()[
                0
            ]
            got = con.execute(
                f"SELECT count(*), coalesce(sum(seq), 0) FROM read_parquet({sql_str(str(out))})"
            ).fetchall()[0]
            if tuple(want) != tuple(got):
                raise RuntimeError(
                    f"end of day {date}: {name} wrote {got[0]} rows (sum seq {got[1]}) but holds {want[0]} "
                    f"(sum seq {want[1]}); the day is kept in memory and the HDB is unchanged"
                )
            _fsync(out)
            _fsync(tmp)
            report.rows[name] = int(want[0])
        # 2. move each verified partition into place (replacing one left by an earlier run of this day)
        for name in store.tables:
            final = partition_dir(store.hdb_dir, name, date)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                final.rename(work / f"{name}.replaced")
            (work / name).rename(final)
            _fsync(final.parent)
            report.paths[name] = str(final)
        # 3. only now forget the day
        store.roll(next_date)
        shutil.rmtree(work, ignore_errors=True)
    return report
