"""calc as a service: margin rows through the tickerplant, per-desk token isolation on every path,
and `marginflow up`: orderly shutdown leaves complete journals; calc killed with SIGKILL under load
is restarted and ends with the same margins as an engine fed the same journal without a kill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect

from calc.events import apply_event
from calc.inputs import load_accounts
from marginflow import config
from marginflow.up import http_get
from tests.support.rows import fills
from tests.support.servers import recv_type, running_calc, running_tp
from tests.support.tokens import desk_token
from tests.support.up import UpProcess
from tickerplant import journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher, Subscriber


def ticks(n: int, start: int) -> dict:
    syms = ["AAPL", "KO", "XOM", "JNJ", "MSFT", "JPM", "PG", "GE"]
    base = {
        "AAPL": 129.0,
        "KO": 60.0,
        "XOM": 110.0,
        "JNJ": 170.0,
        "MSFT": 240.0,
        "JPM": 135.0,
        "PG": 150.0,
        "GE": 80.0,
    }
    return {
        "sym": [syms[(start + i) % 8] for i in range(n)],
        "price": [base[syms[(start + i) % 8]] * (1 + 0.01 * np.sin(start + i)) for i in range(n)],
        "size": [100] * n,
    }


def test_token_isolation_on_every_path(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path) as calc:
                base = f"ws://127.0.0.1:{calc.port}/ws"
                async with connect(base) as ws:  # the dashboard's way: a first auth message
                    await ws.send(json.dumps({"type": "auth", "token": "wrong"}))
                    refused = json.loads(await ws.recv())
                    await ws.send(json.dumps({"type": "snapshot_request"}))
                    unauth = json.loads(await ws.recv())
                async with (
                    connect(base, **desk_token("equity-tech")) as tech,
                    connect(base, **desk_token()) as risk,
                ):
                    hello = json.loads(await tech.recv())
                    await recv_type(risk, "auth_reply")
                    await tech.send(json.dumps({"type": "subscribe"}))
                    await risk.send(json.dumps({"type": "subscribe"}))
                    tech_snap = await recv_type(tech, "snapshot")
                    risk_snap = await recv_type(risk, "snapshot")
                    await tech.send(json.dumps({"type": "subscribe", "accounts": ["DIV02"]}))
                    sub_other = await recv_type(tech, "error")
                    await tech.send(json.dumps({"type": "snapshot_request", "accounts": ["DIV02"]}))
                    snap_other = await recv_type(tech, "error")
                    await tech.send(
                        json.dumps(
                            {
                                "type": "what_if",
                                "account": "DIV02",
                                "id": 3,
                                "trades": [{"sym": "KO", "qty": 100}],
                            }
                        )
                    )
                    wi_other = await recv_type(tech, "error")
                    await tech.send(json.dumps({"type": "history_request", "account": "MN05", "id": 4}))
                    hist_other = await recv_type(tech, "error")
                    async with Publisher(url) as pub:  # live rows for every account
                        for i in range(5):
                            await pub.upd("fill", fills(12, i * 12))
                            await pub.upd("trade", ticks(8, i * 8))
                        await pub.wait_acked()
                    seen_tech, seen_risk = set(), set()
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and len(seen_risk) < 6:
                        m = await recv_type(risk, "margin")
                        seen_risk |= {r["account"] for r in m["rows"]}
                    try:
                        while True:
                            m = json.loads(await asyncio.wait_for(tech.recv(), 0.5))
                            if m["type"] in ("margin", "alert"):
                                seen_tech |= {r["account"] for r in m["rows"]}
                    except TimeoutError:
                        pass
            return (
                refused,
                unauth,
                hello,
                tech_snap,
                risk_snap,
                sub_other,
                snap_other,
                wi_other,
                hist_other,
                seen_tech,
                seen_risk,
            )

    (
        refused,
        unauth,
        hello,
        tech_snap,
        risk_snap,
        sub_other,
        snap_other,
        wi_other,
        hist_other,
        seen_tech,
        seen_risk,
    ) = run(body())
    assert refused == {"type": "error", "reason": "invalid token"}
    assert "not authenticated" in unauth["reason"]
    assert hello["desk"] == "equity-tech" and hello["accounts"] == ["TECH01"]
    assert {r["account"] for r in tech_snap["rows"]} == {"TECH01"}
    everyone = set(load_accounts(config.load().calc.accounts_file))
    assert {r["account"] for r in risk_snap["rows"]} == everyone and len(everyone) >= 7
    for err in (sub_other, snap_other, wi_other, hist_other):
        assert "not permitted for desk 'equity-tech'" in err["reason"]
    assert wi_other["id"] == 3 and hist_other["id"] == 4
    assert seen_tech == {"TECH01"}  # live pushes: its own account only
    assert seen_risk == {"TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06", "OPT08"}


@pytest.mark.parametrize("journal_interval_ms", [0, 50])
def test_margin_rows_are_journaled_and_match_the_engine(tmp_path, run, journal_interval_ms, demo_engine):
    """Every margin row calc publishes lands in the tickerplant's journal (sent with each publish, or
    collected and sent every journal_interval_ms); the last row per account equals an engine fed the
    same journal from scratch (deterministic replay)."""

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path, journal_interval_ms=journal_interval_ms) as calc:
                async with Publisher(url) as pub:
                    for i in range(20):
                        await pub.upd_many([("fill", fills(5, i * 5)), ("trade", ticks(10, i * 10))])
                    await pub.wait_acked()
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.3)  # calc's last collected rows, sent as it stopped
            return srv.core.date, calc.published_rows

    date, published = run(body())
    files = journal.day_files(tmp_path, date)
    margin = reader.read_table(tmp_path, date, "margin").drop_columns(["time"]).to_pylist()
    assert margin, "no margin rows were journaled"
    assert len(margin) == published
    last = {}
    for r in margin:
        last[r["account"]] = r
    eng = demo_engine
    for table, batch in reader.read_files({t: files[t] for t in ("fill", "trade")}):
        apply_event(eng, table, batch)
    snap = eng.snapshot()
    for i, acc in enumerate(snap["account"]):
        assert last[acc]["margin"] == pytest.approx(snap["margin"][i], rel=1e-9)
        assert last[acc]["last_seq"] == max(r["last_seq"] for r in margin)


@pytest.mark.parametrize("always_more", [False, True], ids=["inline", "after-what-waits"])
def test_each_fill_gets_its_margin_row_without_a_later_event(tmp_path, run, monkeypatch, always_more):
    """publish_interval_ms = 0: a fill's margin row reaches a client with nothing sent after it, both
    when calc publishes inline (nothing received behind the batch) and when the subscriber says more
    is waiting (forced here, as when what waits holds no new rows): then calc publishes once it has
    applied everything received."""
    if always_more:
        monkeypatch.setattr(Subscriber, "_frames_waiting", lambda self: True)

    async def body():
        async with running_tp(tmp_path) as (srv, url), running_calc(srv.port, tmp_path) as calc:
            async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws, Publisher(url) as pub:
                await recv_type(ws, "auth_reply")
                await ws.send(json.dumps({"type": "subscribe"}))
                await recv_type(ws, "snapshot")
                for i in range(5):
                    await pub.upd("fill", fills(1, i))
                    seq = await pub.wait_acked()
                    async with asyncio.timeout(2.0):
                        while max(r["last_seq"] for r in (await recv_type(ws, "margin"))["rows"]) < seq:
                            pass

    run(body())


async def final_margins(calc_ws: str, desk: str = "risk") -> dict[str, float]:
    async with connect(f"{calc_ws}/ws", **desk_token(desk)) as ws:
        await recv_type(ws, "auth_reply")
        await ws.send(json.dumps({"type": "snapshot_request"}))
        snap = await recv_type(ws, "snapshot")
        return {r["account"]: r["margin"] for r in snap["rows"]}


@pytest.mark.slow
def test_up_restarts_killed_calc_with_same_margins_and_stops_cleanly(tmp_path, demo_engine):
    up = UpProcess(tmp_path)
    try:

        async def load(kill_at: int | None):
            async with Publisher(up.tickerplant) as pub:
                for i in range(60):
                    await pub.upd_many([("fill", fills(20, i * 20)), ("trade", ticks(40, i * 40))])
                    if i % 10 == 0:
                        await pub.wait_acked()
                    if kill_at is not None and i == kill_at:
                        os.kill(up.pids["calc"], signal.SIGKILL)  # under load
                return await pub.wait_acked()

        asyncio.run(load(kill_at=30))
        up.wait_for_line(r"calc restarted", timeout=90)
        last_seq = asyncio.run(asyncio.wait_for(load(kill_at=None), 60))

        async def settled():
            prev = None
            for _ in range(50):
                m = await final_margins(up.calc_ws)
                if m == prev:
                    return m
                prev = m
                await asyncio.sleep(0.3)
            return prev

        after_kill = asyncio.run(settled())
    finally:
        code = up.stop()
    text = "".join(up.output)
    assert "calc died (exit -9)" in text
    assert code == 0 and "tp    stopped (exit 0)" in text
    # complete journals after shutdown: nothing torn, every acked row there
    scans = [journal.scan(p) for p in (tmp_path / "journal").rglob("*.arrows")]
    assert scans and not any(s.torn for s in scans)
    assert max(s.last_seq for s in scans) >= last_seq
    # the same margins as an engine fed the journal without any kill
    date = journal.journal_dates(tmp_path / "journal")[-1]
    files = journal.day_files(tmp_path / "journal", date)
    eng = demo_engine
    for table, batch in reader.read_files({t: files[t] for t in ("fill", "trade")}):
        apply_event(eng, table, batch)
    snap = eng.snapshot()
    expected = dict(zip(snap["account"], snap["margin"], strict=True))
    assert after_kill.keys() == expected.keys()
    for acc, value in expected.items():
        assert after_kill[acc] == pytest.approx(value, rel=1e-9), acc


def test_fills_the_engine_cannot_take_are_counted_and_calc_keeps_going(tmp_path, run):
    """Rows the tickerplant accepts but calc cannot apply (unknown account, unknown sym) are rejected
    by name, counted on /health, and calc goes on margining the good rows."""

    async def health(port: int) -> dict:
        status, body = await http_get("127.0.0.1", port)
        assert status == 200
        return json.loads(body)

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path) as calc:
                async with Publisher(url) as pub:
                    bad = fills(2, 0)
                    bad["account"] = ["NOPE", "TECH01"]
                    bad["sym"] = ["AAPL", "ZZZZ"]
                    await pub.upd("fill", bad)
                    await pub.upd("fill", fills(6, 10))
                    last = await pub.wait_acked()
                deadline = time.monotonic() + 10
                while calc.engine.last_seq < last and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return await health(calc.port), calc.engine.last_seq, last

    h, seen, last = run(body())
    assert seen == last and h["live"] is True
    assert h["rejected_events"] == 2
    assert any("unknown account 'NOPE'" in r for r in h["last_rejects"])
    assert any("'ZZZZ'" in r for r in h["last_rejects"])


def test_a_restarted_calc_does_not_raise_again_what_it_raised(tmp_path, run):
    """calc's alert rules start blank after a restart; the journal's alert rows tell it what is already
    raised, so the restarted calc neither journals nor pushes a second "raised" (75 of 137 alert rows of
    a 50-round chaos run were repeats before), and a new screen still gets today's alerts."""
    rule = {"name": "any-margin", "kind": "utilisation", "threshold": 1e-9, "clear": 0.0, "min_hold_s": 0}

    def raised(date: str) -> list[tuple[str, str]]:
        t = reader.read_table(tmp_path, date, "alert")
        return [
            (a, r)
            for a, r, s in zip(
                t.column("account").to_pylist(),
                t.column("rule").to_pylist(),
                t.column("state").to_pylist(),
                strict=True,
            )
            if s == "raised"
        ]

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            for attempt in range(2):
                async with running_calc(srv.port, tmp_path, alerts=[rule]) as calc:
                    async with Publisher(url) as pub:
                        await pub.upd_many(
                            [("fill", fills(6, attempt * 6)), ("trade", ticks(10, attempt * 10))]
                        )
                        await pub.wait_acked()
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and len(raised(srv.core.date)) < 6:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)
                    if attempt == 1:  # a new screen gets the alerts raised before the restart
                        async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws:
                            await recv_type(ws, "auth_reply")
                            await ws.send(json.dumps({"type": "subscribe"}))
                            earlier = await recv_type(ws, "alert")
                        assert {r["account"] for r in earlier["rows"] if r["rule"] == "any-margin"} >= {
                            "TECH01",
                            "DIV02",
                            "NRG03",
                            "PHRM04",
                            "MN05",
                            "MACRO06",
                        }
                        assert calc.ledger.repeats > 0  # the restarted rules did fire again: dropped
            keys = raised(srv.core.date)
            assert len(keys) >= 6 and len(keys) == len(set(keys)), keys

    run(body())


