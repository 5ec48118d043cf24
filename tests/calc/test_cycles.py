"""CCP call cycles (calc/cycles.py): local times across time zones and daylight saving, weekends and
holidays, the end of day and the next day, rounding and the minimum transfer amount; config checks."""

from __future__ import annotations

import datetime as dt

import pytest

from calc.cycles import Schedule, call_amount, ns_of, rounded_up
from marginflow import config
from marginflow.config import CcpConfig, CycleConfig


def utc(*a: int) -> int:
    return ns_of(dt.datetime(*a, tzinfo=dt.UTC))


def ccp(tz: str = "America/New_York", **kw: object) -> Schedule:
    cycles = [CycleConfig("ITD1", "11:00"), CycleConfig("ITD2", "14:00"), CycleConfig("EOD", "18:00")]
    return Schedule.of(CcpConfig(name="X", timezone=tz, cycles=cycles, **kw))  # type: ignore[arg-type]


def test_new_york_cycles_follow_daylight_saving() -> None:
    s = ccp()
    # Friday 2022-03-11 is EST (UTC-5): 11:00 local = 16:00 UTC; Monday 2022-03-14 is EDT (UTC-4): 15:00 UTC
    h = s.horizons(utc(2022, 3, 11, 15, 59))
    assert (h["next"].name, h["next"].time_ns) == ("ITD1", utc(2022, 3, 11, 16, 0))
    assert (h["eod"].name, h["eod"].time_ns) == ("EOD", utc(2022, 3, 11, 23, 0))
    assert (h["t+1"].business_date, h["t+1"].time_ns) == ("2022-03-14", utc(2022, 3, 14, 22, 0))
    after_eod = s.horizons(utc(2022, 3, 11, 23, 0))  # a cycle at an instant is past from that instant
    assert after_eod["next"].business_date == "2022-03-14"
    assert after_eod["next"].time_ns == utc(2022, 3, 14, 15, 0)
    assert after_eod["eod"].time_ns == utc(2022, 3, 14, 22, 0)
    assert after_eod["t+1"].business_date == "2022-03-15"


def test_a_zone_east_of_utc_has_its_business_date_before_utc_midnight() -> None:
    s = ccp("Asia/Tokyo")  # UTC+9, no daylight saving: 11:00 JST = 02:00 UTC the same date
    h = s.horizons(utc(2024, 1, 4, 23, 30))  # Thursday 23:30 UTC = Friday 08:30 JST
    assert (h["next"].business_date, h["next"].name) == ("2024-01-05", "ITD1")
    assert h["next"].time_ns == utc(2024, 1, 5, 2, 0)
    assert h["t+1"].business_date == "2024-01-08"  # Friday's T+1 is Monday
    prev = s.previous(utc(2024, 1, 4, 23, 30))
    assert prev is not None and (prev.business_date, prev.name) == ("2024-01-04", "EOD")


def test_holidays_and_weekends_have_no_cycle() -> None:
    s = ccp("UTC", holidays=["2024-12-25"])
    h = s.horizons(utc(2024, 12, 24, 18, 0))
    assert h["next"].business_date == "2024-12-26" and h["t+1"].business_date == "2024-12-27"
    assert s.find("2024-12-25", "EOD") is None and s.find("2024-12-28", "EOD") is None
    assert s.find("2024-12-26", "ITD2") is not None and s.find("2024-12-26", "NOPE") is None


def test_rounding_and_minimum_transfer() -> None:
    assert rounded_up(12_000.0, 1000.0) == 12_000.0
    assert rounded_up(12_000.01, 1000.0) == 13_000.0
    assert rounded_up(11_999.999999999, 1000.0) == 12_000.0  # float noise is not a new multiple
    assert rounded_up(1234.5, 0.0) == 1234.5
    assert call_amount(130_000.0, 120_000.0, 10_000.0) == 10_000.0
    assert call_amount(129_000.0, 120_000.0, 10_000.0) == 0.0  # below the MTA
    assert call_amount(100_000.0, 120_000.0, 10_000.0) == -20_000.0  # excess returned
    s = ccp(rounding=1000.0, minimum_transfer=5000.0)
    assert s.call(s.requirement(104_200.0), 100_000.0) == 5000.0


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"cycles": [{"name": "A", "time": "25:00"}]}, "cycles[0].time"),
        ({"cycles": [{"name": "A", "time": "14:00"}, {"name": "B", "time": "11:00"}]}, "cycles[1].time"),
        ({"cycles": [{"name": "A", "time": "11:00"}, {"name": "A", "time": "14:00"}]}, "cycles"),
        ({"minimum_transfer": -1.0}, "minimum_transfer"),
        ({"holidays": ["2024-13-01"]}, "holidays"),
        ({"cycles": []}, "cycles"),
    ],
)
def test_bad_ccp_config_names_the_key(entry: dict, field: str) -> None:
    base = {"name": "X", "timezone": "UTC", "cycles": [{"name": "EOD", "time": "18:00"}]}
    with pytest.raises(SystemExit) as e:
        config.load(overrides={"calc": {"ccps": [base | entry]}})
    assert f"calc.ccps[0].{field}" in str(e.value)
