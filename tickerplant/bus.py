"""The bridge from the tickerplant's journal to NATS JetStream (`[bus] kind = "nats"`), beside the
websocket fan-out; the wire format (subjects, headers, message ids) is schemas/bus.py.

The journal is the primary record and the bus a copy that may lag: the bridge is told every journal
write after it is done (`JournaledCore.on_written`), queues it, and a task of its own publishes it, so
journaling never waits for the bus. Each message is published with `Nats-Expected-Last-Sequence` (the
bridge is the stream's one writer): when one publish fails, the later ones in flight are refused too.
Only a message someone else put on mf.> can let one of them in after the failed one, out of seq order:
the resync finds and deletes those (`order_check`), so the stream holds the runs in seq order. (Not
`Nats-Expected-Last-Msg-Id`: in a cluster, a refused one there was seen to stop the stream on every
replica, "critical write error: last msgid mismatch".) Give only the tickerplant publish permission on
mf.>. Any failure (no ack within `ack_timeout_s`, the connection down, more than
`max_pending_batches` flushes queued) is counted and sends the bridge to resync: it reads the stream's
last messages (whose Mf-Last-Seq says how far the bus has the journal), reads the journal from there
and publishes what is missing, then goes live again. A resend of a message that did reach the stream
is dropped by its `Nats-Msg-Id` (the duplicate window), or refused by the expected sequence.

The plain functions (`run_messages`, `day_message`, `journal_messages`, `order_check`) build messages
from journal bytes and check the stream's last ones: no I/O.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors
import numpy as np
import pyarrow as pa
from nats.js import api

from marginflow import process
from marginflow.config import BusConfig
from schemas import bus
from schemas.tables import TABLES
from tickerplant import journal, journal_reader
from tickerplant.core import Append, Roll, Write

log = logging.getLogger("marginflow.bus")
MAX_IN_FLIGHT = 256  # publishes awaiting their ack before the bridge waits for the older half
RESUME_WINDOW = 4 * MAX_IN_FLIGHT  # the bridge's last messages a resync checks for seq order
RESEND_ROWS = 10_000  # rows of the journal a resync sends as one batch


class BusMessage(NamedTuple):
    subject: str
    payload: bytes
    headers: dict[str, str]
    last_seq: int  # every row with seq <= this is on the bus once this message is
    date: str


# ---- plain functions: messages from journal bytes ------------------------------------------------
def _buckets_of(values: list, n: int) -> np.ndarray:
    """The bucket of each key (`bus.bucket`, memoized there: keys repeat)."""
    return np.fromiter((bus.bucket(v, n) for v in values), dtype=np.int64, count=len(values))


def batch_messages(
    date: str, tables: dict[str, list[pa.RecordBatch]], n: int, whole: dict[int, bytes] | None = None
) -> list[BusMessage]:
    """One batch's rows (per table, batches ascending in seq; together seq first..last without a gap)
    -> a message per (table, bucket) with that bucket's rows in seq order, ordered by first seq; the
    last one carries Mf-Last-Seq. `whole` maps id(batch) -> its serialized bytes, reused for a table's
    single batch that is one bucket."""
    whole = whole or {}
    parts: list[tuple[int, int, str, int, bytes]] = []  # (first seq, last seq, table, bucket, ipc)
    masks: dict[str, int] = {}
    for table, batches in tables.items():
        batches = [b for b in batches if b.num_rows]
        if not batches:
            continue
        rb = batches[0] if len(batches) == 1 else pa.concat_batches(batches)
        of = _buckets_of(rb.column(TABLES[table].key).to_pylist(), n)
        seqs = rb.column("seq").to_numpy()
        if (of == of[0]).all():
            ipc = whole.get(id(rb)) or rb.serialize().to_pybytes()
            parts.append((int(seqs[0]), int(seqs[-1]), table, int(of[0]), ipc))
            masks[table] = 1 << int(of[0])
            continue
        order = np.argsort(of, kind="stable")  # (rows of one bucket together, in seq order)
        grouped, of, seqs = rb.take(pa.array(order)), of[order], seqs[order]
        starts = [0, *(np.flatnonzero(np.diff(of)) + 1).tolist(), len(of)]
        for lo, hi in itertools.pairwise(starts):
            b = int(of[lo])
            ipc = grouped.slice(lo, hi - lo).serialize().to_pybytes()
            parts.append((int(seqs[lo]), int(seqs[hi - 1]), table, b, ipc))
            masks[table] = masks.get(table, 0) | 1 << b
    if not parts:
        return []
    parts.sort()
    first, last = parts[0][0], max(p[1] for p in parts)
    shared = {bus.DATE: date, bus.BATCH: str(first), bus.PARTS: bus.parts_header(masks)}
    out = []
    for i, (lo, hi, table, b, ipc) in enumerate(parts):
        headers = {
            bus.MSG_ID: bus.msg_id(date, table, b, lo),
            bus.TABLE: table,
            **shared,
            bus.FIRST_SEQ: str(lo),
            bus.MAX_SEQ: str(hi),
            bus.INDEX: str(i),
        }
        end = i == len(parts) - 1
        if end:
            headers[bus.LAST_SEQ] = str(last)
        out.append(BusMessage(bus.subject(table, b), ipc, headers, last if end else 0, date))
    return out


def run_messages(date: str, appends: list[tuple[str, bytes]], n: int) -> list[BusMessage]:
    """The messages of one journal write's batches (table, ipc): `batch_messages` of `n` buckets."""
    decoded: dict[str, list[pa.RecordBatch]] = {}
    whole: dict[int, bytes] = {}
    for table, ipc in appends:
        rb = pa.ipc.read_record_batch(pa.py_buffer(ipc), TABLES[table].arrow_schema)
        whole[id(rb)] = ipc
        decoded.setdefault(table, []).append(rb)
    return batch_messages(date, decoded, n, whole)


