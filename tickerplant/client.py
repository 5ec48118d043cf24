"""Clients of the tickerplant: a Publisher (upd with acks) and the Subscriber every process uses.

The Subscriber's interface — subscribe, replay to the position, then receive batches with seq — does
not depend on the transport, so the same batches could later come from NATS or Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pyarrow as pa
import websockets
from websockets.asyncio.client import ClientConnection, connect

from marginflow import auth, process
from replay import reader
from schemas import wire
from schemas.tables import TABLES

log = logging.getLogger("marginflow.client")
FROM_TP = msgspec.msgpack.Decoder(wire.FromTickerplant)


def to_columns(table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, list]:
    """Rows as a list of dicts, or already as columns -> the column-oriented form Upd carries."""
    if isinstance(rows, Mapping):
        return {k: list(v) for k, v in rows.items()}
    names = [c.name for c in TABLES[table].input_columns] if table in TABLES else list(rows[0]) if rows else []
    cols: dict[str, list] = {n: [] for n in names}
    for r in rows:
        for n in names:
            cols[n].append(r.get(n))
        for k in r:
            if k not in cols:  # let the tickerplant name the extra column in its error
                cols[k] = [r.get(k)]
    return cols


def upd_message(table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], msg_id: int) -> wire.Upd:
    return wire.Upd(table=table, cols=msgspec.Raw(wire.encode(to_columns(table, rows))), id=msg_id)  # type: ignore[arg-type]


def arrow_ipc(data: pa.Table | pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue().to_pybytes()


class Publisher:
    """Sends upd messages; `acked` is the highest message id the tickerplant has journaled, and
    `errors` collects refusals. Messages sent together in `upd_many` travel in one frame. `token`: default
    the local publisher token (marginflow/auth.py)."""

    def __init__(self, url: str, token: str | None = None):
        self.url = url
        self.token = token
        self.ws: ClientConnection | None = None
        self.next_id = 0
        self.acked = 0
        self.last_seq = 0
        self.errors: list[wire.Error] = []
        self._acked_event = asyncio.Event()
        self._replies: asyncio.Queue[wire.Msg] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Publisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.ws = await connect(self.url, max_size=None, compression=None,
                                **auth.client_options(self.url, "publisher", self.token))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for data in self.ws:
                msg = FROM_TP.decode(data)
                for m in msg if isinstance(msg, list) else (msg,):
                    if isinstance(m, wire.Ack):
                        self.acked, self.last_seq = m.upto, m.seq
                        self._acked_event.set()
                    elif isinstance(m, wire.Error):
                        self.errors.append(m)
                        self._acked_event.set()
                    else:
                        await self._replies.put(m)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._acked_event.set()

    async def upd(self, table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> int:
        return await self.upd_many([(table, rows)])

    async def upd_many(self, items: Iterable[tuple[str, Any]]) -> int:
        msgs = []
        for table, rows in items:
            self.next_id += 1
            msgs.append(upd_message(table, rows, self.next_id))
        await self.send_raw(wire.encode(msgs))
        return self.next_id

    async def upd_arrow(self, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Bulk upd: rows as Arrow (columns = the table's input columns), checked column at a time."""
        self.next_id += 1
        await self.send_raw(wire.encode(wire.UpdArrow(table=table, ipc=arrow_ipc(data), id=self.next_id)))
        return self.next_id

    async def send_raw(self, data: bytes) -> None:
        assert self.ws is not None, "not connected"
        if not process.write_now(self.ws, data):  # written at once unless flow control holds it back
            await self.ws.send(data)

    async def wait_acked(self, msg_id: int | None = None, timeout: float = 10.0) -> int:
        """Wait until every message up to msg_id (default: all sent) is acked or refused."""
        target = self.next_id if msg_id is None else msg_id
        async with asyncio.timeout(timeout):
            while self.acked < target and not self._all_answered(target):
                self._acked_event.clear()
                if self._reader is None or self._reader.done():
                    raise ConnectionError("tickerplant connection closed")
                await self._acked_event.wait()
        return self.last_seq

    def _all_answered(self, target: int) -> bool:
        refused = {e.id for e in self.errors}
        return all(i <= self.acked or i in refused for i in range(self.acked + 1, target + 1))

    async def request(self, msg: wire.Msg, timeout: float = 10.0) -> wire.Msg:
        assert self.ws is not None
        await self.ws.send(wire.encode(msg))
        async with asyncio.timeout(timeout):
            return await self._replies.get()

    async def status(self) -> wire.Status:
        reply = await self.request(wire.StatusRequest())
        assert isinstance(reply, wire.Status)
        return reply

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@dataclass
class Event:
    """What a subscriber receives: a batch of one table's rows (ascending seq), or end of day."""

    kind: str  # "batch" | "end_of_day" | "live"
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
    local subscriber token (marginflow/auth.py)."""

    url: str
    tables: Sequence[str] = ()
    keys: Sequence[str] = ()
    ordered: bool = True
    reconnect: bool = True
    token: str | None = None
    applied: dict[str, int] = field(default_factory=dict)  # table -> last applied seq
    position: wire.JournalPosition | None = None
    disconnects: list[str] = field(default_factory=list)
    _ws: ClientConnection | None = field(default=None, repr=False)
    _backlog: int = field(default=0, repr=False)

    def _accept(self, table: str, batch: pa.RecordBatch, replayed: bool,
                seqs: tuple[int, int] | None = None) -> Event | None:
        """The event for the rows not applied yet, or None. `seqs`, the first and last seq of a whole
        published batch, spares the Arrow calls when every row is new (the usual live case)."""
        after = self.applied.get(table, 0)
        if seqs is not None and seqs[0] > after:
            last = seqs[1]
        else:
            batch = reader.filter_batch(table, batch, after)
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
            items = [(t, rb, None) for t, rb in reader.merge_by_seq({b.table: [rb] for b, rb in decoded})]
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
        async with connect(self.url, max_size=None, compression=None, max_queue=None,
                           **auth.client_options(self.url, "subscriber", self.token)) as ws:
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
                for table, batch in reader.read_position(reply.position, reply.tables, after, keys, self.ordered):
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

    async def _live_frames(self, ws: ClientConnection, live: asyncio.Queue[bytes | None],
                           pump: asyncio.Task) -> AsyncIterator[bytes]:
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

    @staticmethod
    async def _pump(ws: ClientConnection, live: asyncio.Queue[bytes | None]) -> None:
        try:
            async for data in ws:
                live.put_nowait(data if isinstance(data, bytes) else data.encode())
        finally:
            live.put_nowait(None)
