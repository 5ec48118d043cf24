"""The rdb following a real tickerplant: rows in DuckDB equal the journal's after joining mid-stream;
a restarted rdb rebuilds the same tables from the journal; end of day writes the HDB from the stream; live
batches read in chunks (rdb.live_chunk_ms) are all there, in order, once, with their lag in the status."""

from __future__ import annotations

import asyncio
import json
import os
import time

import msgspec
import polars as pl
import pytest
from websockets.sync.client import connect

from marginflow import config
from rdb.recovery import LiveLag
from rdb.server import Rdb
from rdb.subscription import follow
from schemas import wire
from tests.support import until
from tests.support.rows import quotes, trades
from tests.support.servers import rdb_process, running_tp
from tests.support.tokens import local_token, with_token
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher

TABLES_USED = ("trade", "quote")


def rdb_config(hdb):
    return config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(hdb)}}).rdb


def test_rdb_mid_stream_and_restart_equal_the_journal(tmp_path, run):
    async def body():
        async with running_tp(tmp_path / "journal") as (srv, url):
            rdb = Rdb(rdb_config(tmp_path / "hdb"), date=srv.core.date)
            task = None
            async with Publisher(url) as pub:
                for i in range(300):
                    await pub.upd_many([("trade", trades(7, i * 7)), ("quote", quotes(5, i * 5))])
                    if i == 120:
                        task = asyncio.create_task(follow(rdb, url))  # joins under load
                    if i % 25 == 0:
                        await asyncio.sleep(0.002)
                last = await pub.wait_acked()
            assert await until(lambda: max(rdb.store.max_seq[t] for t in TABLES_USED) == last)
            live = {t: rdb.store.fetch(t) for t in TABLES_USED}
            task.cancel()
            rdb.store.close()
            again = Rdb(rdb_config(tmp_path / "hdb"), date=srv.core.date)  # a restarted rdb
            task2 = asyncio.create_task(follow(again, url))
            assert await until(lambda: max(again.store.max_seq[t] for t in TABLES_USED) == last)
            rebuilt = {t: again.store.fetch(t) for t in TABLES_USED}
            task2.cancel()
            again.store.close()
            return srv.core.date, live, rebuilt, last

    date, live, rebuilt, last = run(body())
    total = 0
    for t in TABLES_USED:
        journaled = reader.read_table(tmp_path / "journal", date, t)
        assert live[t].equals(journaled.cast(live[t].schema)), t
        assert rebuilt[t].equals(live[t]), t
        total += live[t].num_rows
    assert total == last == 300 * 12


def test_end_of_day_from_the_tickerplant_writes_the_hdb(tmp_path, run):
    async def body():
        async with running_tp(tmp_path / "journal") as (srv, url):
            rdb = Rdb(rdb_config(tmp_path / "hdb"), date=srv.core.date)
            task = asyncio.create_task(follow(rdb, url))
            async with Publisher(url, token=local_token("admin")) as pub:
                await pub.upd("trade", trades(40))
                await pub.wait_acked()
                day1 = srv.core.date
                await pub.send_raw(wire.encode(wire.EndOfDayRequest()))
                assert await until(lambda: rdb.store.date != day1)
                await pub.upd("trade", trades(3, 40))
                await pub.wait_acked()
            assert await until(lambda: rdb.store.max_seq["trade"] == 43)
            today = rdb.store.fetch("trade")
            task.cancel()
            rdb.store.close()
            return day1, srv.core.date, today

    day1, day2, today = run(body())
    part = tmp_path / "hdb" / "trade" / f"date={day1}"
    hdb = pl.read_parquet(part / "*.parquet")
    journaled = pl.from_arrow(reader.read_table(tmp_path / "journal", day1, "trade"))
    key_sorted = journaled.sort(["sym", "time", "seq"])
    assert hdb.select(journaled.columns).equals(key_sorted)  # sorted by key then time
    assert today.num_rows == 3 and today.column("seq").to_pylist() == [41, 42, 43]


