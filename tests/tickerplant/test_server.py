"""Tickerplant: gap-free subscribe mid-stream, crash recovery, bad input, slow subscribers, end of day."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.protocol import State

from marginflow import auth, config
from schemas import wire
from schemas.tables import TABLES
from tests.support.rows import quotes, trades
from tests.support.servers import ROOT, TpProcess, running_tp
from tests.support.tokens import local_token, with_token
from tickerplant import journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher, Subscriber
from tickerplant.core import SMALL_BATCH, Subscription, stored_layout
from tickerplant.journal_writer import JournaledCore
from tickerplant.server import Peer, TickerplantServer


def journal_table(root, date, table) -> pa.Table:
    return reader.read_table(root, date, table)


async def collect(sub: Subscriber, into: list):
    async for ev in sub.events():
        if ev.kind == "batch":
            into.append((ev.table, ev.batch))


def test_subscribe_mid_stream_equals_journal(tmp_path, run):
    """A subscriber joining under load gets exactly the journal's rows: no gap, no duplicate."""

    async def body():
        async with running_tp(tmp_path, publish_interval_ms=1) as (srv, url):
            got: list = []
            sub = Subscriber(url, reconnect=False)
            async with Publisher(url) as pub:
                task = None
                for i in range(400):
                    await pub.upd_many([("trade", trades(5, i * 5)), ("quote", quotes(3, i * 3))])
                    if i == 150:  # join in the middle of the stream
                        task = asyncio.create_task(collect(sub, got))
                    if i % 20 == 0:
                        await asyncio.sleep(0.002)
                last = await pub.wait_acked()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sum(b.num_rows for _, b in got) >= last:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            date = srv.core.date
            assert last == 400 * 8
            assert (
                sub.position is not None and 0 < sub.position.last_seq < last
            )  # it really joined mid-stream
            for table in ("trade", "quote"):
                mine = pa.Table.from_batches([b for t, b in got if t == table])
                assert mine.equals(journal_table(tmp_path, date, table))
            seqs = [s for _, b in got for s in b.column("seq").to_pylist()]
            assert seqs == list(range(1, last + 1))  # merged in seq order, no gap, no duplicate

    run(body())


@pytest.mark.slow
def test_sigkill_restart_keeps_acked_rows_and_continues_seq(tmp_path):
    tp = TpProcess(tmp_path)
    acked_seq = 0
    try:

        async def publish_until_killed():
            nonlocal acked_seq
            async with Publisher(tp.url) as pub:
                for i in range(2000):
                    await pub.upd("trade", trades(10, i * 10))
                    if i % 50 == 0:
                        acked_seq = await pub.wait_acked()
                    if i == 1200:
                        acked_seq = await pub.wait_acked()
                        tp.kill(9)  # mid-stream
                        break
                try:
                    for i in range(50):  # keep sending into the dead socket: nothing of it is acked
                        await pub.upd("trade", trades(10, i))
                except (websockets.ConnectionClosed, ConnectionError):
                    pass

        asyncio.run(publish_until_killed())
        date = journal.journal_dates(tmp_path)[-1]
        tp = TpProcess(tmp_path)  # restart on the same journal

        async def after_restart():
            async with Publisher(tp.url) as pub:
                await pub.upd("trade", trades(1))
                return await pub.wait_acked()

        new_seq = asyncio.run(after_restart())
    finally:
        tp.stop()
    table = journal_table(tmp_path, date, "trade")
    seqs = table.column("seq").to_pylist()
    assert acked_seq >= 12000
    assert seqs[:acked_seq] == list(range(1, acked_seq + 1))  # everything acknowledged survived, in order
    assert new_seq == seqs[-1]  # the restarted tickerplant continued seq after the last journaled row
    assert seqs[-2] == new_seq - 1
    assert len(seqs) == len(set(seqs))


