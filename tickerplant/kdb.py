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
- sync char-vector queries, the few that kx's r.q and common feed handlers send (parse_query: a
  parser for exactly these, no q evaluator; anything else is 'nyi): `.u.sub[`t;`]`, `.u.sub[`;`]`,
  `.u.sub[`t;`a`b]`, `(.u.sub[`;`];`.u `i`L)` (r.q's start), `.u.i`, `.u.L`, `` `.u `i`L ``, `.u.t`,
  `.u.w`, `.u.d`, and parenthesized lists of them, evaluated left to right.
- `.u.L` / `.u.i`: the day's q tickerplant log (`<journal>/<date>/sym<yyyy.mm.dd>`, tick.q's name; the
  layout in marginflow/qipc.py) and its message count. The log is produced on request from the Arrow
  journal (QLog: extended, never rewritten, up to the seq asked for; ingest pays nothing), one
  `(`upd; `table; data)` per journaled batch. For a connection that has subscribed, `.u.i` counts
  the messages up to the position its `.u.sub` answer is consistent with (every row up to it is in
  the log's first .u.i messages, every later one is pushed: none missed, none twice, r.q's point);
  for any other connection, up to what is journaled. The folder r.q cds into (the log's path less
  its date: `<journal>/<date>/sym/`) is created beside it. A desk token gets no log (it holds every
  account's rows).
- roles as on the websocket: publisher for .u.upd (admin for param), subscriber for .u.sub and the
  .u globals; a desk token sees its accounts only. The core does the checks of upd and sub.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from marginflow import auth, kdbserver, qipc
from schemas import wire
from schemas.qtypes import KIND_QTYPES, kinds
from schemas.tables import STAMP_COLUMNS, TABLES, input_schema
from tickerplant import journal
from tickerplant.core import stored_layout
from tickerplant.journal_reader import read_files

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


# ---- the char-vector queries (sans-I/O) ------------------------------------------------------------------
@dataclass(frozen=True)
class SubCall:  # `.u.sub[tables; syms]`: each a symbol atom or vector, as the list form takes them
    tables: Any
    syms: Any


@dataclass(frozen=True)
class Globals:  # `.u.i` (atom: its value) or `` `.u `i`L `` (the list of their values)
    names: tuple[str, ...]
    atom: bool


@dataclass(frozen=True)
class Several:  # `(a; b; ...)`: each evaluated in turn, the list of their values
    items: tuple


U_GLOBALS = (
    "i",
    "L",
    "t",
    "w",
    "d",
)  # the .u globals answered (tick.q's: log count, log, tables, subs, date)
_SYMBOLS = re.compile(r"(?:`[A-Za-z0-9_.]*)+")
_U_LIST = re.compile(r"`\.u[ \t]+")  # `.u `i`L
_U_NAME = re.compile(r"\.u\.([A-Za-z]+)")  # .u.i
_NYI = (
    "nyi: the tickerplant takes (`.u.upd; `t; data) and (`.u.sub; `t; syms), and answers the queries"
    " .u.sub[`t;`syms], .u.i, .u.L, .u.t, .u.w, .u.d, `.u `i`L and (lists; of them)"
)


def parse_query(text: str) -> SubCall | Globals | Several:
    """The query r.q or a feed handler sends as text, e.g. `(.u.sub[`;`];`.u `i`L)`; QIPCError('nyi: ...)
    for anything else (this is no q evaluator)."""
    node, end = _expr(text, 0)
    if text[end:].strip():
        raise qipc.QIPCError(f"{_NYI}; not {text.strip()[:80]!r}")
    return node


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _symbols(text: str, i: int) -> tuple[Any, int]:
    m = _SYMBOLS.match(text, _skip(text, i))
    if m is None:
        raise qipc.QIPCError(f"{_NYI}; a symbol expected at {text[i:][:40]!r}")
    names = m.group().split("`")[1:]
    return (qipc.sym(names[0]) if len(names) == 1 else qipc.symbols(names)), m.end()


def _expect(text: str, i: int, token: str) -> int:
    i = _skip(text, i)
    if not text.startswith(token, i):
        raise qipc.QIPCError(f"{_NYI}; {token!r} expected at {text[i:][:40]!r}")
    return i + len(token)


def _expr(text: str, i: int) -> tuple[Any, int]:
    i = _skip(text, i)
    if text.startswith("(", i):
        items = []
        while True:
            node, i = _expr(text, i + 1)
            items.append(node)
            i = _skip(text, i)
            if not text.startswith(";", i):
                break
        i = _expect(text, i, ")")
        return (items[0] if len(items) == 1 else Several(tuple(items))), i
    if text.startswith(".u.sub", i) and text[_skip(text, i + 6) : _skip(text, i + 6) + 1] == "[":
        tables, i = _symbols(text, _expect(text, i + 6, "["))
        syms, i = _symbols(text, _expect(text, i, ";"))
        return SubCall(tables, syms), _expect(text, i, "]")
    m = _U_LIST.match(text, i)
    if m is not None:
        names, i = _symbols(text, m.end())
        atom = isinstance(names, qipc.Atom)
        wanted = (names.value,) if atom else tuple(names.data)
        if any(n not in U_GLOBALS for n in wanted):
            raise qipc.QIPCError(f"{_NYI}; not .u {' '.join(wanted)}")
        return Globals(wanted, atom), i
    m = _U_NAME.match(text, i)
    if m is not None and m.group(1) in U_GLOBALS:
        return Globals((m.group(1),), True), m.end()
    raise qipc.QIPCError(f"{_NYI}; not {text[i:].strip()[:80]!r}")


# ---- the q log, produced from the Arrow journal ------------------------------------------------------------
def qlog_path(root: str | Path, date: str) -> Path:
    """tick.q's log name for a day (`sym2026.12.02`) in the day's journal folder."""
    return journal.day_dir(root, date) / f"sym{date.replace('-', '.')}"


class QLog:
    """The day's q log file, extended from the journal up to a seq on request (in a worker thread: only
    rows already journaled are read, and a message being appended meanwhile is a torn tail the reader
    stops at). Each journaled batch becomes one `(`upd; `table; data)` message; messages go in seq order
    of their first row, so the messages of the rows up to a flush point are a prefix of the file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.date: str | None = None
        self.first_seqs: list[int] = []  # first seq of each message, in file order (ascending)
        self.done: dict[str, int] = {}  # per table, the last seq in the log
        self.upto = 0

    def extend(self, date: str, upto_seq: int) -> tuple[Path, int]:
        """The log of `date` and the count of its messages that hold every row with seq <= upto_seq."""
        path = qlog_path(self.root, date)
        if date != self.date:  # a new day, or the first request since start: written afresh
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "sym").mkdir(exist_ok=True)  # where r.q cds (the log's path less its date)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(qipc.log_header(0))
            os.replace(tmp, path)
            self.date, self.first_seqs, self.done, self.upto = date, [], {}, 0
        if upto_seq > self.upto:
            files = journal.day_files(self.root, date)
            new = sorted(
                ((int(b.column("seq")[0].as_py()), t, b) for t, b in
                 read_files(files, upto_seq, after=self.done, ordered=False)),
                key=lambda x: (x[0], x[1]),
            )  # fmt: skip
            with open(path, "r+b") as f:
                f.seek(0, os.SEEK_END)
                for first, table, batch in new:
                    data = qipc.from_arrow(batch, kinds=kinds(TABLES[table]))
                    f.write(qipc.encode(qipc.QList([qipc.sym("upd"), qipc.sym(table), data])))
                    self.first_seqs.append(first)
                    self.done[table] = int(batch.column("seq")[-1].as_py())
                f.flush()
                f.seek(qipc.LOG_COUNT_AT)
                f.write(struct.pack("<i", len(self.first_seqs)))
            self.upto = upto_seq
        return path, bisect.bisect_right(self.first_seqs, upto_seq)


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
        self.qlog = QLog(server.core.root)
        self._qlog_lock = asyncio.Lock()

    # ---- messages in ---------------------------------------------------------------------------------
    async def on_message(self, conn: kdbserver.KdbConn, msgtype: int, obj: Any) -> Any:
        if isinstance(obj, qipc.Vector) and obj.t == 10:
            try:
                node = parse_query(obj.data.decode(errors="replace"))
            except qipc.QIPCError as e:
                return qipc.QError(qipc.error_text(str(e)))
            return await self.evaluate(conn, node)
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

    async def evaluate(self, conn: kdbserver.KdbConn, node: Any) -> Any:
        """The value of a parsed query (parse_query), its parts left to right; the first q error stops it."""
        if isinstance(node, SubCall):
            return await self.sub(conn, [node.tables, node.syms])
        parts = [(self.evaluate, x) for x in node.items] if isinstance(node, Several) else [
            (self.u_global, name) for name in node.names]  # fmt: skip
        values = []
        for fn, arg in parts:
            value = await fn(conn, arg)
            if isinstance(value, qipc.QError):
                return value
            values.append(value)
        return values[0] if isinstance(node, Globals) and node.atom else qipc.QList(values)

    async def u_global(self, conn: kdbserver.KdbConn, name: str) -> Any:
        """The value of `.u.<name>` for this connection (see the module docstring)."""
        who = conn.principal
        refused = auth.not_permitted(who, "subscriber", f".u.{name}")
        if refused is not None:
            return qipc.QError(qipc.error_text(refused))
        if name == "t":
            return qipc.symbols(list(TABLES))
        if name == "d":
            return qipc.Atom(-14, (dt.date.fromisoformat(self.core.date) - dt.date(2000, 1, 1)).days)
        if name == "w":
            return self._u_w()
        if who is not None and who.accounts is not None:
            return qipc.QError(f"access: .u.{name}: the q log holds every account's rows; desk {who.desk!r}")
        st = self._state(conn)
        date, upto = st.get("position") or (self.core.date, self.core.journaled_seq)
        async with self._qlog_lock:
            path, count = await asyncio.to_thread(self.qlog.extend, date, upto)
        return qipc.Atom(-7, count) if name == "i" else qipc.sym(f":{path}")

    def _u_w(self) -> qipc.Dict:
        """tick.q's .u.w: per table, its subscribers' (handle; syms), ` for every sym."""
        per: dict[str, list] = {t: [] for t in TABLES}
        for conn_id, sub in self.core.subs.items():
            keys = qipc.symbols(sorted(sub.keys)) if sub.keys else qipc.sym("")
            for t in sub.tables:
                per[t].append(qipc.QList([qipc.Atom(-6, conn_id), keys]))
        return qipc.Dict(qipc.symbols(list(per)), qipc.QList([qipc.QList(v) for v in per.values()]))

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
        st["pending_subs"] = subs  # in force from the core's answer on (deliver), before this resumes
        fut = self._enter(conn, wire.Sub(tables=sorted(subs), keys=keys), "sub")
        assert fut is not None
        answer = await self._answer(conn, fut, "sub")
        st.pop("pending_subs", None)
        if isinstance(answer, qipc.QError):
            return answer
        st["position"] = (answer.date, answer.last_seq)  # what .u.i / .u.L answer this connection
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
                # the pushes after this answer are filtered by the new subscription at once: a Publish
                # can reach deliver before sub() resumes (its rows would be dropped: a gap)
                st["subs"] = st.pop("pending_subs", st["subs"])
                fut.set_result(msg.position)
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