def test_a_restarting_calc_publishes_no_row_of_a_half_replayed_day(tmp_path, run):
    """calc replays the day's journal at start; its publish timer must not publish the replay's passing
    states: such rows reached clients as live numbers and the journal as history, with last_seq going back
    in time (seen under `marginflow up` after calc restarts). The first rows after the replay are the
    replay's end."""

    async def body():
        async with running_tp(tmp_path, publish_interval_ms=0) as (srv, url):
            async with Publisher(url) as pub:  # thousands of small journal batches: the replay takes a while
                for i in range(1500):
                    await pub.upd_many([("fill", fills(1, i)), ("trade", ticks(3, i * 3))])
                    if i % 100 == 99:
                        await pub.wait_acked()
                last = await pub.wait_acked()
            async with running_calc(srv.port, tmp_path, publish_interval_ms=20) as calc:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not calc.live:
                    await asyncio.sleep(0.02)
                assert calc.live
                await asyncio.sleep(0.5)
            margin = reader.read_table(tmp_path, srv.core.date, "margin")
            assert margin.num_rows > 0
            assert min(margin.column("last_seq").to_pylist()) >= last, (
                "a row of the half-replayed day was published"
            )

    run(body())


def test_margin_rows_go_to_clients_before_the_forecast_is_projected(tmp_path, run):
    """The margin rows go to clients before the forecast is projected (it costs more than the rows): calc's
    own steps recorded in the order they ran, on a fill with a CCP forecast on; the client gets the row."""
    ccp = {"name": "T-CCP", "timezone": "UTC", "cycles": [{"name": "C1", "time": "23:59"}], "rounding": 0.01}

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path, ccps=[ccp]) as calc:
                steps: list[str] = []
                fan_out, project = calc._fan_out, calc.engine.project

                def recorded_fan_out(update, cols):
                    steps.append(update.__name__)
                    fan_out(update, cols)

                def recorded_project(rows, force=False, evaluate=True):
                    steps.append("project")
                    return project(rows, force, evaluate)

                calc._fan_out, calc.engine.project = recorded_fan_out, recorded_project
                async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws:
                    await recv_type(ws, "auth_reply")
                    await ws.send(json.dumps({"type": "subscribe"}))
                    await recv_type(ws, "snapshot")
                    async with Publisher(url) as pub:
                        await pub.upd("fill", fills(1, 0))
                        row = (await recv_type(ws, "margin"))["rows"][0]
        return steps, row

    steps, row = run(body())
    assert row["account"] == "TECH01"
    assert "MarginUpdate" in steps and steps.index("MarginUpdate") < steps.index("project"), steps
