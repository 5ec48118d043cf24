"""The Subscriber's NATS JetStream transport: the same events as tickerplant/client.py's Subscriber
(replayed batches, then `live`, then live batches and end_of_day), read from the stream tickerplant/bus.py
fills (subjects and headers: schemas/bus.py).

It asks the server only for the subjects it needs: a filter subject per table (`mf.<table>.*`) or, for
the tables it wants some keys of (`keys` for every table as Subscriber's `keys`, `table_keys` per table),
per bucket of those keys (`mf.fill.17`), plus the day markers; the other keys' rows of its buckets are
dropped by key (counted in `foreign`). A batch's messages are consecutive on the stream; the ones of our
buckets are joined back into seq order (`Mf-Parts` says how many of them there are) and handed out as
the ordered merge across tables, as the websocket fan-out would. The replay starts at the last day marker
(the start of the tickerplant's journal day; `start="all"` for the whole stream, or a stream sequence);
everything the stream held when the consumer was made is replayed, then `live`. The consumer is an
ordered, ephemeral one (nats-py recreates it from the last stream sequence it delivered when it misses
heartbeats, e.g. its node died); if the subscription itself fails, a new one starts after the last
stream sequence delivered, and so it does when the consumer has gone quiet for two STALL_S while the
stream held a message for us the whole time (nats-py's recreation can fail without a word). The
duplicate check is per (table, bucket), `applied_buckets` (a bucket's rows arrive in seq order; across
buckets they do not): a redelivery never applies a row twice. For the tables
in `coalesce`, consecutive batches of one table already received (the consumer's pending messages) are
handed over as one (Arrow concat, at most MAX_JOINED; never across the replay's end, live too: the join
once stopped at the replay's end for good, and a live shard then applied and published every one-row fill
message alone). `widen` adds keys
while reading (a calc shard's fill bought an instrument): it returns the new keys' rows so far before the
fill's seq, joins the later ones into what is still to come, and the subscription continues with the
wider filter after the messages taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from nats.js import api

from marginflow.config import BusConfig
from schemas import bus, wire
from schemas.tables import TABLES
from tickerplant import journal_reader
from tickerplant.bus import check_buckets, connect
from tickerplant.client import Event

log = logging.getLogger("marginflow.nats_client")
_SCHEMAS = {t: spec.arrow_schema for t, spec in TABLES.items()}  # (the stored schemas, built once)
HEARTBEAT_S = 1.0  # the consumer's idle heartbeat: two missed and nats-py recreates it
MAX_JOINED = 512  # messages joined into one batch at most (`coalesce`)
STALL_S = 3 * HEARTBEAT_S  # silence after which the stream is asked whether it holds more for us


class Stalled(nats.errors.Error):
    """The consumer delivered nothing while the stream held a message on our subjects (resubscribe)."""


def filter_subjects(
    tables: Sequence[str],
    keys: Collection[str] = (),
    table_keys: Mapping[str, Collection[str]] | None = None,
    buckets: int = 64,
) -> list[str]:
    """The consumer's filter subjects: the day markers, and each table's (or its keys' buckets')."""
    table_keys = table_keys or {}
    subjects = [bus.DAY_SUBJECT]
    for t in tables or TABLES:
        wanted = table_keys.get(t, keys)
        subjects += bus.bucket_subjects(t, bus.key_buckets(wanted, buckets) if wanted else None, buckets)
    return subjects


@dataclass
class _Group:
    """The messages of one bus batch received so far (its rows per table), until all of ours are in."""

    batch: str
    parts: dict[str, int]
    replayed: bool
    expected: int
    rows: dict[str, list[pa.RecordBatch]] = field(default_factory=dict)
    got: int = 0
    last_stream_seq: int = 0


@dataclass
class NatsSubscriber:
    """Subscriber's interface over NATS JetStream (see the module docstring)."""

    cfg: BusConfig
    tables: Sequence[str] = ()
    keys: Sequence[str] = ()
    table_keys: Mapping[str, Collection[str]] = field(default_factory=dict)
    ordered: bool = True  # (always: batches are joined back into seq order)
    reconnect: bool = True
    start: str | int = "day"  # "day": the last day marker; "all": the whole stream; int: a stream sequence
    applied: dict[str, int] = field(default_factory=dict)  # table -> last applied seq
    applied_buckets: dict[tuple[str, int], int] = field(default_factory=dict)  # (table, bucket) -> last seq
    position: wire.JournalPosition | None = None  # (date and last seq the replay ran up to; no files)
    disconnects: list[str] = field(default_factory=list)
    stream_seq: int = 0  # the last stream sequence delivered
    bad: Counter[str] = field(default_factory=Counter)  # subject -> messages refused (not the bridge's)
    received: Counter[str] = field(default_factory=Counter)  # table -> rows the bus sent (our buckets')
    foreign: Counter[str] = field(default_factory=Counter)  # table -> of those, other keys' rows: dropped
    widened: int = 0  # times `widen` added keys
    coalesce: Collection[str] = ()  # tables whose consecutive batches waiting together become one batch
    _nc: Any = field(default=None, repr=False)
    _first: int = 1  # the replay's first stream sequence
    _resubscribe: bool = False  # `widen` changed the subjects: a new consumer after the current message
    _group: _Group | None = None
    _partial: tuple[str, dict[str, int], int] | None = None  # (batch, parts, got) of a group cut short
    _queue: deque[tuple[int, Event]] = field(default_factory=deque)  # (stream seq, event) ready to hand out
    _filters: dict[str, tuple[int, pa.Array | None]] = field(default_factory=dict)  # (`_filter`)
    _parts: dict[str, dict[str, int]] = field(default_factory=dict)  # Mf-Parts text -> parsed (a few kept)

    @property
    def subjects(self) -> list[str]:
        return filter_subjects(self.tables, self.keys, self.table_keys, self.cfg.buckets)

    def _keys_of(self, table: str) -> frozenset[str] | None:
        """The keys of `table` we want (None: every key)."""
        wanted = self.table_keys.get(table, self.keys)
        return frozenset(wanted) if wanted else None

    def _filter(self, table: str) -> tuple[int, pa.Array | None]:
        """(the bit mask of our buckets of `table`, 0 if not ours; our keys of it, None: every key),
        kept until `widen` changes them."""
        f = self._filters.get(table)
        if f is None:
            keys = self._keys_of(table)
            n = self.cfg.buckets
            if self.tables and table not in self.tables:
                f = (0, None)
            elif keys is None:
                f = ((1 << n) - 1, None)
            else:
                f = (bus.mask(bus.key_buckets(keys, n)), pa.array(sorted(keys), pa.string()))
            self._filters[table] = f
        return f

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _start_seq(self, js: Any) -> int:
        if isinstance(self.start, int):
            return self.start
        if self.start == "day":
            try:
                return (await js.get_last_msg(self.cfg.stream, bus.DAY_SUBJECT)).seq
            except nats.js.errors.NotFoundError:
                pass
        return 1

    async def _replay_upto(self, js: Any, subjects: Sequence[str] | None = None) -> int:
        """The stream sequence of the last message the stream holds on our subjects (0: none). (Asked
        per subject: a consumer's num_pending just after its creation was seen to be 0.)"""
        last = 0
        for subject in subjects or self.subjects:
            try:
                last = max(last, (await js.get_last_msg(self.cfg.stream, subject)).seq)
            except nats.js.errors.NotFoundError:
                pass
        return last

    async def _check_stream(self, js: Any) -> None:
        """Refuse a stream made with another bucket count than ours (ValueError)."""
        try:
            info = await js.stream_info(self.cfg.stream)
        except nats.js.errors.NotFoundError:
            return
        check_buckets(info.config.description, self.cfg)

    async def events(self) -> AsyncIterator[Event]:
        self._nc = await connect(self.cfg, "marginflow-sub")
        try:
            js = self._nc.jetstream()
            await self._check_stream(js)
            first = self._first = await self._start_seq(js)
            replay_upto = await self._replay_upto(js)  # what the stream holds for us now: the replay
            is_live = replay_upto < first
            if is_live:
                yield self._live()
            next_seq = first
            replay_end = False  # the replay's last message was taken: `live` once the queue is out
            while True:
                start = next_seq  # (the consumer delivers from here: the stall check's floor)
                sub = None
                try:  # (making the consumer fails too while the stream has no leader: retried as the rest)
                    sub = await js.subscribe(
                        bus.DAY_SUBJECT,
                        stream=self.cfg.stream,
                        ordered_consumer=True,
                        idle_heartbeat=HEARTBEAT_S,
                        config=api.ConsumerConfig(
                            filter_subjects=self.subjects,
                            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=next_seq,
                        ),
                    )
                    while True:
                        if not self._queue:
                            if replay_end and not is_live:
                                is_live = True
                                yield self._live()
                            msg = await self._next(sub, js, start)
                            replay_end |= self._take_one(msg, is_live, replay_upto)
                            next_seq = self.stream_seq
                            continue
                        _, ev = self._queue.popleft()
                        if ev.kind == "batch" and ev.table in self.coalesce:  # join what waits behind it
                            parts = [ev.batch]
                            while len(parts) < MAX_JOINED:
                                if not self._queue:  # (live: replay_end stays True; not past it)
                                    if sub.pending_msgs == 0 or (replay_end and not is_live):
                                        break
                                    msg = await self._next(sub, js, start)
                                    replay_end |= self._take_one(msg, is_live, replay_upto)
                                    next_seq = self.stream_seq
                                    continue
                                nxt = self._queue[0][1]
                                if (nxt.kind, nxt.table, nxt.replayed) != ("batch", ev.table, ev.replayed):
                                    break
                                parts.append(self._queue.popleft()[1].batch)
                            if len(parts) > 1:
                                ev.batch = pa.concat_batches(parts)
                        ev.more = bool(self._queue) or sub.pending_msgs > 0
                        yield ev
                        if self._resubscribe:  # `widen` changed the subjects: a new consumer from here
                            self._resubscribe = False
                            if not is_live:
                                replay_upto = max(replay_upto, await self._replay_upto(js))
                            break
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                    reason = f"{type(e).__name__}: {e}"
                    self.disconnects.append(reason)
                    log.warning(
                        "nats subscriber: %s; resubscribing after stream seq %d", reason, next_seq - 1
                    )
                    if not self.reconnect:
                        raise
                    await asyncio.sleep(0.2)
                finally:
                    try:
                        if sub is not None:
                            await sub.unsubscribe()
                    except Exception:  # noqa: BLE001 - the old subscription may already be gone
                        pass
        finally:
            await self.close()

    async def _next(self, sub: Any, js: Any, start: int) -> Any:
        """The consumer's next message. After STALL_S of silence, ask the stream what it holds on our
        subjects past the last message delivered (before any: from `start`, where the consumer began);
        if a message it held at the previous ask has still not come after another STALL_S, the consumer
        is stuck: Stalled (the caller resubscribes after what it took)."""
        behind = 0  # a stream seq on our subjects, not delivered, seen at the last ask (0: none)
        while True:
            try:
                return await sub.next_msg(timeout=STALL_S)
            except nats.errors.TimeoutError:
                if self._nc is None or self._nc.is_closed:
                    raise
            delivered = max(self.stream_seq, start) - 1
            if behind and behind > delivered:
                raise Stalled(f"nothing delivered in {2 * STALL_S:.0f} s; the stream holds seq {behind}")
            info = await js.stream_info(self.cfg.stream)
            held = await self._replay_upto(js) if info.state.last_seq > delivered else 0
            behind = held if held > delivered else 0

    # ---- messages -> groups -> events ----
    def _take_one(self, msg: Any, is_live: bool, replay_upto: int) -> bool:
        """Take a message from the consumer (`_take`); True if it ends the replay (then its batch is
        flushed: `live` once the queue is handed out)."""
        meta = msg.metadata
        self.stream_seq = meta.sequence.stream + 1
        self._take(msg, replayed=not is_live)
        # (num_pending: of the first consumer only; a widened one's was seen to be 0 at first)
        pending = meta.num_pending == 0 and not self.widened
        # (a batch open at the replay's end is completed first: its rows in seq order, then `live`)
        return not is_live and (pending or meta.sequence.stream >= replay_upto) and self._group is None

    def _take(self, msg: Any, replayed: bool) -> None:
        """One message from the consumer: a day marker (after the batch before it), or a bucket's rows
        added to its batch's group, which goes to the queue once all of our messages of it are in."""
        headers = msg.headers or {}
        seq = msg.metadata.sequence.stream
        if msg.subject == bus.DAY_SUBJECT:
            self._flush()
            ended = headers.get(bus.DATE, "")
            if not replayed and ended:
                ev = Event("end_of_day", date=ended, next_date=headers.get(bus.NEXT_DATE, ""))
                self._queue.append((seq, ev))
            return
        try:
            table, b, rows, batch_id, parts = self._rows(msg)
        except (KeyError, ValueError, pa.ArrowException) as e:  # not the bridge's message
            self._bad_message(msg, e)
            return
        g = self._group
        if g is not None and (g.batch, g.parts) != (batch_id, parts):  # (a resend's batch has other parts)
            self._flush()
            g = None
        if g is None:
            expected = sum((m & self._filter(t)[0]).bit_count() for t, m in parts.items())
            g = self._group = _Group(batch_id, parts, replayed, expected)
            if self._partial is not None and self._partial[:2] == (batch_id, parts):
                g.got = self._partial[2]  # the rest of a batch cut short (`widen`): its messages so far count
            self._partial = None
        g.got += 1
        g.last_stream_seq = seq
        if rows is not None:
            g.rows.setdefault(table, []).append(rows)
        if g.got >= g.expected:
            self._flush()

    def _rows(self, msg: Any) -> tuple[str, int, pa.RecordBatch | None, str, dict[str, int]]:
        """(table, bucket, the rows not applied yet of our keys or None, batch id, parts) of a message."""
        headers = msg.headers or {}
        table = headers[bus.TABLE]
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        b = bus.subject_bucket(msg.subject)
        first, top = int(headers[bus.FIRST_SEQ]), int(headers[bus.MAX_SEQ])
        batch_id, text = headers[bus.BATCH], headers[bus.PARTS]
        parts = self._parts.get(text)
        if parts is None:
            if len(self._parts) > 64:
                self._parts.clear()
            parts = self._parts[text] = bus.parse_parts(text)
        after = self.applied_buckets.get((table, b), 0)
        if top <= after:
            return table, b, None, batch_id, parts
        batch = pa.ipc.read_record_batch(pa.py_buffer(msg.data), _SCHEMAS[table])
        self.received[table] += batch.num_rows
        if first <= after:
            batch = journal_reader.filter_batch(table, batch, after)
        self.applied_buckets[(table, b)] = top
        self.applied[table] = max(self.applied.get(table, 0), top)
        return table, b, batch if batch.num_rows else None, batch_id, parts

    def _flush(self) -> None:
        """The open group's rows into the queue, in seq order across its tables and buckets."""
        g, self._group = self._group, None
        if g is not None and g.got < g.expected:
            self._partial = (g.batch, g.parts, g.got)
        if g is None or not g.rows:
            return
        rows = _sorted(g.rows)
        for table, (batch,) in rows.items():  # (our keys only: once per table of the batch)
            keys = self._filter(table)[1]
            if keys is not None:
                rows[table] = [journal_reader.filter_batch(table, batch, keys=keys)]
                self.foreign[table] += batch.num_rows - rows[table][0].num_rows
        for table, batch in journal_reader.merge_by_seq(rows):
            self._queue.append((g.last_stream_seq, Event("batch", table, batch, replayed=g.replayed)))

    async def widen(
        self,
        table_keys: Mapping[str, Collection[str]],
        cut: int | None = None,
        rest: tuple[str, pa.RecordBatch] | None = None,
    ) -> list[Event]:
        """Add keys while reading `events()` (a shard's fill added an instrument at seq `cut`): returns
        the new keys' rows the stream holds from the replay's start up to the messages taken so far with
        seq < `cut` (every one if None), in seq order, for the caller to apply first; their rows after
        `cut`, and `rest` (the rows of the event just handed out after the cut, for the caller not to
        apply), join the batches still to come in seq order. After the messages taken, the subscription
        goes on with the wider filter (a new consumer if the subjects changed): no gap, no duplicate.
        Tables not subscribed yet are added; keys already there are ignored."""
        has = lambda t: not self.tables or t in self.tables  # noqa: E731
        before = self.subjects
        added: dict[str, set[str]] = {}
        for t, keys in table_keys.items():
            had = set(self.table_keys.get(t, self.keys)) if has(t) else set()
            if has(t) and not had:
                continue  # the whole table already
            if set(keys) - had:
                added[t] = set(keys) - had
                self.table_keys = {**self.table_keys, t: sorted(had | added[t])}
        if self.tables:
            self.tables = [*self.tables, *(t for t in added if t not in self.tables)]
        self._filters.clear()
        late: list[tuple[int, str, pa.RecordBatch]] = []  # (stream seq, table, rows after the cut)
        if rest is not None and rest[1].num_rows:
            late.append((0, *rest))
        early: dict[str, list[pa.RecordBatch]] = {}
        if added and self._nc is not None:
            self._flush()  # (an open batch: the rest of it comes as a batch of its own)
            self._resubscribe = self.subjects != before
            self.widened += 1
            n = self.cfg.buckets
            subjects = sorted(
                {s for t, k in added.items() for s in bus.bucket_subjects(t, bus.key_buckets(k, n), n)}
            )
            for seq, table, rows in await self._read_back(subjects, self.stream_seq - 1, added):
                cut_at = rows.num_rows if cut is None else int(np.searchsorted(rows.column("seq"), cut))
                if cut_at:
                    early.setdefault(table, []).append(rows.slice(0, cut_at))
                if cut_at < rows.num_rows:
                    late.append((seq, table, rows.slice(cut_at)))
        if late:
            self._merge_into_queue(late)
        return [Event("batch", t, b, replayed=True) for t, b in journal_reader.merge_by_seq(_sorted(early))]

    async def _read_back(
        self, subjects: list[str], upto: int, keys: Mapping[str, Collection[str]]
    ) -> list[tuple[int, str, pa.RecordBatch]]:
        """The rows of `keys` in the stream's messages on `subjects` from the replay's start up to stream
        seq `upto`: (stream seq, table, rows)."""
        js = self._nc.jetstream()
        bound = min(await self._replay_upto(js, subjects), upto)
        if bound < self._first:
            return []
        out: list[tuple[int, str, pa.RecordBatch]] = []
        sub = await js.subscribe(
            subjects[0],
            stream=self.cfg.stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                filter_subjects=subjects,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._first,
            ),
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                seq = msg.metadata.sequence.stream
                if seq > upto:
                    break
                try:
                    table = (msg.headers or {})[bus.TABLE]
                    batch = pa.ipc.read_record_batch(pa.py_buffer(msg.data), _SCHEMAS[table])
                    batch = journal_reader.filter_batch(table, batch, keys=frozenset(keys.get(table, ())))
                    if batch.num_rows and table in keys:
                        out.append((seq, table, batch))
                except (KeyError, ValueError, pa.ArrowException) as e:  # not the bridge's message
                    self._bad_message(msg, e)
                if seq >= bound:
                    break
        finally:
            await sub.unsubscribe()
        return out

    def _merge_into_queue(self, late: list[tuple[int, str, pa.RecordBatch]]) -> None:
        """Rows (stream seq, table, batch) joined in seq order into the queue's batches, each before the
        first day marker that came after its message."""
        items = list(self._queue)
        self._queue.clear()
        segments: list[tuple[dict[str, list[pa.RecordBatch]], int, tuple[int, Event] | None]] = []
        rows: dict[str, list[pa.RecordBatch]] = {}
        last = 0
        for seq, ev in items:
            if ev.kind == "batch":
                rows.setdefault(ev.table, []).append(ev.batch)
                last = seq
            else:
                segments.append((rows, seq, (seq, ev)))
                rows = {}
        segments.append((rows, last, None))
        for seq, table, batch in late:
            target = next((r for r, end, marker in segments if marker is None or seq <= end), segments[-1][0])
            target.setdefault(table, []).append(batch)
        for rows, end, marker in segments:
            for table, batch in journal_reader.merge_by_seq(_sorted(rows)):
                self._queue.append((end, Event("batch", table, batch, replayed=True)))
            if marker is not None:
                self._queue.append(marker)

    def _bad_message(self, msg: Any, e: Exception) -> None:
        """A message on our subjects that is not a bridge's (a missing header, rows that do not
        decode): counted and skipped, nothing of it applied."""
        reason = f"header {e.args[0]} missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        self.bad[msg.subject] += 1
        log.error("nats subscriber: message %s on %s refused: %s", self.stream_seq, msg.subject, reason)
        return None

    def _live(self) -> Event:
        last = max(self.applied.values(), default=0)
        self.position = wire.JournalPosition(date="", directory="", files={}, last_seq=last)
        return Event("live")


def _sorted(rows: Mapping[str, list[pa.RecordBatch]]) -> dict[str, list[pa.RecordBatch]]:
    """Per table, its batches (each ascending in seq, from different buckets) as one in seq order."""
    out: dict[str, list[pa.RecordBatch]] = {}
    for table, batches in rows.items():
        if len(batches) == 1:
            out[table] = batches
            continue
        rb = pa.concat_batches(batches)
        order = pc.sort_indices(rb.column("seq"))
        out[table] = [rb.take(order)]
    return out
