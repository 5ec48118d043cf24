"""`marginflow calc`: the streaming margin engine as a process. Subscribes to fills, ticks and param
events, applies them to MarginEngine in seq order (calc/events.py), publishes margin and alert rows back
into the tickerplant and to websocket clients (calc/api.py), and serves the dashboard (calc/static/).

Both links survive a tickerplant restart: the Subscriber resubscribes and replays the gap, the Publisher
reconnects and resends what was not acked (tickerplant/client.py). A lost connection used to raise out of
`journal()` into whichever task was publishing (the publish timer, or `consume`), which died without a
word: events were still applied but no margin row went out again. Now a publish never raises on a lost
link, and a background task that fails is logged and restarted. `/health` reports the output side and
says "stalled" (HTTP 503, `live` false) when events are applied and rows produced but the tickerplant
has acked nothing for `calc.stall_after_s`, so `marginflow up` restarts calc.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import mimetypes
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import msgspec
import pyarrow as pa
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from calc import shard
from calc.alerts import AlertLedger
from calc.api import Api, Client, rows_as_dicts
from calc.delivery import DeliveryQueue, Routes
from calc.engine import MarginEngine
from calc.events import INPUT_TABLES, ParamResult, apply_batch
from calc.mail import MailSender
from calc.projection import accuracy
from calc.rdbquery import margin_history, query_rdb
from calc.rest import RestServer
from calc.rows import RowGate
from calc.today import Today
from calc.warm import warm_up
from calc.watch import ParamWatcher
from calc.webhook import WebhookSender
from marginflow import auth, metrics, process
from marginflow import config as configuration
from marginflow.config import Config
from schemas import bus as buswire
from schemas import calc as api
from schemas import rdb as rdbwire
from tickerplant.bus import connect as bus_connect
from tickerplant.client import Event, Publisher, Subscriber
from tickerplant.nats_client import NatsSubscriber

log = logging.getLogger("marginflow.calc")
STATIC = Path(__file__).resolve().parent / "static"
CLIENT_QUEUE = 1024


def static_file(path: str) -> Path | None:
    """The dashboard file a URL path names, or None: outside calc/static/, not a file, or a name the
    file system refuses (too long, NUL byte) — never an exception (a 5,000-character path was a 500)."""
    if len(path) > 1024:
        return None
    name = "index.html" if path in ("/", "") else path.lstrip("/")
    try:
        file = (STATIC / name).resolve()
        return file if file.is_relative_to(STATIC) and file.is_file() else None
    except (OSError, ValueError):
        return None


def static_response(connection: ServerConnection, path: str) -> Response:
    """The dashboard file a URL path names (static_file), or 404."""
    file = static_file(path)
    if file is None:
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
    ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    if file.suffix == ".js":
        ctype = "text/javascript"
    return Response(
        200, "OK", Headers({"Content-Type": ctype, "Cache-Control": "no-cache"}), file.read_bytes()
    )


def gate_http(
    gate: auth.Gate, connection: ServerConnection, request: Request
) -> tuple[bool, Response | None]:
    """Every request through the gate (the Origin allow-list, no token in the URL): (done, response). A
    websocket upgrade is done (authenticated here when it carries an Authorization header, refused before
    the upgrade; without one, the first message must be `auth`), and so is a refused request; else the
    caller serves the path."""
    host = auth.peer_host(connection)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        outcome = gate.handshake(host, request.headers, request.path, required=False)
        if isinstance(outcome, auth.Refusal):
            return True, auth.respond(connection, outcome)
        if outcome is not None:
            gate.principals[connection] = outcome
        return True, None
    refusal = gate.request(host, request.headers, request.path)
    return (True, auth.respond(connection, refusal)) if refusal is not None else (False, None)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Peer:
    """A websocket client: frames written at once, or queued for `write` (a task) while the socket is
    paused; one too slow to drain its queue is disconnected (4001)."""

    ws: ServerConnection
    client: Client
    queue: asyncio.Queue
    writer: asyncio.Task | None = None

    def send(self, frame: bytes | str) -> None:
        if self.queue.empty() and process.write_now(self.ws, frame):
            return  # written at once: no queue hop and task switch
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("client %d too slow; disconnecting", self.client.id)
            if self.writer:
                self.writer.cancel()
            asyncio.create_task(self.ws.close(4001, "slow consumer"))

    async def write(self) -> None:
        while True:
            await self.ws.send(await self.queue.get())


class CalcService:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        c = cfg.calc
        ws = auth.scheme(cfg.access)
        self.tp_url = f"{ws}://{cfg.tickerplant.host}:{cfg.tickerplant.port}"
        self.rdb_url = f"{ws}://{cfg.rdb.host}:{cfg.rdb.port}"
        t0 = time.perf_counter()
        self.shard = shard.from_config(c, cfg.bus.buckets)  # `--shard K/N`: only its accounts (calc/shard.py)
        self.engine = MarginEngine.from_config(c) if self.shard is None else shard.shard_engine(c, self.shard)
        self.feed = None if self.shard is None else shard.Subscription.of(self.engine)
        self.lease: shard.Lease | None = None  # a shard on the bus publishes only while it holds its lease
        if self.shard is not None and cfg.bus.kind == "nats":
            owner = f"{socket.gethostname()}:{os.getpid()}"
            self.lease = shard.Lease(cfg.bus, self.shard, owner, self._lease_changed)
        log.info(
            "engine: %d accounts, %d instruments, numba warm-up %.2f s (loaded %.2f s)",
            len(self.engine.accounts),
            len(self.engine.syms),
            warm_up(),
            time.perf_counter() - t0,
        )
        # the API needs role subscriber; Origins are calc's own (known once the port is bound)
        self.gate = auth.Gate(cfg.access, auth.allowed_origins(cfg.access, c.host, c.port), role="subscriber")
        self.api = Api(self.gate, self.engine.accounts)
        self.peers: dict[int, Peer] = {}
        self.publisher: Publisher | None = None
        self.sub: Subscriber | NatsSubscriber | None = None  # (consume's, once it runs)
        self._rpc: Any = None  # a shard's NATS connection answering the front's what-ifs
        self._last_event_at = 0.0  # time.monotonic() of the last applied batch
        self._last_rows_at = 0.0  # ... of the last margin rows produced
        self._output_since: float | None = None  # ... since when rows wait for the tickerplant's ack
        self._unjournaled: list[tuple[str, dict]] = []  # margin/alert rows not yet sent to the tickerplant
        self.row_gate = RowGate()  # rows the tickerplant would refuse are dropped one by one (calc/rows.py)
        self._activity = asyncio.Event()  # a batch arrived (wakes the busy poll)
        self._applied = (
            asyncio.Event()
        )  # a live batch was applied and not published (publish_interval_ms = 0)
        self.live = False
        self.dirty = False
        self._forecast_at = -math.inf  # (loop time) when a publish last evaluated the forecast
        self._forecast_wake: asyncio.TimerHandle | None = None  # the publish that evaluates it next
        self.port = 0
        self.published_rows = 0
        self.today = Today()  # today's alerts, forecasts and call checks, for a screen that subscribes
        self.ledger = (
            AlertLedger()
        )  # the state of every alert as journaled (no second "raised" after a restart)
        self.routes = Routes(self.engine.settings.alerts, c.data_alerts)  # rules' and data alerts' targets
        self.webhook = WebhookSender(c.webhook_retries, c.webhook_timeout_s, c.webhook_queue)
        self.mail = (
            MailSender(c.email, c.webhook_retries, c.webhook_queue) if self.routes.has_emails else None
        )
        watch = cfg.params.watch
        self.watcher = (  # [params.watch]: parameter files that arrive by themselves (calc/watch.py)
            ParamWatcher(watch, c.params_dir, self.tp_url, self.raise_alert, lambda: self.engine.last_seq)
            if watch.folders or watch.urls
            else None
        )
        self._tasks: list[asyncio.Task] = []
        self.server = None
        self.metrics = metrics.CalcMetrics(INPUT_TABLES)  # /metrics (marginflow/metrics.py)
        self.metrics.watch(self)
        # count per batch, publish and what-if (calc.metrics); what /metrics reads at scrape is always there
        self.counting = c.metrics
        self.rest: RestServer | None = None  # the REST API (calc/rest.py) when calc.rest_port is set

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.cfg.calc
        auth.check_bind("calc", c.host, self.cfg.access)
        self.server = await serve(
            self.handle,
            c.host,
            c.port,
            process_request=self.http,
            max_size=1 << 20,
            compression=None,
            ssl=auth.server_ssl(self.cfg.access),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.gate.origins = auth.allowed_origins(self.cfg.access, c.host, self.port)
        if c.rest_port:
            self.rest = RestServer(self, c.host, c.rest_port, self.cfg.access)
            await self.rest.start()
        self.publisher = Publisher(self.tp_url, name="calc")
        try:
            await self.publisher.connect()
        except (OSError, TimeoutError, websockets.WebSocketException) as e:
            log.warning("tickerplant %s not reachable (%s): connecting in the background", self.tp_url, e)
            await self.publisher.connect(wait=False)  # reconnects with backoff, resending what is not acked
        self._tasks.append(self._supervised("consume", self.consume))
        if self.shard is not None and self.cfg.bus.kind == "nats":  # the front's what-ifs (calc/front.py)
            self._rpc = await bus_connect(self.cfg.bus, f"marginflow-shard-{self.shard.k}")
            await self._rpc.subscribe(buswire.whatif_subject(self.shard.k), cb=self._answer_what_if)
        if self.lease is not None:
            self._tasks.append(self._supervised("lease", self.lease.run))
        if self.routes.has_webhooks:
            self._tasks.append(self._supervised("webhooks", self.webhook.run))
        if self.mail is not None:
            self._tasks.append(self._supervised("email", self.mail.run))
        if self.watcher is not None:
            watcher = self.watcher
            self._tasks.append(self._supervised("params watch", lambda: watcher.run(lambda: self.live)))
        if c.publish_interval_ms > 0:
            self._tasks.append(
                self._supervised("publish timer", lambda: self._timer(c.publish_interval_ms / 1000))
            )
        else:
            self._tasks.append(self._supervised("publish", self._when_drained))
        if c.busy_poll_ms > 0:
            self._tasks.append(asyncio.create_task(process.busy_poll(c.busy_poll_ms / 1000, self._activity)))
        if c.journal_interval_ms > 0:
            self._tasks.append(
                self._supervised("journal timer", lambda: self._journal_timer(c.journal_interval_ms / 1000))
            )

    def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """A background loop that is logged and started again if it fails, instead of dying unseen."""

        async def loop() -> None:
            while True:
                try:
                    await run()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("calc task %s failed; restarting it", name)
                    await asyncio.sleep(0.5)

        return asyncio.create_task(loop(), name=f"calc {name}")

    def deliveries(self) -> dict[str, DeliveryQueue]:
        """The alert delivery channels (their sent / failed / dropped counts go to /metrics)."""
        out: dict[str, DeliveryQueue] = {"webhook": self.webhook}
        if self.mail is not None:
            out["email"] = self.mail
        return out

    def readiness(self) -> str:
        """/readyz: "" once the journal is replayed and the output is not stalled, else why not."""
        if not self.live:
            return "replaying the journal"
        output = self.output_health()
        return output.get("reason", "") if output["stalled"] else ""

    @property
    def active(self) -> bool:
        """Whether this process publishes: always, unless it is a shard on the bus without its lease."""
        return self.lease is None or self.lease.held

    async def _lease_changed(self, held: bool) -> None:
        """Taken: the rows of every account (a standby never published) go out now. Lost: nothing more
        goes out (what waits for the journal timer is dropped: the new holder publishes its own)."""
        if held and self.live:
            await self.publish()
        if not held:
            self._unjournaled.clear()

    async def _answer_what_if(self, msg: Any) -> None:
        """A what-if the front routed to this shard (NATS request/reply, schemas/bus.py)."""
        try:
            req = msgspec.msgpack.decode(msg.data, type=api.WhatIf)
            answer = buswire.WhatIfAnswer(result=self.engine.what_if(req.account, req.trades, req.compare))
        except Exception as e:  # the engine names the field and the reason
            answer = buswire.WhatIfAnswer(error=str(e))
        await msg.respond(msgspec.msgpack.encode(answer))

    async def stop(self) -> None:
        if self._rpc is not None:
            await self._rpc.close()
        if self.rest is not None:
            await self.rest.stop()
        await process.cancel_and_wait(*self._tasks)
        if self._forecast_wake is not None:
            self._forecast_wake.cancel()
        await self.journal()
        if self.publisher:
            try:  # the last rows journaled before calc stops, if the tickerplant is there to ack them
                await self.publisher.wait_acked(timeout=2.0)
            except (TimeoutError, ConnectionError):
                log.warning(
                    "stopping with %d margin/alert messages not acked by the tickerplant",
                    self.publisher.unacked,
                )
            await self.publisher.close()
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _timer(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if (
                self.dirty and self.live
            ):  # never a row of a half-replayed day (the replay ends with one publish)
                await self.publish()

    async def _when_drained(self) -> None:
        """publish_interval_ms = 0, for batches `consume` did not publish because more had been received
        behind them: runs once `consume` waits on the socket, i.e. when everything received is applied
        (also when what was waiting held no new rows, so a row is never held back)."""
        while True:
            await self._applied.wait()
            self._applied.clear()
            if self.dirty and self.live:
                await self.publish()

    async def _journal_timer(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.journal()

    async def journal(self) -> None:
        """Send the collected margin and alert rows into the tickerplant (one frame)."""
        items, self._unjournaled = self._unjournaled, []
        merged: dict[str, dict[str, list]] = {}  # one upd per table
        for table, rows in items:
            cols = merged.setdefault(table, {c: [] for c in rows})
            for c, values in rows.items():
                cols[c] += values
        merged = {
            t: self.row_gate.admit(t, cols) for t, cols in merged.items()
        }  # a bad row never takes the rest
        merged = {t: cols for t, cols in merged.items() if cols["account"]}
        if merged and self.publisher is not None:
            await self.publisher.upd_many(merged.items())  # kept until acked; resent after a reconnect
            for e in self.publisher.errors:
                log.error("tickerplant refused %s", e.reason)
            self.publisher.errors.clear()

    # ---- the stream: tickerplant -> engine -> margin rows -------------------------------------------
    def subscriber(self) -> Subscriber | NatsSubscriber:
        """Its inputs, and its own journaled alerts (to restore the ledger after a restart): from the
        tickerplant's fan-out, or a shard's from the bus (only its accounts' rows and its instruments')."""
        tables = [*INPUT_TABLES, "alert", "forecast"]
        if self.feed is None or self.cfg.bus.kind != "nats":
            return Subscriber(self.tp_url, tables=tables, ordered=True)
        return NatsSubscriber(  # (ticks or fills waiting together: one batch, as the fan-out's flush)
            self.cfg.bus,
            tables=self.feed.tables,
            table_keys=self.feed.table_keys,
            coalesce=shard.JOINED_TABLES,
        )

    async def _shard_batch(self, sub: Subscriber | NatsSubscriber, ev: Event) -> pa.RecordBatch | None:
        """A shard's batch: another shard's rows dropped (the websocket fan-out sends every account's);
        at the first fill that adds an instrument the bus subscription widens: the instrument's ticks
        before it are applied first, the batch is cut after that fill, and its later rows come back from
        the subscriber joined in seq order with the instrument's later ticks."""
        assert self.feed is not None
        batch = self.feed.mine(ev.table, ev.batch)
        if batch is None or ev.table != "fill" or not isinstance(sub, NatsSubscriber):
            return batch
        i = self.feed.first_new(batch)
        if i is None:
            return batch
        new = self.feed.new_syms(batch.slice(i, 1))
        cut = batch.column("seq")[i].as_py()
        rest = ("fill", batch.slice(i + 1)) if i + 1 < batch.num_rows else None
        for back in await sub.widen({t: new for t in shard.TICK_TABLES}, cut=cut, rest=rest):
            apply_batch(self.engine, back.table, back.batch, self.cfg.calc)
        return batch.slice(0, i + 1)

    async def consume(self) -> None:
        sub = self.sub = self.subscriber()
        interval = self.cfg.calc.publish_interval_ms
        async for ev in sub.events():
            if self.feed is not None and ev.kind == "batch":
                ev.batch = await self._shard_batch(sub, ev)
                if ev.batch is None:
                    continue
            if ev.kind == "live":
                self.live = True
                self.engine.take_callchecks()  # the replayed calls' were journaled before the restart
                await self.publish()  # the state rebuilt from the journal: one row per account
                log.info(
                    "live after replaying the journal up to seq %d",
                    sub.position.last_seq if sub.position else 0,
                )
            elif ev.kind == "batch" and ev.table == "alert":
                # the journal's alerts (a standby's: the active's, live): what was raised stays raised, once
                if not self.live or not self.active:
                    self._restore_alerts(ev.batch)
            elif ev.kind == "batch" and ev.table == "forecast":
                standby = not self.live or not self.active  # what stood before a restart, or the active's
                if standby and self.engine.projector is not None:
                    b = ev.batch
                    cols = {n: b.column(n).to_pylist() for n in b.schema.names if n not in ("time", "seq")}
                    cols["cycle_time"] = b.column("cycle_time").cast(pa.int64()).to_pylist()
                    self.engine.projector.restore(cols, b.column("time").cast(pa.int64()).to_pylist())
            elif ev.kind == "batch":
                rejected = self.engine.rejected
                for result in apply_batch(self.engine, ev.table, ev.batch, self.cfg.calc):
                    self._log_param(result)
                    if self.watcher is not None:
                        self.watcher.note(result)
                if self.counting:  # once per batch (engine.now: the newest event time the engine has seen)
                    live = self.live and ev.table != "param"
                    rejected = self.engine.rejected - rejected
                    self.metrics.batch(
                        ev.table,
                        ev.batch.num_rows,
                        rejected,
                        self.engine.rejects,
                        self.engine.now if live else None,
                    )
                self._last_event_at = time.monotonic()
                self.dirty = True
                self._activity.set()
                if self.live and interval <= 0:
                    if ev.more:
                        self._applied.set()  # publish after what is waiting (see _when_drained)
                    else:
                        await self.publish()  # nothing else received: publish now (no task switch)
            elif ev.kind == "end_of_day":
                log.info("end of day %s", ev.date)

    def _restore_alerts(self, batch: pa.RecordBatch) -> None:
        """Journaled alert rows (calc's own, from before a restart): the ledger's states and today's alerts
        for a new screen. Live, the subscription echoes calc's own rows: ignored (the ledger is ahead)."""
        cols = {n: batch.column(n).to_pylist() for n in batch.schema.names if n not in ("time", "seq")}
        cols["time"] = batch.column("time").cast(pa.int64()).to_pylist()
        self.ledger.restore(cols["account"], cols["rule"], cols["state"])
        self.today.add("alert", cols)

    def raise_alert(self, row: dict) -> None:
        """An alert row from outside the engine (a refused parameter file), out with the next publish."""
        self.engine.add_alert(row)
        self.dirty = True
        self._applied.set()

    @staticmethod
    def _log_param(result: ParamResult) -> None:
        """Log what calc/events.py did with a `param` row: put in force, or refused (the old file stays)."""
        if result.applied:
            log.info("%s: %s", result.what, result.message)
        else:
            log.error("%s: not applied, the previous file stays in force: %s", result.what, result.message)

    async def publish(self) -> None:
        if not self.active:  # a standby: its numbers kept current, its rows out once it holds the lease
            self.dirty = False
            self.engine.refresh()
            return
        if not self.counting:
            return await self._publish()
        t0 = time.perf_counter()
        await self._publish()
        self.metrics.published(time.time_ns(), time.perf_counter() - t0)

    async def _publish(self) -> None:
        """Margin rows of the accounts that changed, then their forecast, then the alerts they raise: to
        clients first (the latency a desk sees: the margin rows before the forecast is projected and before
        the alert rules run), then into the tickerplant, at once or with the next journal_interval_ms (a crash
        before that leaves those rows out of the margin history; on restart calc recomputes every account
        from the journaled events and publishes its current row)."""
        self.dirty = False
        rows = self.engine.changed_rows()
        now = time.time_ns()
        if rows["account"]:  # first: the forecast below costs more than the rows themselves
            self._fan_out(api.MarginUpdate, dict(rows, time=[now] * len(rows["account"])))
        # (before the alerts: predicted_call rules watch it)
        forecast = self.engine.project(rows, evaluate=self._forecast_due())
        checks = self.engine.take_callchecks()
        self._forecast_out(forecast, checks)
        if not rows["account"] and not self.engine.has_alerts():  # (a data alert comes without margin rows)
            if self._unjournaled and self.cfg.calc.journal_interval_ms <= 0:
                await self.journal()  # forecast or parallel-run rows alone
            return
        self.published_rows += len(rows["account"])
        self._last_rows_at = time.monotonic()
        if self._output_since is None:
            self._output_since = self._last_rows_at
        alerts = self.ledger.changes(self.engine.take_alerts())
        if alerts["account"]:
            timed_alerts = dict(alerts, time=[now] * len(alerts["account"]))
            self._fan_out(api.AlertUpdate, timed_alerts)
            self.today.add("alert", timed_alerts)
            for row in rows_as_dicts(timed_alerts):
                if self.counting:
                    self.metrics.alert(row)
                if url := self.routes.webhook(row):
                    self.webhook.submit(url, row)
                if self.mail is not None and (to := self.routes.email(row)):
                    self.mail.submit(to, row)
        self._unjournaled += [(t, r) for t, r in (("margin", rows), ("alert", alerts)) if r["account"]]
        if self.cfg.calc.journal_interval_ms <= 0:
            await self.journal()

    def _forecast_due(self) -> bool:
        """Whether this publish evaluates the forecast: at most every calc.forecast_interval_ms (a call
        hours ahead does not move between two fills a millisecond apart, and evaluating it on the event loop
        delays the next batch). A publish inside the interval records its margin rows only; a timer then
        brings a publish at the interval's end, so the last rows' forecast is never left unevaluated."""
        c, loop = self.cfg.calc, asyncio.get_running_loop()
        gap = c.forecast_interval_ms / 1000
        # (publishes as far apart as the interval: each evaluates, whatever the timer's jitter)
        if c.publish_interval_ms >= c.forecast_interval_ms or loop.time() - self._forecast_at >= gap:
            self._forecast_at = loop.time()
            return True
        if self._forecast_wake is None:
            self._forecast_wake = loop.call_at(self._forecast_at + gap, self._forecast_now)
        return False

    def _forecast_now(self) -> None:
        self._forecast_wake = None
        self.dirty = True
        self._applied.set()

    def shard_health(self) -> dict | None:
        """The shard this calc is (None: unsharded), and whether it publishes (holds the lease)."""
        if self.shard is None:
            return None
        out: dict = {"shard": self.shard.name, "accounts": len(self.engine.accounts), "active": self.active}
        if self.lease is not None:
            out["takeovers"] = self.lease.takeovers
        if isinstance(self.sub, NatsSubscriber):
            out["widened"] = self.sub.widened
            out["instruments"] = len(self.feed.syms) if self.feed is not None else 0
        return out

    def forecast_health(self) -> dict:
        """The forecast's method and the parallel run so far (per lead time: calls, MAE, coverage...)."""
        p = self.engine.projector
        if p is None:
            return {"method": "off (no [[calc.ccps]])"}
        checks = self.today.check_columns(("lead_s", "error", "actual", "covered"))
        return {
            "method": p.method,
            "ccps": list(p.schedules),
            "call_issues": p.issues,
            "parallel_run": {str(k): v for k, v in accuracy(checks).items()},
        }

    def _forecast_out(self, forecast: dict[str, list], checks: dict[str, list]) -> None:
        """The forecast rows and the parallel run's rows: to clients, kept for new screens (the latest
        forecast per account and horizon, today's checks), and queued for the tickerplant."""
        now = time.time_ns()
        for table, cols, update in (
            ("forecast", forecast, api.ForecastUpdate),
            ("callcheck", checks, api.CallcheckUpdate),
        ):
            if not cols.get("account"):
                continue
            timed = dict(cols, time=[now] * len(cols["account"]))
            self._fan_out(update, timed)
            self.today.add(table, timed)
            self._unjournaled.append((table, cols))

    def _fan_out(self, update: type[api.ApiMsg], cols: dict[str, list]) -> None:
        for cid, frame in self.api.fan_out(update, cols).items():
            peer = self.peers.get(cid)
            if peer is not None:
                self._send_frame(peer, frame)

    # ---- websocket clients ------------------------------------------------------------------------
    def _send(self, peer: Peer, msg: api.ApiMsg) -> None:
        self._send_frame(peer, self.api.encode(peer.client, msg))

    def _send_frame(self, peer: Peer, frame: bytes | str) -> None:
        peer.send(frame)

    async def handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlparse(ws.request.path).query) if ws.request else {}
        binary = (query.get("format") or ["json"])[0] == "msgpack"
        client, replies = self.api.connect(
            binary, principal=self.gate.principals.get(ws), peer=auth.peer_host(ws)
        )
        peer = Peer(ws, client, asyncio.Queue(CLIENT_QUEUE))
        peer.writer = asyncio.create_task(peer.write())
        self.peers[client.id] = peer
        try:
            for m in replies:
                self._send(peer, m)
            async for data in ws:
                client.binary = isinstance(data, bytes)
                msg = self.api.decode(client, data)
                t0 = time.perf_counter()
                replies = self.api.handle(client, msg, self.engine)
                if self.counting and isinstance(msg, api.WhatIf):
                    self.metrics.what_if_seconds.labels("ws").observe(time.perf_counter() - t0)
                for reply in replies:
                    self._send(peer, reply)
                if client.close_reason:  # failed authentications: no more guesses on this connection
                    await asyncio.sleep(0.01)  # (the error reply first)
                    ws.close_timeout = (
                        0.5  # its pipelined guesses stay unread: do not wait for its close frame
                    )
                    await ws.close(1008, client.close_reason)
                    break
                if isinstance(msg, api.Subscribe) and client.subscribed is not None:
                    for update in self.today.for_subscriber(client):  # a new screen starts with the day
                        self._send(peer, update)
                if isinstance(msg, api.HistoryRequest) and client.may_see(msg.account):
                    self._send(peer, await self.history(msg))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.api.disconnect(client)
            self.peers.pop(client.id, None)
            await asyncio.sleep(0.05)
            peer.writer.cancel()

    def has_account(self, account: str) -> bool:
        return account in self.engine.acc_index

    async def what_if_of(self, account: str, trades: list, compare: bool) -> dict:
        """The engine's what-if (the REST API's; InputError naming the trade and why)."""
        return self.engine.what_if(account, trades, compare)

    async def history(self, msg: api.HistoryRequest) -> api.ApiMsg:
        """Today's margin rows of one account, from the rdb (calc/rdbquery.py)."""
        return await margin_history(self.rdb_url, msg)

    async def query_rdb(self, sql: str, id: int = 0, token: str | None = None) -> rdbwire.QueryResult | str:
        """One query to the rdb (calc/rdbquery.py), as calc's local query credential or as `token`."""
        return await query_rdb(self.rdb_url, sql, id, token)

    def output_health(self, now: float | None = None) -> dict:
        """The output side: the publisher's link, what waits for acks, and whether it is stalled: events
        applied and rows produced in the last `stall_after_s`, but nothing acked for that long."""
        pub = self.publisher
        now = time.monotonic() if now is None else now
        waiting = bool(self._unjournaled) or (pub is not None and pub.unacked > 0)
        if not waiting:
            self._output_since = None
        limit = self.cfg.calc.stall_after_s
        last_ack = pub.last_ack_at if pub is not None else 0.0
        since = max(last_ack, self._output_since or 0.0)
        stalled = (
            waiting
            and self._output_since is not None
            and now - since > limit
            and now - self._last_event_at < limit
            and now - self._last_rows_at < limit
        )
        out = {
            "connected": bool(pub and pub.connected),
            "unacked": pub.unacked if pub else 0,
            "unjournaled": len(self._unjournaled),
            "reconnects": pub.reconnects if pub else 0,
            "resent": pub.resent if pub else 0,
            "since_last_ack_s": round(now - last_ack, 3) if last_ack else None,
            "stalled": stalled,
        }
        if stalled:
            out["reason"] = (
                f"output stalled: events applied and margin rows produced, but nothing acked by the "
                f"tickerplant for {now - since:.1f} s (calc.stall_after_s = {limit:g}; "
                f"publisher {'connected' if out['connected'] else 'disconnected'}, "
                f"{out['unacked']} messages unacked)"
            )
        return out

    # ---- HTTP: dashboard files and health -----------------------------------------------------------
    def http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Every request: the Origin allow-list, no token in the URL. A websocket upgrade with an
        Authorization header is authenticated here (refused before the upgrade); without one, the first
        message must be `auth`. Then the dashboard's files and /health."""
        done, response = gate_http(self.gate, connection, request)
        if done:
            return response
        path = urlparse(request.path).path
        served = metrics.http_response(connection, request, self.gate, self.metrics, self.readiness)
        if served is not None:  # /metrics, /healthz, /readyz
            return served
        if path == "/health":
            output = self.output_health()
            live = self.live and not output["stalled"]
            health = {
                "ok": True,
                "live": live,
                "accounts": len(self.engine.accounts),
                "events": int(self.engine.events),
                "published_rows": self.published_rows,
                "rejected_events": int(self.engine.rejected),
                "last_rejects": list(self.engine.rejects)[-5:],
                "engine": {
                    **self.engine.memory(),
                    **self.engine.scenario_work(),
                    "peak_rss_bytes": peak_rss(),
                },
                "webhooks": {
                    "sent": self.webhook.sent,
                    "failed": self.webhook.failed,
                    "dropped": self.webhook.dropped,
                },
                "output": output,
                "shard": self.shard_health(),
                "forecast": self.forecast_health(),
            }
            if self.mail is not None:
                health["email"] = self.mail.counts()
            if self.watcher is not None:
                health["params_watch"] = self.watcher.health()
            if output["stalled"]:
                health["reason"] = output["reason"]
                return Response(
                    503,
                    "Service Unavailable",
                    Headers({"Content-Type": "application/json"}),
                    msgspec.json.encode(health),
                )
            return Response(
                200, "OK", Headers({"Content-Type": "application/json"}), msgspec.json.encode(health)
            )
        return static_response(connection, path)


