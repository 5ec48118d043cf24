"""calc/impliedvol.py: implied vols from quotes round-trip through calc/options.py's prices (European
1e-10, American 1e-8 relative), equal QuantLib's impliedVolatility (European) and invert QuantLib's
Bjerksund-Stensland 1993 prices to their vol (American, method=BS1993), and refuse bad quotes with a
reason naming the field, never raising."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from calc import options
from calc.impliedvol import VOL_MAX, VOL_MIN, implied_vol_one, implied_vols
from tests.calc.test_options import quantlib_option

BSM, B76 = options.MODEL_BSM, options.MODEL_BLACK76
GRID = list(
    itertools.product(
        (0.7, 0.9, 1.0, 1.1, 1.4),  # strike / spot
        (7 / 365, 0.25, 1.0, 3.0),
        (0.08, 0.25, 0.6, 1.5),
        ((0.03, 0.01), (0.05, 0.0), (0.01, 0.06), (-0.01, 0.0)),
        (True, False),
    )
)


def _grid_arrays(model: int, american: bool):
    a = np.array([(m * 100.0, t, v, r, q) for m, t, v, (r, q), _c in GRID])
    n = len(GRID)
    return dict(
        model=np.full(n, model),
        spot=np.full(n, 100.0),
        strike=a[:, 0],
        t=a[:, 1],
        vol=a[:, 2],
        r=a[:, 3],
        q=a[:, 4],
        is_call=np.array([c for *_x, c in GRID]),
        american=np.full(n, american),
    )


@pytest.mark.parametrize(
    ("model", "american", "tol"),
    [(BSM, False, 1e-10), (B76, False, 1e-10), (BSM, True, 1e-8), (B76, True, 1e-8)],
    ids=["bsm", "black76", "american-bsm", "american-black76"],
)
def test_price_to_vol_to_price_round_trips(model: int, american: bool, tol: float) -> None:
    g = _grid_arrays(model, american)
    args = (g["model"], g["spot"], g["strike"], g["t"], g["r"], g["q"])
    price, _delta, _gamma, vega = options.price_greeks(*args, g["vol"], g["is_call"], g["american"])
    # quotes worth something beyond the intrinsic value (a vol is defined) and not exercised now
    intrinsic = np.where(
        g["is_call"], np.maximum(100.0 - g["strike"], 0.0), np.maximum(g["strike"] - 100.0, 0.0)
    )
    ok = (vega > 1e-6 * price) & (price > intrinsic + 1e-6) & (price > 1e-8)
    assert ok.mean() > 0.8
    vols, reasons = implied_vols(
        g["model"][ok], price[ok], g["spot"][ok], g["strike"][ok], g["t"][ok], g["r"][ok], g["q"][ok],
        g["is_call"][ok], g["american"][ok],
    )  # fmt: skip
    assert reasons is None
    back = options.price_greeks(*(x[ok] for x in args), vols, g["is_call"][ok], g["american"][ok])[0]
    price_err = (np.abs(back - price[ok]) / price[ok]).max()
    # the vol itself, where the price moves with it (vega x vol above 1e-4 of the price)
    sensitive = vega[ok] * g["vol"][ok] > 1e-4 * price[ok]
    vol_err = (np.abs(vols - g["vol"][ok]) / g["vol"][ok])[sensitive].max()
    print(f"round trip max rel err: price {price_err:.2e}, vol {vol_err:.2e}")
    assert price_err <= tol and vol_err <= 100 * tol


def _quantlib_vol(price, spot, strike, days, r, q, vol, is_call, american) -> float:
    option, process = quantlib_option(spot, strike, days, r, q, vol, is_call, american)
    return option.impliedVolatility(price, process, 1e-15, 1000, 1e-4, 5.0)


def _quantlib_price(spot, strike, days, r, q, vol, is_call) -> float:
    """QuantLib's Bjerksund-Stensland (1993) American price."""
    return quantlib_option(spot, strike, days, r, q, vol, is_call, True)[0].NPV()


QL_CASES = [  # spot, strike, days, r, q, quoted price, call
    (100.0, 105.0, 91, 0.03, 0.01, 3.1, True),
    (100.0, 90.0, 365, 0.05, 0.0, 4.2, False),
    (50.0, 50.0, 30, 0.02, 0.04, 2.5, True),
    (100.0, 120.0, 730, 0.04, 0.02, 25.0, False),
]


def test_implied_vols_equal_quantlib() -> None:
    for s, k, days, r, q, price, c in QL_CASES:
        want = _quantlib_vol(price, s, k, days, r, q, 0.2, c, False)
        got, reason = implied_vol_one(BSM, price, s, k, days / 365.0, r, q, c, False)
        assert reason is None
        assert got == pytest.approx(want, rel=1e-10), (s, k, days, r, q, price, c)


