"""The rdb's subscription: replay today's journal up to the tickerplant's position, then live batches
(no gap, no duplicate), each appended to DuckDB in bulk; end_of_day writes the HDB.

`follow` is the only place the rdb talks to the tickerplant. It also drives the rdb's Recovery state:
recovering from the start until the first `live` event, and again while a reconnect (e.g. to a restarted
tickerplant) replays the rows missed; queries wait or say so meanwhile (rdb.recovery).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import pyarrow as pa

from rdb.recovery import LiveLag, Recovery
from tickerplant.client import Subscriber

log = logging.getLogger("marginflow.rdb")


class Target(Protocol):
    recovery: Recovery
    lag: LiveLag

    def start_day(self, date: str) -> None: ...
    def apply_batch(self, table: str, batch: pa.RecordBatch) -> int: ...
    def end_of_day(self, date: str | None = None, next_date: str | None = None) -> object: ...


async def follow(rdb: Target, tp_url: str, ready: asyncio.Event | None = None, chunk_ms: float = 0.0) -> None:
    """Apply every table's rows from the tickerplant at `tp_url` to `rdb`, forever (reconnecting and
    replaying the gap when the connection drops). Live batches are read in chunks every `chunk_ms`
    (rdb.live_chunk_ms; 0: each as it arrives), each chunk's lag kept in `rdb.lag`. If it stops on an error
    (a refused subscription, a batch the rdb cannot apply, a failed end of day) the rdb's recovery state
    says "failed" and queries say so."""
    try:
        await _follow(rdb, tp_url, ready, chunk_ms)
    except Exception as e:
        log.exception("rdb stopped following %s", tp_url)
        rdb.recovery.fail(f"{type(e).__name__}: {e}")
        raise


async def _follow(rdb: Target, tp_url: str, ready: asyncio.Event | None, chunk_ms: float) -> None:
    sub = Subscriber(tp_url, ordered=False, chunk_s=chunk_ms / 1000)
    recovery = rdb.recovery
    if not recovery.recovering:
        recovery.begin("starting")
    t0 = time.perf_counter()
    position = None
    sessions = 0
    async for ev in sub.events():
        if sub.position is not position:  # a new session: hold the tickerplant's journal date
            position = sub.position
            sessions += 1
            if sessions > 1 and ev.kind == "batch" and ev.replayed:  # a reconnect replays what it missed
                recovery.begin("reconnected", position)
                t0 = time.perf_counter()
            recovery.session(position)
            if position is not None:
                try:
                    rdb.start_day(position.date)
                except ValueError as e:  # rows of an earlier day held: its end of day must come first
                    log.warning("%s", e)
        if ev.kind == "batch":
            rows = rdb.apply_batch(ev.table, ev.batch)
            if ev.replayed:
                recovery.progress(rows, ev.batch.column("seq")[-1].as_py() if ev.batch.num_rows else -1)
            elif ev.batch.num_rows:
                rdb.lag.batch(ev.batch.column("time")[0].value, ev.more)
        elif ev.kind == "live":
            if recovery.recovering:
                snap = recovery.snapshot()
                log.info(
                    "replayed %d journal rows up to seq %d in %.2f s; live",
                    snap["replayed_rows"],
                    sub.position.last_seq if sub.position else 0,
                    time.perf_counter() - t0,
                )
            recovery.done()
            if ready is not None:
                ready.set()
        elif ev.kind == "end_of_day":
            await asyncio.to_thread(rdb.end_of_day, ev.date, ev.next_date)
