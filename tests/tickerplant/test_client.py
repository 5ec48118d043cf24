"""Every link survives the other side's restart: a Publisher resends what was not acked when the
tickerplant dies mid-stream (each row journaled exactly once), and calc's margin rows reach the journal
and its websocket clients again after the tickerplant is killed and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pyarrow as pa
import pytest
from websockets.asyncio.client import connect

from marginflow import config
from marginflow.up import http_get
from tests.support.rows import fills, trades
from tests.support.servers import TpProcess, recv_type, running_calc, running_tp
from tests.support.tokens import desk_token
from tests.support.up import UpProcess
from tickerplant import feed, journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher


async def subscribed_and_margin_flows(ws, tp_url: str) -> None:
    """Subscribe a calc client (after its auth reply and snapshot) and see a margin row for a new fill."""
    await recv_type(ws, "auth_reply")
    await ws.send(json.dumps({"type": "subscribe"}))
    await recv_type(ws, "snapshot")
    async with Publisher(tp_url) as pub:
        await pub.upd("fill", fills(6, 0))
        await pub.wait_acked()
    await recv_type(ws, "margin", 10)


async def restart_tp(tp: TpProcess, journal_dir) -> TpProcess:
    """SIGKILL the tickerplant and start it again on the same port and journal (off the event loop)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, tp.kill, 9)
    return await loop.run_in_executor(None, lambda: TpProcess(journal_dir, "--port", str(tp.port)))


@pytest.mark.slow
def test_publisher_resends_what_was_not_acked_when_the_tp_dies(tmp_path):
    tp = TpProcess(tmp_path)
    n, rows = 800, 10
    try:

        async def body():
            nonlocal tp
            restart = None
            async with Publisher(tp.url, name="test") as pub:
                for i in range(n):
                    await pub.upd("trade", trades(rows, i * rows))
                    if i == 400:  # mid-stream, with messages in flight (sent, journaled or not, not acked)
                        restart = asyncio.ensure_future(restart_tp(tp, tmp_path))
                    await asyncio.sleep(0.0005)
                    if restart is not None and restart.done() and tp is not restart.result():
                        tp = restart.result()
                if restart is not None:
                    tp = await restart
                await pub.wait_acked(timeout=30)
                status = await pub.status()
                return pub.reconnects, pub.resent, pub.errors, pub.acked, status

        reconnects, resent, errors, acked, status = asyncio.run(body())
    finally:
        tp.stop()
    assert reconnects >= 1 and resent >= 1 and errors == [] and acked == n
    date = journal.journal_dates(tmp_path)[-1]
    table = reader.read_table(tmp_path, date, "trade")
    assert table.column("seq").to_pylist() == list(range(1, n * rows + 1))  # no gap, no seq twice
    expected = trades(n * rows)
    for col in ("sym", "price", "size"):  # every row once, in the order sent: none missing, none twice
        assert table.column(col).to_pylist() == expected[col]
    print(
        f"reconnects={reconnects} resent={resent} duplicates={status.bad_messages.get('duplicate_resend', 0)}"
    )


def margin_rows_after(root, seq: int) -> int:
    dates = journal.journal_dates(root)
    if not dates:
        return 0
    return sum(
        int((b.column("seq").to_numpy() > seq).sum())
        for b in journal.iter_file(journal.table_path(root, dates[-1], "margin"))
    )


