"""calc/ccp/scenarios.py: the filtered, stressed and floor sets of a small history, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calc.ccp.presets import resolve
from calc.ccp.scenarios import build_sets
from calc.history import InputError, PriceHistory
from marginflow.config import CcpModelConfig

DATES = np.array(
    ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-06", "2020-01-07", "2020-01-08"],
    dtype="datetime64[D]",
)
# A: +10 %, -10 %, 0, +10 %, then back to 100 ; B flat then doubling once
HIST = PriceHistory(
    DATES,
    ["A", "B"],
    np.array([[100.0, 10.0], [110.0, 10.0], [99.0, 10.0], [99.0, 20.0], [108.9, 20.0], [100.0, 20.0]]),
)


def spec(**fields):
    return resolve(CcpModelConfig(name="t", **fields))


def test_filtered_set_lookback_horizon_and_end_dates():
    sets = build_sets(HIST, spec(lookback_days=3, holding_days=1), "2020-01-08", vol_scenarios="none")
    f = sets["filtered"]
    assert list(sets) == ["filtered"] and f.vol_mult is None
    # the last 3 daily returns: 99 -> 99, 99 -> 108.9, 108.9 -> 100; B: 10 -> 20, flat, flat
    np.testing.assert_allclose(f.returns[:, 0], [0.0, 0.1, 100 / 108.9 - 1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(f.returns[:, 1], [1.0, 0.0, 0.0], atol=1e-12)
    assert f.end_dates.tolist() == DATES[3:].tolist()
    # 2-day windows over the last 4 returns: 110 -> 99, 99 -> 99 (ends 01-06), 99 -> 108.9, 99 -> 100
    two = build_sets(HIST, spec(lookback_days=4, holding_days=2), "2020-01-08", vol_scenarios="none")[
        "filtered"
    ]
    np.testing.assert_allclose(two.returns[:, 0], [99 / 110 - 1, 0.1, 100 / 99 - 1], rtol=1e-12)
    assert two.end_dates.tolist() == DATES[3:].tolist()
    # as_of cuts the history: up to 2020-01-06, the last 2 returns are -10 % and 0
    cut = build_sets(HIST, spec(lookback_days=2), "2020-01-06", vol_scenarios="none")["filtered"]
    np.testing.assert_allclose(cut.returns[:, 0], [-0.1, 0.0], atol=1e-12)


def test_ewma_filtering_and_vol_proxy_by_hand():
    h = PriceHistory(DATES[:3], ["A"], np.array([[100.0], [110.0], [99.0]]))
    a, b = math.log(1.1), math.log(0.9)
    lam = 0.9
    v0 = (a * a + b * b) / 2  # seeded with the mean square return
    v1 = lam * v0 + (1 - lam) * a * a
    v2 = lam * v1 + (1 - lam) * b * b
    f = build_sets(h, spec(lookback_days=2, ewma_lambda=lam), "2020-01-03", vol_scenarios="proxy")["filtered"]
    # each day rescaled to today's volatility: r_t sigma_T / sigma_t
    expect = [math.expm1(a * math.sqrt(v2 / v0)), math.expm1(b * math.sqrt(v2 / v1))]
    np.testing.assert_allclose(f.returns[:, 0], expect, rtol=1e-12)
    # implied vol proxy: the EWMA volatility at each window's end over its start
    np.testing.assert_allclose(f.vol_mult[:, 0], [math.sqrt(v1 / v0), math.sqrt(v2 / v1)], rtol=1e-12)


def test_stressed_and_floor_sets_unfiltered():
    s = spec(
        lookback_days=2,
        ewma_lambda=0.9,
        stress_from="2020-01-02",
        stress_to="2020-01-06",
        apc="floor",
        apc_floor_days=4,
    )
    sets = build_sets(HIST, s, "2020-01-08", vol_scenarios="none")
    assert list(sets) == ["filtered", "stressed", "floor"]
    # stressed: closes 110, 99, 99 (B 10, 10, 20): returns -10 %, 0 and 0, +100 %, not filtered
    np.testing.assert_allclose(sets["stressed"].returns, [[-0.1, 0.0], [0.0, 1.0]], atol=1e-12)
    assert sets["stressed"].end_dates.tolist() == DATES[2:4].tolist()
    # floor: the last 4 returns, unfiltered
    np.testing.assert_allclose(sets["floor"].returns[:, 0], [-0.1, 0.0, 0.1, 100 / 108.9 - 1], atol=1e-12)


def test_bad_periods_are_refused_naming_the_field():
    with pytest.raises(InputError, match="stress_from .. stress_to 2019-12-01 .. 2020-01-06 is not within"):
        build_sets(HIST, spec(stress_from="2019-12-01", stress_to="2020-01-06"), "2020-01-08")
    with pytest.raises(InputError, match="not within the price history 2020-01-01 .. 2020-01-03"):
        build_sets(HIST, spec(stress_from="2020-01-02", stress_to="2020-01-06"), "2020-01-03")
    with pytest.raises(InputError, match="apc_floor_days 2520 needs that many daily returns"):
        build_sets(HIST, spec(apc="floor"), "2020-01-08")
    with pytest.raises(InputError, match="as_of: 2019-01-01 is before"):
        build_sets(HIST, spec(), "2019-01-01")
    with pytest.raises(InputError, match="holding_days 9 needs at least that many daily returns"):
        build_sets(HIST, spec(holding_days=9), "2020-01-08")
