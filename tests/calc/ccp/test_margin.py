"""calc/ccp/margin.py: each component against a hand calculation (the arithmetic in the comments), and
each preset against a worked example of a three-position book written out below."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calc.ccp.margin import (
    Addons,
    apc_addon,
    combine,
    concentration_addon,
    evaluate,
    liquidity_addon,
    option_credit,
    round_up,
    var_es,
)
from calc.ccp.presets import resolve
from marginflow.config import CcpModelConfig

NAN = math.nan


def spec(**fields):
    return resolve(CcpModelConfig(name="m", **fields), "2022-12-28")


def test_var_es_follow_the_engines_tail_convention():
    pnl = np.array([-10.0, 5.0, -30.0, 20.0, -20.0])  # losses worst first: 30, 20, 10
    # c = 0.8: (1-c) S = 1 scenario -> VaR = ES = the worst loss
    assert var_es(pnl, 0.8) == pytest.approx((30.0, 30.0))
    # c = 0.6: 2 scenarios -> VaR = 2nd worst = 20, ES = (30 + 20) / 2 = 25
    assert var_es(pnl, 0.6) == pytest.approx((20.0, 25.0))
    # c = 0.7: 1.5 scenarios -> k = 2, VaR = 20, ES = (30 + 0.5 x 20) / 1.5 = 26.666...
    assert var_es(pnl, 0.7) == pytest.approx((20.0, 40.0 / 1.5))
    # c = 0.99 with 5 scenarios: fewer than 1/(1-c) -> the worst alone
    assert var_es(pnl, 0.99) == pytest.approx((30.0, 30.0))
    # a book that gains in every scenario needs no margin (floored at 0)
    assert var_es(np.array([1.0, 2.0, 3.0]), 0.6) == (0.0, 0.0)


def test_combine_filtered_and_stressed():
    assert combine(100.0, 150.0, "max", 0.5, True) == 150.0  # max(100, 150)
    assert combine(100.0, 150.0, "weight", 0.75, True) == pytest.approx(112.5)  # 75 + 37.5
    assert combine(100.0, 150.0, "weight", 0.75, False) == 100.0  # no stressed period: filtered alone


def test_apc_tools_of_rts_153_article_28():
    # buffer: 25 % of the base 150 = 37.5
    assert apc_addon(spec(apc="buffer"), 150.0, 100.0, 150.0, 0.0) == pytest.approx(37.5)
    # stress weight 0.25 over a base of 0.9 x 100 + 0.1 x 150 = 105: 0.75 x 100 + 0.25 x 150 = 112.5 -> 7.5
    sw = spec(apc="stress_weight")
    assert apc_addon(sw, 105.0, 100.0, 150.0, 0.0) == pytest.approx(7.5)
    # ... and nothing when the base already weights the stressed number more (base 150)
    assert apc_addon(sw, 150.0, 100.0, 150.0, 0.0) == 0.0
    # floor: the 10-year measure 130 over a base of 105 -> 25; a floor below the base -> 0
    assert apc_addon(spec(apc="floor"), 105.0, 100.0, 150.0, 130.0) == pytest.approx(25.0)
    assert apc_addon(spec(apc="floor"), 105.0, 100.0, 150.0, 90.0) == 0.0
    assert apc_addon(spec(apc="none"), 105.0, 100.0, 150.0, 130.0) == 0.0


def test_liquidity_half_spread_times_quantity_and_multiplier():
    # 100 x 1 x 0.05 = 5 plus |-50| x 100 x 0.2 = 1000 -> 1005
    qty, mult, half = np.array([100.0, -50.0]), np.array([1.0, 100.0]), np.array([0.05, 0.2])
    assert liquidity_addon(qty, mult, half) == pytest.approx(1005.0)


def test_concentration_above_a_fraction_of_adv():
    qty = np.array([1000.0, -300.0, 50.0])
    mult, price = np.array([1.0, 1.0, 100.0]), np.array([20.0, 50.0, 3.0])
    adv = np.array([2000.0, 1000.0, NAN])
    # fraction 0.1, rate 0.02: (1000 - 200) x 1 x 20 x 0.02 = 320; (300 - 100) x 1 x 50 x 0.02 = 200;
    # the third has no ADV: no term -> 520
    assert concentration_addon(qty, mult, price, adv, 0.1, 0.02) == pytest.approx(520.0)
    # fraction 0.5: (1000 - 1000)+ = 0; (300 - 500)+ = 0 -> 0
    assert concentration_addon(qty, mult, price, adv, 0.5, 0.02) == 0.0
    assert concentration_addon(qty, mult, price, adv, 0.1, 0.0) == 0.0  # rate 0 = off


def test_option_credit_and_premium_margin():
    qty, mult = np.array([10.0, -5.0, 100.0]), np.array([100.0, 100.0, 1.0])
    price, is_opt = np.array([2.5, 4.0, 50.0]), np.array([True, True, False])
    # long options 10 x 100 x 2.5 = 2500 (the stock does not count); cap 0.5 -> 1250; at most the margin
    assert option_credit(qty, mult, price, is_opt, 0.5, 5000.0) == pytest.approx(1250.0)
    assert option_credit(qty, mult, price, is_opt, 1.0, 100.0) == pytest.approx(100.0)
    assert option_credit(qty, mult, price, is_opt, 0.0, 5000.0) == 0.0
    # premium margin: the short options' value 5 x 100 x 4 = 2000 is charged: 2500 - 2000 = 500 (cap 1)
    assert option_credit(qty, mult, price, is_opt, 1.0, 5000.0, premium=True) == pytest.approx(500.0)
    # with no credit for longs the charge stands alone: -2000, whatever the cap
    assert option_credit(qty, mult, price, is_opt, 0.0, 5000.0, premium=True) == pytest.approx(-2000.0)


def test_round_up_to_a_multiple():
    assert round_up(1234.01, 100.0) == pytest.approx(1300.0)
    assert round_up(1200.0, 100.0) == pytest.approx(1200.0)
    assert round_up(0.1 + 0.2, 0.1) == pytest.approx(0.3)  # 3.0000000000000004 steps stays 3
    assert round_up(1234.5, 0.0) == 1234.5


# ---------------------------------------------------------------- the presets' worked example
#
# Book: A long 100 at 50 (mult 1, exposure 5000); B short 200 at 20 (exposure -4000); C a long call on A,
# 2 contracts, mult 100, value 1.0 (long option value 2 x 100 x 1.0 = 200).
# Filtered set, 5 scenarios: returns A [-.04, .02, -.01, .03, -.02], B [-.01, .01, .02, -.02, .01];
# C's per-contract P&L (full revaluation, mult included) [-150, 80, -40, 130, -70].
#   linear 5000 rA - 4000 rB = [-160, 60, -130, 230, -140]; C x 2 = [-300, 160, -80, 260, -140]
#   total = [-460, 220, -210, 490, -280]; losses worst first 460, 280, 210
#   at c = 0.6 (2 tail scenarios): VaR = 280, ES = (460 + 280) / 2 = 370
# Stressed set, 4 scenarios: A [-.10, .05, -.06, .02], B [-.05, .08, .03, 0]; C [-250, 200, -180, 50]
#   linear = [-300, -70, -420, 100]; C x 2 = [-500, 400, -360, 100]; total = [-800, 330, -780, 200]
#   at c = 0.6: tail 1.6 scenarios, k = 2: VaR = 780, ES = (800 + 0.6 x 780) / 1.6 = 1268 / 1.6 = 792.5
# Add-on inputs: half spreads A 0.053, B 0.02, C 0.10 -> liquidity 100 x 0.053 + 200 x 0.02 + 2 x 100 x 0.1
#   = 5.3 + 4 + 20 = 29.3; ADV A 500, B 4000, C none.


def _book():
    ra = np.array([[-0.04, -0.01], [0.02, 0.01], [-0.01, 0.02], [0.03, -0.02], [-0.02, 0.01]])
    rs = np.array([[-0.10, -0.05], [0.05, 0.08], [-0.06, 0.03], [0.02, 0.0]])
    x = np.array([5000.0, -4000.0])
    filtered = ra @ x + 2 * np.array([-150.0, 80.0, -40.0, 130.0, -70.0])
    stressed = rs @ x + 2 * np.array([-250.0, 200.0, -180.0, 50.0])
    np.testing.assert_allclose(filtered, [-460, 220, -210, 490, -280], atol=1e-9)
    np.testing.assert_allclose(stressed, [-800, 330, -780, 200], atol=1e-9)
    addons = Addons(
        qty=np.array([100.0, -200.0, 2.0]),
        mult=np.array([1.0, 1.0, 100.0]),
        price=np.array([50.0, 20.0, 1.0]),
        half_spread=np.array([0.053, 0.02, 0.10]),
        adv=np.array([500.0, 4000.0, NAN]),
        is_option=np.array([False, False, True]),
    )
    return {"filtered": filtered, "stressed": stressed}, addons


def test_prisma_preset_worked_example():
    # prisma: ES, stressed as a floor (max), liquidity, concentration 0.1 of ADV at 2 %, credit 100 %,
    # rounding 0.01. filtered ES 370, stressed ES 792.5 -> base 792.5; no APC.
    # concentration: A (100 - 0.1 x 500) x 1 x 50 x 0.02 = 50; B (200 - 400)+ = 0 -> 50
    # gross 792.5 + 29.3 + 50 = 871.8; credit min(200, 871.8) = 200 -> margin 671.8
    pnl, addons = _book()
    s = resolve(CcpModelConfig(name="p", preset="prisma", confidence=0.6), "2022-12-28")
    c = evaluate(s, pnl, addons)
    assert (c.var, c.es) == pytest.approx((280.0, 370.0))
    assert (c.filtered, c.stressed, c.base, c.apc) == pytest.approx((370.0, 792.5, 792.5, 0.0))
    assert (c.liquidity, c.concentration, c.option_credit) == pytest.approx((29.3, 50.0, 200.0))
    assert c.margin == pytest.approx(671.8)
    assert c.model == "p" and c.param_id == s.param_id


def test_span2_preset_worked_example():
    # span2: VaR, base = 0.75 x 280 + 0.25 x 780 = 210 + 195 = 405; liquidity 29.3; concentration at 0.2 of
    # ADV: A (100 - 100)+ = 0, B 0 -> 0; credit 200; 405 + 29.3 - 200 = 234.3 rounded up to 1 -> 235
    pnl, addons = _book()
    c = evaluate(resolve(CcpModelConfig(name="s", preset="span2", confidence=0.6)), pnl, addons)
    assert (c.filtered, c.stressed, c.base) == pytest.approx((280.0, 780.0, 405.0))
    assert (c.liquidity, c.concentration, c.option_credit) == pytest.approx((29.3, 0.0, 200.0))
    assert c.margin == pytest.approx(235.0)
    # with the 25 % APC buffer (an EU CCP's span2-like model): + 0.25 x 405 = 101.25 -> 335.55 -> 336
    c = evaluate(resolve(CcpModelConfig(name="s", preset="span2", confidence=0.6, apc="buffer")), pnl, addons)
    assert c.apc == pytest.approx(101.25) and c.margin == pytest.approx(336.0)


def test_no_preset_is_plain_var_of_the_filtered_set():
    # base values: VaR, no stressed set, no add-on, no credit, no rounding -> margin = filtered VaR 280
    pnl, addons = _book()
    c = evaluate(resolve(CcpModelConfig(name="b", confidence=0.6)), pnl, addons)
    assert (c.margin, c.stressed, c.liquidity, c.concentration, c.option_credit) == pytest.approx(
        (280.0, 0.0, 0.0, 0.0, 0.0)
    )
