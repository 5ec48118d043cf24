"""The forecast of the call in a running calc (real tickerplant, real calc, a websocket client): forecast
rows per account and horizon, actual `call` rows in -> the parallel run's `callcheck` rows out, a call row
calc cannot place counted as a reject naming the field, and the forecasts standing before a calc restart
still matched with a call that arrives after it (restored from the journal)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import time
from itertools import pairwise

import pytest
from websockets.asyncio.client import connect

from marginflow import config
from marginflow.up import http_get
from tests.support.rows import fills
from tests.support.servers import recv_type, running_calc, running_tp
from tests.support.tokens import desk_token
from tickerplant.client import Publisher

LEADS = [60, 600]


def ccp_in_two_hours() -> tuple[dict, str, str]:
    """A UTC CCP with one cycle two hours from now (its business date may be the next weekday)."""
    at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    day = at.date()
    while day.weekday() >= 5:
        day += dt.timedelta(days=1)
    ccp = {"name": "T-CCP", "timezone": "UTC", "cycles": [{"name": "C1", "time": at.strftime("%H:%M")}]}
    ccp |= {"rounding": 1000.0, "minimum_transfer": 0.0}
    return ccp, day.isoformat(), "C1"


def call_rows(date: str, cycle: str, accounts: list[str], requirement: float) -> dict[str, list]:
    n = len(accounts)
    return {
        "business_date": [date] * n,
        "cycle": [cycle] * n,
        "ccp": ["T-CCP"] * n,
        "account": accounts,
        "requirement": [requirement] * n,
        "call": [0.0] * n,
        "collateral": [requirement] * n,
    }


async def forecasts_of(ws, want: set[str]) -> dict[tuple[str, str], dict]:
    got: dict[tuple[str, str], dict] = {}
    while not want <= {a for a, _ in got}:
        for r in (await recv_type(ws, "forecast"))["rows"]:
            got[(r["account"], r["horizon"])] = r
    return got


def test_forecast_rows_parallel_run_and_restart(tmp_path, run):
    ccp, date, cycle = ccp_in_two_hours()
    calc_cfg = {"ccps": [ccp], "forecast_leads_s": LEADS}

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path, **calc_cfg) as calc:
                async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws:
                    await recv_type(ws, "auth_reply")
                    await ws.send(json.dumps({"type": "subscribe"}))
                    await recv_type(ws, "snapshot")
                    async with Publisher(url) as pub:  # a tick: the event clock the forecast runs on
                        await pub.upd("trade", {"sym": ["AAPL"], "price": [129.5], "size": [100]})
                        before = await forecasts_of(ws, {"TECH01", "DIV02"})
                    now = calc.engine.snapshot()  # (no event since: the margins the forecast saw)
                    snap = {a: {k: now[k][i] for k in now} for i, a in enumerate(now["account"])}
                    async with Publisher(url) as pub:
                        bad = call_rows(date, "NOPE", ["TECH01"], 1.0)
                        await pub.upd("call", call_rows(date, cycle, ["TECH01"], 123_000.0))
                        await pub.upd("call", bad)
                        await pub.wait_acked()
                    check = (await recv_type(ws, "callcheck"))["rows"]
                    health = json.loads((await http_get("127.0.0.1", calc.port, "/health"))[1])
            async with running_calc(
                srv.port, tmp_path, **calc_cfg
            ) as calc2:  # a restart: replays the journal
                async with connect(f"ws://127.0.0.1:{calc2.port}/ws", **desk_token()) as ws:
                    await recv_type(ws, "auth_reply")
                    await ws.send(json.dumps({"type": "subscribe"}))
                    async with Publisher(url) as pub:
                        await pub.upd("call", call_rows(date, cycle, ["DIV02"], 99_000.0))
                        await pub.wait_acked()
                    after = (await recv_type(ws, "callcheck"))["rows"]
        return snap, before, check, health, after

    snap, before, check, health, after = run(body())
    tech = before[("TECH01", "next")]
    assert (tech["ccp"], tech["cycle"], tech["business_date"]) == ("T-CCP", cycle, date)
    assert {h for a, h in before if a == "TECH01"} == {"next", "eod", "t+1"}
    assert tech["replica"] == math.ceil(snap["TECH01"]["margin"] / 1000.0) * 1000.0  # the CCP's rounding
    assert tech["p50"] == tech["p95"] == tech["replica"] and tech["method"] == "replica"  # no calls yet
    assert tech["call_p50"] == tech["replica"] - snap["TECH01"]["collateral"]
    # the call: one row per lead time, each the forecast standing then (the same here: nothing moved)
    assert sorted(r["lead_s"] for r in check) == LEADS and {r["account"] for r in check} == {"TECH01"}
    assert all(r["p50"] == tech["p50"] and r["error"] == tech["p50"] - 123_000.0 for r in check)
    assert all(r["covered"] == int(123_000.0 <= tech["p95"]) for r in check)
    assert health["forecast"]["method"] == "replica" and health["forecast"]["call_issues"] == 1
    assert any("field cycle" in r for r in health["last_rejects"])
    assert set(health["forecast"]["parallel_run"]) == {str(x) for x in LEADS}
    # after the restart, DIV02's call meets the forecast that stood for it before the restart
    div = before[("DIV02", "next")]
    assert sorted(r["lead_s"] for r in after) == LEADS
    assert all(r["account"] == "DIV02" and r["p50"] == div["p50"] for r in after)


def test_the_forecast_is_evaluated_at_most_every_interval_and_follows_the_last_fill(tmp_path, run):
    """calc.forecast_interval_ms: fills published one by one (a publish each, publish_interval_ms = 0) get
    their margin rows at once, but the forecast is evaluated at most once per interval (it ran after every
    publish, delaying the next fill); the last fill's forecast still comes, at the interval's end."""
    ccp, _date, _cycle = ccp_in_two_hours()
    interval_ms, n = 400.0, 12

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path, ccps=[ccp], forecast_interval_ms=interval_ms) as calc:
                proj = calc.engine.projector
                evaluations: list[float] = []
                real = proj.forecast_rows

                def counted(*args, **kwargs):  # the real method, its calls timed
                    evaluations.append(time.monotonic())
                    return real(*args, **kwargs)

                proj.forecast_rows = counted
                async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws:
                    await recv_type(ws, "auth_reply")
                    await ws.send(json.dumps({"type": "subscribe"}))
                    await recv_type(ws, "snapshot")
                    async with Publisher(url) as pub:
                        await pub.upd("trade", {"sym": ["AAPL"], "price": [129.5], "size": [100]})
                        await forecasts_of(ws, {"TECH01"})
                        t0, margin_rows = time.monotonic(), 0
                        for k in range(n):  # each buy adds 5,000 AAPL: TECH01's margin moves > 5% each time
                            fill = fills(1, 100 + k, accounts=("TECH01",))
                            fill.update(sym=["AAPL"], side=["B"], qty=[5000.0], price=[130.0])
                            await pub.upd("fill", fill)
                            await pub.wait_acked()
                            while "TECH01" not in (await recv_type(ws, "margin"))["rows"][0]["account"]:
                                pass
                            margin_rows += 1
                        fills_s = time.monotonic() - t0
                    last = calc.engine.snapshot()
                    margin = last["margin"][last["account"].index("TECH01")]
                    async with asyncio.timeout(10):  # the forecast of the last margin, an interval later
                        while True:
                            got = await forecasts_of(ws, {"TECH01"})
                            if got[("TECH01", "next")]["replica"] == math.ceil(margin / 1000.0) * 1000.0:
                                break
                    waited = time.monotonic() - t0 - fills_s
        return evaluations, t0, fills_s, waited, margin_rows

    evaluations, t0, fills_s, waited, margin_rows = run(body())
    during = [t for t in evaluations if t0 <= t <= t0 + fills_s]
    assert margin_rows == n  # every fill's margin row, none held back
    assert len(during) <= fills_s / (interval_ms / 1000) + 2, (len(during), fills_s)  # was one per fill
    assert all(b - a >= interval_ms / 1000 * 0.95 for a, b in pairwise(evaluations)), evaluations
    assert waited <= interval_ms / 1000 + 1.0, waited


def test_publishes_as_far_apart_as_the_forecast_interval_each_evaluate_it(run):
    """With publish_interval_ms >= forecast_interval_ms every publish evaluates the forecast (a publish timer
    that wakes a little early must not push it to the publish after); below, one per interval, the next
    one brought by a timer."""
    from calc.server import CalcService

    async def due_twice(publish_ms: float) -> tuple[bool, bool, bool]:
        calc = {"publish_interval_ms": publish_ms, "forecast_interval_ms": 100.0}
        cfg = config.load(overrides={"calc": calc})
        service = CalcService(cfg)
        first, second = service._forecast_due(), service._forecast_due()
        woken = service._forecast_wake is not None
        if woken:
            service._forecast_wake.cancel()
        return first, second, woken

    assert run(due_twice(100.0)) == (True, True, False)
    assert run(due_twice(0.0)) == (True, False, True)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 60_001.0])
def test_a_bad_forecast_interval_is_refused_naming_the_key(value):
    with pytest.raises(SystemExit, match="calc.forecast_interval_ms: must be"):
        config.load(overrides={"calc": {"forecast_interval_ms": value}})