def test_truncation_at_random_offsets_keeps_every_complete_message(tmp_path):
    import random

    from schemas.tables import TABLES

    schema = TABLES["trade"].arrow_schema
    path = tmp_path / "trade.arrows"
    jf = journal.JournalFile(path, schema)
    boundaries = [jf.bytes]  # bytes after the schema message, then after each batch
    rows_per_batch = []
    seq = 0
    for i in range(25):
        n = 1 + i % 7
        batch = pa.record_batch(
            [
                pa.array([0] * n, pa.timestamp("ns")),
                pa.array(range(seq + 1, seq + n + 1), pa.int64()),
                pa.array(["A"] * n),
                pa.array([1.5] * n),
                pa.array([1] * n, pa.int64()),
            ],
            schema=schema,
        )
        seq += n
        jf.append(batch.serialize())
        boundaries.append(jf.bytes)
        rows_per_batch.append(n)
    jf.close(end_of_stream=False)
    full = path.read_bytes()
    rng = random.Random(11)
    offsets = sorted(
        set(rng.randrange(boundaries[0], len(full)) for _ in range(60)) | {boundaries[3] + 1, boundaries[5]}
    )
    for cut in offsets:
        path.write_bytes(full[:cut])
        complete = sum(1 for b in boundaries[1:] if b <= cut)
        s = journal.scan(path)
        assert s.batches == complete and s.rows == sum(rows_per_batch[:complete])
        assert s.valid_bytes == boundaries[complete]
        assert s.torn == (cut != boundaries[complete])
        for side in tmp_path.glob("trade.arrows.torn-*"):
            side.unlink()
        r = journal.repair(path)
        assert path.stat().st_size == boundaries[complete] and r.batches == complete and not r.torn
        assert ("bytes cut, kept in trade.arrows.torn-" in r.repaired) == (cut != boundaries[complete])
        if cut != boundaries[complete]:
            (side,) = tmp_path.glob("trade.arrows.torn-*")
            assert side.read_bytes() == full[boundaries[complete] : cut]
        table = pa.ipc.open_stream(path.read_bytes()).read_all()  # any Arrow reader accepts it again
        assert table.num_rows == sum(rows_per_batch[:complete])


def test_journal_is_plain_arrow_for_pyarrow_polars_duckdb(tmp_path, run):
    import duckdb

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with Publisher(url) as pub:
                for i in range(10):
                    await pub.upd("trade", trades(7, i * 7))
                await pub.wait_acked()
            return srv.core.date

    date = run(body())
    path = journal.table_path(tmp_path, date, "trade")
    t = pa.ipc.open_stream(path.read_bytes()).read_all()
    df = pl.read_ipc_stream(path)
    con = duckdb.connect()
    n, total = con.execute("select count(*), sum(size) from t").fetchone()
    assert t.num_rows == df.height == n == 70
    assert total == sum(trades(70)["size"]) == df["size"].sum()
    assert t.column("seq").to_pylist() == list(range(1, 71))


