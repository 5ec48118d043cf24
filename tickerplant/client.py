"""Clients of the tickerplant: a Publisher (upd with acks) and the Subscriber every process uses.

The Subscriber's interface — subscribe, replay to the position, then receive batches with seq — does
not depend on the transport, so the same batches could later come from NATS or Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pyarrow as pa
import websockets
from websockets.asyncio.client import ClientConnection, connect

from marginflow import auth, process
from schemas import wire
from schemas.tables import TABLES
from tickerplant import journal_reader

log = logging.getLogger("marginflow.client")
FROM_TP = msgspec.msgpack.Decoder(wire.FromTickerplant)


def to_columns(
    table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
) -> dict[str, list]:
    """Rows as a list of dicts, or already as columns -> the column-oriented form Upd carries."""
    if isinstance(rows, Mapping):
        return {k: list(v) for k, v in rows.items()}
    names = (
        [c.name for c in TABLES[table].input_columns] if table in TABLES else list(rows[0]) if rows else []
    )
    cols: dict[str, list] = {n: [] for n in names}
    for r in rows:
        for n in names:
            cols[n].append(r.get(n))
        for k in r:
            if k not in cols:  # let the tickerplant name the extra column in its error
                cols[k] = [r.get(k)]
    return cols


def upd_message(
    table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], msg_id: int, pub: str = ""
) -> wire.Upd:
    cols = msgspec.Raw(wire.encode(to_columns(table, rows)))  # type: ignore[arg-type]
    return wire.Upd(table=table, cols=cols, id=msg_id, pub=pub)


def arrow_ipc(data: pa.Table | pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue().to_pybytes()


class Publisher:
    """Sends upd messages; `acked` is the highest message id the tickerplant has journaled, and
    `errors` collects refusals. Messages sent together in `upd_many` travel in one frame.

    The link survives the tickerplant's restart: every upd carries this publisher's stable id (`pub`,
    `<name>-<random hex>`) and its own increasing message id; each frame is kept until every message in
    it is acked or refused (at most `max_unacked` messages: beyond that `upd` waits, backpressure). When
    the connection drops the publisher reconnects with backoff (0.1 s doubling to 5 s, jittered, until
    `close()`) and resends the unanswered frames in order with the same ids; the tickerplant journals a
    message id of a publisher at most once (tickerplant.core), so a resend after a lost ack is acked,
    not journaled twice. `wait_acked` keeps waiting across reconnects. `reconnect=False` gives the old
    behaviour: a lost connection ends the publisher (ConnectionError). `token`: default the local
    publisher token (marginflow/auth.py)."""

    def __init__(
        self,
        url: str,
        name: str = "pub",
        *,
        token: str | None = None,
        reconnect: bool = True,
        max_unacked: int = 10_000,
        max_backoff_s: float = 5.0,
    ):
        self.url = url
        self.token = token
        self.name = name
        self.pub_id = f"{name}-{secrets.token_hex(6)}"
        self.reconnect = reconnect
        self.max_unacked = max_unacked
        self.max_backoff_s = max_backoff_s
        self.ws: ClientConnection | None = None
        self.next_id = 0
        self.acked = 0
        self.last_seq = 0
        self.errors: list[wire.Error] = []
        self.reconnects = 0
        self.resent = 0  # messages sent again after a reconnect
        self.refused = ""  # why the tickerplant refused our credentials (then the publisher stops)
        self.connected = False
        self.last_ack_at = 0.0  # time.monotonic() of the last ack or refusal (0: none yet)
        self.last_disconnect = ""
        self._unacked: deque[tuple[int, int, bytes]] = deque()  # (first id, last id, frame) not answered yet
        self._refused: set[int] = set()  # refused ids above `acked`
        self._answered = 0  # every id <= this is acked or refused
        self._sent_upto = 0  # highest id written to the current connection
        self._acked_event = asyncio.Event()
        self._room = asyncio.Event()  # set while fewer than max_unacked messages wait
        self._room.set()
        self._up = asyncio.Event()  # set while connected and every kept frame is (re)sent
        self._replies: asyncio.Queue[wire.Msg] = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._oldest_at = 0.0  # when the oldest kept frame was queued or the last answer came
        self._ever_sent = 0  # highest id written to any connection (what a resend sends again)

    async def __aenter__(self) -> Publisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def unacked(self) -> int:
        """Messages sent (or waiting to be) and neither acked nor refused yet."""
        return self.next_id - self._answered

    @property
    def oldest_unacked_at(self) -> float:
        return self._oldest_at if self._unacked else 0.0

    async def _open(self) -> ClientConnection:
        """The one place the connection is made (headers, e.g. credentials, go here)."""
        return await connect(
            self.url,
            max_size=None,
            compression=None,
            open_timeout=5,
            **auth.client_options(self.url, "publisher", self.token),
        )

    async def connect(self, wait: bool = True) -> None:
        """Connect (the first connection's failure raises unless `wait=False`, which keeps trying in
        the background, as after a lost connection)."""
        if wait:
            ws = await self._open()
            self._attach(ws)
            self._reader = asyncio.create_task(self._run(ws))
        else:
            self._reader = asyncio.create_task(self._run(None))

    async def _run(self, ws: ClientConnection | None) -> None:
        """Read this connection's replies; when it drops, reconnect (with backoff) and resend."""
        delay = 0.1
        while True:
            if ws is not None:
                delay = 0.1
                reason = await self._session(ws)
                self.connected = False
                self._up.clear()
                self.ws = None
                self._acked_event.set()
                if self._closing or not self.reconnect:
                    return
                self.last_disconnect = reason
                self.reconnects += 1
                log.warning(
                    "publisher %s: connection to %s lost (%s); reconnecting, %d messages to resend",
                    self.pub_id,
                    self.url,
                    reason,
                    self.unacked,
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self.max_backoff_s, delay * 2)
            if self._closing:
                return
            try:
                ws = await self._open()
                self._attach(ws)
            except (
                websockets.InvalidStatus
            ) as e:  # refused credentials are final; a throttled handshake is not
                ws = None
                if e.response.status_code in (401, 403):
                    self.refused = f"tickerplant refused the connection: HTTP {e.response.status_code}"
                    log.error("publisher %s: %s; not retrying (check the token)", self.pub_id, self.refused)
                    self._acked_event.set()
                    return
                log.debug("publisher %s: reconnect refused: %s", self.pub_id, e)
            except (OSError, TimeoutError, websockets.WebSocketException) as e:
                ws = None
                log.debug("publisher %s: reconnect failed: %s", self.pub_id, e)

    def _attach(self, ws: ClientConnection) -> None:
        """A new connection: everything not answered is to be (re)sent on it, in order."""
        self.ws = ws
        self.connected = True
        self._sent_upto = self._answered
        if not self._unacked:
            self._up.set()

    async def _session(self, ws: ClientConnection) -> str:
        """Resend what is not answered, then read replies until the connection closes; the reason."""
        try:
            before = self.resent
            while True:  # frames kept while this loop awaits are sent by it too, in order
                todo = [f for f in self._unacked if f[1] > self._sent_upto]
                if not todo:
                    break
                for first, last, frame in todo:
                    await ws.send(frame)
                    self.resent += max(0, min(last, self._ever_sent) - first + 1)
                    self._sent_upto = self._ever_sent = max(self._ever_sent, last)
            if self.reconnects:
                log.info(
                    "publisher %s: reconnected to %s, %d messages resent",
                    self.pub_id,
                    self.url,
                    self.resent - before,
                )
            self._up.set()
            async for data in ws:
                self._on_reply(data)
        except websockets.ConnectionClosed as e:
            return (e.rcvd.reason if e.rcvd else "") or str(e)
        except OSError as e:
            return str(e)
        return "closed by the tickerplant"

    def _on_reply(self, data: bytes | str) -> None:
        msg = FROM_TP.decode(data)
        for m in msg if isinstance(msg, list) else (msg,):
            if isinstance(m, wire.Ack):
                self.acked = max(self.acked, m.upto)
                self.last_seq = max(self.last_seq, m.seq)
                self._answer()
            elif isinstance(m, wire.Error):
                self.errors.append(m)
                if m.id > self.acked:
                    self._refused.add(m.id)
                self._answer()
            else:
                self._replies.put_nowait(m)

    def _answer(self) -> None:
        """Advance the answered mark and drop the frames wholly answered."""
        self.last_ack_at = time.monotonic()
        answered = max(self._answered, self.acked)
        while answered + 1 in self._refused:
            answered += 1
        self._refused = {i for i in self._refused if i > answered}
        self._answered = answered
        while self._unacked and self._unacked[0][1] <= answered:
            self._unacked.popleft()
        self._oldest_at = self.last_ack_at
        if self.unacked < self.max_unacked:
            self._room.set()
        self._acked_event.set()

    async def upd(self, table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> int:
        return await self.upd_many([(table, rows)])

    async def upd_many(self, items: Iterable[tuple[str, Any]]) -> int:
        items = list(items)
        await self._wait_room()
        first = self.next_id + 1
        msgs = []
        for table, rows in items:
            self.next_id += 1
            msgs.append(upd_message(table, rows, self.next_id, self.pub_id))
        await self._send(first, self.next_id, wire.encode(msgs))
        return self.next_id

    async def upd_arrow(self, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Bulk upd: rows as Arrow (columns = the table's input columns), checked column at a time."""
        await self._wait_room()
        self.next_id += 1
        msg = wire.UpdArrow(table=table, ipc=arrow_ipc(data), id=self.next_id, pub=self.pub_id)
        await self._send(self.next_id, self.next_id, wire.encode(msg))
        return self.next_id

    async def _wait_room(self) -> None:
        while self.unacked >= self.max_unacked:
            self._room.clear()
            if self._closing or (
                not self.reconnect and not self.connected and self._reader is not None and self._reader.done()
            ):
                raise ConnectionError("tickerplant connection closed")
            await self._room.wait()

    async def _send(self, first: int, last: int, frame: bytes) -> None:
        """Keep the frame until answered; write it now if the connection is up (else the reconnect
        resends it)."""
        if not self._unacked:
            self._oldest_at = time.monotonic()
        self._unacked.append((first, last, frame))
        if self.unacked >= self.max_unacked:
            self._room.clear()
        ws = self.ws
        if not self._up.is_set() or ws is None:
            if not self.reconnect and (self._reader is None or self._reader.done()):
                raise ConnectionError("tickerplant connection closed")
            return
        self._sent_upto = self._ever_sent = last
        if process.write_now(ws, frame):  # written at once unless flow control holds it back
            return
        try:
            await ws.send(frame)
        except websockets.ConnectionClosed:
            if not self.reconnect:
                raise

    async def send_raw(self, data: bytes) -> None:
        """Write a frame as is (not kept, not resent: tests and benchmarks of the wire)."""
        ws = self.ws
        if ws is None:
            raise ConnectionError("not connected")
        if not process.write_now(ws, data):
            await ws.send(data)

    async def wait_acked(self, msg_id: int | None = None, timeout: float | None = 10.0) -> int:
        """Wait until every message up to msg_id (default: all sent) is acked or refused, across
        reconnects; TimeoutError after `timeout` s (None: no limit)."""
        target = self.next_id if msg_id is None else msg_id
        async with asyncio.timeout(timeout):
            while self._answered < target:
                self._acked_event.clear()
                if self._closing or self._reader is None or self._reader.done():
                    raise ConnectionError(self.refused or "tickerplant connection closed")
                await self._acked_event.wait()
        return self.last_seq

    async def request(self, msg: wire.Msg, timeout: float = 10.0) -> wire.Msg:
        async with asyncio.timeout(timeout):
            await self._up.wait()
            assert self.ws is not None
            await self.ws.send(wire.encode(msg))
            return await self._replies.get()

    async def status(self) -> wire.Status:
        reply = await self.request(wire.StatusRequest())
        assert isinstance(reply, wire.Status)
        return reply

    async def close(self) -> None:
        self._closing = True
        self._room.set()
        self._acked_event.set()
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            if not self._reader.done() and self.ws is None:
                self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


@dataclass
class Event:
    """What a subscriber receives: a batch of one table's rows (ascending seq), or end of day."""

    kind: wire.EventKind
    table: str = ""
    batch: pa.RecordBatch | None = None
    date: str = ""
    next_date: str = ""
    replayed: bool = False
    more: bool = False  # a live batch with more rows already received behind it (same frame or next frames)


@dataclass
class Subscriber:
    """Subscribe to tables (and keys); replay the journal up to the tickerplant's position; then
    live batches, dropping rows already applied (per-table seq high-water marks). On disconnect it
    resubscribes and replays the gap, so no row is missed or applied twice.

    `ordered=True` merges tables into one seq order (calc needs it); the rdb does not. `token`: default the
    local subscriber token (marginflow/auth.py).

    `chunk_s` > 0 (a bulk subscriber such as the rdb): once live, after the frames at hand are read the
    socket is left unread for `chunk_s`, so what is published meanwhile waits in the kernel's buffer and is
    read in one go: one wake-up of this process per chunk instead of one per published frame, which on a
    small box leaves the cores to the latency-sensitive processes. Every row still arrives, in order."""

    url: str
    tables: Sequence[str] = ()
    keys: Sequence[str] = ()
    ordered: bool = True
    reconnect: bool = True
    token: str | None = None
    chunk_s: float = 0.0
    applied: dict[str, int] = field(default_factory=dict)  # table -> last applied seq
    position: wire.JournalPosition | None = None
    disconnects: list[str] = field(default_factory=list)
    _ws: ClientConnection | None = field(default=None, repr=False)
    _backlog: int = field(default=0, repr=False)

    def _accept(
        self, table: str, batch: pa.RecordBatch, replayed: bool, seqs: tuple[int, int] | None = None
    ) -> Event | None:
        """The event for the rows not applied yet, or None. `seqs`, the first and last seq of a whole
        published batch, spares the Arrow calls when every row is new (the usual live case)."""
        after = self.applied.get(table, 0)
        if seqs is not None and seqs[0] > after:
            last = seqs[1]
        else:
            batch = journal_reader.filter_batch(table, batch, after)
            if batch.num_rows == 0:
                return None
            last = batch.column("seq")[-1].as_py()
        self.applied[table] = last
        return Event("batch", table, batch, replayed=replayed)

    def _frames_waiting(self) -> bool:
        """Live frames received and not read yet: the replay's backlog, or frames in websockets' receive
        buffer (`recv_messages.frames`, not documented API; websockets 17.4)."""
        ws = self._ws
        return self._backlog > 0 or (ws is not None and len(ws.recv_messages.frames) > 0)

    def _published(self, msg: wire.Publish, schemas: dict[str, pa.Schema]) -> Iterator[Event]:
        decoded = [(b, pa.ipc.read_record_batch(pa.py_buffer(b.ipc), schemas[b.table])) for b in msg.batches]
        if self.ordered and len(decoded) > 1:  # tables interleaved in seq: slices in seq order
            items = [
                (t, rb, None) for t, rb in journal_reader.merge_by_seq({b.table: [rb] for b, rb in decoded})
            ]
        else:
            items = [(b.table, rb, (b.first_seq, b.last_seq)) for b, rb in decoded]
        last = len(items) - 1
        for i, (table, batch, seqs) in enumerate(items):
            ev = self._accept(table, batch, False, seqs)
            if ev:
                ev.more = i < last or self._frames_waiting()
                yield ev

    async def events(self) -> AsyncIterator[Event]:
        while True:
            try:
                async for ev in self._session():
                    yield ev
                return
            except websockets.InvalidStatus as e:  # a refused handshake: retry only a throttled one
                if e.response.status_code != 429 or not self.reconnect:
                    raise
                self.disconnects.append(f"refused: {e.response.status_code}")
                await asyncio.sleep(1.0)
            except (websockets.ConnectionClosed, OSError) as e:
                reason = getattr(getattr(e, "rcvd", None), "reason", "") or str(e)
                self.disconnects.append(reason)
                log.warning("subscriber disconnected: %s", reason)
                if not self.reconnect:
                    raise
                await asyncio.sleep(0.2)

    async def _session(self) -> AsyncIterator[Event]:
        async with connect(
            self.url,
            max_size=None,
            compression=None,
            max_queue=None,
            **auth.client_options(self.url, "subscriber", self.token),
        ) as ws:
            await ws.send(wire.encode(wire.Sub(tables=list(self.tables), keys=list(self.keys))))
            reply = FROM_TP.decode(await ws.recv())
            if isinstance(reply, wire.Error):
                raise ValueError(f"subscribe refused: {reply.reason}")
            assert isinstance(reply, wire.SubReply)
            self.position = reply.position
            schemas = {t: wire.deserialize_schema(s) for t, s in reply.schemas.items()}
            self._ws = ws
            live: asyncio.Queue[bytes | None] = asyncio.Queue()  # unbounded: keeps reading during replay
            pump = asyncio.create_task(self._pump(ws, live))
            try:
                keys = frozenset(self.keys) or None
                after = dict(self.applied)
                for table, batch in journal_reader.read_position(
                    reply.position, reply.tables, after, keys, self.ordered
                ):
                    ev = self._accept(table, batch, replayed=True)
                    if ev:
                        yield ev
                    await asyncio.sleep(0)
                yield Event("live")
                async for data in self._live_frames(ws, live, pump):
                    msg = FROM_TP.decode(data)
                    if isinstance(msg, wire.Publish):
                        for ev in self._published(msg, schemas):
                            yield ev
                    elif isinstance(msg, wire.EndOfDay):
                        yield Event("end_of_day", date=msg.date, next_date=msg.next_date)
                raise ConnectionError("tickerplant closed the connection")
            finally:
                pump.cancel()

    async def _live_frames(
        self, ws: ClientConnection, live: asyncio.Queue[bytes | None], pump: asyncio.Task
    ) -> AsyncIterator[bytes]:
        """The frames the pump read during the replay, then frames straight from the socket (one task
        switch less per frame). Stopping the pump loses nothing: websockets' recv may be canceled.
        Ends when the connection closes normally; an abnormal close raises ConnectionClosed."""
        pump.cancel()
        await asyncio.wait([pump])
        backlog = []
        while not live.empty() and (data := live.get_nowait()) is not None:
            backlog.append(data)
        for i, data in enumerate(backlog):
            self._backlog = len(backlog) - 1 - i  # frames still waiting behind this one (Event.more)
            yield data
        self._backlog = 0
        if not pump.cancelled():  # the connection closed during the replay
            pump.result()
            return
        async for data in ws:
            yield data if isinstance(data, bytes) else data.encode()
            if self.chunk_s > 0 and not self._frames_waiting():
                await self._gather(ws)

    async def _gather(self, ws: ClientConnection) -> None:
        """Leave the socket unread for `chunk_s` (websockets never pauses this connection's reading itself:
        it is opened with max_queue=None)."""
        ws.transport.pause_reading()
        try:
            await asyncio.sleep(self.chunk_s)
        finally:
            ws.transport.resume_reading()

    @staticmethod
    async def _pump(ws: ClientConnection, live: asyncio.Queue[bytes | None]) -> None:
        try:
            async for data in ws:
                live.put_nowait(data if isinstance(data, bytes) else data.encode())
        finally:
            live.put_nowait(None)
