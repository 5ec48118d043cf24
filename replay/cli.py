"""`marginflow replay`: read journals back in seq order; print them, or republish into a tickerplant.

Republishing is paced by the journaled `time` (--speed 1, 10, ...) or at full speed (--speed max).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import pyarrow as pa

from calc.events import OUTPUT_TABLES
from marginflow import config as configuration
from schemas.tables import TABLES
from tickerplant import journal_reader
from tickerplant.client import Publisher

RESTART_WAIT_S = 300.0  # how long a republish waits for acks (a tickerplant restart in between is waited out)


def input_columns(table: str, batch: pa.RecordBatch) -> dict[str, list]:
    return {c.name: batch.column(c.name).to_pylist() for c in TABLES[table].input_columns}


async def republish(url: str, items, speed: float | None, chunk: int = 5000) -> tuple[int, float]:
    """Send journaled rows to a tickerplant, paced by their time (speed x) or as fast as acks allow."""
    rows = 0
    start = time.monotonic()
    first_time: int | None = None
    async with Publisher(url, name="replay") as pub:  # reconnects and resends across a tickerplant restart
        for table, batch in items:
            if speed:
                t0 = batch.column("time").cast(pa.int64())[0].as_py()
                first_time = first_time if first_time is not None else t0
                due = (t0 - first_time) / 1e9 / speed
                wait = due - (time.monotonic() - start)
                if wait > 0:
                    await asyncio.sleep(wait)
            for off in range(0, batch.num_rows, chunk):
                await pub.upd(table, input_columns(table, batch.slice(off, chunk)))
            rows += batch.num_rows
            if pub.next_id - pub.acked > 64:
                await pub.wait_acked(pub.next_id - 32, timeout=RESTART_WAIT_S)
        await pub.wait_acked(timeout=RESTART_WAIT_S)
    return rows, time.monotonic() - start


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow replay", description=__doc__)
    ap.add_argument("--config")
    ap.add_argument("--journal", help="journal root (default: tickerplant.journal_dir from config)")
    ap.add_argument("--date", help="first date YYYY-MM-DD (default: all)")
    ap.add_argument("--to", help="last date YYYY-MM-DD (default: --date)")
    ap.add_argument("--tables", nargs="*", help="tables to read (default: all)")
    ap.add_argument("--publish", metavar="URL", help="republish into this tickerplant (ws://host:port)")
    ap.add_argument("--speed", default="max", help="pace: 1, 10, ... times real time, or max")
    ap.add_argument("--limit", type=int, default=20, help="print: rows per batch shown")
    args = ap.parse_args(argv)
    cfg = configuration.load(args.config)
    root = args.journal or cfg.tickerplant.journal_dir
    tables = [t for t in (args.tables or TABLES) if t not in OUTPUT_TABLES] if args.publish else args.tables
    items = journal_reader.read_days(root, args.date, args.to or args.date, tables)
    if args.publish:
        speed = None if args.speed == "max" else float(args.speed)
        rows, secs = asyncio.run(republish(args.publish, items, speed))
        print(f"republished {rows} rows in {secs:.2f} s ({rows / max(secs, 1e-9):,.0f} rows/s)")
        return 0
    count = 0
    for table, batch in items:
        count += batch.num_rows
        print(f"-- {table} seq {batch.column('seq')[0]}..{batch.column('seq')[-1]} ({batch.num_rows} rows)")
        print(batch.slice(0, args.limit).to_string(preview_cols=12))
    print(f"{count} rows")
    return 0