async def run(cfg: Config) -> None:
    service = CalcService(cfg)
    ws, http = auth.scheme(cfg.access), auth.scheme(cfg.access, "https", "http")
    host = cfg.calc.host

    def ready() -> str:
        rest = f" rest {http}://{host}:{service.rest.port}/v1" if service.rest else ""
        return f"calc ready {ws}://{host}:{service.port} dashboard {http}://{host}:{service.port}/{rest}"

    await process.serve_until_stopped(service, ready)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow calc", description=__doc__)
    ap.add_argument("--config")
    ap.add_argument("--port", type=int, help="calc port (0 = any free port)")
    ap.add_argument("--tp-port", type=int, help="tickerplant port")
    ap.add_argument("--rdb-port", type=int, help="rdb port (for history)")
    ap.add_argument("--rest-port", type=int, help="REST API port (0 = off)")
    ap.add_argument("--shard", help="K/N: own shard K (0..N-1) of N, from the bus when [bus] kind = nats")
    args = ap.parse_args(argv)
    over: dict = {}
    if args.shard is not None:
        over.setdefault("calc", {})["shard"] = args.shard
    if args.port is not None:
        over.setdefault("calc", {})["port"] = args.port
    if args.tp_port is not None:
        over.setdefault("tickerplant", {})["port"] = args.tp_port
    if args.rdb_port is not None:
        over.setdefault("rdb", {})["port"] = args.rdb_port
    if args.rest_port is not None:
        over.setdefault("calc", {})["rest_port"] = args.rest_port
    process.setup_logging("calc")
    asyncio.run(run(configuration.load(args.config, over)))
    return 0