def test_american_vols_recover_the_vol_of_quantlib_s_bjerksund_stensland_prices() -> None:
    """QuantLib's impliedVolatility of an American option reprices on a finite-difference grid (not the
    option's engine), so the check is the other way round: a QuantLib Bjerksund-Stensland (1993) price at
    a known vol inverts, with method=BS1993, to that vol."""
    for (s, k, days, r, q, _price, c), vol in itertools.product(QL_CASES, (0.12, 0.3, 0.7)):
        want = _quantlib_price(s, k, days, r, q, vol, c)
        if want <= max(s - k if c else k - s, 0.0) * (1 + 1e-15):
            continue  # exercised now: the price is the intrinsic value over a range of vols
        got, reason = implied_vol_one(BSM, want, s, k, days / 365.0, r, q, c, True, options.BS1993)
        assert reason is None
        assert got == pytest.approx(vol, rel=1e-8), (s, k, days, r, q, vol, c)


def test_the_american_vol_is_below_the_european_one_for_the_same_put_quote() -> None:
    """An early-exercise premium is worth vol: the same put price implies a lower American vol."""
    euro, _ = implied_vol_one(BSM, 6.0, 100.0, 100.0, 1.0, 0.06, 0.0, False, False)
    amer, _ = implied_vol_one(BSM, 6.0, 100.0, 100.0, 1.0, 0.06, 0.0, False, True)
    assert 0.0 < amer < euro


@pytest.mark.parametrize("american", [False, True])
def test_bad_quotes_give_nan_and_a_reason_naming_the_field(american: bool) -> None:
    cases = [
        ((BSM, 0.5, 100.0, 101.2, 0.5, 0.0, 0.0, False), "price 0.5 is below the intrinsic value 1.2"),
        ((BSM, 101.0, 100.0, 90.0, 0.5, 0.0, 0.0, True), "price 101 is at or above the upper bound 100"),
        ((BSM, 2.0, 100.0, 100.0, 0.0, 0.03, 0.0, True), "t 0.0 is not positive"),
        ((BSM, 20.0, 100.0, 120.0, 1.0, 0.0, 0.0, False), "price 20 is the intrinsic value"),
        ((BSM, 2.0, 100.0, 100.0, -0.1, 0.03, 0.0, True), "t -0.1 is not positive"),
        ((BSM, math.nan, 100.0, 100.0, 0.5, 0.03, 0.0, True), "price nan is not finite"),
        ((BSM, 2.0, math.inf, 100.0, 0.5, 0.03, 0.0, True), "spot inf is not finite"),
        ((BSM, 2.0, 100.0, -5.0, 0.5, 0.03, 0.0, True), "strike -5.0 is not positive"),
        ((BSM, 2.0, 100.0, 100.0, 0.5, math.nan, 0.0, True), "r nan is not finite"),
        ((B76, 2.0, 0.0, 100.0, 0.5, 0.03, 0.0, True), "spot 0.0 is not positive"),
    ]
    args = list(zip(*(c for c, _ in cases), strict=True))
    vols, reasons = implied_vols(*args, american)
    assert np.isnan(vols).all()
    for (_args, want), got in zip(cases, reasons, strict=True):
        assert got.startswith(want), (got, want)


def test_a_quote_outside_the_vol_bracket_is_refused_for_american() -> None:
    huge = options.price_one(BSM, 100.0, 120.0, 0.5, 0.03, 0.0, VOL_MAX * 1.5, True, True)
    vol, reason = implied_vol_one(BSM, huge, 100.0, 120.0, 0.5, 0.03, 0.0, True, True)
    assert math.isnan(vol) and reason.startswith(f"price {huge:.10g} needs a vol above {VOL_MAX}")
    # at the money forward: 0.001 is above the intrinsic value 0 but below the price 0.004 at VOL_MIN
    vol, reason = implied_vol_one(BSM, 1e-3, 100.0, 100.0, 1.0, 0.0, 0.0, False, True)
    assert math.isnan(vol) and f"needs a vol below {VOL_MIN}" in reason


def test_a_rate_whose_discount_factor_overflows_gives_a_reason_not_an_exception() -> None:
    for american in (False, True):
        vol, reason = implied_vol_one(BSM, 5.0, 100.0, 100.0, 1.0, -1000.0, 0.0, True, american)
        assert math.isnan(vol) and reason.startswith(
            "no vol for price 5 (spot 100.0, strike 100.0, t 1.0, r -1000.0"
        )


def test_one_bad_quote_does_not_spoil_the_others() -> None:
    price = options.price_one(BSM, 100.0, 100.0, 0.5, 0.03, 0.01, 0.3, True, False)
    vols, reasons = implied_vols(BSM, [price, -1.0, price], 100.0, 100.0, 0.5, 0.03, 0.01, True, False)
    assert vols[0] == pytest.approx(0.3, rel=1e-12) and vols[2] == vols[0] and math.isnan(vols[1])
    assert reasons[0] is None and reasons[2] is None and "below the intrinsic value" in reasons[1]
