"""The rdb never answers from half a day: while it replays the tickerplant's journal (at start, and after a
reconnect to a restarted tickerplant) a query waits for the replay or gets a "recovering" Error, never a
smaller count; once live its tables equal the journal's, also across a kill -9 of the tickerplant."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pytest
from websockets.sync.client import connect

from marginflow import config
from rdb.server import Rdb
from rdb.service import Service
from rdb.subscription import follow
from schemas.rdb import Error, Query, QueryResult, Status, StatusRequest
from tests.support import ROOT, until
from tests.support.servers import TpProcess, running_tp
from tests.support.tokens import with_token
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher

DECODE = msgspec.msgpack.Decoder(QueryResult | Error | Status)
COUNT = msgspec.msgpack.encode(Query(sql="SELECT count(*) AS n FROM trade", format="json"))


def rdb_config(hdb: Path, **kw: object):
    return config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(hdb), **kw}}).rdb


def trade_rows(n: int, start: int = 0) -> pa.Table:
    syms = ["AAPL", "MSFT", "IBM", "JPM"]
    return pa.table({
        "sym": [syms[(start + i) % 4] for i in range(n)],
        "price": [100.0 + (start + i) % 97 * 0.25 for i in range(n)],
        "size": pa.array([1 + (start + i) % 13 for i in range(n)], pa.int64()),
    })  # fmt: skip


async def publish(url: str, batches: int, rows: int, start: int = 0) -> int:
    async with Publisher(url) as pub:
        for i in range(batches):
            await pub.upd_arrow("trade", trade_rows(rows, start + i * rows))
        return await pub.wait_acked(timeout=60)


class SlowRdb(Rdb):
    """An rdb whose replay takes a while (rows applied 6,000 at a time, 50 ms apart), so queries land in the
    middle of it."""

    def apply_batch(self, table: str, batch: pa.RecordBatch | pa.Table) -> int:
        kept = 0
        for i in range(0, batch.num_rows, 6000):
            time.sleep(0.05)
            kept += super().apply_batch(table, batch.slice(i, 6000))
            self.store.flush()
        return kept


def answer(service: Service, frame: bytes = COUNT) -> QueryResult | Error | Status:
    return DECODE.decode(service.handle(frame))  # type: ignore[arg-type]


def test_queries_during_the_replay_wait_or_say_recovering(tmp_path: Path, run) -> None:
    total = 40 * 6000

    async def body() -> tuple[list, QueryResult | Error, dict, int]:
        async with running_tp(tmp_path / "journal") as (srv, url):
            last = await publish(url, 40, 6000)
            rdb = SlowRdb(rdb_config(tmp_path / "hdb", recovery_wait_s=0.02), date=srv.core.date)
            rdb.recovery.begin("starting")  # what rdb.server.run does before it listens
            patient = Service(rdb.store, timeout_s=30, recovery=rdb.recovery, recovery_wait_s=30)
            replies: list = []
            waited: list = []
            stop = threading.Event()

            def ask() -> None:
                while not stop.is_set():
                    replies.append(answer(rdb.service))

            threads = [
                threading.Thread(target=ask),
                threading.Thread(target=lambda: waited.append(answer(patient))),
            ]
            for th in threads:
                th.start()
            task = asyncio.create_task(follow(rdb, url))
            mid = None
            while rdb.recovery.recovering:
                await asyncio.sleep(0.02)
                if mid is None and rdb.recovery.recovering and 0 < rdb.recovery.replayed < total:
                    # asked on the loop's thread, so the replay (on the same thread) is paused mid-way while
                    # the status is made: in a worker thread it could answer after the replay ended
                    mid = msgspec.to_builtins(answer(rdb.service, msgspec.msgpack.encode(StatusRequest())))
            await asyncio.sleep(0.3)
            stop.set()
            for th in threads:
                await asyncio.to_thread(th.join, 30)
            final = answer(rdb.service)
            assert isinstance(final, QueryResult)
            task.cancel()
            rdb.store.close()
            return replies + [final], waited[0], mid or {}, last

    replies, waited, mid, last = run(body())
    assert last == total
    counts = [r.data[0][0] for r in replies if isinstance(r, QueryResult)]
    errors = [r.reason for r in replies if isinstance(r, Error)]
    assert set(counts) == {total}, sorted(set(counts))[:5]  # never a smaller number
    assert errors and all(
        e.startswith("recovering: the rdb is replaying the tickerplant's journal") for e in errors
    )
    assert (
        re.search(r"\d+ rows replayed so far, up to seq \d+", errors[-1])
        and f"up to seq {total}" in errors[-1]
    )
    assert isinstance(waited, QueryResult) and waited.data == [
        [total]
    ]  # a patient query waits for the replay
    assert mid["extra"]["state"] == "recovering" and mid["extra"]["recovery"]["position"]["last_seq"] == total
    assert 0 < mid["extra"]["recovery"]["replayed_rows"] < total


@pytest.mark.slow
def test_rdb_process_started_over_a_long_journal_never_answers_part_of_it(tmp_path: Path, run) -> None:
    """`marginflow rdb --tp` over 300k journaled rows: queries sent as soon as it listens get the whole
    count or "recovering", never part of it."""
    tp = TpProcess(tmp_path / "journal")
    try:
        total = run(publish(tp.url, 60, 5000))
        proc = subprocess.Popen(
            [sys.executable, "-m", "marginflow.cli", "rdb", "--port", "0", "--hdb", str(tmp_path / "hdb"),
             "--tp", tp.url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("rdb ready ws://127.0.0.1:"), line
            got: list[int | str] = []
            with connect(line.split()[2], max_size=None, **with_token("query")) as ws:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and total not in got:
                    ws.send(COUNT)
                    r = DECODE.decode(ws.recv(timeout=30))
                    got.append(r.data[0][0] if isinstance(r, QueryResult) else r.reason)  # type: ignore[union-attr]
                ws.send(msgspec.msgpack.encode(StatusRequest()))
                status = DECODE.decode(ws.recv(timeout=30))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    finally:
        tp.stop()
    print("answers while starting:", [g if isinstance(g, int) else g[:40] for g in got[:3]], "...", len(got))
    assert got[-1] == total
    assert all(g == total or (isinstance(g, str) and g.startswith("recovering:")) for g in got), got[:5]
    assert isinstance(status, Status) and status.extra["state"] == "live"
    assert status.extra["recovery"]["recoveries"] == 1


@pytest.mark.slow
def test_tickerplant_kill9_and_restart_counts_equal_the_journal(tmp_path: Path, run) -> None:
    journal = tmp_path / "journal"
    tp = TpProcess(journal)
    port = tp.port

    async def body() -> tuple[str, dict, dict, int]:
        nonlocal tp
        rdb = Rdb(rdb_config(tmp_path / "hdb"))
        rdb.recovery.begin("starting")
        await publish(tp.url, 10, 3000)
        task = asyncio.create_task(follow(rdb, tp.url))
        assert await until(lambda: rdb.recovery.state == "live")
        async with Publisher(tp.url) as pub:  # live rows, then the tickerplant dies mid-stream
            for i in range(20):
                await pub.upd_arrow("trade", trade_rows(500, 30_000 + i * 500))
            await pub.wait_acked(timeout=30)
        tp.kill(signal.SIGKILL)
        await asyncio.sleep(0.5)
        tp = await asyncio.to_thread(TpProcess, journal, "--port", str(port))  # same port, same journal
        last = await publish(tp.url, 10, 2000, start=50_000)
        assert await until(lambda: rdb.store.max_seq["trade"] == last and rdb.recovery.state == "live")
        date = rdb.store.date
        held = {"trade": rdb.store.fetch("trade")}
        snap = rdb.recovery.snapshot()
        counts = answer(rdb.service)
        task.cancel()
        rdb.store.close()
        assert isinstance(counts, QueryResult)
        return date, held, {"snap": snap, "count": counts.data[0][0]}, last

    try:
        date, held, info, last = run(body())
    finally:
        tp.stop()
    journaled = reader.read_table(journal, date, "trade")
    assert journaled.num_rows == last == 30_000 + 10_000 + 20_000
    seqs = held["trade"].column("seq").to_pylist()
    assert len(seqs) == len(set(seqs)) == journaled.num_rows == info["count"]  # no duplicates, none missing
    assert held["trade"].equals(journaled.cast(held["trade"].schema))
    print("after the restart:", info["snap"])
    assert info["snap"]["state"] == "live"


def test_a_refused_subscription_fails_queries_instead_of_answering(tmp_path: Path, run) -> None:
    """If following the tickerplant stops on an error (here: a batch the rdb cannot apply), the rdb says so
    on every query and in status rather than answer from the rows it has."""

    class Broken(Rdb):
        def apply_batch(self, table: str, batch: pa.RecordBatch | pa.Table) -> int:
            raise ValueError(f"{table}: a column this rdb does not know")

    async def body() -> tuple[Error | QueryResult | Status, Status]:
        async with running_tp(tmp_path / "journal") as (srv, url):
            await publish(url, 1, 10)
            rdb = Broken(rdb_config(tmp_path / "hdb"), date=srv.core.date)
            task = asyncio.create_task(follow(rdb, url))
            await asyncio.gather(task, return_exceptions=True)
            r = answer(rdb.service)
            s = answer(rdb.service, msgspec.msgpack.encode(StatusRequest()))
            rdb.store.close()
            return r, s  # type: ignore[return-value]

    r, s = run(body())
    assert isinstance(r, Error) and r.reason.startswith("failed: the rdb stopped following the tickerplant")
    assert "a column this rdb does not know" in r.reason
    assert s.extra["state"] == "failed"


class Proxy:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that can be shut (listener and connections closed)
    and opened again on the same port: it decides when the rdb can reach the tickerplant again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_w]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


@pytest.mark.slow
def test_replay_after_reconnecting_to_a_restarted_tickerplant_is_never_half_answered(
    tmp_path: Path, run
) -> None:
    """kill -9 the tickerplant, restart it on its port, journal 240k more rows before the rdb can reach it;
    while the rdb replays them every count is the old whole one (before the replay), "recovering", or the new
    whole one: never part of the replay."""
    journal = tmp_path / "journal"
    tp = TpProcess(journal)
    port = tp.port

    async def body() -> tuple[list, dict, int, int]:
        nonlocal tp
        first = await publish(tp.url, 5, 6000)
        proxy = Proxy(port)
        await proxy.open()
        rdb = SlowRdb(rdb_config(tmp_path / "hdb", recovery_wait_s=0.02))
        rdb.recovery.begin("starting")
        task = asyncio.create_task(follow(rdb, f"ws://127.0.0.1:{proxy.port}"))
        assert await until(lambda: rdb.recovery.state == "live")
        await proxy.shut()  # the rdb loses the tickerplant and cannot reconnect yet
        tp.kill(signal.SIGKILL)
        tp = await asyncio.to_thread(TpProcess, journal, "--port", str(port))
        last = await publish(tp.url, 40, 6000, start=first)
        replies: list = []
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                replies.append(answer(rdb.service))

        th = threading.Thread(target=ask)
        th.start()
        await asyncio.sleep(0.2)
        await proxy.open()  # now it reconnects and replays the 240k rows it missed
        assert await until(lambda: rdb.store.max_seq["trade"] == last and rdb.recovery.state == "live", 60)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.to_thread(th.join, 30)
        snap = rdb.recovery.snapshot()
        task.cancel()
        await proxy.shut()
        rdb.store.close()
        return replies, snap, first, last

    try:
        replies, snap, first, last = run(body())
    finally:
        tp.stop()
    counts = [r.data[0][0] for r in replies if isinstance(r, QueryResult)]
    errors = [r.reason for r in replies if isinstance(r, Error)]
    assert set(counts) <= {first, last} and counts[-1] == last, sorted(set(counts))[:5]
    assert errors and all(e.startswith("recovering:") and "(reconnected)" in e for e in errors)
    assert snap["state"] == "live" and snap["reason"] == "reconnected" and snap["recoveries"] == 2
    assert snap["replayed_rows"] == last - first