def test_live_batches_applied_in_chunks_are_all_there_in_order_once(tmp_path, run):
    """rdb.live_chunk_ms: the live batches read in chunks (far fewer wake-ups than published frames), and
    still every row in the tickerplant's order, none twice; each chunk's lag is in the rdb's status."""
    chunk_ms = 40.0

    async def body():
        async with running_tp(tmp_path / "journal") as (srv, url):
            cfg = config.load(
                overrides={"rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb"), "live_chunk_ms": chunk_ms}}
            ).rdb
            rdb = Rdb(cfg, date=srv.core.date)
            ready = asyncio.Event()
            task = asyncio.create_task(follow(rdb, url, ready, chunk_ms=cfg.live_chunk_ms))
            await ready.wait()
            t0 = time.monotonic()
            async with Publisher(url) as pub:
                for i in range(150):  # ~150 published frames over ~0.5 s
                    await pub.upd_many([("trade", trades(3, i * 3)), ("quote", quotes(2, i * 2))])
                    await pub.wait_acked()
                    await asyncio.sleep(0.003)
                last = await pub.wait_acked()
            assert await until(lambda: max(rdb.store.max_seq[t] for t in TABLES_USED) == last)
            elapsed = time.monotonic() - t0
            live = {t: rdb.store.fetch(t) for t in TABLES_USED}
            status = msgspec.msgpack.decode(rdb.service.handle(wire.encode(wire.StatusRequest())))
            task.cancel()
            rdb.store.close()
            return srv.core.date, live, last, elapsed, status, rdb.lag

    date, live, last, elapsed, status, lag = run(body())
    total = 0
    for t in TABLES_USED:
        journaled = reader.read_table(tmp_path / "journal", date, t)
        assert live[t].equals(journaled.cast(live[t].schema)), t  # every row, in order, once
        total += live[t].num_rows
    assert total == last == 150 * 5
    assert lag.batches >= 150  # a batch per table and frame
    assert 1 <= lag.chunks <= elapsed / (chunk_ms / 1000) + 2  # a chunk at most every chunk_ms
    assert lag.chunks < lag.batches / 3
    assert 0 < lag.last_ms <= lag.max_ms < 10_000
    shown = status["extra"]["live"]
    assert shown["chunk_ms"] == chunk_ms and shown["chunks"] == lag.chunks
    assert shown["lag_ms"] == round(lag.last_ms, 3) and shown["max_lag_ms"] == round(lag.max_ms, 3)


def test_live_lag_is_the_age_of_each_chunks_oldest_row():
    lag = LiveLag(50.0)
    ms = 1_000_000
    lag.batch(100 * ms, more=True, now_ns=130 * ms)
    lag.batch(120 * ms, more=False, now_ns=140 * ms)  # the chunk of two batches: its oldest row is 40 ms old
    assert (lag.chunks, lag.batches, lag.last_ms, lag.max_ms) == (1, 2, 40.0, 40.0)
    lag.batch(200 * ms, more=False, now_ns=205 * ms)
    assert (lag.chunks, lag.last_ms, lag.max_ms) == (2, 5.0, 40.0)
    assert lag.snapshot()["lag_ms"] == 5.0 and lag.snapshot()["chunk_ms"] == 50.0


def test_marginflow_rdb_runs_at_its_nice_value_duckdb_threads_included(tmp_path, monkeypatch):
    """rdb.nice: `marginflow rdb` lowers its own CPU priority at start, before DuckDB starts its threads
    (Linux keeps a nice value per thread), so every thread of the process runs at it."""
    monkeypatch.setenv(config.OVERRIDES_ENV, json.dumps({"rdb": {"nice": 7, "kdb_port": 0, "threads": 2}}))
    with rdb_process(tmp_path / "hdb") as (proc, _url):
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
        nice = {t: os.getpriority(os.PRIO_PROCESS, t) for t in tasks}
    assert len(tasks) >= 2 and set(nice.values()) == {7}, nice


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_marginflow_rdb_runs_under_sched_idle_by_default_duckdb_threads_included(tmp_path, monkeypatch):
    """rdb.nice = "idle" (the default): every thread of `marginflow rdb`, DuckDB's included, runs under
    SCHED_IDLE, so a waking tickerplant or calc takes a core from it at once; its status says so."""
    assert config.load().rdb.nice == "idle"
    inherited = json.loads(os.environ[config.OVERRIDES_ENV])  # (the tests' credentials: tests/conftest.py)
    monkeypatch.setenv(config.OVERRIDES_ENV, json.dumps(inherited | {"rdb": {"kdb_port": 0, "threads": 2}}))
    with rdb_process(tmp_path / "hdb") as (proc, url):
        tasks = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
        policy = {t: os.sched_getscheduler(t) for t in tasks}
        nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
        with connect(url, **with_token("query")) as ws:  # what an SRE reads in the status
            ws.send(wire.encode(wire.StatusRequest()))
            status = msgspec.msgpack.decode(ws.recv(timeout=10))
    assert len(tasks) >= 2 and set(policy.values()) == {os.SCHED_IDLE}, policy
    assert status["extra"]["cpu"] == {"policy": "idle", "nice": nice}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("live_chunk_ms", -1.0),
        ("live_chunk_ms", float("nan")),
        ("nice", 20),
        ("nice", -1),
    ],
)
def test_bad_chunk_or_nice_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(SystemExit, match=f"rdb.{key}: must be"):
        config.load(overrides={"rdb": {key: value}})


@pytest.mark.parametrize("value", [True, "low", 5.5])
def test_a_nice_value_of_the_wrong_kind_is_refused_naming_the_field(value):
    with pytest.raises(SystemExit, match=r"\$\.rdb\.nice"):
        config.load(overrides={"rdb": {"nice": value}})
