"""The NATS JetStream bus against a real 3-node cluster (R3 stream): tickerplant -> JetStream ->
NatsSubscriber equals the journal; resends dropped; the bus down or a node killed loses nothing acked;
a subscriber's filter subjects give it only its accounts' fills."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import asynccontextmanager

import nats
import nats.errors
import nats.js.errors
import pyarrow as pa
import pytest

from marginflow import config, process
from marginflow.config import BusConfig
from schemas import bus
from tests.support.nats_cluster import _free_ports
from tests.support.rows import fills, quotes, trades
from tests.support.servers import tp_config, wait_for
from tickerplant import journal_reader
from tickerplant.bus import ack_result, hpub, order_check, run_messages
from tickerplant.client import Publisher
from tickerplant.core import stored_layout
from tickerplant.nats_client import STALL_S, NatsSubscriber
from tickerplant.server import TickerplantServer

STREAMS = itertools.count(1)
TABLES_KEY = {"trade": "sym", "fill": "account"}


@pytest.fixture
def bus_cfg(nats_cluster):
    """An R3 stream of the test's own on the module's cluster (quick timeouts), deleted after it (every
    stream takes mf.>, so two cannot live at once)."""
    cfg = BusConfig(
        kind="nats",
        servers=nats_cluster.urls,
        stream=f"T{next(STREAMS)}",
        replicas=3,
        ack_timeout_s=1.0,
        retry_interval_s=0.2,
    )
    yield cfg

    async def delete():  # (retried: after a node's restart the cluster may still be electing)
        nc = await nats.connect(cfg.servers)
        for _ in range(60):
            try:
                await nc.jetstream().delete_stream(cfg.stream)
                break
            except nats.js.errors.NotFoundError:
                break
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await asyncio.sleep(0.5)
        await nc.close()

    asyncio.run(asyncio.wait_for(delete(), 30))


@asynccontextmanager
async def bus_tp(journal, cfg: BusConfig, live: bool = True):
    srv = TickerplantServer(tp_config(journal, publish_interval_ms=1, kdb_port=0), bus=cfg)
    await srv.start()
    try:
        if live:
            await wait_for(lambda: srv.bus.live, 30, f"the bridge to be live ({srv.bus.stats})")
        yield srv, f"ws://127.0.0.1:{srv.port}"
    finally:
        await srv.stop()


async def caught_up(srv, timeout: float = 30.0) -> None:
    await wait_for(
        lambda: srv.bus.live and srv.bus.published_upto == srv.core.journaled_seq, timeout, "the bus"
    )


class Collector:
    """A NatsSubscriber read by a task: every row as (table, row dict), in arrival order."""

    def __init__(self, sub: NatsSubscriber):
        self.sub = sub
        self.rows: list[tuple[str, dict]] = []
        self.kinds: list[str] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for ev in self.sub.events():
            self.kinds.append(ev.kind)
            if ev.kind == "batch":
                self.rows += [(ev.table, r) for r in ev.batch.to_pylist()]

    async def until(self, last_seq: int, timeout: float = 30.0) -> None:
        await wait_for(lambda: max((r["seq"] for _, r in self.rows), default=0) >= last_seq, timeout, "rows")
        await asyncio.sleep(0.1)  # (a duplicate after the last row would show)

    async def stop(self) -> None:
        await process.cancel_and_wait(self.task)


def journal_rows(root, tables=None, accounts=None) -> list[tuple[str, dict]]:
    rows = [(t, r) for t, b in journal_reader.read_days(root, tables=tables) for r in b.to_pylist()]
    return [(t, r) for t, r in rows if accounts is None or t != "fill" or r["account"] in accounts]


async def stream_made(js, cfg: BusConfig) -> None:
    """The test's stream made (retried: a cluster just started may still be electing its leader)."""
    from tickerplant.bus import ensure_stream

    for _ in range(60):
        try:
            return await ensure_stream(js, cfg)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await asyncio.sleep(0.5)
    await ensure_stream(js, cfg)


async def publish(url: str, n: int, at=None) -> int:
    """n frames of trades, quotes and fills; `at(i)` called before frame i; the last seq acked."""
    async with Publisher(url) as pub:
        for i in range(n):
            if at is not None:
                await at(i)
            await pub.upd_many(
                [("trade", trades(3, i * 3)), ("quote", quotes(2, i * 2)), ("fill", fills(2, i * 2))]
            )
            if i % 10 == 0:
                await asyncio.sleep(0.005)
        return await pub.wait_acked(timeout=30)