@pytest.mark.slow
def test_calc_output_reaches_journal_and_clients_after_tp_sigkill_restart(tmp_path):
    tp = TpProcess(tmp_path)
    try:

        async def body():
            nonlocal tp
            async with (
                running_calc(tp.port, tmp_path, publish_interval_ms=100) as calc,
                connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws,
            ):
                await subscribed_and_margin_flows(ws, tp.url)
                tp = await restart_tp(tp, tmp_path)
                t0 = time.monotonic()
                async with Publisher(tp.url) as pub:
                    await pub.upd("fill", fills(6, 100))
                    fill_seq = await pub.wait_acked()
                margin = await recv_type(ws, "margin", 5)  # calc applied the new fills and pushed rows
                to_client = time.monotonic() - t0
                while margin_rows_after(tmp_path, fill_seq) == 0 and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.05)
                to_journal = time.monotonic() - t0
                async with Publisher(tp.url) as pub:
                    status = await pub.status()
                health = calc.output_health()
                return margin, to_client, to_journal, margin_rows_after(tmp_path, fill_seq), status, health

        margin, to_client, to_journal, journaled, status, health = asyncio.run(body())
    finally:
        tp.stop()
    assert {r["account"] for r in margin["rows"]} & {"TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06"}
    assert to_client < 5
    assert journaled > 0 and to_journal < 5, "calc's margin rows did not reach the restarted tickerplant"
    assert status.rows["margin"] >= journaled
    assert health["reconnects"] >= 1 and health["connected"] and not health["stalled"]


def test_feed_exec_ids_unique_across_runs(tmp_path, run):
    cfg = config.load().feed

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            for _ in range(2):  # two runs with the same seed: the same random stream, new ids
                sim = feed.MarketSimulator.from_config(cfg, ["A1", "A2", "A3"])
                await feed.simulate(url, sim, rate=2000, seconds=0.5)
            return dict(srv.core.bad), srv.core.date

    bad, date = run(body())
    ids = reader.read_table(tmp_path, date, "fill").column("exec_id").to_pylist()
    assert len(ids) > 40 and len(set(ids)) == len(ids)
    assert bad == {}  # none refused as a duplicate


@pytest.mark.slow
def test_feed_survives_a_tp_restart(tmp_path):
    tp = TpProcess(tmp_path)
    cfg = config.load().feed
    try:

        async def body():
            nonlocal tp
            sim = feed.MarketSimulator.from_config(cfg, ["A1", "A2"])
            task = asyncio.create_task(feed.simulate(tp.url, sim, rate=1000, seconds=4.0))
            await asyncio.sleep(1.0)
            tp = await restart_tp(tp, tmp_path)
            killed_at = time.time_ns()
            sent = await task  # the feed did not die with the tickerplant
            return sent, killed_at

        sent, killed_at = asyncio.run(body())
    finally:
        tp.stop()
    date = journal.journal_dates(tmp_path)[-1]
    tables = {t: reader.read_table(tmp_path, date, t) for t in ("trade", "quote", "fill")}
    after = sum(
        int((tb.column("time").cast(pa.int64()).to_numpy() > killed_at).sum()) for tb in tables.values()
    )
    seqs = sorted(s for tb in tables.values() for s in tb.column("seq").to_pylist())
    assert after > 500  # rows flowed again after the restart
    assert seqs == list(range(1, len(seqs) + 1))  # no seq twice
    exec_ids = tables["fill"].column("exec_id").to_pylist()
    assert len(set(exec_ids)) == len(exec_ids) and sent >= len(seqs)


def test_calc_health_reports_a_stalled_output(tmp_path, run):
    """The tickerplant stops reading calc's publisher connection (a stuck socket) while calc's input
    flows: margin rows are produced, nothing is acked; /health turns 503 "stalled" with the reason after
    calc.stall_after_s, and back to 200 once the acks come."""

    async def health(port):
        status, body = await http_get("127.0.0.1", port)
        return status, json.loads(body)

    async def body():
        async with (
            running_tp(tmp_path) as (srv, url),
            running_calc(srv.port, tmp_path, publish_interval_ms=50, stall_after_s=1.0) as calc,
        ):
            await until_true(lambda: calc.live, 20)
            first = await health(calc.port)
            local = calc.publisher.ws.local_address[1]
            (peer,) = [p for p in srv.peers.values() if p.ws.remote_address[1] == local]
            peer.ws.transport.pause_reading()
            async with Publisher(url) as pub:
                for i in range(25):
                    await pub.upd("fill", fills(6, 1000 + i * 6))
                    await pub.wait_acked()
                    await asyncio.sleep(0.1)
            stalled = await health(calc.port)
            peer.ws.transport.resume_reading()
            await until_true(lambda: calc.publisher.unacked == 0, 10)
            return first, stalled, await health(calc.port)

    first, (code, stalled), (code2, after) = run(body())
    assert first[0] == 200 and first[1]["live"] and first[1]["output"]["connected"]
    assert code == 503 and stalled["live"] is False and stalled["output"]["stalled"]
    assert "output stalled" in stalled["reason"] and stalled["output"]["unacked"] > 0
    assert stalled["output"]["since_last_ack_s"] > 1.0
    assert code2 == 200 and after["live"] and not after["output"]["stalled"]


