"""The live forecast and the parallel run (calc/projection.py) on a small fixture worked out by hand:
replica with the CCP's rounding and MTA, the forecasts standing at each lead time, the breaks and the
replica's error band, the running accuracy, and the issues of call rows calc cannot place."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from calc.cycles import ns_of
from calc.inputs import AccountSpec
from calc.projection import N_MARGIN, FeatureInputs, Projector, accuracy
from marginflow import config


def utc(*a: int) -> int:
    return ns_of(dt.datetime(*a, tzinfo=dt.UTC))


CCP = {
    "name": "C1",
    "timezone": "UTC",
    "cycles": [{"name": "ITD1", "time": "11:00"}, {"name": "EOD", "time": "18:00"}],
    "minimum_transfer": 5000.0,
    "rounding": 1000.0,
}


def margin_row(account: str, margin: float, collateral: float = 100_000.0) -> dict[str, list]:
    return {
        "account": [account],
        "margin": [margin],
        "var": [margin],
        "es": [margin * 1.1],
        "stress": [0.0],
        "collateral": [collateral],
    }


@pytest.fixture
def proj() -> Projector:
    calc = config.load(overrides={"calc": {"ccps": [CCP], "forecast_leads_s": [3600, 900]}}).calc
    specs = {a: AccountSpec(a, "hvar", 100_000.0) for a in ("A", "B")}
    p = Projector(calc, specs)
    p.advance(utc(2024, 1, 3, 9, 0))  # Wednesday 09:00: the clock's first reading
    return p


def by_horizon(rows: dict[str, list]) -> dict[str, dict]:
    return {h: {k: v[i] for k, v in rows.items()} for i, h in enumerate(rows["horizon"])}


def test_replica_forecast_rounding_and_minimum_transfer(proj: Projector) -> None:
    t = utc(2024, 1, 3, 9, 0)
    proj.on_margin(margin_row("A", 104_200.0), t)
    rows = by_horizon(proj.forecast_rows(t, last_seq=7))
    assert set(rows) == {"next", "eod", "t+1"}  # B has no margin yet: no rows
    nxt = rows["next"]
    assert (nxt["cycle"], nxt["business_date"], nxt["cycle_time"]) == (
        "ITD1",
        "2024-01-03",
        utc(2024, 1, 3, 11),
    )
    assert (rows["eod"]["cycle"], rows["t+1"]["business_date"]) == ("EOD", "2024-01-04")
    assert nxt["replica"] == nxt["p50"] == nxt["p95"] == 105_000.0  # rounded up to 1,000; no error band yet
    assert nxt["call_p50"] == 5000.0 and nxt["method"] == "replica" and nxt["last_seq"] == 7
    proj.on_margin(margin_row("A", 104_500.0), t)  # a move inside the rounding: no new row
    assert proj.forecast_rows(t + 10**9, last_seq=8)["account"] == []
    proj.on_margin(margin_row("A", 104_900.0, collateral=101_000.0), t)  # call 4,000 < MTA: no call
    rows = by_horizon(proj.forecast_rows(t + 2 * 10**9, 9))  # the same p50, a new call
    assert rows["next"]["p50"] == 105_000.0 and rows["next"]["call_p50"] == 0.0


def test_parallel_run_matches_calls_with_the_forecast_standing_at_each_lead(proj: Projector) -> None:
    proj.on_margin(margin_row("A", 104_200.0), utc(2024, 1, 3, 9, 0))
    proj.forecast_rows(utc(2024, 1, 3, 9, 0), 1)  # stands for ITD1 at both leads (10:00 and 10:45)
    proj.on_margin(margin_row("A", 110_500.0), utc(2024, 1, 3, 10, 30))
    proj.forecast_rows(utc(2024, 1, 3, 10, 30), 2)  # after 10:00: only the 15-min lead takes 111,000
    proj.advance(utc(2024, 1, 3, 11, 0, 1))  # ITD1 passed: the replica standing then was 111,000
    assert proj.replica_at[("2024-01-03", "ITD1")][proj.index["A"]] == 111_000.0
    calls = {
        "business_date": ["2024-01-03", "2024-01-03", "2024-01-03"],
        "cycle": ["ITD1", "ITD9", "ITD1"],
        "ccp": ["C1", "C1", "C1"],
        "account": ["A", "A", "Z"],
        "requirement": [113_220.0, 1.0, 1.0],
        "call": [13_220.0, 0.0, 0.0],
        "collateral": [100_000.0, 0.0, 0.0],
    }
    check, issues = proj.on_calls(calls)
    assert len(issues) == 2 and "field cycle" in issues[0] and "field account" in issues[1]
    got = {check["lead_s"][i]: (check["p50"][i], check["error"][i], check["covered"][i]) for i in range(2)}
    assert got == {900: (111_000.0, -2220.0, 0), 3600: (105_000.0, -8220.0, 0)}
    assert proj.accounts["A"].breaks[-1] == pytest.approx(113_220 / 111_000 - 1)
    # the band is now the replica's error at C1 (one call: +2%): p50 = p95 = replica x 1.02
    rows = by_horizon(proj.forecast_rows(utc(2024, 1, 3, 11, 5), 3))
    assert rows["next"]["cycle"] == "EOD" and rows["next"]["p50"] == pytest.approx(111_000 * 1.02)
    acc = accuracy(check)
    assert acc[900] == {
        "calls": 1.0,
        "mae": 2220.0,
        "bias": -2220.0,
        "hit_rate": 1.0,  # |2,220| <= 5% of 113,220
        "worst_under": -2220.0,
        "coverage": 0.0,
    }
    assert acc[3600]["hit_rate"] == 0.0  # 8,220 > 5,661


def test_feature_inputs_of_the_same_state_are_the_same(proj: Projector) -> None:
    proj.on_margin(margin_row("A", 50_000.0), utc(2024, 1, 3, 9, 0))
    proj.on_margin(margin_row("A", 60_000.0), utc(2024, 1, 3, 10, 30))
    keys, x = proj.inputs(utc(2024, 1, 3, 10, 30))
    assert [k[1] for k in keys] == ["next", "eod", "t+1"]
    assert isinstance(x, FeatureInputs) and len(x) == 3
    assert x.margin_1h[0] == 50_000.0  # standing at 09:30
    assert x.to_cycle_s.tolist() == [1800.0, 7.5 * 3600, (24 + 7.5) * 3600]
    assert x.horizon.tolist() == [0.0, 1.0, 2.0] and x.weekday.tolist() == [2.0, 2.0, 3.0]
    assert np.isnan(x.last_break).all() and np.isnan(x.vol94).all()  # no calls, no history given


def test_an_account_at_an_unknown_ccp_is_refused_naming_it() -> None:
    calc = config.load(overrides={"calc": {"ccps": [CCP]}}).calc
    with pytest.raises(ValueError, match="account 'A': ccp 'NOPE'"):
        Projector(calc, {"A": AccountSpec("A", "hvar", 1.0, ccp="NOPE")})


def test_what_if_moves_the_next_call_by_the_replica_of_the_new_margin(proj: Projector) -> None:
    t = utc(2024, 1, 3, 9, 0)
    proj.on_margin(margin_row("A", 104_200.0), t)
    f = proj.what_if("A", 121_500.0, t)
    assert f is not None and (f["cycle"], f["method"]) == ("ITD1", "replica")
    assert f["before"] == {"p50": 105_000.0, "p95": 105_000.0, "call_p50": 5000.0, "call_p95": 5000.0}
    assert all(type(v) is float for side in ("before", "after") for v in f[side].values())  # (msgspec, JSON)
    assert f["after"]["p50"] == 122_000.0 and f["after"]["call_p50"] == 22_000.0
    assert proj.num[proj.index["A"], N_MARGIN] == 104_200.0  # the state is untouched
    assert proj.what_if("B", 1.0, t) is None  # no margin yet


def test_predicted_call_alert_carries_the_lead_time_drivers_and_stress() -> None:
    """A fill that takes TECH01's margin above its collateral: the forecast's call at DEMO-CCP's next
    cycle (11:00 New York = 16:00 UTC in January) raises the predicted_call rule once, with its lead."""
    from calc.engine import MarginEngine

    rule = {"name": "pc", "kind": "predicted_call", "threshold": 1000.0, "accounts": ["TECH01"]}
    eng = MarginEngine.from_config(config.load(overrides={"calc": {"alerts": [rule]}}).calc)
    t = utc(2024, 1, 3, 14, 30)  # Wednesday 09:30 New York
    eng.apply_prices(["AAPL"], np.array([130.0]), np.array([1]), np.array([t]))
    eng.project(eng.changed_rows())
    assert eng.take_alerts()["account"] == []  # TECH01's margin is below its collateral: no call
    eng.apply_fills(
        ["TECH01"], ["AAPL"], ["B"], np.array([60_000.0]), np.array([130.0]), np.array([2]), np.array([t])
    )
    rows = eng.changed_rows()
    forecast = eng.project(rows)
    alerts = eng.take_alerts()
    nxt = {h: i for i, h in enumerate(forecast["horizon"]) if forecast["account"][i] == "TECH01"}["next"]
    call = forecast["call_p50"][nxt]
    margin = rows["margin"][rows["account"].index("TECH01")]
    assert call == math.ceil(margin / 1000) * 1000 - 350_000.0 > 1000.0  # rounding 1,000; collateral 350,000
    assert (
        alerts["kind"] == ["predicted_call"] and alerts["state"] == ["raised"] and alerts["value"] == [call]
    )
    text = alerts["message"][0]
    assert "DEMO-CCP ITD1 2024-01-03 in 1h30m" in text and "drivers AAPL" in text and "worst stress" in text


def test_a_margin_jittering_across_a_rounding_step_writes_a_row_every_5_s_at_most(proj: Projector) -> None:
    t0 = utc(2024, 1, 3, 9, 0)
    written = []
    for k in range(20):  # 104,900 / 105,100 every second: the replica flips 105,000 / 106,000 (0.95%)
        proj.on_margin(margin_row("A", 104_900.0 if k % 2 else 105_100.0), t0 + k * 10**9)
        rows = proj.forecast_rows(t0 + k * 10**9, k)
        written += [k for h in rows["horizon"] if h == "next"]
    assert written == [0, 5, 10, 15]  # the first, then one each 5 s
    proj.on_margin(margin_row("A", 120_000.0), t0 + 21 * 10**9)  # a 13% move: at once
    assert proj.forecast_rows(t0 + 21 * 10**9, 21)["p50"][0] == 120_000.0
