"""The tickerplant's kdb+ IPC port: feed handlers publish with `.u.upd`, kdb+ rdbs subscribe with
`.u.sub`, as against kx's tick.q.

- `.u.upd[`table; data]` (sync or async; `data` a q table, or a list of columns in the table's
  input order, or one row of atoms; a leading time (and seq) column is dropped: the tickerplant
  stamps its own, as for every upd) becomes the Arrow of the table's input columns and enters the
  core as an `upd_arrow` message on this connection: the same checks (tickerplant/validate.py),
  stamping, dedupe and journal as a websocket upd, and the same error text. Sync: the reply comes once
  the rows are journaled (the core's ack), or the q error; async: a refusal is counted by the core
  and logged.
- `.u.sub[`table; syms]` (` for every table, ` for every sym) answers (table; empty table of its
  schema) (a list of them for `) and from then on pushes `(`upd; `table; data)` async messages in seq
  order (the core's publish: none twice, none missed), `(`.u.end; date)` at end of day. A subscriber
  that does not read is cut off when its queue (tickerplant.subscriber_queue_frames) is full.
- roles as on the websocket: publisher for .u.upd (admin for param), subscriber for .u.sub; a desk
  token sees its accounts only. The core does these checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from marginflow import kdbserver, qipc
from schemas import wire
from schemas.qtypes import KIND_QTYPES, kinds
from schemas.tables import STAMP_COLUMNS, TABLES, input_schema
from tickerplant.core import stored_layout

if TYPE_CHECKING:
    from tickerplant.server import TickerplantServer

log = logging.getLogger("marginflow.tp")
ACK_TIMEOUT_S = 30.0
_from_tp = msgspec.msgpack.Decoder(wire.FromTickerplant)


def empty_table(table: str) -> qipc.Table:
    """The q table `.u.sub` answers: no rows, the schema's columns in their q types."""
    return qipc.empty_table({c.name: KIND_QTYPES[c.kind].num for c in TABLES[table].columns})


def _one_row(item: Any) -> Any:
    if isinstance(item, qipc.Atom):
        return qipc.Vector(11, [item.value]) if item.t == -11 else qipc.vector(-item.t, [item.value])
    return qipc.QList([item])  # a string: one value of a text column


def input_columns(table: str, data: Any) -> pa.Table:
    """The Arrow table of `table`'s input columns that a `.u.upd` payload holds (types as sent: the
    core's check decides). QIPCError when the payload is no table or list of columns."""
    if table not in TABLES:
        return pa.table({})
    names = input_schema(table).names
    if isinstance(data, qipc.Table):
        arrow = qipc.to_arrow(data)
        return arrow.drop_columns([c for c in STAMP_COLUMNS if c in arrow.schema.names])
    if not isinstance(data, qipc.QList):
        raise qipc.QIPCError(f"type: .u.upd[`{table}; data]: data must be a table or a list of columns")
    items = list(data.items)
    if items and all(isinstance(x, qipc.Atom) or (isinstance(x, qipc.Vector) and x.t == 10) for x in items):
        items = [_one_row(x) for x in items]
    if len(items) == len(names) + 2 or len(items) == len(names) + 1:
        items = items[len(items) - len(names) :]  # the feed's own time (and seq): stamped here instead
    if len(items) != len(names):
        raise qipc.QIPCError(
            f"length: table {table} takes {len(names)} columns ({', '.join(names)}), got {len(items)}"
        )
    return pa.table([qipc.q_column_to_arrow(n, c) for n, c in zip(names, items, strict=True)], names=names)