@pytest.mark.parametrize(
    "table,cols,field,kind",
    [
        ("nosuch", {"sym": ["A"]}, "table", "unknown_table"),
        ("trade", {"sym": ["A"], "price": [1.0]}, "size", "bad_value"),  # missing column
        ("trade", {"sym": ["A"], "price": [1.0], "size": [1], "venue": ["X"]}, "venue", "bad_value"),  # extra
        ("trade", {"sym": ["A"], "price": ["1.0"], "size": [1]}, "price", "bad_value"),  # mistyped
        ("trade", {"sym": ["A", "B"], "price": [1.0, float("nan")], "size": [1, 1]}, "price", "bad_value"),
        ("trade", {"sym": ["A"], "price": [float("inf")], "size": [1]}, "price", "bad_value"),
        ("trade", {"sym": ["A"], "price": [1.0], "size": [0]}, "size", "bad_value"),
        (
            "fill",
            {
                "account": ["X"],
                "sym": ["A"],
                "side": ["B"],
                "qty": [-5.0],
                "price": [1.0],
                "order_id": ["o"],
                "exec_id": ["e"],
            },
            "qty",
            "bad_value",
        ),
        (
            "fill",
            {
                "account": ["X"],
                "sym": ["A"],
                "side": ["SELL"],
                "qty": [5.0],
                "price": [1.0],
                "order_id": ["o"],
                "exec_id": ["e"],
            },
            "side",
            "bad_value",
        ),
        ("trade", {"sym": ["A", "B"], "price": [1.0], "size": [1, 1]}, "price", "bad_shape"),
        (
            "quote",
            {"sym": [""], "bid": [1.0], "ask": [1.1], "bid_size": [1], "ask_size": [1]},
            "sym",
            "bad_value",
        ),
    ],
)
def test_bad_input_named_counted_never_journaled(tmp_path, run, table, cols, field, kind):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with Publisher(url) as pub:
                await pub.upd(table, cols)
                await pub.upd("trade", trades(2))  # the same connection stays usable
                await pub.wait_acked()
                status = await pub.status()
            return srv.core.date, pub.errors, status

    date, errors, status = run(body())
    assert len(errors) == 1
    e = errors[0]
    assert e.id == 1 and e.field == field and table in e.reason and field in e.reason
    if kind == "bad_value" and len(cols.get("sym", [])) == 2:
        assert e.row == 1  # the row is named
    assert status.bad_messages == {kind: 1}
    assert journal_table(tmp_path, date, "trade").num_rows == 2
    assert sum(status.rows.values()) == 2