# ---- no cluster --------------------------------------------------------------------------------
def test_buckets_are_a_stable_hash_and_subjects_at_most_one_per_bucket():
    import hashlib

    for key in ["TECH01", "a.b", "_", "x y", "é>*", ""]:
        want = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 64
        assert bus.bucket(key, 64) == want  # (blake2b, not hash(): the same in every process)
    assert bus.bucket(None, 64) == bus.bucket("", 64)
    assert bus.subject("fill", 17) == "mf.fill.17" and bus.subject_bucket("mf.fill.17") == 17
    assert bus.bucket_subjects("fill", {3, 1}, 64) == ["mf.fill.1", "mf.fill.3"]
    assert (
        bus.bucket_subjects("fill", None, 64) == bus.bucket_subjects("fill", range(64), 64) == ["mf.fill.*"]
    )
    accounts = [f"A{i}" for i in range(2000)]  # (a 2,000-account shard: at most 64 subjects per table)
    assert len(bus.bucket_subjects("fill", bus.key_buckets(accounts[:40], 64), 64)) <= 40
    assert bus.bucket_subjects("fill", bus.key_buckets(accounts, 64), 64) == ["mf.fill.*"]
    parts = {"trade": bus.mask([0, 5, 63]), "fill": bus.mask([2])}
    assert bus.parse_parts(bus.parts_header(parts)) == parts
    assert bus.described_buckets(bus.stream_description(128)) == 128 and bus.described_buckets(None) is None


def _ipc(table, seqs, keys):
    schema = stored_layout(table)[0]
    cols = {"time": [0] * len(seqs), "seq": seqs}
    rows = trades(len(seqs)) if table == "trade" else fills(len(seqs), 0)
    rows["sym" if table == "trade" else "account"] = keys
    arrays = [pa.array({**rows, **cols}[f.name], f.type) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema).serialize().to_pybytes()