def day_message(ended: str, starts: str, upto: int) -> BusMessage:
    """The marker at the start of journal day `starts` (`ended`: the day before, "" if none)."""
    headers = {
        bus.MSG_ID: bus.day_msg_id(starts),
        bus.DATE: ended,
        bus.NEXT_DATE: starts,
        bus.LAST_SEQ: str(upto),
    }
    return BusMessage(bus.DAY_SUBJECT, b"", headers, upto, starts)


def resume_point(headers: dict[str, str] | None) -> tuple[int, str]:
    """(the journal seq the bus has every row up to, the journal day it is in) from the stream's last
    message's headers; (0, "") for an empty stream."""
    if not headers:
        return 0, ""
    day = headers.get(bus.NEXT_DATE) or headers.get(bus.DATE, "")
    return int(headers.get(bus.LAST_SEQ, "0")), day


def hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    """The NATS protocol's HPUB command of a message: what nats-py's publish writes, without its checks
    per header key and value (the bridge's headers are its own: names and one-line values)."""
    hdr = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    size = f"{len(hdr)} {len(hdr) + len(payload)}"
    return f"HPUB {subject} {reply} {size}\r\n".encode() + hdr + payload + b"\r\n"


def ack_result(data: bytes, headers: dict[str, str] | None, stream: str) -> bool | Exception:
    """A publish's answer from the stream: False (stored), True (a duplicate: dropped), or the error
    (refused, or no stream on the subject). (Parsed as JSON only when it is not a plain ack.)"""
    if headers and headers.get("Status") == "503":
        return ConnectionError(f"no stream answers on {stream}'s subjects")
    if data.startswith(b'{"stream":') and b'"error"' not in data and b'"duplicate"' not in data:
        return False
    try:
        ack = json.loads(data)
    except ValueError as e:
        return ValueError(f"an ack that is not JSON: {e}")
    if "error" in ack:
        return RuntimeError(f"stream refused a publish: {ack['error'].get('description', ack)}")
    return bool(ack.get("duplicate"))


