"""Feed handlers (simulator, file feed) and the replay / journal-check command lines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa

from marginflow import config
from tests.support import ROOT
from tests.support.rows import trades
from tests.support.servers import running_tp
from tickerplant import feed, journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher


def test_simulator_moves_with_the_real_covariance():
    cfg = config.load().feed
    sim = feed.MarketSimulator.from_config(cfg, ["A1", "A2"])
    syms, closes = feed.load_closes(cfg.prices_file)
    real = np.cov(np.diff(np.log(closes), axis=0), rowvar=False)
    steps = 6000
    logs = np.empty((steps, len(syms)))
    for i in range(steps):  # one simulated trading day per step
        before = np.log(sim.prices.copy())
        sim.step(sim.day_seconds)
        logs[i] = np.log(sim.prices) - before
    simulated = np.cov(logs, rowvar=False)
    vol_real, vol_sim = np.sqrt(np.diag(real)), np.sqrt(np.diag(simulated))
    assert np.allclose(vol_sim, vol_real, rtol=0.06)  # sampling error of a std over 6000 draws is ~1%
    corr_real = real / np.outer(vol_real, vol_real)
    corr_sim = simulated / np.outer(vol_sim, vol_sim)
    assert np.abs(corr_sim - corr_real).max() < 0.06


def test_simulated_messages_are_valid_and_reach_the_journal(tmp_path, run):
    cfg = config.load().feed
    sim = feed.MarketSimulator.from_config(cfg, ["A1", "A2", "A3"])

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            sent = await feed.simulate(url, sim, rate=3000, seconds=1.0)
            await __import__("asyncio").sleep(0.1)
            return sent, dict(srv.core.rows), dict(srv.core.bad), srv.core.date

    sent, rows, bad, date = run(body())
    assert bad == {}
    assert 2000 <= sent <= 3300
    assert rows["trade"] + rows["quote"] + rows["fill"] == sent
    assert rows["fill"] > 0 and rows["trade"] > 0 and rows["quote"] > 0
    fills = reader.read_table(tmp_path, date, "fill")
    assert set(fills.column("account").to_pylist()) <= {"A1", "A2", "A3"}


def test_file_feed_publishes_csv_rows(tmp_path, run):
    path = tmp_path / "t.csv"
    pl.DataFrame(trades(2500)).write_csv(path)

    async def body():
        async with running_tp(tmp_path / "j") as (srv, url):
            n = await feed.publish_file(url, "trade", feed.read_rows(str(path)), rate=None)
            return n, srv.core.date

    n, date = run(body())
    t = reader.read_table(tmp_path / "j", date, "trade")
    assert n == 2500 and t.column("price").to_pylist() == trades(2500)["price"]


CALLS_CSV = """business_date,cycle,ccp,account,requirement,call,collateral
2024-01-03,ITD1,DEMO-CCP,TECH01,352000,2000,350000
2024-01-03,EOD,DEMO-CCP,TECH01,361000,9000,352000
"""


def test_file_feed_publishes_a_ccp_call_report_and_refuses_a_bad_date(tmp_path, run, capsys):
    good, bad = tmp_path / "calls.csv", tmp_path / "bad.csv"
    good.write_text(CALLS_CSV)
    bad.write_text(CALLS_CSV.replace("2024-01-03,EOD", "2024-02-30x,EOD"))

    async def body():
        async with running_tp(tmp_path / "j") as (srv, url):
            await feed.publish_file(url, "call", feed.read_rows(str(good)), rate=None)
            await feed.publish_file(url, "call", feed.read_rows(str(bad)), rate=None)
            return srv.core.date

    date = run(body())
    t = reader.read_table(tmp_path / "j", date, "call")
    assert t.num_rows == 2  # the bad file's upd was refused whole: nothing of it journaled
    assert t.column("requirement").to_pylist() == [352000.0, 361000.0]
    assert t.column("business_date").to_pylist() == ["2024-01-03"] * 2
    out = capsys.readouterr().out
    assert "refused" in out and "row 1" in out and "business_date" in out


def test_replay_republishes_and_journal_check_reports(tmp_path, run):
    async def fill_journal(root, n):
        async with running_tp(root) as (srv, url):
            async with Publisher(url) as pub:
                for i in range(n):
                    await pub.upd("trade", trades(10, i * 10))
                    await pub.wait_acked()  # one journal batch per message
            return srv.core.date, url

    date, _ = run(fill_journal(tmp_path / "a", 30))

    async def republish():
        from replay.cli import republish as rp

        async with running_tp(tmp_path / "b") as (srv, url):
            rows, _ = await rp(url, reader.read_days(tmp_path / "a", date, date), None)
            return rows, srv.core.date

    rows, date_b = run(republish())
    a = reader.read_table(tmp_path / "a", date, "trade").drop_columns(["time"])
    b = reader.read_table(tmp_path / "b", date_b, "trade").drop_columns(["time"])
    assert rows == 300 and a.equals(b)
    # journal check: exit 0 on a whole journal, 1 and a 'torn' line on a cut one; --repair fixes it
    path = journal.table_path(tmp_path / "a", date, "trade")
    cmd = [sys.executable, "-m", "marginflow.cli", "journal", "check"]
    ok = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and " 300 " in ok.stdout
    whole = [b.num_rows for b in journal.iter_file(path)]
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    bad = subprocess.run([*cmd, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "torn" in bad.stdout
    fixed = subprocess.run([*cmd, str(path), "--repair"], capture_output=True, text=True, cwd=ROOT)
    assert fixed.returncode == 0 and f" {len(whole) - 1} " in fixed.stdout  # all but the cut batch were whole
    assert pa.ipc.open_stream(path.read_bytes()).read_all().num_rows == sum(whole[:-1])