def test_a_flush_becomes_a_message_per_table_and_bucket():
    """Two tables interleaved in seq, several keys each: one message per (table, bucket) with its rows
    in seq order, ordered by first seq; the batch's first seq and parts on each, Mf-Last-Seq on the last
    only; a table's batch that is one bucket keeps its journal bytes."""
    import hashlib

    n = 4
    b = {k: int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") % n for k in "CAZX"}
    assert b["C"] != b["A"] and b["C"] == b["Z"]  # (the keys chosen so: C and Z share a bucket, A not)
    t = _ipc("trade", [1, 2, 5, 6, 7], ["C", "A", "C", "Z", "A"])
    f = _ipc("fill", [3, 4], ["X", "X"])
    msgs = run_messages("2024-01-15", [("trade", t), ("fill", f)], n)
    got = [(m.subject, m.headers[bus.FIRST_SEQ], m.headers[bus.MAX_SEQ]) for m in msgs]
    assert got == [
        (f"mf.trade.{b['C']}", "1", "6"),
        (f"mf.trade.{b['A']}", "2", "7"),
        (f"mf.fill.{b['X']}", "3", "4"),
    ]
    rows = [
        pa.ipc.read_record_batch(pa.py_buffer(m.payload), stored_layout(m.headers[bus.TABLE])[0])
        for m in msgs
    ]
    assert [r.column("seq").to_pylist() for r in rows] == [[1, 5, 6], [2, 7], [3, 4]]
    assert rows[0].column("sym").to_pylist() == ["C", "C", "Z"]
    assert msgs[2].payload == f  # one bucket: the journal's bytes as they are
    assert {m.headers[bus.BATCH] for m in msgs} == {"1"}
    assert bus.parse_parts(msgs[0].headers[bus.PARTS]) == {
        "trade": bus.mask([b["C"], b["A"]]),
        "fill": bus.mask([b["X"]]),
    }
    assert [bus.LAST_SEQ in m.headers for m in msgs] == [False, False, True] and msgs[2].headers[
        bus.LAST_SEQ
    ] == "7"
    assert [m.last_seq for m in msgs] == [0, 0, 7]
    assert msgs[1].headers[bus.MSG_ID] == f"2024-01-15:trade:{b['A']}:2"


def test_the_resync_deletes_a_batch_the_stream_has_only_part_of():
    """order_check: the stream's last own messages; a batch without its last message (its publish
    failed) is deleted with what follows a gap; the restart point is the last whole batch's end."""

    def m(batch, index, last=None, day=False):
        h = {bus.MSG_ID: "x", bus.DATE: "d"}
        if not day:
            h |= {bus.BATCH: str(batch), bus.INDEX: str(index)}
        if last is not None:
            h[bus.LAST_SEQ] = str(last)
        return h

    whole = [(1, m(1, 0)), (2, m(1, 1, 5)), (3, m(0, 0, 5, day=True)), (4, m(6, 0)), (5, m(6, 1, 9))]
    assert order_check(whole) == ((9, "d"), [])
    part = [*whole, (6, m(10, 0)), (7, m(10, 1))]  # batch 10's last message never stored
    assert order_check(part) == ((9, "d"), [6, 7])
    gap = [*whole, (6, m(12, 0, 13)), (7, m(14, 0, 14))]  # batch 10..11 missing: 12 on is out of order
    assert order_check(gap) == ((9, "d"), [6, 7])
    hole = [*whole, (6, m(10, 0)), (7, m(10, 2, 12)), (8, m(13, 0, 13))]  # message 1 of batch 10 refused
    assert order_check(hole) == ((9, "d"), [6, 7, 8])
    assert order_check([(1, m(1, 1))]) == ((0, ""), [])  # (no batch's end in sight: from the start)


def test_the_bridges_hpub_is_nats_pys_and_acks_read_without_json_when_plain():
    """The HPUB the bridge builds is byte for byte what nats-py's publish would write; a stream's answer
    reads as stored, duplicate, refused (with the reason) or no stream."""
    from nats.protocol.command import hpub_cmd

    headers = {bus.MSG_ID: "2024-01-15:trade:5", bus.LAST_SEQ: "7", bus.EXPECTED_LAST_SEQ: "3"}
    hdr = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    for reply in ("_INBOX.x.12", ""):
        assert hpub("mf.trade.A", reply, headers, b"rows") == hpub_cmd("mf.trade.A", reply, hdr, b"rows")
    assert ack_result(b'{"stream":"S","seq":9}', None, "S") is False
    assert ack_result(b'{"stream":"S","seq":9,"duplicate":true}', None, "S") is True
    refused = ack_result(b'{"error":{"code":400,"description":"wrong last sequence: 8"}}', {}, "S")
    assert isinstance(refused, RuntimeError) and "wrong last sequence: 8" in str(refused)
    assert isinstance(ack_result(b"", {"Status": "503"}, "S"), ConnectionError)
    assert isinstance(ack_result(b"{not json", None, "S"), ValueError)


def test_bus_config_defaults_to_websocket_and_names_bad_keys(tmp_path):
    assert config.load().bus.kind == "websocket"
    assert TickerplantServer(tp_config(tmp_path, kdb_port=0)).bus is None  # nothing changes by default
    with pytest.raises(ValueError, match="bus.replicas"):
        BusConfig(kind="nats", replicas=7)
    with pytest.raises(SystemExit, match="bus.ack_timeout_s"):
        config.load(overrides={"bus": {"kind": "nats", "ack_timeout_s": 0}})


# ---- the cluster -------------------------------------------------------------------------------
def test_rows_reach_nats_subscribers_as_journaled(tmp_path, run, nats_cluster, bus_cfg):
    """A subscriber from the start (live) and one joining mid-stream (replay, then live) each get the
    journal's rows: same rows, same order (ascending seq across tables), none twice."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            early = Collector(NatsSubscriber(cfg, tables=["trade", "quote", "fill"]))
            await wait_for(lambda: "live" in early.kinds, 10, "live")
            joiners: list[Collector] = []

            async def join(i):
                if i == 60:
                    joiners.append(Collector(NatsSubscriber(cfg, tables=["trade", "quote", "fill"])))

            last = await publish(url, 120, join)
            await caught_up(srv)
            for c in (early, *joiners):
                await c.until(last)
                await c.stop()
            return early.rows, joiners[0].rows, joiners[0].kinds, srv.bus.stats

    early, late, kinds, stats = run(body())
    expected = journal_rows(tmp_path)
    assert len(expected) == 120 * 7
    assert early == expected and late == expected
    seqs = [r["seq"] for _, r in late]
    assert seqs == sorted(set(seqs))
    assert kinds.index("live") > 0 and kinds[0] == "batch"  # the joiner replayed, then went live
    assert stats.failures == 0 or stats.published > 0


def test_coalesce_joins_waiting_runs_of_one_table_into_one_batch(tmp_path, run, nats_cluster, bus_cfg):
    """A subscriber joining after the rows were published (the consumer has many waiting) with
    `coalesce` gets the journal's rows exactly (order, none twice, `applied` per table): a batch per run
    of one table in seq order (a bus batch's buckets joined), and consecutive trade batches of the
    trade-only flushes joined into fewer."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            await publish(url, 60)
            async with Publisher(url) as pub:
                for i in range(30):
                    await pub.upd("trade", trades(3, 1000 + i * 3))
                last = await pub.wait_acked(timeout=30)
            await caught_up(srv)
            sub = NatsSubscriber(cfg, tables=["trade", "quote", "fill"], coalesce=("trade", "quote"))
            c = Collector(sub)
            await c.until(last)
            await c.stop()
            return c.rows, c.kinds, dict(sub.applied)

    rows, kinds, applied = run(body())
    expected = journal_rows(tmp_path)
    assert rows == expected and len(rows) == 60 * 7 + 30 * 3
    assert kinds.count("batch") < 60 * 3 + 30  # (the 60 mixed frames: 3 runs each; the 30 trade ones joined)
    assert applied == {t: max(r["seq"] for tt, r in expected if tt == t) for t in ("trade", "quote", "fill")}


def test_a_shard_joins_the_one_row_fills_waiting_in_its_consumer(tmp_path, run, nats_cluster, bus_cfg):
    """A shard's subscriber (calc/shard.py JOINED_TABLES: ticks and fills) with 40 one-row fill messages
    waiting (a bus message each) gets the journal's rows exactly (seq order, none twice) in fewer fill
    batches than messages: a shard that falls behind catches up a batch at a time, as the websocket
    fan-out's flush (one-row fills each applied and published alone kept a shard behind at 1,000/s)."""
    from calc import shard

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            async with Publisher(url) as pub:
                for i in range(40):
                    await pub.upd("fill", fills(1, i))
                last = await pub.wait_acked(timeout=30)
            await caught_up(srv)
            sub = NatsSubscriber(cfg, tables=["fill"], coalesce=shard.JOINED_TABLES)
            c = Collector(sub)
            await c.until(last)
            await c.stop()
            return c.rows, c.kinds

    rows, kinds = run(body())
    expected = journal_rows(tmp_path, tables=["fill"])
    assert len(expected) == 40 and rows == expected
    assert [r["seq"] for _, r in rows] == sorted({r["seq"] for _, r in rows})
    assert kinds.count("batch") < 40


def test_live_messages_waiting_are_joined_after_a_replay(tmp_path, run, nats_cluster, bus_cfg):
    """Live, after a replay: 40 one-row fill messages published while the reader does not read (they wait
    in the consumer) come as fewer batches than messages, the rows exact and in seq order. (The join
    stopped for good at the replay's end: each came alone.)"""
    from calc import shard

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            await publish(url, 5)  # (a replay first)
            await caught_up(srv)
            sub = NatsSubscriber(cfg, tables=["fill"], coalesce=shard.JOINED_TABLES)
            events = sub.events()
            kinds, rows = [], []
            while (ev := await anext(events)).kind != "live":
                rows += [r for r in ev.batch.to_pylist()] if ev.kind == "batch" else []
            async with Publisher(url) as pub:
                for i in range(40):  # (a flush, a bus message each)
                    await pub.upd("fill", fills(1, 100 + i))
                    last = await pub.wait_acked(timeout=30)
            await caught_up(srv)
            await wait_for(lambda: sub.stream_seq > 0, 5, "delivery")
            await asyncio.sleep(0.5)  # (delivered into the subscription's queue meanwhile)
            while max((r["seq"] for r in rows), default=0) < last:
                ev = await anext(events)
                kinds.append(ev.kind)
                rows += ev.batch.to_pylist() if ev.kind == "batch" else []
            await events.aclose()
            return rows, kinds

    rows, kinds = run(body())
    expected = [r for _, r in journal_rows(tmp_path, tables=["fill"])]
    assert len(expected) == 5 * 2 + 40 and rows == expected
    assert kinds.count("batch") < 20


def test_a_resend_is_dropped_by_the_duplicate_window(tmp_path, run, nats_cluster, bus_cfg):
    """The same message (same Nats-Msg-Id) again is acked as a duplicate and not stored; a restarted
    tickerplant resumes from the stream's last message and publishes nothing twice."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            await publish(url, 20)
            await caught_up(srv)
        nc = await nats.connect(cfg.servers)
        js = nc.jetstream()
        before = (await js.stream_info(cfg.stream)).state.last_seq
        last = await js.get_msg(cfg.stream, before)
        ack = await js.publish(last.subject, last.data, headers=dict(last.headers))
        after_resend = (await js.stream_info(cfg.stream)).state.last_seq
        async with bus_tp(tmp_path, cfg) as (srv2, _):
            await caught_up(srv2)
            resent = srv2.bus.stats.resent
        after_restart = (await js.stream_info(cfg.stream)).state.last_seq
        await nc.close()
        return before, ack, after_resend, resent, after_restart

    before, ack, after_resend, resent, after_restart = run(body())
    assert ack.duplicate and ack.seq == before
    assert after_resend == before == after_restart
    assert resent == 0


def test_bus_down_journaling_goes_on_and_the_journal_is_resent(tmp_path, run, nats_cluster, bus_cfg):
    """No NATS server: every upd is still journaled and acked, the failures counted; once the bus is
    there the journal's rows are published from the journal, and a subscriber gets them all."""

    async def body():
        dead = BusConfig(kind="nats", servers=[f"nats://127.0.0.1:{_free_ports(1)[0]}"], retry_interval_s=0.2)
        async with bus_tp(tmp_path, dead, live=False) as (srv, url):
            last = await publish(url, 30)
            await wait_for(lambda: srv.bus.stats.failures >= 1, 10, "a failure counted")
            down = (srv.bus.live, srv.bus.stats.failures, srv.core.journaled_seq)
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            await caught_up(srv)
            sub = Collector(NatsSubscriber(cfg))
            await sub.until(last)
            await sub.stop()
            return last, down, srv.bus.stats, sub.rows

    last, (live, failures, journaled), stats, rows = run(body())
    assert journaled == last == 30 * 7 and not live and failures >= 1
    assert stats.resent > 0
    assert rows == journal_rows(tmp_path)


@pytest.mark.slow
def test_kill9_the_stream_leader_mid_stream_loses_no_acked_row(tmp_path, run, nats_cluster, bus_cfg):
    """kill -9 the node leading the R3 stream while rows flow: every row the tickerplant acked
    reaches the stream (resent from the journal) and a live subscriber, once each, in order."""

    async def body():
        cfg = bus_cfg
        killed: list[int] = []
        async with bus_tp(tmp_path, cfg) as (srv, url):
            nc = await nats.connect(cfg.servers)
            sub = Collector(NatsSubscriber(cfg))
            await wait_for(lambda: "live" in sub.kinds, 10, "live")

            async def kill(i):
                if i == 80:
                    leader = (await nc.jetstream().stream_info(cfg.stream)).cluster.leader
                    killed.append(int(leader.removeprefix("n")))
                    await nc.close()
                    nats_cluster.kill(killed[0])

            last = await publish(url, 200, kill)
            await caught_up(srv, 60)
            await sub.until(last, 60)
            await sub.stop()
            stats = srv.bus.stats
        nats_cluster.start(killed[0])  # (the module's other tests need three nodes)
        return last, stats, sub.rows, sub.sub.disconnects

    last, stats, rows, disconnects = run(body(), timeout=200)
    assert rows == journal_rows(tmp_path)
    assert rows[-1][1]["seq"] == last
    assert stats.failures >= 1 and stats.resent > 0  # the leader's death failed publishes: resent


@pytest.mark.slow
def test_a_subscriber_keeps_resubscribing_while_the_cluster_is_down(tmp_path, run, nats_cluster, bus_cfg):
    """Every node killed for longer than the stall check: the subscriber's resubscribes fail (no consumer
    can be made; seen once under a busy full suite after a leader's kill -9, while the stream had no
    leader: the first failed attempt ended the subscriber) and it keeps trying; once the nodes are back
    it gets every row after, once each, in order."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            sub = Collector(NatsSubscriber(cfg))
            await wait_for(lambda: "live" in sub.kinds, 10, "live")
            await sub.until(await publish(url, 5), 30)
            for i in range(3):
                nats_cluster.kill(i)
            await asyncio.sleep(2 * STALL_S + 4)  # the stall check's ask fails, then the resubscribes
            alive = not sub.task.done()
            nats_cluster.start()
            last = await publish(url, 5)
            await caught_up(srv, 60)
            await sub.until(last, 60)
            await sub.stop()
        return alive, sub.sub.disconnects, last, sub.rows

    alive, disconnects, last, rows = run(body(), timeout=200)
    assert alive and disconnects
    assert rows == journal_rows(tmp_path) and rows[-1][1]["seq"] == last


def test_a_consumer_nats_py_no_longer_recovers_is_found_and_resubscribed(
    tmp_path, run, nats_cluster, bus_cfg
):
    """The live subscriber's ordered consumer is deleted on the server and nats-py's heartbeat monitor,
    which would recreate it, is gone (seen after a leader's kill -9 under busy cores: the subscriber
    then waited forever). Once the stream holds rows for it that do not come, the subscriber
    resubscribes after the last row it took: every row after, once each, in order."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            sub = Collector(NatsSubscriber(cfg))
            await wait_for(lambda: "live" in sub.kinds, 10, "live")
            await sub.until(await publish(url, 10))
            (jsub,) = [s for s in sub.sub._nc._subs.values() if getattr(s, "_jsi", None) is not None]
            jsub._jsi._hbtask.cancel()  # nats-py's own recovery: gone
            nc = await nats.connect(cfg.servers)
            await nc.jetstream().delete_consumer(cfg.stream, jsub._jsi._psub._consumer)
            await nc.close()
            t0 = asyncio.get_running_loop().time()
            last = await publish(url, 10)
            await caught_up(srv)
            await sub.until(last, 30)
            took = asyncio.get_running_loop().time() - t0
            await sub.stop()
        return sub.rows, sub.sub.disconnects, took

    rows, disconnects, took = run(body(), timeout=90)
    assert rows == journal_rows(tmp_path)
    assert any(d.startswith("Stalled") for d in disconnects), disconnects
    assert took < 4 * STALL_S, took


def test_a_subscriber_started_past_what_the_stream_holds_is_not_taken_for_stalled(
    tmp_path, run, nats_cluster, bus_cfg
):
    """The stall check compares the stream with what the consumer could deliver: a subscriber that starts
    after the last message on its subjects (a stream sequence past them, as a resubscription after the
    last row does) waits quietly through three STALL_S, then takes the next rows."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            before = await publish(url, 5)
            await caught_up(srv)
            nc = await nats.connect(cfg.servers)
            past = (await nc.jetstream().stream_info(cfg.stream)).state.last_seq + 1
            await nc.close()
            sub = Collector(NatsSubscriber(cfg, start=past))
            await asyncio.sleep(3 * STALL_S)
            quiet = list(sub.sub.disconnects)
            last = await publish(url, 3)
            await sub.until(last, 30)
            await sub.stop()
        return quiet, sub.rows, before

    quiet, rows, before = run(body(), timeout=90)
    assert quiet == []
    want = [(t, r) for t, r in journal_rows(tmp_path) if r["seq"] > before]
    assert rows == want and len(want) >= 3 * 5  # (the fills repeat the first frames' ids: refused)


def test_a_subscriber_asking_for_some_accounts_receives_only_their_fills(
    tmp_path, run, nats_cluster, bus_cfg
):
    """Filter subjects per table and key: the server sends only mf.fill.<those accounts>."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            mine = NatsSubscriber(cfg, tables=["fill"], table_keys={"fill": ["TECH01", "NRG03"]})
            sub = Collector(mine)
            last = await publish(url, 40)
            await caught_up(srv)
            want = journal_rows(tmp_path, ["fill"], {"TECH01", "NRG03"})
            await sub.until(want[-1][1]["seq"])
            await sub.stop()
            return mine.subjects, sub.rows, want, last

    subjects, rows, want, last = run(body())
    assert subjects == [
        bus.DAY_SUBJECT,
        *bus.bucket_subjects("fill", {bus.bucket("TECH01", 64), bus.bucket("NRG03", 64)}, 64),
    ]
    assert rows == want and len(want) > 0
    assert {r["account"] for _, r in rows} == {"TECH01", "NRG03"}


def test_end_of_day_and_foreign_messages_on_the_bus(tmp_path, run, nats_cluster, bus_cfg):
    """The journal's roll reaches a live subscriber as end_of_day, then the new day's rows; a late
    subscriber replays from the new day's start. A message on mf.> that is not the bridge's (no seq
    headers; rows that do not decode) is counted and skipped by subscribers, never applied; the bridge's
    next publish is refused (expected sequence), it resyncs, deletes what got in out of seq order, and a
    subscriber reading the stream then gets exactly the journal. (A subscriber live at that moment may
    miss the runs deleted: only the tickerplant may publish on mf.>, README.)"""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            sub = Collector(NatsSubscriber(cfg))
            await wait_for(lambda: "live" in sub.kinds, 10, "live")
            await publish(url, 5)
            srv.send(srv.tp.end_of_day())
            await publish(url, 5)
            await caught_up(srv)  # (the new day's marker is on the stream before the foreign messages)
            await sub.until(70)
            nc = await nats.connect(cfg.servers)
            await nc.publish("mf.fill.X", b"no headers")  # (core NATS: stored by the stream, not the bridge)
            await nc.publish("mf.fill.Y", b"not arrow", headers={bus.FIRST_SEQ: "1000", bus.LAST_SEQ: "1000"})
            await nc.flush()
            await nc.close()
            last = await publish(url, 5)
            await caught_up(srv)
            late = Collector(NatsSubscriber(cfg))
            await late.until(last)
            await wait_for(lambda: sum(sub.sub.bad.values()) == 2, 10, "the live subscriber's count")
            await sub.stop()
            await late.stop()
            return sub, late, srv.bus.stats

    sub, late, stats = run(body())
    rows = [(t, r) for t, b in journal_reader.read_days(tmp_path) for r in b.to_pylist()]
    assert len(rows) == 95 and sub.rows[:70] == rows[:70]  # (the last 5 frames' fills: exec_ids seen today)
    assert sub.kinds.count("end_of_day") == 1
    eod = sub.kinds.index("end_of_day")
    assert sum(1 for k in sub.kinds[:eod] if k == "batch") > 0 and "batch" in sub.kinds[eod:]
    assert late.rows == [(t, r) for t, r in rows if r["seq"] > 35]  # from the new day's marker on
    assert sub.sub.bad == {"mf.fill.X": 1, "mf.fill.Y": 1} == late.sub.bad
    assert stats.failures >= 1


def test_a_subscriber_of_some_instruments_gets_their_rows_joined_back_into_seq_order(
    tmp_path, run, nats_cluster, bus_cfg
):
    """Two instruments in two buckets: a flush's rows of them come in two messages (one per bucket)
    and are handed out as one batch per run in seq order, the other instruments of those buckets
    dropped by sym (counted as foreign)."""
    syms = ["AAPL", "IBM"]
    assert bus.bucket("AAPL", 64) != bus.bucket("IBM", 64)

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            last = await publish(url, 40)
            await caught_up(srv)
            mine = NatsSubscriber(cfg, tables=["trade", "quote"], keys=syms)
            sub = Collector(mine)
            want = [(t, r) for t, r in journal_rows(tmp_path, ["trade", "quote"]) if r["sym"] in syms]
            await sub.until(want[-1][1]["seq"])
            await sub.stop()
            return sub.rows, want, mine, last

    rows, want, mine, last = run(body())
    assert rows == want and len(want) > 40
    seqs = [r["seq"] for _, r in rows]
    assert seqs == sorted(seqs)  # (across the two buckets: joined back)
    assert mine.received["trade"] - mine.foreign["trade"] == sum(1 for t, _ in rows if t == "trade")


def test_a_duplicate_of_one_bucket_s_message_is_dropped_and_the_other_bucket_s_rows_kept(
    run, nats_cluster, bus_cfg
):
    """A batch of trades 1..4 in two buckets (P: 1, 3; Q: 2, 4), then P's message again (a redelivery
    under another id), then trade 5: the subscriber applies 1..5 once each. (A duplicate check per
    table would drop Q's row 2: it arrives after P's 3.)"""
    from tickerplant.bus import batch_messages

    p, q = "AAPL", "IBM"
    schema = stored_layout("trade")[0]

    def rows(seqs, syms):
        cols = {**trades(len(seqs)), "time": [0] * len(seqs), "seq": seqs, "sym": syms}
        return pa.RecordBatch.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)

    first = batch_messages("2024-01-15", {"trade": [rows([1, 2, 3, 4], [p, q, p, q])]}, 64)
    second = batch_messages("2024-01-15", {"trade": [rows([5], [q])]}, 64)
    assert [m.subject for m in first] == [bus.subject("trade", bus.bucket(s, 64)) for s in (p, q)]

    async def body():
        cfg = bus_cfg
        nc = await nats.connect(cfg.servers)
        js = nc.jetstream()
        await stream_made(js, cfg)
        again = first[0]._replace(headers={**first[0].headers, bus.MSG_ID: "redelivered"})
        for m in [*first, again, *second]:
            await js.publish(m.subject, m.payload, headers=m.headers)
        await nc.close()
        sub = Collector(NatsSubscriber(cfg, tables=["trade"], start="all"))
        await sub.until(5)
        await sub.stop()
        return sub.rows

    got = run(body())
    assert [(r["seq"], r["sym"]) for _, r in got] == [(1, p), (2, q), (3, p), (4, q), (5, q)]


def test_a_2000_account_shard_s_consumer_is_created(run, nats_cluster, bus_cfg):
    """A shard of 2,000 accounts over 200 instruments asks for at most [bus] buckets subjects a table
    (a subject per account, ~8,400, could not be made in time: BENCHMARKS.md) and goes live at once."""
    import time

    from calc.shard import ACCOUNT_TABLES, TICK_TABLES

    accounts = [f"ACC{i:05d}" for i in range(2000)]
    syms = [f"S{i:03d}" for i in range(200)]
    keys = {t: accounts for t in ACCOUNT_TABLES} | {t: syms for t in TICK_TABLES}

    async def body():
        cfg = bus_cfg
        nc = await nats.connect(cfg.servers)
        await stream_made(nc.jetstream(), cfg)
        await nc.close()
        sub = NatsSubscriber(cfg, tables=[*ACCOUNT_TABLES, *TICK_TABLES, "param"], table_keys=keys)
        t0 = time.monotonic()
        c = Collector(sub)
        await wait_for(lambda: "live" in c.kinds, 10, "the consumer")
        took = time.monotonic() - t0
        await c.stop()
        return sub.subjects, took

    subjects, took = run(body())
    assert len(subjects) <= 1 + 7 * 64 and len(subjects) < 450
    assert took < 10


def test_widen_cuts_at_the_fill_and_joins_the_new_instrument_s_later_rows_in_seq_order(
    run, nats_cluster, bus_cfg
):
    """A batch: S2 tick 1, S1 tick 2, the fill 3 that buys S2, S2 tick 4, S1 tick 5; then S2 tick 6.
    A subscriber of S1 widens to S2 at the fill: S2's tick before it comes back from `widen`, its tick 4
    is handed out with S1's 5 in seq order, and 6 comes from the wider consumer; nothing twice."""
    from tickerplant.bus import batch_messages

    s1, s2 = "AAPL", "IBM"
    assert bus.bucket(s1, 64) != bus.bucket(s2, 64)

    def rows(table, seqs, keys):
        schema = stored_layout(table)[0]
        base = trades(len(seqs)) if table == "trade" else fills(len(seqs), 0)
        cols = {**base, "time": [0] * len(seqs), "seq": seqs, TABLES_KEY[table]: keys}
        return pa.RecordBatch.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)

    first = batch_messages(
        "2024-01-15",
        {"trade": [rows("trade", [1, 2, 4, 5], [s2, s1, s2, s1])], "fill": [rows("fill", [3], ["TECH01"])]},
        64,
    )
    second = batch_messages("2024-01-15", {"trade": [rows("trade", [6], [s2])]}, 64)

    async def body():
        cfg = bus_cfg
        nc = await nats.connect(cfg.servers)
        js = nc.jetstream()
        await stream_made(js, cfg)
        for m in first:
            await js.publish(m.subject, m.payload, headers=m.headers)
        sub = NatsSubscriber(cfg, tables=["trade", "fill"], table_keys={"trade": [s1]}, start="all")
        seen: list[tuple[str, int]] = []
        async for ev in sub.events():
            if ev.kind != "batch":
                continue
            if ev.table == "fill":
                back = await sub.widen({"trade": [s2]}, cut=3)
                seen += [("back", r["seq"]) for b in back for r in b.batch.to_pylist()]
                for m in second:
                    await js.publish(m.subject, m.payload, headers=m.headers)
            seen += [(ev.table, r["seq"]) for r in ev.batch.to_pylist()]
            if any(s == 6 for _, s in seen):
                break
        await nc.close()
        return seen

    seen = run(body())
    assert seen == [("trade", 2), ("back", 1), ("fill", 3), ("trade", 4), ("trade", 5), ("trade", 6)]