def own_message(headers: dict[str, str]) -> bool:
    """A message a bridge published (a message id, a journal date and a seq header)."""
    return bus.MSG_ID in headers and bus.DATE in headers and (bus.LAST_SEQ in headers or bus.BATCH in headers)


def order_check(own: list[tuple[int, dict[str, str]]]) -> tuple[tuple[int, str], list[int]]:
    """The bridge's last messages on the stream (stream seq, headers), oldest first, the oldest older
    than anything that was in flight: (how far the bus has every row, its day) and the stream seqs to
    delete: those after a gap (a later message stored after an earlier one failed) and those of a batch
    whose last message is not there (resent whole). The check starts at the first message that ends a
    batch (Mf-Last-Seq)."""
    start = next((i for i, (_, h) in enumerate(own) if bus.LAST_SEQ in h), None)
    if start is None:
        return resume_point(None), []
    upto, date = resume_point(own[start][1])
    bad: list[int] = []
    batch: list[int] = []  # the stream seqs of the batch being read (its last message not yet seen)
    for seq, headers in own[start + 1 :]:
        if bad:
            bad.append(seq)
            continue
        if bus.BATCH not in headers:  # a day marker: between batches, at the same seq
            in_order = not batch and int(headers[bus.LAST_SEQ]) == upto
        else:  # the batch after `upto`, its messages one after another
            in_order = int(headers[bus.BATCH]) == upto + 1 and int(headers[bus.INDEX]) == len(batch)
        if not in_order:
            bad += [*batch, seq]
            batch = []
        elif bus.LAST_SEQ in headers:
            upto, date = resume_point(headers)
            batch = []
        else:
            batch.append(seq)
    return (upto, date), bad + batch


def journal_messages(
    root: Path, start_date: str, bus_date: str, after: int, upto: int, n: int
) -> Iterator[BusMessage]:
    """What the bus lacks: the journal's rows after seq `after` up to `upto`, from `start_date` on,
    with a day marker before each day the bus is not in yet (`bus_date`: the day it is in); batches of
    about RESEND_ROWS rows, `n` buckets."""
    for date in journal.journal_dates(root):
        if date < start_date:
            continue
        if date != bus_date:
            yield day_message(bus_date, date, after)
            bus_date = date
        files = journal.day_files(root, date)
        pending: dict[str, list[pa.RecordBatch]] = {}
        rows = 0
        for table, batch in journal_reader.read_files(files, upto, {t: after for t in files}):
            pending.setdefault(table, []).append(batch)
            rows += batch.num_rows
            if rows >= RESEND_ROWS:
                yield from batch_messages(date, pending, n)
                pending, rows = {}, 0
        yield from batch_messages(date, pending, n)


# ---- the connection ------------------------------------------------------------------------------
def connect_options(cfg: BusConfig, name: str) -> dict[str, Any]:
    """nats.connect's keyword arguments for the [bus] section: servers, credentials, TLS."""
    opts: dict[str, Any] = {
        "servers": list(cfg.servers),
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": min(cfg.retry_interval_s, 2.0),
        "connect_timeout": 2,
        "allow_reconnect": True,
    }
    if cfg.credentials_env:
        token = os.environ.get(cfg.credentials_env)
        if not token:
            raise ValueError(f"bus.credentials_env: environment variable {cfg.credentials_env} is not set")
        opts["token"] = token
    if cfg.credentials_file:
        opts["user_credentials"] = cfg.credentials_file
    if cfg.tls_ca or cfg.tls_cert:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca or None)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        opts["tls"] = ctx
    return opts


async def connect(cfg: BusConfig, name: str) -> Any:
    """A NATS connection that reconnects by itself once made; the first connection fails (TimeoutError)
    unless made within connect_timeout per server (nats-py would retry it forever)."""

    async def error(e: Exception) -> None:
        log.debug("%s: nats: %s", name, e)

    async def disconnected() -> None:
        log.info("%s: disconnected from the bus", name)

    opts = connect_options(cfg, name)
    async with asyncio.timeout(opts["connect_timeout"] * len(cfg.servers) + 1):
        return await nats.connect(**opts, error_cb=error, disconnected_cb=disconnected)


