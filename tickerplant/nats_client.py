"""The Subscriber's NATS JetStream transport: the same events as tickerplant/client.py's Subscriber
(replayed batches, then `live`, then live batches and end_of_day; per-table seq high-water marks in
`applied`), read from the stream tickerplant/bus.py fills (subjects and headers: schemas/bus.py).

It asks the server only for the subjects it needs: a filter subject per table (`mf.<table>.*`) or per
table and key (`mf.fill.ACC1`; `keys` for every table as Subscriber's `keys`, `table_keys` per table),
plus the day markers. The stream holds the runs in seq order, so the consumer's order is already the
ordered merge across tables. The replay starts at the last day marker (the start of the tickerplant's
journal day; `start="all"` for the whole stream, or a stream sequence); everything the stream held when
the consumer was made is replayed, then `live`. The consumer is an ordered, ephemeral one (nats-py
recreates it from the last stream sequence it delivered when it misses heartbeats, e.g. its node
died); if the subscription itself fails, a new one starts after the last stream sequence delivered.
Rows at or below `applied[table]` are dropped, so a redelivery never applies a row twice. For the
tables in `coalesce`, consecutive messages of one table already received together (the consumer's
pending ones) are handed over as one batch (Arrow concat, at most MAX_JOINED messages; never across the
replay's end): a batch per run of one key costs a subscriber more than the rows in it. `widen` adds
keys while reading (a calc shard's fill bought an instrument): it returns the new subjects' messages so
far, and the subscription continues with a new consumer on the wider filter after the current message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import pyarrow as pa
from nats.js import api

from marginflow.config import BusConfig
from schemas import bus, wire
from schemas.tables import TABLES
from tickerplant import journal_reader
from tickerplant.bus import connect
from tickerplant.client import Event

log = logging.getLogger("marginflow.nats_client")
HEARTBEAT_S = 1.0  # the consumer's idle heartbeat: two missed and nats-py recreates it
MAX_JOINED = 512  # messages joined into one batch at most (`coalesce`)


def filter_subjects(
    tables: Sequence[str], keys: Collection[str] = (), table_keys: Mapping[str, Collection[str]] | None = None
) -> list[str]:
    """The consumer's filter subjects: the day markers, and each table's (or its keys')."""
    table_keys = table_keys or {}
    subjects = [bus.DAY_SUBJECT]
    for t in tables or TABLES:
        wanted = table_keys.get(t, keys)
        subjects += bus.table_subjects(t, frozenset(wanted) if wanted else None)
    return subjects


@dataclass
class NatsSubscriber:
    """Subscriber's interface over NATS JetStream (see the module docstring)."""

    cfg: BusConfig
    tables: Sequence[str] = ()
    keys: Sequence[str] = ()
    table_keys: Mapping[str, Collection[str]] = field(default_factory=dict)
    ordered: bool = True  # (always: the stream's order is seq order)
    reconnect: bool = True
    start: str | int = "day"  # "day": the last day marker; "all": the whole stream; int: a stream sequence
    applied: dict[str, int] = field(default_factory=dict)  # table -> last applied seq
    position: wire.JournalPosition | None = None  # (date and last seq the replay ran up to; no files)
    disconnects: list[str] = field(default_factory=list)
    stream_seq: int = 0  # the last stream sequence delivered
    bad: Counter[str] = field(default_factory=Counter)  # subject -> messages refused (not the bridge's)
    widened: int = 0  # times `widen` added subjects (each a new consumer)
    coalesce: Collection[str] = ()  # tables whose consecutive messages waiting together become one batch
    _nc: Any = field(default=None, repr=False)
    _first: int = 1  # the replay's first stream sequence
    _resubscribe: bool = False  # `widen` changed the subjects: a new consumer after the current message

    @property
    def subjects(self) -> list[str]:
        return filter_subjects(self.tables, self.keys, self.table_keys)

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

    async def _replay_upto(self, js: Any) -> int:
        """The stream sequence of the last message the stream holds on our subjects (0: none). (Asked
        per subject: a consumer's num_pending just after its creation was seen to be 0.)"""
        last = 0
        for subject in self.subjects:
            try:
                last = max(last, (await js.get_last_msg(self.cfg.stream, subject)).seq)
            except nats.js.errors.NotFoundError:
                pass
        return last

    async def events(self) -> AsyncIterator[Event]:
        self._nc = await connect(self.cfg, "marginflow-sub")
        try:
            js = self._nc.jetstream()
            first = self._first = await self._start_seq(js)
            replay_upto = await self._replay_upto(js)  # what the stream holds for us now: the replay
            is_live = replay_upto < first
            if is_live:
                yield self._live()
            next_seq = first
            while True:
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
                carry = None  # a message read ahead while joining, not yet handled
                try:
                    while True:
                        msg, carry = carry or await sub.next_msg(timeout=None), None
                        meta = msg.metadata
                        self.stream_seq = next_seq = meta.sequence.stream + 1
                        ev = self._decoded(msg, replayed=not is_live)
                        if ev is not None and ev.table in self.coalesce:  # join what is waiting behind it
                            parts = [ev.batch]
                            while sub.pending_msgs > 0 and len(parts) < MAX_JOINED:
                                if not is_live and meta.sequence.stream >= replay_upto:
                                    break  # (the rest are live: after the `live` event)
                                carry = await sub.next_msg(timeout=None)
                                if carry.subject.split(".", 2)[1] != ev.table:
                                    break
                                msg, carry, meta = carry, None, carry.metadata
                                self.stream_seq = next_seq = meta.sequence.stream + 1
                                more = self._decoded(msg, replayed=not is_live)
                                if more is not None:
                                    parts.append(more.batch)
                            if len(parts) > 1:
                                ev.batch = pa.concat_batches(parts)
                        if ev is not None:
                            ev.more = sub.pending_msgs > 0 or carry is not None
                            yield ev
                        # (num_pending: of the first consumer only; a widened one's was seen to be 0 at first)
                        pending = meta.num_pending == 0 and not self.widened
                        if not is_live and (pending or meta.sequence.stream >= replay_upto):
                            is_live = True
                            yield self._live()
                        if self._resubscribe:  # `widen` was called: the wider filter from the next message
                            self._resubscribe = False
                            if not is_live:
                                replay_upto = max(replay_upto, await self._replay_upto(js))
                            break  # (a message read ahead comes again from the new consumer)
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
                        await sub.unsubscribe()
                    except Exception:  # noqa: BLE001 - the old subscription may already be gone
                        pass
        finally:
            await self.close()

    async def widen(self, table_keys: Mapping[str, Collection[str]]) -> list[Event]:
        """Add keys to the filter while reading `events()` (a shard's fill added an instrument): returns
        the batches the stream holds on the new subjects from the replay's start up to the message just
        delivered (seq order; earlier than it, for the caller to apply first), and after that message
        the subscription goes on with the wider filter (a new consumer): no gap, no duplicate. Tables
        not subscribed yet are added. Keys already there are ignored."""
        has = lambda t: not self.tables or t in self.tables  # noqa: E731
        added: dict[str, set[str]] = {}
        for t, keys in table_keys.items():
            had = set(self.table_keys.get(t, self.keys)) if has(t) else set()
            if has(t) and not had:
                continue  # the whole table already
            if set(keys) - had:
                added[t] = set(keys) - had
                self.table_keys = {**self.table_keys, t: sorted(had | added[t])}
        if not added or self._nc is None:
            return []
        upto = self.stream_seq - 1  # the message just delivered
        subjects = [s for t, k in added.items() for s in bus.table_subjects(t, frozenset(k))]
        if self.tables:
            self.tables = [*self.tables, *(t for t in added if t not in self.tables)]
        self._resubscribe = True
        self.widened += 1
        js = self._nc.jetstream()
        last = 0
        for subject in subjects:
            try:
                last = max(last, (await js.get_last_msg(self.cfg.stream, subject)).seq)
            except nats.js.errors.NotFoundError:
                pass
        bound = min(last, upto)
        if bound < self._first:
            return []
        out: list[Event] = []
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
                    batch = pa.ipc.read_record_batch(pa.py_buffer(msg.data), TABLES[table].arrow_schema)
                    out.append(Event("batch", table, batch, replayed=True))
                except (KeyError, ValueError, pa.ArrowException) as e:  # not the bridge's message
                    self._bad_message(msg, e)
                if seq >= bound:
                    break
        finally:
            await sub.unsubscribe()
        return out

    def _decoded(self, msg: Any, replayed: bool) -> Event | None:
        try:
            return self._event(msg, replayed)
        except (KeyError, ValueError, pa.ArrowException) as e:  # not the bridge's message
            return self._bad_message(msg, e)

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

    def _event(self, msg: Any, replayed: bool) -> Event | None:
        headers = msg.headers or {}
        if msg.subject == bus.DAY_SUBJECT:
            ended = headers.get(bus.DATE, "")
            if replayed or not ended:
                return None
            return Event("end_of_day", date=ended, next_date=headers.get(bus.NEXT_DATE, ""))
        table = headers.get(bus.TABLE) or msg.subject.split(".")[1]
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        first, last = int(headers[bus.FIRST_SEQ]), int(headers[bus.LAST_SEQ])
        after = self.applied.get(table, 0)
        if last <= after:
            return None
        batch = pa.ipc.read_record_batch(pa.py_buffer(msg.data), TABLES[table].arrow_schema)
        if first <= after:
            batch = journal_reader.filter_batch(table, batch, after)
        self.applied[table] = last
        return Event("batch", table, batch, replayed=replayed)