async def until_true(cond, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


class Proxy:
    """A TCP proxy in front of the tickerplant that can lose what the tickerplant sends back (the acks)
    and then cut the publisher's connection: a real 'lost ack'."""

    def __init__(self, port: int):
        self.port = port
        self.drop_replies = False
        self.server: asyncio.Server | None = None
        self.clients: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)

        async def pipe(src, dst, replies: bool):
            try:
                while data := await src.read(65536):
                    if not (replies and self.drop_replies):
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def cut(self) -> None:
        for w in self.clients:
            w.transport.abort()
        self.clients.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server:
            self.server.close()


def test_resend_after_a_lost_ack_is_acked_not_journaled_twice(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            proxy = Proxy(srv.port)
            port = await proxy.start()
            try:
                async with Publisher(f"ws://127.0.0.1:{port}", name="lossy") as pub:
                    await pub.upd("trade", trades(5))
                    await pub.wait_acked()
                    proxy.drop_replies = True  # the tickerplant journals and acks; the acks are lost
                    for i in range(1, 11):
                        await pub.upd("trade", trades(5, i * 5))
                    await until_true(lambda: srv.core.rows["trade"] == 55, 10)
                    assert pub.acked == 1 and pub.unacked == 10
                    proxy.drop_replies = False
                    proxy.cut()  # the publisher reconnects and resends the 10 messages with the same ids
                    await pub.wait_acked(timeout=10)
                    return pub.acked, pub.resent, pub.reconnects, dict(srv.core.bad), srv.core.date
            finally:
                await proxy.stop()

    acked, resent, reconnects, bad, date = run(body())
    assert acked == 11 and resent == 10 and reconnects == 1
    assert bad == {"duplicate_resend": 10}
    table = reader.read_table(tmp_path, date, "trade")
    assert table.column("seq").to_pylist() == list(range(1, 56))
    assert table.column("price").to_pylist() == trades(55)["price"]


@pytest.mark.slow
def test_up_restarts_a_killed_tp_and_calc_output_flows_again(tmp_path):
    """The issue's case: SIGKILL the tickerplant under `marginflow up`; once `up` restarted it, new fills
    move margins on a calc websocket client and calc's margin rows reach the journal, within 5 s."""
    up = UpProcess(tmp_path)
    try:

        async def body():
            root = tmp_path / "journal"
            async with connect(up.calc_ws + "/ws", **desk_token()) as ws:
                await subscribed_and_margin_flows(ws, up.tickerplant)
                os.kill(up.pids["tp"], signal.SIGKILL)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, up.wait_for_line, r"tp restarted", 60)
                t0 = time.monotonic()
                async with Publisher(up.tickerplant) as pub:
                    await pub.upd("fill", fills(6, 500))
                    fill_seq = await pub.wait_acked()
                await recv_type(ws, "margin", 5)
                to_client = time.monotonic() - t0
                while margin_rows_after(root, fill_seq) == 0 and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.05)
                return to_client, time.monotonic() - t0, margin_rows_after(root, fill_seq)

        to_client, to_journal, rows = asyncio.run(body())
    finally:
        code = up.stop()
    text = "".join(up.output)
    assert "tp died (exit -9)" in text and code == 0
    assert to_client < 5 and rows > 0 and to_journal < 5, (to_client, to_journal, rows)
