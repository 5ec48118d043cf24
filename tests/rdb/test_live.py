"""The rdb following a real tickerplant: rows in DuckDB equal the journal's after joining mid-stream;
a restarted rdb rebuilds the same tables from the journal; end of day writes the HDB from the stream."""

from __future__ import annotations

import asyncio

import polars as pl

from marginflow import config
from rdb.server import Rdb
from rdb.subscription import follow
from schemas import wire
from tests.support import until
from tests.support.rows import quotes, trades
from tests.support.servers import running_tp
from tests.support.tokens import local_token
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
