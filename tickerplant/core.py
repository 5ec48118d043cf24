"""The tickerplant's protocol logic over plain data, no I/O: validate `upd`, stamp time and seq, say
what to journal and what to publish (sans-I/O, as websockets' protocol.py).

State (as in kdb+ tick.q): `date` (d), `last_seq` (i), subscriptions (w), pending rows not yet
journaled. The core takes frames and reads the clocks it is given; each call returns an `Out`: the
journal writes (Append, AppendMarks, Roll) and the frames to send as (connection id, bytes) pairs.
The shell performs the writes, then sends: tickerplant/journal_writer.py owns the files (repair at
start, appends, fsync, the marks file), tickerplant/server.py only moves bytes. The column checks of
upd_arrow and the wording of upd's decode errors are in tickerplant/validate.py.

Why each behaviour exists:
- rows are journaled and published together in `flush`, so a `sub` between flushes sees a consistent
  position: every row with seq <= last_seq is in the files, every later row is published to it.
- acks are sent only after the rows are written to the journal (every frame of an Out goes after its
  writes): an acknowledged row survives a crash.
- a bad message is answered with an Error naming table, row and field, counted, and never journaled;
  the rest of the frame is still processed.
- seq is per row and never restarts (not even at end of day), so replays of date ranges stay ordered.
- a resend is never journaled twice: per publisher id the highest message id journaled (written ahead
  of the data, beside the day's journal), and per day the fills' exec_ids; which rule applies where is
  in tickerplant/dedupe.py.
- end_of_day_request rolls only to the real next date: never past the day after today's trading date.
- each table's pending rows are serialized once, and those bytes are both the journal's stream message
  and the publish payload; a few rows (zero-latency mode) are encoded straight from the lists
  (journal.encode_batch, no Arrow arrays), since pyarrow's per-call cost dominated a 1-row flush.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marginflow import auth
from marginflow.config import TickerplantConfig
from schemas import wire
from schemas.tables import TABLES, input_schema
from tickerplant import dedupe, journal
from tickerplant.validate import check_arrow, error_from_validation

Frames = list[tuple[int, bytes]]  # (connection id, frame) to send


def trading_date(now_ns: int, eod_time: str) -> str:
    """The journal date of an instant: the day rolls at `eod_time` (UTC, HH:MM). With a roll at
    midnight it is the UTC date; with a roll at 22:00 the evening belongs to the next day."""
    hh, mm = (int(x) for x in eod_time.split(":"))
    offset = dt.timedelta(hours=hh, minutes=mm)
    moment = dt.datetime.fromtimestamp(now_ns / 1e9, tz=dt.UTC)
    if offset:
        moment += dt.timedelta(days=1) - offset
    return moment.date().isoformat()


def next_date(date: str) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()


@dataclass
class Subscription:
    tables: tuple[str, ...]
    keys: frozenset[str]
    peer: str = ""
    sent_batches: int = 0
    accounts: frozenset[str] | None = (
        None  # a desk-restricted token: rows of account-keyed tables only for these
    )


SMALL_BATCH = 64  # rows up to which journal.encode_batch beats building Arrow arrays column at a time


@cache
def stored_layout(table: str) -> tuple[pa.Schema, journal.BatchLayout]:
    """The journaled schema of a table (time, seq, input columns) and its record batch message layout."""
    schema = TABLES[table].arrow_schema
    return schema, journal.batch_layout(schema)


def warm_layouts() -> None:
    """Build every table's stored layout now (at start-up) rather than at its first flush: the first build
    imports pandas through pyarrow (~0.4 s), which would stall the first fills of the day."""
    for table in TABLES:
        stored_layout(table)


@dataclass
class Pending:
    """Rows of one table waiting for the next flush: input columns as lists (Arrow chunks once an
    upd_arrow arrives), and per message its (time, first seq, row count), expanded at flush."""

    table: str
    schema: pa.Schema  # the table's input columns
    columns: dict[str, list] = field(default_factory=dict)
    chunks: list[pa.Table] = field(default_factory=list)  # sealed rows, in arrival order
    stamps: list[tuple[int, int, int]] = field(default_factory=list)
    rows: int = 0

    @property
    def seqs(self) -> tuple[int, int]:
        """First and last seq of the pending rows."""
        _, first, count = self.stamps[-1]
        return self.stamps[0][1], first + count - 1

    def seal(self) -> None:
        """Turn the rows gathered as lists into an Arrow chunk (before an Arrow chunk arrives, and at
        flush)."""
        if self.columns and self.columns[self.schema.names[0]]:
            self.chunks.append(
                pa.table([pa.array(self.columns[f.name], f.type) for f in self.schema], schema=self.schema)
            )
            self.columns = {n: [] for n in self.schema.names}

    def serialize(self) -> bytes:
        """The pending rows stamped with time and seq, as one record batch message of the journaled
        schema. A few list rows (the zero-latency case) are encoded straight from the lists; more
        rows, or rows that came as Arrow, go through Arrow arrays."""
        schema, layout = stored_layout(self.table)
        if not self.chunks and self.rows <= SMALL_BATCH:
            times: list[int] = []
            seqs: list[int] = []
            for now, first, count in self.stamps:
                times += [now] * count
                seqs += range(first, first + count)
            values = {"time": times, "seq": seqs, **self.columns}
            return journal.encode_batch(layout, [values[n] for n in schema.names])
        times, seqs = self.stamp_columns()
        arrays = {"time": pa.array(times, pa.timestamp("ns")), "seq": pa.array(seqs), **self.input_arrays()}
        return (
            pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)
            .serialize()
            .to_pybytes()
        )

    def input_arrays(self) -> dict[str, pa.Array]:
        if not self.chunks:  # only list rows: straight to arrays
            return {f.name: pa.array(self.columns[f.name], f.type) for f in self.schema}
        self.seal()
        data = self.chunks[0] if len(self.chunks) == 1 else pa.concat_tables(self.chunks)
        return {n: data.column(n).combine_chunks() for n in self.schema.names}

    def stamp_columns(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.stamps) == 1:
            now, first, count = self.stamps[0]
            return np.full(count, now, dtype=np.int64), np.arange(first, first + count, dtype=np.int64)
        now, first, count = (np.array(x, dtype=np.int64) for x in zip(*self.stamps, strict=True))
        times = np.repeat(now, count)
        starts = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count)
        return times, starts + np.arange(self.rows, dtype=np.int64)


class Append(NamedTuple):
    """Append one record batch message to a table's journal file: the same bytes the publish frames
    carry (no copy)."""

    table: str
    ipc: bytes


class AppendMarks(NamedTuple):
    """Append the publishers' marks of the rows whose Appends follow (the write-ahead of
    tickerplant/dedupe.py): fsynced before those rows when fsync is "batch"."""

    marks: list[dedupe.Mark]


class Roll(NamedTuple):
    """End of day: close the day's files with the end-of-stream marker, open `date`'s, and start its
    marks file with `marks` (message ids live on across days)."""

    date: str
    marks: list[dedupe.Mark]


Write = Append | AppendMarks | Roll


@dataclass(slots=True)
class Out:
    """What one call into the core asks of the shell, in this order: perform every write of `writes`
    (in order; fsync as configured), then send every frame of `send`. Acks are among the frames, so
    an ack goes out only after the rows it acknowledges are written."""

    writes: list[Write] = field(default_factory=list)
    send: Frames = field(default_factory=list)


@dataclass
class JournalState:
    """What the journal on disk holds when the tickerplant starts (read and repaired by the shell,
    tickerplant/journal_writer.py): the day to continue, the last seq journaled, that day's rows per
    table, the publishers' valid marks and that day's fill exec_ids (exec_id -> seq)."""

    date: str
    last_seq: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    marks: dict[str, dedupe.Mark] = field(default_factory=dict)
    exec_ids: dict[str, int] = field(default_factory=dict)
    scans: list[journal.Scan] = field(default_factory=list)  # (for the shell's log)


def _no_queue(conn: int) -> tuple[int, int]:
    return 0, 0


class TickerplantCore:
    """The tickerplant over plain data. `now_ns` (wall clock, ns) stamps rows and dates the journal;
    `monotonic` (s) gives the uptime; `queue_depth(conn)` -> (frames queued, limit) and
    `journal_bytes()` -> bytes per table file are asked of the shell for `status`."""

    def __init__(
        self,
        cfg: TickerplantConfig,
        now_ns: Callable[[], int],
        monotonic: Callable[[], float],
        *,
        queue_depth: Callable[[int], tuple[int, int]] | None = None,
        journal_bytes: Callable[[], Mapping[str, int]] = dict,
    ):
        self.cfg = cfg
        self.root = Path(cfg.journal_dir)
        self.now_ns = now_ns
        self.monotonic = monotonic
        self.queue_depth = queue_depth or _no_queue
        self.journal_bytes = journal_bytes
        self.date = trading_date(now_ns(), cfg.eod_time)
        self.last_seq = 0
        self.pending: dict[str, Pending] = {}
        self.acks: dict[int, tuple[int, int]] = {}  # conn -> (upto id, last seq)
        self.subs: dict[int, Subscription] = {}
        self.principals: dict[int, auth.Principal] = {}  # conn -> who it authenticated as (connect)
        self.rows: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = (
            Counter()
        )  # (kind, table) -> refusals (never reset: metrics)
        self.journaled: Counter[str] = Counter()  # table -> rows journaled since start (never reset: metrics)
        self.messages = 0
        self.started = monotonic()
        self._writes: list[Write] = []  # asked of the shell by the current call (see Out)
        # ---- dedupe (tickerplant/dedupe.py)
        self.marks: dict[str, dedupe.Mark] = {}  # publisher id -> its highest journaled (or pending) message
        self.exec_ids: dict[str, int] = {}  # today's fill exec_ids (journaled or pending) -> seq
        self.journaled_seq = 0  # last seq written to the journal
        self._flush_marks: dict[str, dedupe.Mark] = {}  # marks of the pending rows, written ahead at flush

    def _out(self, send: Frames) -> Out:
        writes, self._writes = self._writes, []
        return Out(writes, send)

    # ---- start and end of day ------------------------------------------------------------------
    def restore(self, state: JournalState) -> None:
        """Continue from the journal as the shell found it at start: its day, seq, rows and dedupe."""
        self.date = state.date
        self.last_seq = self.journaled_seq = state.last_seq
        self.rows = Counter(state.rows)
        self.marks = dict(state.marks)
        self.exec_ids = dict(state.exec_ids)

    def end_of_day(self, new_date: str | None = None) -> Out:
        """Flush, roll the journal to the next day's files (Roll), tell subscribers."""
        return self._out(self._end_of_day(new_date))

    def _end_of_day(self, new_date: str | None = None) -> Frames:
        out = self._flush()
        old = self.date
        new_date = new_date or next_date(old)
        self.date = new_date
        self.rows.clear()
        self.exec_ids.clear()  # exec_ids are unique per day
        self.marks = {p: dedupe.Mark(p, m.id, m.first_seq, m.last_seq) for p, m in self.marks.items()}
        self._writes.append(Roll(new_date, list(self.marks.values())))  # ids live on
        frame = wire.encode(wire.EndOfDay(date=old, next_date=new_date))
        out += [(cid, frame) for cid in self.subs]
        return out

    def maybe_roll(self) -> Out:
        today = trading_date(self.now_ns(), self.cfg.eod_time)
        return self.end_of_day(today) if today > self.date else Out()

    # ---- incoming frames -----------------------------------------------------------------------
    def on_frame(self, conn: int, data: bytes, peer: str = "") -> Out:
        """Handle one websocket frame (one message or a list of them)."""
        try:
            msgs = wire.decoder(wire.TickerplantMessage).decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return self._out(self._on_frame_slow(conn, data, peer))
        out: Frames = []
        for msg in msgs if isinstance(msgs, list) else (msgs,):
            out += self._on_message(conn, msg, peer)
        return self._out(out)

    def oversized(self) -> None:
        """The shell refused a frame over max_message_bytes (and closes the connection): count it."""
        self.bad["oversized"] += 1
        self.rejected["oversized", ""] += 1

    def _on_frame_slow(self, conn: int, data: bytes, peer: str) -> Frames:
        """A frame that did not decode as a whole: decode its messages one by one so the good ones
        are still processed and each bad one gets its own error."""
        try:
            parts = msgspec.msgpack.decode(data, type=list[msgspec.Raw])
        except (msgspec.ValidationError, msgspec.DecodeError):
            parts = [msgspec.Raw(data)]
        out: Frames = []
        dec = msgspec.msgpack.Decoder(wire.TickerplantMessage)
        for raw in parts:
            try:
                msg = dec.decode(raw)
            except msgspec.ValidationError as e:  # (a subclass of DecodeError: test it first)
                out.append(self._bad(conn, "bad_message", self._envelope_error(raw, e)))
                continue
            except msgspec.DecodeError as e:
                out.append(self._bad(conn, "undecodable", wire.Error(reason=f"undecodable message: {e}")))
                continue
            out += self._on_message(conn, msg, peer)
        return out

    def _envelope_error(self, raw: msgspec.Raw, e: msgspec.ValidationError) -> wire.Error:
        try:
            obj = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError:
            obj = None
        table = str(obj.get("table", "")) if isinstance(obj, dict) else ""
        msg_id = obj.get("id", 0) if isinstance(obj, dict) and isinstance(obj.get("id"), int) else 0
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in (None, "upd", "upd_arrow", "sub", "status_request", "end_of_day_request"):
            return wire.Error(reason=f"unknown message type {kind!r}", id=msg_id)
        return wire.Error(reason=f"bad message: {e}", id=msg_id, table=table)

    def _bad(self, conn: int, kind: str, err: wire.Error) -> tuple[int, bytes]:
        self.bad[kind] += 1
        self.rejected[kind, err.table] += 1
        return conn, wire.encode(err)

    def connect(self, conn: int, principal: auth.Principal | None) -> None:
        """A connection authenticated as `principal` (None: not authenticated; every request is refused)."""
        if principal is not None:
            self.principals[conn] = principal

    def _refused(self, conn: int, msg: wire.Msg) -> Frames | None:
        """The refusal of a message this connection's principal may not send, or None."""
        who = self.principals.get(conn)
        if isinstance(msg, wire.Upd | wire.UpdArrow):
            role = "admin" if msg.table in auth.ADMIN_TABLES else "publisher"
            reason, msg_id, table = auth.not_permitted(who, role, f"upd {msg.table}"), msg.id, msg.table
        elif isinstance(msg, wire.Sub):
            reason, msg_id, table = auth.not_permitted(who, "subscriber", "sub"), 0, ""
        elif isinstance(msg, wire.EndOfDayRequest):
            reason, msg_id, table = auth.not_permitted(who, "admin", "end_of_day_request"), 0, ""
        else:
            reason, msg_id, table = (
                (auth.not_permitted(who, "subscriber", "status") if who is None else None),
                0,
                "",
            )
        if reason is None:
            return None
        return [self._bad(conn, "unauthorized", wire.Error(reason=reason, id=msg_id, table=table))]

    def _on_message(self, conn: int, msg: wire.Msg, peer: str) -> Frames:
        refused = self._refused(conn, msg)
        if refused is not None:
            return refused
        if isinstance(msg, wire.Upd):
            return self._upd(conn, msg)
        if isinstance(msg, wire.UpdArrow):
            return self._upd_arrow(conn, msg)
        if isinstance(msg, wire.Sub):
            return self._sub(conn, msg, peer)
        if isinstance(msg, wire.StatusRequest):
            return [(conn, wire.encode(self.status()))]
        if isinstance(msg, wire.EndOfDayRequest):
            return self._end_of_day_request(conn)
        return [self._bad(conn, "bad_message", wire.Error(reason=f"unexpected message {type(msg).__name__}"))]

    def _end_of_day_request(self, conn: int) -> Frames:
        """Roll now, but only to the real next date: refused once the journal date is already after
        today's trading date, so repeated requests cannot move the date days ahead."""
        today = trading_date(self.now_ns(), self.cfg.eod_time)
        if self.date > today:
            reason = (
                f"end of day refused: the journal date {self.date} is already after today's trading date "
                f"{today}; it rolls only to the real next date"
            )
            return [self._bad(conn, "end_of_day_refused", wire.Error(reason=reason))]
        return self._end_of_day()

    def _duplicate_resend(self, conn: int, pub: str, msg_id: int) -> Frames | None:
        """A message this publisher already had journaled (resent after a lost ack): ack it again,
        journal nothing (tickerplant/dedupe.py). None if it is new."""
        mark = self.marks.get(pub) if pub else None
        if mark is None or msg_id > mark.id:
            return None
        self.bad["duplicate_resend"] += 1
        upto, seq = self.acks.get(conn, (0, 0))
        self.acks[conn] = (max(upto, msg_id), max(seq, mark.last_seq))
        return []

    def _duplicate_fill(self, conn: int, exec_ids: list[str], msg_id: int) -> Frames | None:
        err = dedupe.duplicate_exec_id(exec_ids, self.exec_ids, self.journaled_seq, msg_id)
        return None if err is None else [self._bad(conn, "duplicate_exec_id", err)]

    def _unknown_table(self, conn: int, table: str, msg_id: int) -> Frames:
        err = wire.Error(
            reason=f"unknown table {table!r}; tables are {', '.join(TABLES)}",
            id=msg_id,
            table=table,
            field="table",
        )
        return [self._bad(conn, "unknown_table", err)]

    def _unknown_or_resent(self, conn: int, msg: wire.Upd | wire.UpdArrow) -> Frames | None:
        """The Error for an unknown table, or the re-ack of a message already journaled; None: new."""
        if msg.table not in TABLES:
            return self._unknown_table(conn, msg.table, msg.id)
        return self._duplicate_resend(conn, msg.pub, msg.id)

    def _row_count(self, conn: int, table: str, n: int, msg_id: int) -> Frames | None:
        """The Error for a message of no rows or of more than max_rows_per_message; None: fine."""
        if n == 0:
            err = wire.Error(reason=f"table {table}: no rows", id=msg_id, table=table)
            return [self._bad(conn, "bad_shape", err)]
        if n > self.cfg.max_rows_per_message:
            reason = (
                f"table {table}: {n} rows, more than max_rows_per_message={self.cfg.max_rows_per_message}"
            )
            return [self._bad(conn, "too_many_rows", wire.Error(reason=reason, id=msg_id, table=table))]
        return None

    def _upd(self, conn: int, msg: wire.Upd) -> Frames:
        """Validate and stamp rows; they are journaled and published at the next flush."""
        table = msg.table
        if (early := self._unknown_or_resent(conn, msg)) is not None:
            return early
        try:
            cols = wire.columns_decoder(table).decode(msg.cols)
        except msgspec.ValidationError as e:
            return [self._bad(conn, "bad_value", error_from_validation(e, table, msg.id))]
        except msgspec.DecodeError as e:
            return [
                self._bad(
                    conn,
                    "undecodable",
                    wire.Error(reason=f"table {table}: undecodable cols: {e}", id=msg.id, table=table),
                )
            ]
        columns: dict[str, list] = msgspec.structs.asdict(cols)  # the input columns, in order
        first, n = next((name, len(v)) for name, v in columns.items())
        for name, v in columns.items():
            if len(v) != n:
                reason = f"table {table}, field {name}: {len(v)} values but {first} has {n}"
                return [
                    self._bad(
                        conn, "bad_shape", wire.Error(reason=reason, id=msg.id, table=table, field=name)
                    )
                ]
        if (refused := self._row_count(conn, table, n, msg.id)) is not None:
            return refused
        if table == "fill" and (dup := self._duplicate_fill(conn, columns["exec_id"], msg.id)) is not None:
            return dup
        p = self.pending.get(table)
        if p is None:  # the first rows since the last flush: the decoded lists become the pending columns
            p = self.pending[table] = Pending(table, input_schema(table), columns)
        else:
            for name, v in columns.items():
                p.columns[name].extend(v)
        self._stamp(conn, p, n, msg.id, msg.pub, columns.get("exec_id") if table == "fill" else None)
        return []

    def _pending(self, table: str) -> Pending:
        p = self.pending.get(table)
        if p is None:
            schema = input_schema(table)
            p = self.pending[table] = Pending(table, schema, {c: [] for c in schema.names})
        return p

    def _stamp(
        self, conn: int, p: Pending, n: int, msg_id: int, pub: str = "", exec_ids: list[str] | None = None
    ) -> None:
        first = self.last_seq + 1
        p.stamps.append((self.now_ns(), first, n))
        self.last_seq += n
        p.rows += n
        self.messages += 1
        upto, _ = self.acks.get(conn, (0, 0))
        self.acks[conn] = (max(upto, msg_id), self.last_seq)
        if exec_ids is not None:
            for i, e in enumerate(exec_ids):
                self.exec_ids[e] = first + i
        if pub:
            mark = self._flush_marks.get(pub)
            if mark is None:
                mark = self._flush_marks[pub] = dedupe.Mark(pub, msg_id, first, self.last_seq)
            mark.id, mark.last_seq = msg_id, self.last_seq
            self.marks[pub] = dedupe.Mark(pub, msg_id, first, self.last_seq)

    def _upd_arrow(self, conn: int, msg: wire.UpdArrow) -> Frames:
        """The bulk form: an Arrow IPC stream of the table's input columns, checked column at a time
        against the same rules as `upd` (schemas.tables.column_rule)."""
        table = msg.table
        if (early := self._unknown_or_resent(conn, msg)) is not None:
            return early
        try:
            data = pa.ipc.open_stream(msg.ipc).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            err = wire.Error(reason=f"table {table}: undecodable Arrow IPC: {e}", id=msg.id, table=table)
            return [self._bad(conn, "undecodable", err)]
        checked = check_arrow(table, data, msg.id)
        if isinstance(checked, wire.Error):
            return [self._bad(conn, "bad_shape" if checked.row < 0 else "bad_value", checked)]
        if (refused := self._row_count(conn, table, checked.num_rows, msg.id)) is not None:
            return refused
        exec_ids = checked.column("exec_id").to_pylist() if table == "fill" else None
        if exec_ids is not None and (dup := self._duplicate_fill(conn, exec_ids, msg.id)) is not None:
            return dup
        p = self._pending(table)
        p.seal()
        p.chunks.append(checked)
        self._stamp(conn, p, checked.num_rows, msg.id, msg.pub, exec_ids)
        return []

    def _sub(self, conn: int, msg: wire.Sub, peer: str = "") -> Frames:
        unknown = [t for t in msg.tables if t not in TABLES]
        if unknown:
            err = wire.Error(
                reason=f"unknown tables {unknown}; tables are {', '.join(TABLES)}", field="tables"
            )
            return [self._bad(conn, "unknown_table", err)]
        tables = tuple(msg.tables) or tuple(TABLES)
        who = self.principals.get(conn)
        accounts = who.accounts if who is not None else None
        if accounts is not None and msg.tables and all(TABLES[t].key == "account" for t in tables):
            outside = sorted(set(msg.keys) - accounts)
            if outside:
                err = wire.Error(
                    reason=f"not permitted: accounts {', '.join(outside)} are not desk {who.desk!r}'s",
                    field="keys",
                )
                return [self._bad(conn, "unauthorized", err)]
        out = self._flush()  # everything before this point is journaled: the position is consistent
        self.subs[conn] = Subscription(tables, frozenset(msg.keys), peer, accounts=accounts)
        reply = wire.SubReply(
            tables=list(tables),
            keys=list(msg.keys),
            schemas={t: wire.serialize_schema(TABLES[t].arrow_schema) for t in tables},
            position=self.position(),
        )
        return out + [(conn, wire.encode(reply))]

    def position(self) -> wire.JournalPosition:
        return wire.JournalPosition(
            date=self.date,
            directory=str(self.root),
            files=self._paths(),
            last_seq=self.last_seq,
        )

    def _paths(self) -> dict[str, str]:
        """The day's journal file of each table."""
        return {t: str(journal.table_path(self.root, self.date, t)) for t in TABLES}

    def drop(self, conn: int) -> None:
        self.principals.pop(conn, None)
        self.subs.pop(conn, None)
        self.acks.pop(conn, None)

    # ---- journal and publish -------------------------------------------------------------------
    def flush(self) -> Out:
        """Journal every pending row (one record batch per table), then build the publish frames
        (each batch serialized once; one encoding per distinct subscription), then the acks: the
        subscribers' frames go out first, as they are what the latency is measured on. The publishers'
        marks of these rows are written first (write-ahead, tickerplant/dedupe.py)."""
        return self._out(self._flush())

    def _flush(self) -> Frames:
        if not self.pending:
            out = [(conn, wire.encode(wire.Ack(upto=i, seq=s))) for conn, (i, s) in self.acks.items()]
            self.acks = {}  # (acks of resends that were not journaled again)
            return out
        writes = self._writes
        if self._flush_marks:
            tables = {t: p.seqs[1] for t, p in self.pending.items()}
            for m in self._flush_marks.values():
                m.tables = tables
            writes.append(AppendMarks(list(self._flush_marks.values())))
            self._flush_marks = {}
        batches: list[wire.Batch] = []
        for table, p in self.pending.items():
            ipc = p.serialize()  # the journal's stream message and the publish payload: the same bytes
            writes.append(Append(table, ipc))
            self.rows[table] += p.rows
            self.journaled[table] += p.rows
            batches.append(wire.Batch(table, *p.seqs, ipc))
        self.pending = {}
        self.journaled_seq = self.last_seq
        out: Frames = []
        frames: dict[tuple, bytes | None] = {}
        for conn, sub in self.subs.items():
            key = (sub.tables, sub.keys, sub.accounts)
            if key not in frames:
                frames[key] = self._publish_frame(batches, sub)
            if frames[key] is not None:
                sub.sent_batches += 1
                out.append((conn, frames[key]))
        out += [(conn, wire.encode(wire.Ack(upto=i, seq=s))) for conn, (i, s) in self.acks.items()]
        self.acks = {}
        return out

    def _publish_frame(self, batches: list[wire.Batch], sub: Subscription) -> bytes | None:
        chosen: list[wire.Batch] = []
        for b in batches:
            if b.table not in sub.tables:
                continue
            key = TABLES[b.table].key
            wanted = sub.keys
            if sub.accounts is not None and key == "account":  # a desk's token: its accounts' rows only
                wanted = sub.accounts & sub.keys if sub.keys else sub.accounts
                if not wanted:
                    continue
            if wanted and key:
                rb = pa.ipc.read_record_batch(pa.py_buffer(b.ipc), stored_layout(b.table)[0])
                rb = rb.filter(pc.is_in(rb.column(key), pa.array(sorted(wanted))))
                if rb.num_rows == 0:
                    continue
                seq = rb.column("seq")
                b = wire.Batch(b.table, seq[0].as_py(), seq[-1].as_py(), rb.serialize().to_pybytes())
            chosen.append(b)
        return wire.encode(wire.Publish(batches=chosen)) if chosen else None

    def status(self) -> wire.Status:
        subs = []
        for cid, s in self.subs.items():
            depth, limit = self.queue_depth(cid)
            subs.append(
                wire.SubscriberStatus(
                    cid, s.peer, list(s.tables), sorted(s.keys), depth, limit, s.sent_batches
                )
            )
        return wire.Status(
            process="tickerplant",
            date=self.date,
            last_seq=self.last_seq,
            rows={t: self.rows[t] for t in TABLES},
            messages=self.messages,
            bad_messages=dict(self.bad),
            subscribers=subs,
            journal=self._paths(),
            journal_bytes=dict(self.journal_bytes()),
            uptime_s=self.monotonic() - self.started,
        )