async def ensure_stream(js: Any, cfg: BusConfig) -> None:
    """The stream on mf.> as configured (created if missing, its limits updated if changed); a stream
    made with another bucket count is refused (ValueError: the count is fixed per stream)."""
    want = api.StreamConfig(
        name=cfg.stream,
        subjects=[bus.ALL_SUBJECTS],
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window_s,
        max_age=cfg.max_age_s,
        storage=api.StorageType.FILE,
        description=bus.stream_description(cfg.buckets),
    )
    try:
        info = await js.stream_info(cfg.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(want)
        return
    have = info.config
    check_buckets(have.description, cfg)
    if (have.num_replicas, have.duplicate_window, have.max_age, have.description) != (
        want.num_replicas,
        want.duplicate_window,
        want.max_age,
        want.description,
    ):
        await js.update_stream(want)


def check_buckets(description: str | None, cfg: BusConfig) -> None:
    """Refuse a stream whose description names a bucket count other than `[bus] buckets`."""
    named = bus.described_buckets(description)
    if named is not None and named != cfg.buckets:
        raise ValueError(
            f"stream {cfg.stream} has {named} buckets, [bus] buckets = {cfg.buckets}: the count is fixed "
            "per stream (use another stream, or the stream's count)"
        )


# ---- the bridge ----------------------------------------------------------------------------------
@dataclass
class BridgeStats:
    published: int = 0  # messages acknowledged by the stream
    duplicates: int = 0  # acknowledged as duplicates (a resend the stream already had)
    failures: int = 0  # publishes or resyncs that failed (each sends the bridge to resync)
    resent: int = 0  # messages published from the journal by a resync
    overflows: int = 0  # times the queue was over max_pending_batches (then resent from the journal)
    deleted: int = 0  # messages a resync found out of seq order (after a failed publish) and deleted
    last_error: str = ""


@dataclass
class Bridge:
    """Publishes what the tickerplant journals to JetStream (see the module docstring). `journal_root`
    and `journaled_seq()` are the tickerplant's; `date` its journal date (kept by the Roll writes)."""

    cfg: BusConfig
    journal_root: Path
    journaled_seq: Callable[[], int]
    date: str = ""
    stats: BridgeStats = field(default_factory=BridgeStats)
    published_upto: int = 0  # every row with seq <= this is acknowledged by the stream
    live: bool = False  # caught up: new writes are queued (else the resync reads them from the journal)
    _queue: deque[tuple[str, Any]] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None
    _nc: Any = None
    _js: Any = None
    _stream_seq: int = 0  # the stream's last sequence as this bridge expects it
    _renamed: dict[str, str] = field(default_factory=dict)  # message id of a deleted message -> its resend's
    _inbox: str = ""  # the reply subjects of the acks: <inbox>.<token>
    _token: int = 0
    _chain_start: int = 0  # tokens up to this one are a failed chain's (ignored)
    _answers: dict[int, bool | Exception] = field(default_factory=dict)  # token -> duplicate, or refusal
    _answered: asyncio.Event = field(default_factory=asyncio.Event)
    _bus_date: str = ""  # the journal day the stream is in

    # ---- told by the tickerplant (synchronous, after the journal write) ----
    def on_written(self, writes: list[Write]) -> None:
        appends: list[tuple[str, bytes]] = []
        for w in writes:
            if type(w) is Append:
                appends.append((w.table, w.ipc))
            elif type(w) is Roll:
                self._offer("rows", (self.date, appends))
                appends = []
                self._offer("day", (self.date, w.date))
                self.date = w.date
        self._offer("rows", (self.date, appends))

    def _offer(self, kind: str, item: Any) -> None:
        if not self.live or (kind == "rows" and not item[1]):
            return
        if len(self._queue) >= self.cfg.max_pending_batches:
            self.stats.overflows += 1
            self._fail("more than max_pending_batches flushes queued for the bus")
            return
        self._queue.append((kind, item))
        self._wake.set()

    def _fail(self, reason: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = reason
        log.debug("bus: failure: %s", reason)
        if self.live:
            log.warning("bus: %s; resending from the journal once it is back", reason)
        self.live = False
        self._queue.clear()
        self._wake.set()

    # ---- the task ----
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 2.0) -> None:
        """Publish what is queued (at most `timeout` s), then close."""
        try:
            async with asyncio.timeout(timeout):
                while self.live and (self._queue or self.published_upto < self.journaled_seq()):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass
        await process.cancel_and_wait(self._task)
        if self._nc is not None:
            await self._nc.close()

    async def _run(self) -> None:
        while True:
            try:
                if self._nc is None:
                    self._nc = await connect(self.cfg, "marginflow-tp")
                    self._js = self._nc.jetstream(timeout=self.cfg.ack_timeout_s)
                    self._inbox = self._nc.new_inbox()
                    await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
                await self._resync()
                await self._publish_live()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure of the bus means: resync later
                self._fail(f"{type(e).__name__}: {e}")
                await asyncio.sleep(self.cfg.retry_interval_s)

    async def _resync(self) -> None:
        """Where the stream is; publish from the journal what it lacks; then live."""
        await ensure_stream(self._js, self.cfg)
        info = await self._js.stream_info(self.cfg.stream)
        self._stream_seq = info.state.last_seq
        self._chain_start = self._token  # (acks of a failed chain: never waited for again)
        self._answers.clear()
        upto, self._bus_date = await self._resume(info.state.first_seq)
        self.published_upto = upto
        while True:
            target = self.journaled_seq()
            if self.published_upto >= target and self._bus_date == self.date:
                self.live = True  # (no await since target was read: the next write is queued)
                self._queue.clear()
                log.info("bus: live on stream %s after seq %d", self.cfg.stream, self.published_upto)
                return
            start = self._bus_date or self.date
            pending = journal_messages(
                self.journal_root, start, self._bus_date, self.published_upto, target, self.cfg.buckets
            )
            before = (self.published_upto, self._bus_date)
            n = await self._publish(pending)
            self.stats.resent += n
            if n == 0 and before == (self.published_upto, self._bus_date) and self._bus_date == self.date:
                raise RuntimeError(f"the journal has no rows after seq {self.published_upto} up to {target}")
            if self._bus_date != self.date and self.published_upto >= target:
                await self._publish([day_message(self._bus_date, self.date, self.published_upto)])

    async def _resume(self, first_seq: int) -> tuple[int, str]:
        """How far the stream has the journal: the bridge's messages among the stream's last ones
        (anything else on mf.> skipped), checked by `order_check`; the ones out of order deleted."""
        own: list[tuple[int, dict[str, str]]] = []
        seq = self._stream_seq
        while seq >= max(first_seq, 1) and len(own) < RESUME_WINDOW:
            try:
                msg = await self._js.get_msg(self.cfg.stream, seq)
            except nats.js.errors.NotFoundError:  # (deleted)
                msg = None
            headers = dict(msg.headers or {}) if msg is not None else {}
            if own_message(headers):
                own.append((seq, headers))
            seq -= 1
        own.reverse()
        (upto, date), bad = order_check(own)
        headers_of = dict(own)
        for seq in bad:
            log.warning("bus: stream seq %d is out of seq order (after a failed publish): deleted", seq)
            await self._js.delete_msg(self.cfg.stream, seq)
            self.stats.deleted += 1
            self._renamed[headers_of[seq][bus.MSG_ID]] = f"{headers_of[seq][bus.MSG_ID]}:after-{seq}"
        return upto, date

    async def _publish_live(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
                if not self.live:
                    raise ConnectionError(self.stats.last_error or "bus failed")
            await self._publish(self._drain())  # everything queued, pipelined (one wait for the acks)
            if not self.live:
                raise ConnectionError(self.stats.last_error or "bus failed")

    def _drain(self) -> Iterator[BusMessage]:
        """The queued writes' messages, taken from the queue as they are published."""
        upto = self.published_upto
        while self._queue and self.live:
            kind, item = self._queue.popleft()
            if kind == "rows":
                for m in run_messages(*item, self.cfg.buckets):
                    upto = max(upto, m.last_seq)
                    yield m
            else:
                yield day_message(item[0], item[1], upto)

    async def _publish(self, messages: Iterable[BusMessage]) -> int:
        """Publish in order, pipelined (up to MAX_IN_FLIGHT unacknowledged: past that it waits for the
        older half, so the writes go out together); each expects the stream's previous sequence; the
        acks are waited for before it returns (published_upto then covers them). Raises on any failure.
        (Every message asks for its ack: with some not asking, a foreign message on mf.> could take the
        place of a refused one of ours and the chain of expected sequences go on past it.)"""
        in_flight: deque[tuple[int, BusMessage]] = deque()  # (ack token, message)
        n = 0
        for m in messages:
            headers = {**m.headers, bus.EXPECTED_LAST_SEQ: str(self._stream_seq)}
            if m.headers[bus.MSG_ID] in self._renamed:  # its id is a deleted message's (duplicate window)
                headers[bus.MSG_ID] = self._renamed[m.headers[bus.MSG_ID]]
            in_flight.append((await self._send(m.subject, m.payload, headers), m))
            self._stream_seq += 1
            n += 1
            if len(in_flight) > MAX_IN_FLIGHT:
                while len(in_flight) > MAX_IN_FLIGHT // 2:
                    await self._acked(*in_flight.popleft())
        while in_flight:
            await self._acked(*in_flight.popleft())
        return n

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        """Publish with a reply subject of our own, <inbox>.<token>; the stream's answer lands in
        `_answers[token]` (nats-py's publish_async loses every later ack once the stream answers one
        with an error, and makes a future per message)."""
        self._token += 1
        await self._write(subject, f"{self._inbox}.{self._token}", payload, headers)
        return self._token

    async def _write(self, subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> None:
        """nats-py's publish, cheaper: the command built by `hpub`, queued for nats-py's flusher task
        (which writes everything queued at once when this task next waits). While nats-py reconnects,
        or for a message over the server's max_payload, its own publish (buffering, or the error)."""
        nc = self._nc
        send = getattr(nc, "_send_command", None)
        if send is None or not nc.is_connected or len(payload) > nc.max_payload - 1024:
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        await send(hpub(subject, reply, headers, payload))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def _on_ack(self, msg: Any) -> None:
        token = int(msg.subject.rsplit(".", 1)[-1])
        if token <= self._chain_start:  # (an ack of a failed chain's: never waited for)
            return
        self._answers[token] = ack_result(msg.data, msg.headers, self.cfg.stream)
        self._answered.set()

    async def _acked(self, token: int, m: BusMessage) -> None:
        """The ack of `m` (published with `token`): raises the stream's refusal, or on no ack in time."""
        answer = self._answers.pop(token, None)
        if answer is None:
            try:
                async with asyncio.timeout(self.cfg.ack_timeout_s):
                    while (answer := self._answers.pop(token, None)) is None:
                        self._answered.clear()
                        await self._answered.wait()
            except TimeoutError:
                raise TimeoutError(f"no ack from the stream within {self.cfg.ack_timeout_s} s") from None
        if isinstance(answer, Exception):
            raise answer
        if answer:  # (a duplicate)
            self.stats.duplicates += 1
            self._stream_seq -= 1  # the stream did not grow (the next publishes are refused: resync)
        else:
            self.stats.published += 1
        self.published_upto = max(self.published_upto, m.last_seq)
        self._bus_date = m.date
