"""`marginflow rdb`: the websocket shell around the rdb's Store and query Service.

`Rdb` holds the state and is what the subscription drives: `apply_batch(table, batch)` for each published (or
replayed) batch, `end_of_day(date, next_date)` on the tickerplant's EndOfDay. The server answers Query /
StatusRequest frames, each in a worker thread (DuckDB runs queries concurrently; a slow query never blocks
the event loop, nor other connections).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pyarrow as pa
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from marginflow import auth, metrics, process
from marginflow import config as configuration
from marginflow.config import AccessConfig, RdbConfig
from rdb import hdb
from rdb.kdb import RdbKdb
from rdb.recovery import LiveLag, Recovery
from rdb.service import MAX_REQUEST_BYTES, Service
from rdb.store import Store
from rdb.subscription import follow
from schemas.wire import Error

log = logging.getLogger("marginflow.rdb")
QUERY_THREADS = 32  # requests answered at once (each in a worker thread; DuckDB runs them concurrently)
MAX_FRAME_BYTES = 4 * MAX_REQUEST_BYTES  # a frame larger than this closes the connection (1009, too big)


class Rdb:
    """The rdb process: `store` (today in DuckDB, the HDB views) and `service` (sandboxed queries over it)."""

    def __init__(
        self,
        cfg: RdbConfig,
        *,
        date: str | None = None,
        access: AccessConfig | None = None,
        origins: frozenset[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.access = access or configuration.current_access()
        # a connection needs a token with role query (admin implies it); a desk token's accounts go to
        # the service
        self.gate = auth.Gate(
            self.access,
            origins if origins is not None else auth.configured_origins(self.access),
            role="query",
        )
        self.store = Store(
            Path(cfg.hdb_dir),
            date=date,
            memory_limit=cfg.memory_limit,
            threads=cfg.threads,
            flush_rows=cfg.flush_rows,
        )
        self.recovery = Recovery()  # recovering while the subscription replays the journal (rdb.subscription)
        self.lag = LiveLag(cfg.live_chunk_ms)  # how far the live rows trail the tickerplant
        self.service = Service(
            self.store,
            timeout_s=cfg.query_timeout_s,
            max_rows=cfg.max_result_rows,
            max_bytes=cfg.max_result_bytes,
            recovery=self.recovery,
            recovery_wait_s=cfg.recovery_wait_s,
            lag=self.lag,
        )
        self.server: Server | None = None
        self.port = 0
        self.metrics = metrics.RdbMetrics()
        self.metrics.watch(self.service, self.recovery)
        # requests run here, not in asyncio's small default pool: queries waiting for recovery (or running
        # long) never hold back status requests or end of day
        self._pool = ThreadPoolExecutor(max_workers=QUERY_THREADS, thread_name_prefix="rdb-query")
        self.kdb = RdbKdb(self, cfg.kdb_port, MAX_FRAME_BYTES) if cfg.kdb_port else None  # kdb+ IPC port

    # ---- driven by the subscription ----------------------------------------------------------------------
    def apply_batch(self, table: str, batch: pa.RecordBatch | pa.Table) -> int:
        """Append a published or replayed batch; rows with a seq already held are dropped.
        Returns rows kept."""
        rows = self.store.append(table, batch)
        self.metrics.rows_applied.labels(table).inc(rows)
        return rows

    def start_day(self, date: str) -> None:
        """Hold `date` (the tickerplant's journal date, SubReply.position.date) before the first batch is
        applied; refused once rows are held (that day must end through end_of_day)."""
        if any(self.store.max_seq[t] >= 0 for t in self.store.tables):
            if date != self.store.date:
                raise ValueError(f"date: the rdb holds rows of {self.store.date}; end that day before {date}")
            return
        if date != self.store.date:
            self.store.roll(date)

    def end_of_day(self, date: str | None = None, next_date: str | None = None) -> hdb.EodReport:
        """Write the day to the Parquet HDB, verify, clear, and start `next_date`. Blocking (run it in a
        thread from async code); raises before clearing anything if the HDB write does not verify."""
        report = hdb.end_of_day(self.store, date, next_date)
        log.info(
            "end of day %s: %s rows -> %s; now %s",
            report.date,
            sum(report.rows.values()),
            self.store.hdb_dir,
            report.next_date,
        )
        return report

    # ---- websocket shell -----------------------------------------------------------------------------------
    async def start(self) -> None:
        auth.check_bind("rdb", self.cfg.host, self.access)
        self.server = await serve(
            self.handle,
            self.cfg.host,
            self.cfg.port,
            max_size=MAX_FRAME_BYTES,
            compression=None,
            process_request=metrics.process_request(
                self.gate, self.metrics, lambda: metrics.ready_state(self.recovery)
            ),
            ssl=auth.server_ssl(self.access),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.kdb is not None:
            await self.kdb.port.start()
        log.info(
            "rdb listening on %s://%s:%d, hdb %s, day %s",
            auth.scheme(self.access),
            self.cfg.host,
            self.port,
            self.store.hdb_dir,
            self.store.date,
        )

    async def handle(self, ws: ServerConnection) -> None:
        principal = self.gate.principals.get(ws)
        if principal is None:  # (process_request let only authenticated connections in)
            await ws.close(1008, "not authenticated")
            return
        # the caller's accounts for desk restriction (None or containing "*" = every account)
        accounts = None if principal.accounts is None else frozenset(principal.accounts)
        loop = asyncio.get_running_loop()
        try:
            async for frame in ws:
                with self.metrics.query_seconds.time():
                    reply = await loop.run_in_executor(self._pool, self.service.handle, frame, accounts)
                await ws.send(reply)
        except ConnectionClosed:
            pass

    async def stop(self) -> None:
        if self.kdb is not None:
            await self.kdb.port.stop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def _refuse(frame: bytes | str, reason: str) -> bytes | str:
    """An Error reply in the request's own format (text: JSON, bytes: msgpack)."""
    err = Error(reason=reason)
    return msgspec.json.encode(err).decode() if isinstance(frame, str) else msgspec.msgpack.encode(err)


async def run(
    cfg: RdbConfig, ready: asyncio.Event | None = None, date: str | None = None, tp_url: str | None = None
) -> None:
    rdb = Rdb(cfg, date=date)
    if tp_url:  # no query answers before the journal is replayed
        rdb.recovery.begin("starting")
    await rdb.start()
    process.freeze_startup_objects()
    following = asyncio.create_task(follow(rdb, tp_url, chunk_ms=cfg.live_chunk_ms)) if tp_url else None
    stopped = asyncio.create_task(process.until_stopped())
    await asyncio.sleep(0)  # its SIGTERM handler in place before anyone is told the rdb is ready
    if ready is not None:
        ready.set()
    print(f"rdb ready {auth.scheme(rdb.access)}://{cfg.host}:{rdb.port} hdb={rdb.store.hdb_dir}", flush=True)
    await stopped
    await process.cancel_and_wait(following)
    await rdb.stop()


def lower_priority(nice: int | str) -> None:
    """Lower this process's CPU priority to rdb.nice: a nice value 0-19 (raised, never lowered, which needs
    privileges) or "idle", Linux's SCHED_IDLE (the rdb runs only on a core nothing else wants, and a waking
    tickerplant or calc takes the core from it at once; nice 19 still gets ~1.5% and waits for its slice).
    Linux keeps both per thread: every thread there is now (numpy's, started at import) is set, and the
    threads started later (DuckDB's) inherit them from the main thread, so call it before the Store opens."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's value is its threads'
        threads = [0]
    idle = getattr(os, "SCHED_IDLE", None) if nice == "idle" else None
    for t in threads:
        if idle is not None:
            os.sched_setscheduler(t, idle, os.sched_param(0))
        elif nice == "idle":  # no SCHED_IDLE here (not Linux): the lowest nice value instead
            os.setpriority(os.PRIO_PROCESS, t, 19)
        elif nice > os.getpriority(os.PRIO_PROCESS, t):
            os.setpriority(os.PRIO_PROCESS, t, nice)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow rdb", description=__doc__)
    ap.add_argument("--config", help="config file merged over the embedded defaults")
    ap.add_argument("--host", help="interface to bind")
    ap.add_argument("--port", type=int, help="port (0 = any free port)")
    ap.add_argument("--hdb", help="HDB folder (Parquet, one partition per table per day)")
    ap.add_argument("--date", help="the day held in memory, YYYY-MM-DD (default: today, UTC)")
    ap.add_argument("--tp", help="tickerplant URL to follow (default from config [tickerplant])")
    ap.add_argument(
        "--no-subscribe", action="store_true", help="serve queries only; do not follow a tickerplant"
    )
    args = ap.parse_args(argv)
    overrides: dict = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.hdb:
        overrides["hdb_dir"] = str(Path(args.hdb).resolve())
    ap_tp = None if args.no_subscribe else args.tp
    full = configuration.load(args.config, {"rdb": overrides})
    cfg = full.rdb
    tp_url = ap_tp or (
        None
        if args.no_subscribe
        else f"{auth.scheme(full.access)}://{full.tickerplant.host}:{full.tickerplant.port}"
    )
    process.setup_logging("rdb")
    lower_priority(cfg.nice)
    try:
        asyncio.run(run(cfg, date=args.date, tp_url=tp_url))
    except ValueError as e:  # bad config values (memory_limit, date): one line, no traceback
        print(f"rdb: {e}", flush=True)
        return 2
    return 0