def test_undecodable_and_unknown_message_kinds(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with Publisher(url) as pub:
                await pub.send_raw(b"\xc1\x00garbage")
                await pub.send_raw(msgspec.msgpack.encode({"type": "launch", "x": 1}))
                await pub.send_raw(
                    msgspec.msgpack.encode(
                        [
                            {
                                "type": "upd",
                                "table": "trade",
                                "id": 7,
                                "cols": {"sym": ["A"], "price": [2.0], "size": [3]},
                            },
                            {"type": "upd", "table": "trade"},
                        ]
                    )
                )
                await asyncio.sleep(0.1)
                await pub.upd("trade", trades(1))
                await pub.wait_acked()
                return srv.core.date, pub.errors, dict(srv.core.bad)

    date, errors, bad = run(body())
    reasons = [e.reason for e in errors]
    assert any("undecodable" in r for r in reasons)
    assert any("unknown message type 'launch'" in r for r in reasons)
    assert any("cols" in r for r in reasons)  # the incomplete upd in the list is refused on its own
    assert bad == {"undecodable": 1, "bad_message": 2}
    assert (
        journal_table(tmp_path, date, "trade").num_rows == 2
    )  # the good upd in the mixed frame, then the last


def test_oversized_message_is_refused_and_counted(tmp_path, run):
    async def body():
        async with running_tp(tmp_path, max_message_bytes=4096) as (srv, url):
            async with connect(url, max_size=None, **with_token("publisher")) as ws:
                big = wire.encode(wire.Upd(table="trade", cols=msgspec.Raw(wire.encode(trades(2000))), id=1))
                await ws.send(big)
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await ws.recv()
                assert info.value.rcvd.code == 1009
            async with Publisher(url) as pub:  # other connections are unaffected
                await pub.upd("trade", trades(3))
                await pub.wait_acked()
                return srv.core.date, dict(srv.core.bad)

    date, bad = run(body())
    assert bad == {"oversized": 1}
    assert journal_table(tmp_path, date, "trade").num_rows == 3


def test_too_many_rows_refused(tmp_path, run):
    async def body():
        async with running_tp(tmp_path, max_rows_per_message=100) as (srv, url):
            async with Publisher(url) as pub:
                await pub.upd("trade", trades(101))
                await pub.upd("trade", trades(100))
                await pub.wait_acked()
                return pub.errors, srv.core.rows["trade"]

    errors, rows = run(body())
    assert len(errors) == 1 and "max_rows_per_message=100" in errors[0].reason and rows == 100


def test_never_reading_subscriber_does_not_slow_others(tmp_path, run):
    """Throughput of a healthy subscriber with a stuck one beside it stays above half of its
    throughput alone; the stuck one is disconnected with a reason once its queue is full."""

    async def measure(srv, url, with_stuck: bool) -> tuple[float, int | None]:
        stuck = None
        if with_stuck:
            stuck = await connect(url, max_size=None, max_queue=1, **with_token("subscriber"))
            await stuck.send(wire.encode(wire.Sub()))
            stuck.transport.pause_reading()  # never reads another byte
        sub = Subscriber(url, tables=["trade"], reconnect=False)
        rows = 0
        target = 60000
        done = asyncio.Event()

        async def consume():
            nonlocal rows
            async for ev in sub.events():
                if ev.kind == "batch" and not ev.replayed:
                    rows += ev.batch.num_rows
                    if rows >= target:
                        done.set()
                        return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        async with Publisher(url) as pub:
            for i in range(target // 100):
                await pub.upd("trade", trades(100, i))
                if i % 20 == 0:
                    await pub.wait_acked()
            await pub.wait_acked()
        await asyncio.wait_for(done.wait(), 30)
        elapsed = time.perf_counter() - start
        task.cancel()
        code = None
        if stuck is not None:
            async with Publisher(url) as pub:  # keep going until the kernel buffers and its queue are full
                me = "{}:{}".format(*stuck.local_address[:2])
                for i in range(3000):
                    if all(sub.peer != me for sub in srv.core.subs.values()):
                        break
                    await pub.upd("trade", trades(1000, i))
                    if i % 10 == 0:
                        await pub.wait_acked()
            assert all(sub.peer != me for sub in srv.core.subs.values()), "the stuck subscriber stayed"
            stuck.transport.resume_reading()
            try:
                while True:
                    await asyncio.wait_for(stuck.recv(), 5)
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
            except TimeoutError:
                code = -1
        return target / elapsed, code

    async def body():
        async with running_tp(tmp_path, subscriber_queue_frames=64, publish_interval_ms=1) as (srv, url):
            alone, _ = await measure(srv, url, False)
            beside, code = await measure(srv, url, True)
            return alone, beside, code

    alone, beside, code = run(body())
    assert beside >= alone / 2, (alone, beside)
    assert code == 4001  # disconnected as a slow consumer


def test_end_of_day_rolls_files_and_tells_subscribers(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            events = []
            sub = Subscriber(url, tables=["trade"], reconnect=False)

            async def consume():
                async for ev in sub.events():
                    events.append(ev)

            task = asyncio.create_task(consume())
            async with Publisher(url, token=local_token("admin")) as pub:
                await pub.upd("trade", trades(5))
                await pub.wait_acked()
                day1 = srv.core.date
                await pub.send_raw(wire.encode(wire.EndOfDayRequest()))
                await asyncio.sleep(0.1)
                await pub.upd("trade", trades(4))
                seq = await pub.wait_acked()
            await asyncio.sleep(0.2)
            task.cancel()
            return day1, srv.core.date, events, seq

    day1, day2, events, seq = run(body())
    assert day2 > day1
    kinds = [e.kind for e in events]
    assert "end_of_day" in kinds
    eod = next(e for e in events if e.kind == "end_of_day")
    assert eod.date == day1 and eod.next_date == day2
    s1 = journal.scan(journal.table_path(tmp_path, day1, "trade"))
    assert s1.closed and s1.rows == 5
    s2 = journal.scan(journal.table_path(tmp_path, day2, "trade"))
    assert s2.rows == 4 and s2.first_seq == 6 and seq == 9  # seq continues across the day


async def start_publish_stop(journal_dir, n: int) -> tuple[int, str]:
    """Start a tickerplant on `journal_dir`, publish n trades, stop it: (last seq acked, its date)."""
    async with running_tp(journal_dir) as (srv, url):
        async with Publisher(url) as pub:
            await pub.upd("trade", trades(n))
            return await pub.wait_acked(), srv.core.date


def test_restart_after_clean_stop_continues_the_same_stream(tmp_path, run):
    def once(n):
        return start_publish_stop(tmp_path, n)

    s1, date = run(once(3))
    s2, _ = run(once(2))
    assert (s1, s2) == (3, 5)
    t = pa.ipc.open_stream(journal.table_path(tmp_path, date, "trade").read_bytes()).read_all()
    assert t.column("seq").to_pylist() == [1, 2, 3, 4, 5]


def test_restart_on_a_torn_journal_says_what_it_cut(tmp_path, run, caplog):
    """A start after a crash mid-write cuts the torn tail and says so once, naming the file and the side
    file that keeps the cut bytes (the warning used to test the scan taken after the cut: never shown)."""

    def once(n):
        return start_publish_stop(tmp_path, n)

    _, date = run(once(3))
    path = journal.table_path(tmp_path, date, "trade")
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00\x00\x00half a message")
    with caplog.at_level(logging.WARNING, logger="marginflow.tp"):
        last, _ = run(once(1))
    cut = [r.getMessage() for r in caplog.records if "bytes cut" in r.getMessage()]
    assert len(cut) == 1 and str(path) in cut[0] and "trade.arrows.torn-" in cut[0], caplog.text
    assert last == 4  # the stream continued after the 3 whole rows
    (side,) = path.parent.glob("trade.arrows.torn-*")
    assert side.read_bytes().endswith(b"half a message") and path.stat().st_size > whole


def test_key_filtered_subscription(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            got = []
            sub = Subscriber(url, tables=["trade"], keys=["IBM"], reconnect=False)
            async with Publisher(url) as pub:
                await pub.upd("trade", trades(8))
                await pub.wait_acked()
                task = asyncio.create_task(collect(sub, got))
                await asyncio.sleep(0.1)
                await pub.upd("trade", trades(8, 8))
                await pub.wait_acked()
            await asyncio.sleep(0.2)
            task.cancel()
            return pa.Table.from_batches([b for _, b in got])

    t = run(body())
    expected = [s for s in trades(16)["sym"] if s == "IBM"]
    assert t.column("sym").to_pylist() == expected and len(expected) == 4
    assert pc.all(pc.equal(t.column("sym"), "IBM")).as_py()


def test_arrow_bulk_upd_is_checked_by_the_same_rules_and_keeps_arrival_order(tmp_path, run):
    good = pa.table(trades(50, 1000))

    def variant(**cols):
        d = {**trades(3), **cols}
        return pa.table({k: v for k, v in d.items() if v is not None})

    cases = [
        (variant(price=[1.0, float("nan"), 2.0]), "price", 1),
        (variant(price=[1.0, float("inf"), 2.0]), "price", 1),
        (variant(size=[1, 0, 2]), "size", 1),
        (variant(sym=["A", "", "B"]), "sym", 1),
        (variant(price=None), "price", -1),  # missing column
        (variant(venue=["x", "y", "z"]), "venue", -1),  # extra column
        (variant(price=["1", "2", "3"]), "price", -1),  # mistyped (no silent string parsing)
        (pa.table({**trades(3), "price": pa.array([1.0, None, 2.0])}), "price", 1),  # null
    ]

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with Publisher(url) as pub:
                await pub.upd("trade", trades(2))  # list form, then Arrow, then list: one seq order
                await pub.upd_arrow("trade", good)
                await pub.upd("trade", trades(2, 7))
                for data, _, _ in cases:
                    await pub.upd_arrow("trade", data)
                await pub.send_raw(wire.encode(wire.UpdArrow(table="trade", ipc=b"not arrow", id=99)))
                fills = pa.table(
                    {
                        "account": ["X"],
                        "sym": ["A"],
                        "side": ["Q"],
                        "qty": [1.0],
                        "price": [1.0],
                        "order_id": ["o"],
                        "exec_id": ["e"],
                    }
                )
                await pub.upd_arrow("fill", fills)
                await pub.upd("trade", trades(1))
                await pub.wait_acked()
                return srv.core.date, pub.errors

    date, errors = run(body())
    t = journal_table(tmp_path, date, "trade")
    assert t.column("seq").to_pylist() == list(range(1, 56))
    expected = [
        *trades(2)["price"],
        *good.column("price").to_pylist(),
        *trades(2, 7)["price"],
        *trades(1)["price"],
    ]
    assert t.column("price").to_pylist() == expected
    by_field = [(e.field, e.row) for e in errors]
    assert by_field[: len(cases)] == [(f, r) for _, f, r in cases]
    assert "undecodable Arrow IPC" in errors[len(cases)].reason
    assert errors[-1].field == "side" and "must be one of ['B', 'S']" in errors[-1].reason


_VALUES = {  # hypothesis strategies for the values of each Arrow type a table uses
    pa.string(): st.text(max_size=40),
    pa.float64(): st.floats(allow_nan=False) | st.integers(-(2**53), 2**53),
    pa.int64(): st.integers(-(2**63), 2**63 - 1),
    pa.timestamp("ns"): st.integers(0, 2**63 - 1),
}


@st.composite
def table_rows(draw) -> tuple[pa.Schema, list[list]]:
    schema = TABLES[draw(st.sampled_from(sorted(TABLES)))].arrow_schema
    n = draw(st.integers(1, 70))
    return schema, [draw(st.lists(_VALUES[f.type], min_size=n, max_size=n)) for f in schema]


@settings(max_examples=150, deadline=None)
@given(table_rows())
def test_encode_batch_writes_the_bytes_pyarrow_writes(data):
    """journal.encode_batch (the zero-latency path) is byte for byte RecordBatch.serialize()."""
    schema, columns = data
    rb = pa.RecordBatch.from_arrays(
        [pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema
    )
    ipc = journal.encode_batch(journal.batch_layout(schema), columns)
    assert ipc == rb.serialize().to_pybytes()
    assert pa.ipc.read_record_batch(pa.py_buffer(ipc), schema).equals(rb)


def test_small_and_large_flushes_journal_the_same_rows(tmp_path):
    """Flushes of a few list rows (encoded straight from the lists) and of many (through Arrow
    arrays) journal and publish the same rows: values in order, seq per row, one time per message."""
    flushes = [
        [1],
        [2, 3],
        [SMALL_BATCH - 1, 1],
        [SMALL_BATCH, 1],
        [5] * 40,
    ]  # row counts of each flush's messages
    clock = iter(range(10**18, 10**19, 1000))
    core = JournaledCore(
        config.load(overrides={"tickerplant": {"journal_dir": str(tmp_path)}}).tickerplant,
        now_ns=lambda: next(clock),
    )
    core.open()
    core.core.connect(1, auth.SYSTEM)
    core.core.subs[7] = Subscription(("trade",), frozenset())
    published = []
    for sizes in flushes:
        for i, n in enumerate(sizes):
            upd = wire.Upd(table="trade", cols=msgspec.Raw(wire.encode(trades(n, i))), id=i)
            assert core.on_frame(1, wire.encode(upd)) == []
        out = dict(core.flush())
        assert msgspec.msgpack.decode(out[1], type=wire.Ack).upto == len(sizes) - 1
        for b in msgspec.msgpack.decode(out[7], type=wire.Publish).batches:
            rb = pa.ipc.read_record_batch(pa.py_buffer(b.ipc), TABLES["trade"].arrow_schema)
            assert (b.first_seq, b.last_seq) == (rb.column("seq")[0].as_py(), rb.column("seq")[-1].as_py())
            published.append(rb)
    t = journal_table(tmp_path, core.core.date, "trade")
    core.close()
    assert t.equals(pa.Table.from_batches(published))
    assert t.column("price").to_pylist() == [
        p for sizes in flushes for i, n in enumerate(sizes) for p in trades(n, i)["price"]
    ]
    assert t.column("seq").to_pylist() == list(range(1, t.num_rows + 1))
    messages = [n for sizes in flushes for n in sizes]  # (the clock's first tick went to the core's date)
    assert t.column("time").cast(pa.int64()).to_pylist() == [
        10**18 + 1000 * (k + 1) for k, n in enumerate(messages) for _ in range(n)
    ]


def test_frames_keep_their_order_when_a_reader_stalls_and_resumes(tmp_path, run):
    """Zero-latency publishes are written at once while a subscriber keeps up, and queued while its
    transport is paused; either way it receives every batch once, in seq order."""

    async def body():
        async with running_tp(tmp_path, publish_interval_ms=0, subscriber_queue_frames=100000) as (srv, url):
            async with connect(url, max_size=None, max_queue=None, **with_token("subscriber")) as ws:
                await ws.send(wire.encode(wire.Sub(tables=["trade"])))
                await ws.recv()
                rows = most_queued = 0
                async with Publisher(url) as pub:
                    for phase in ("reading", "stalled", "reading"):
                        if phase == "stalled":
                            ws.transport.pause_reading()
                        for i in range(2000):
                            await pub.upd("trade", trades(500, rows))
                            await pub.wait_acked()
                            rows += 500
                            queued = max(p.queue.qsize() for p in srv.peers.values())
                            most_queued = max(most_queued, queued)
                            if (phase == "stalled" and queued > 3) or (phase == "reading" and i == 20):
                                break
                        ws.transport.resume_reading()
                seqs = []
                while len(seqs) < rows:
                    msg = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 10), type=wire.Publish)
                    for b in msg.batches:
                        seqs += pa.ipc.read_record_batch(pa.py_buffer(b.ipc), TABLES["trade"].arrow_schema)[
                            "seq"
                        ].to_pylist()
                return most_queued, srv.core.last_seq, seqs

    most_queued, last_seq, seqs = run(body())
    assert most_queued > 3  # the stall did make frames wait in the queue
    assert seqs == list(range(1, last_seq + 1))


def test_send_writes_at_once_only_behind_an_empty_queue(tmp_path):
    """A frame is written straight to an open, unpaused connection with nothing queued; otherwise it
    waits in the queue behind the frames already there."""

    class Connection:  # the parts of a websockets ServerConnection that write_now touches
        def __init__(self):
            self.written: list[bytes] = []
            self.protocol = SimpleNamespace(state=State.OPEN, send_binary=self.written.append)
            self.paused = False

        def send_data(self) -> None:
            pass

    srv = TickerplantServer(
        config.load(overrides={"tickerplant": {"journal_dir": str(tmp_path)}}).tickerplant
    )
    ws = Connection()
    peer = srv.peers[1] = Peer(ws, asyncio.Queue(maxsize=10))  # type: ignore[arg-type]
    srv.send([(1, b"a")])
    ws.paused = True  # flow control: the transport's buffer is full
    srv.send([(1, b"b")])
    ws.paused = False
    srv.send([(1, b"c")])  # not before b
    assert ws.written == [b"a"] and [peer.queue.get_nowait() for _ in range(2)] == [b"b", b"c"]
    srv.send([(1, b"d")])
    ws.protocol.state = State.CLOSING
    srv.send([(1, b"e")])
    assert ws.written == [b"a", b"d"] and peer.queue.get_nowait() == b"e"


def test_subscriber_applies_each_published_row_once_in_seq_order():
    """Live publishes: rows at or below the table's applied seq are dropped (a batch wholly new is
    taken as is), and with ordered=True the tables of one publish are interleaved by seq."""

    def batch(table: str, seqs: list[int]) -> wire.Batch:
        rows = (trades if table == "trade" else quotes)(len(seqs))
        rb = pa.RecordBatch.from_pydict(
            {"time": [0] * len(seqs), "seq": seqs, **rows}, schema=TABLES[table].arrow_schema
        )
        return wire.Batch(table, seqs[0], seqs[-1], rb.serialize().to_pybytes())

    schemas = {t: TABLES[t].arrow_schema for t in ("trade", "quote")}
    sub = Subscriber("ws://unused", applied={"trade": 3})

    def received(*batches: wire.Batch) -> list[tuple[str, list[int]]]:
        return [
            (ev.table, ev.batch["seq"].to_pylist())
            for ev in sub._published(wire.Publish(list(batches)), schemas)
        ]

    assert received(batch("trade", [2, 3, 4, 5])) == [("trade", [4, 5])]
    assert received(batch("trade", [6, 7])) == [("trade", [6, 7])]
    assert received(batch("trade", [6, 7])) == []
    assert received(batch("trade", [8, 10]), batch("quote", [9])) == [
        ("trade", [8]),
        ("quote", [9]),
        ("trade", [10]),
    ]
    assert sub.applied == {"trade": 10, "quote": 9}
    # `more`: the events of one publish but its last have rows behind them (nothing else received here)
    more = [
        ev.more
        for ev in sub._published(wire.Publish([batch("trade", [11, 13]), batch("quote", [12])]), schemas)
    ]
    assert more == [True, True, False]


def test_subscriber_tells_which_live_batches_have_frames_received_behind_them(tmp_path, run):
    """Three publishes that arrive before the subscriber reads: the first two events say more is
    waiting (calc then publishes once, after the third), the last does not; both for frames read
    during the journal replay (kept in a backlog) and for frames waiting in the socket's buffer."""

    async def go():
        async with running_tp(tmp_path) as (srv, url), Publisher(url) as pub:
            events = Subscriber(url, tables=["trade"], reconnect=False).events()
            assert (await anext(events)).kind == "live"
            for first in (1, 4):  # backlog, then socket
                for k in range(3):
                    await pub.upd("trade", trades(1, k))
                    await pub.wait_acked()
                    await asyncio.sleep(0.02)  # one flush (one frame) per message
                await asyncio.sleep(0.1)
                got = [await anext(events) for _ in range(3)]
                assert [ev.batch["seq"].to_pylist() for ev in got] == [[first], [first + 1], [first + 2]]
                assert [ev.more for ev in got] == [True, True, False]
            await events.aclose()

    run(go())


def test_every_tables_layout_is_built_at_start_not_at_its_first_flush(tmp_path, run):
    """The first build of a stored layout imports pandas through pyarrow (~0.4 s): done at start, it never
    stalls the day's first fills."""

    async def body():
        stored_layout.cache_clear()
        async with running_tp(tmp_path):
            return stored_layout.cache_info().currsize

    assert run(body()) == len(TABLES)


def test_a_second_tickerplant_on_a_journal_stops_with_the_reason(tmp_path):
    """`marginflow tp` on a journal another live tickerplant writes: exit 2 with one error line naming
    the folder and the holder's pid; the first keeps journaling; after a kill -9 of the first (the
    kernel drops its lock) the folder opens again."""
    first = TpProcess(tmp_path / "journal")
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "marginflow.cli",
                "tp",
                "--port",
                "0",
                "--journal",
                str(tmp_path / "journal"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=dict(os.environ, MARGINFLOW_OVERRIDES='{"tickerplant": {"kdb_port": 0}}'),
        )
        assert second.returncode == 2, second.stdout + second.stderr
        out = second.stdout + second.stderr
        assert f"is being written by another tickerplant (pid {first.proc.pid}" in out
        assert "Traceback" not in out
        assert first.proc.poll() is None
        first.kill()
        third = TpProcess(tmp_path / "journal")  # the lock died with the process
        third.stop()
    finally:
        first.stop()
