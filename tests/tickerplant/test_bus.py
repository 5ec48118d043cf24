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

from marginflow import config
from marginflow.config import BusConfig
from schemas import bus
from tests.support.nats_cluster import _free_ports
from tests.support.rows import fills, quotes, trades
from tests.support.servers import tp_config, wait_for
from tickerplant import journal_reader
from tickerplant.bus import ack_result, hpub, run_messages
from tickerplant.client import Publisher
from tickerplant.core import stored_layout
from tickerplant.nats_client import NatsSubscriber
from tickerplant.server import TickerplantServer

STREAMS = itertools.count(1)


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
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def journal_rows(root, tables=None, accounts=None) -> list[tuple[str, dict]]:
    rows = [(t, r) for t, b in journal_reader.read_days(root, tables=tables) for r in b.to_pylist()]
    return [(t, r) for t, r in rows if accounts is None or t != "fill" or r["account"] in accounts]


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
def test_subject_keys_round_trip_and_stay_one_token():
    for key in ["TECH01", "a.b", "_", "x y", "é>*", "A_B-1", "%41"]:
        token = bus.key_token(key)
        assert "." not in token and " " not in token and token not in ("*", ">", "_")
        assert bus.key_from_token(token) == key
    assert bus.key_token(None) == "_" and bus.key_from_token("_") is None
    assert bus.subject("fill", "a.b") == "mf.fill.a%2Eb"


def test_a_flush_becomes_runs_of_one_key_in_seq_order():
    """Two tables interleaved in seq, several keys each: one message per run, contiguous seqs,
    ascending across tables; a batch that is one run keeps its journal bytes."""
    schema, _ = stored_layout("trade")

    def batch(table, seqs, keys):
        schema = stored_layout(table)[0]
        cols = {"time": [0] * len(seqs), "seq": seqs}
        rows = trades(len(seqs)) if table == "trade" else fills(len(seqs), 0)
        key = "sym" if table == "trade" else "account"
        rows[key] = keys
        arrays = [pa.array({**rows, **cols}[f.name], f.type) for f in schema]
        return pa.RecordBatch.from_arrays(arrays, schema=schema).serialize().to_pybytes()

    t = batch("trade", [1, 2, 5, 6], ["A", "A", "B", "A"])
    f = batch("fill", [3, 4], ["X", "X"])
    msgs = run_messages("2024-01-15", [("trade", t), ("fill", f)])
    got = [(m.subject, m.headers[bus.FIRST_SEQ], m.headers[bus.LAST_SEQ]) for m in msgs]
    assert got == [
        ("mf.trade.A", "1", "2"),
        ("mf.fill.X", "3", "4"),
        ("mf.trade.B", "5", "5"),
        ("mf.trade.A", "6", "6"),
    ]
    assert msgs[1].payload == f  # one run: the journal's bytes as they are
    assert msgs[0].headers[bus.MSG_ID] == "2024-01-15:trade:1"
    assert [m.last_seq for m in msgs] == [2, 4, 5, 6]


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
    `coalesce` gets the journal's rows exactly (order, none twice, `applied` per table), in fewer batches
    than the bridge's messages: consecutive trade / quote runs joined, never across tables or fills."""

    async def body():
        cfg = bus_cfg
        async with bus_tp(tmp_path, cfg) as (srv, url):
            last = await publish(url, 60)
            await caught_up(srv)
            sub = NatsSubscriber(cfg, tables=["trade", "quote", "fill"], coalesce=("trade", "quote"))
            c = Collector(sub)
            await c.until(last)
            await c.stop()
            return c.rows, c.kinds, srv.bus.stats.published, dict(sub.applied)

    rows, kinds, messages, applied = run(body())
    expected = journal_rows(tmp_path)
    assert rows == expected and len(rows) == 60 * 7
    assert kinds.count("batch") < messages - 60  # (fills: a message per run, never joined)
    assert applied == {t: max(r["seq"] for tt, r in expected if tt == t) for t in ("trade", "quote", "fill")}


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
    assert subjects == [bus.DAY_SUBJECT, "mf.fill.NRG03", "mf.fill.TECH01"]
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