def _ipc(data: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as w:
        w.write_table(data)
    return sink.getvalue().to_pybytes()


class TickerplantKdb:
    """The kdb+ port of a TickerplantServer: its connections are connections of the core."""

    def __init__(self, server: TickerplantServer, port: int):
        self.server = server
        self.core = server.core
        self.port = kdbserver.KdbPort(
            "tickerplant",
            server.cfg.host,
            port,
            server.gate,
            self.on_message,
            max_bytes=server.cfg.max_message_bytes,
            queue_frames=server.cfg.subscriber_queue_frames,
            ids=server.ids,
            on_open=lambda c: self.core.connect(c.id, c.principal),
            on_close=self._closed,
        )

    # ---- messages in ---------------------------------------------------------------------------------
    async def on_message(self, conn: kdbserver.KdbConn, msgtype: int, obj: Any) -> Any:
        items = obj.items if isinstance(obj, qipc.QList) else []
        fn = qipc.text_of(items[0]) if items else None
        if fn in (".u.upd", "upd"):
            return await self.upd(conn, msgtype, items[1:])
        if fn == ".u.sub":
            return await self.sub(conn, items[1:])
        return qipc.QError(
            "nyi: the tickerplant takes (`.u.upd; `table; data) and (`.u.sub; `table; syms)"
            + (f", not {fn}" if fn else "")
        )

    def _state(self, conn: kdbserver.KdbConn) -> dict[str, Any]:
        st = conn.state
        if not st:
            st.update(next_id=0, waiters={}, subs={}, name=conn.addr)
        return st

    def _enter(self, conn: kdbserver.KdbConn, msg: wire.Msg, key: Any) -> asyncio.Future | None:
        """Hand one wire message to the core as this connection's; the future of its answer if `key`."""
        st = self._state(conn)
        fut = None
        if key is not None:
            fut = asyncio.get_running_loop().create_future()
            st["waiters"][key] = fut
        self.server.receive(conn.id, wire.encode(msg), st["name"])
        return fut

    async def _answer(self, conn: kdbserver.KdbConn, fut: asyncio.Future, key: Any) -> Any:
        try:
            return await asyncio.wait_for(fut, ACK_TIMEOUT_S)
        except TimeoutError:
            return qipc.QError(f"timeout: no answer from the tickerplant in {ACK_TIMEOUT_S:g} s")
        finally:
            self._state(conn)["waiters"].pop(key, None)

    async def upd(self, conn: kdbserver.KdbConn, msgtype: int, args: list) -> Any:
        table = qipc.text_of(args[0]) if len(args) == 2 else None
        if table is None:
            return qipc.QError("rank: .u.upd takes [`table; data]")
        try:
            data = input_columns(table, args[1])
        except qipc.QIPCError as e:
            self.core.bad["bad_value"] += 1
            return qipc.QError(f"table {table}: {e}")
        st = self._state(conn)
        st["next_id"] += 1
        mid = st["next_id"]
        msg = wire.UpdArrow(table=table, ipc=_ipc(data), id=mid)
        fut = self._enter(conn, msg, mid if msgtype == qipc.SYNC else None)
        return None if fut is None else await self._answer(conn, fut, mid)

    async def sub(self, conn: kdbserver.KdbConn, args: list) -> Any:
        if len(args) != 2:
            return qipc.QError("rank: .u.sub takes [`table; syms]")
        tables_arg, syms_arg = args
        if isinstance(tables_arg, qipc.Atom) and tables_arg.t == -11:
            tables = list(TABLES) if tables_arg.value == "" else [tables_arg.value]
        elif isinstance(tables_arg, qipc.Vector) and tables_arg.t == 11:
            tables = list(tables_arg.data)
        else:
            return qipc.QError("type: .u.sub's first argument is a table name (` for all)")
        if isinstance(syms_arg, qipc.Atom) and syms_arg.t == -11:
            syms = None if syms_arg.value == "" else frozenset([syms_arg.value])
        elif isinstance(syms_arg, qipc.Vector) and syms_arg.t == 11:
            syms = frozenset(syms_arg.data) or None
        else:
            return qipc.QError("type: .u.sub's second argument is a symbol list (` for all)")
        unknown = [t for t in tables if t not in TABLES]
        if unknown:
            return qipc.QError(f"unknown tables {unknown}; tables are {', '.join(TABLES)}")
        st = self._state(conn)
        subs: dict[str, frozenset[str] | None] = dict(st["subs"])
        for t in tables:
            subs[t] = syms
        wanted = set().union(*(s for s in subs.values() if s is not None))
        keys = sorted(wanted) if all(s is not None for s in subs.values()) else []
        fut = self._enter(conn, wire.Sub(tables=sorted(subs), keys=keys), "sub")
        assert fut is not None
        answer = await self._answer(conn, fut, "sub")
        if isinstance(answer, qipc.QError):
            return answer
        st["subs"] = subs
        pairs = [qipc.QList([qipc.sym(t), empty_table(t)]) for t in tables]
        every = isinstance(tables_arg, qipc.Atom) and not tables_arg.value
        return pairs[0] if len(tables) == 1 and not every else qipc.QList(pairs)

    # ---- frames out of the core -------------------------------------------------------------------------
    def deliver(self, conn_id: int, frame: bytes) -> bool:
        """A frame the core sent to one of this port's connections, as q; False if not one of them."""
        conn = self.port.conns.get(conn_id)
        if conn is None:
            return False
        try:
            msg = _from_tp.decode(frame)
        except msgspec.DecodeError:
            log.exception("kdb+ connection %d: undecodable frame from the core", conn_id)
            return True
        st = self._state(conn)
        waiters: dict[Any, asyncio.Future] = st["waiters"]
        if isinstance(msg, wire.Ack):
            for key in [k for k in waiters if isinstance(k, int) and k <= msg.upto]:
                if not waiters[key].done():
                    waiters[key].set_result(None)
        elif isinstance(msg, wire.Error):
            fut = waiters.get(msg.id if msg.id else "sub")
            if fut is not None and not fut.done():
                fut.set_result(qipc.QError(qipc.error_text(msg.reason)))
            else:
                log.warning(
                    "kdb+ connection %d (%s): async message refused: %s", conn_id, conn.addr, msg.reason
                )
        elif isinstance(msg, wire.SubReply):
            fut = waiters.get("sub")
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(msg, wire.Publish):
            self._publish(conn, msg, st["subs"])
        elif isinstance(msg, wire.EndOfDay):
            days = (dt.date.fromisoformat(msg.date) - dt.date(2000, 1, 1)).days
            conn.push(qipc.QList([qipc.sym(".u.end"), qipc.Atom(-14, days)]))
        return True

    def _publish(self, conn: kdbserver.KdbConn, msg: wire.Publish, subs: dict) -> None:
        for b in msg.batches:
            if b.table not in subs:
                continue
            rb = pa.ipc.read_record_batch(pa.py_buffer(b.ipc), stored_layout(b.table)[0])
            syms = subs[b.table]
            key = TABLES[b.table].key
            if syms is not None and key:
                rb = rb.filter(pc.is_in(rb.column(key), pa.array(sorted(syms))))
                if rb.num_rows == 0:
                    continue
            data = qipc.from_arrow(rb, kinds=kinds(TABLES[b.table]))
            if not conn.push(qipc.QList([qipc.sym("upd"), qipc.sym(b.table), data])):
                return

    def _closed(self, conn: kdbserver.KdbConn) -> None:
        self.core.drop(conn.id)
        for fut in self._state(conn)["waiters"].values():
            if not fut.done():
                fut.cancel()
