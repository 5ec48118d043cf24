"""Implied volatility from option quotes (issue #14 item 2): the vol at which calc/options.py's model
gives the quoted price, per contract, so that quotes on the feed can update a contract's implied vol.

    vols, reasons = implied_vols(model, price, spot, strike, t, r, q, is_call, american)
    # vols: float array, NaN where no vol fits; reasons: None when every vol was found, else an object
    # array with None for the good ones and a sentence naming the field for the others

- European (``american`` False): Jaeckel's "Let's be rational" (PyPI ``lets-be-rational``) on the Black
  formula, which is exact to machine precision in two iterations: BSM with yield q as Black with forward
  ``F = S e^{(r - q) T}`` and the undiscounted price ``price e^{rT}``; Black-76 directly (``spot`` is the
  forward; q is taken as r, as calc/options.py does).
- American: the root in vol of ``calc.options.price_one`` (Bjerksund-Stensland 2002 by default, or
  ``method=BS1993``) minus the price, by ``scipy.optimize.brentq`` on ``[VOL_MIN, VOL_MAX]`` (the price
  is increasing in vol; the bracket is checked first, so brentq always has a sign change).

Refusals (NaN with a reason, never an exception): a non-finite field; ``t <= 0``; a spot or strike <= 0;
a price below or at the intrinsic value (European: of the forward, discounted
``max(S e^{-qT} - K e^{-rT}, 0)``; American: also ``max(S - K, 0)``, where an option exercised now has
that price over a range of vols), at or above the upper bound (call: ``S e^{-qT}``, American ``S``;
put: ``K e^{-rT}``, American ``K``), or one that needs a vol outside ``[VOL_MIN, VOL_MAX]``.
"""

from __future__ import annotations

import math

import numpy as np
from lets_be_rational import implied_volatility_from_a_transformed_rational_guess as _lbr_vol
from lets_be_rational.exceptions import AboveMaximumException, BelowIntrinsicException
from scipy.optimize import brentq

from calc import options

VOL_MIN = 1e-4  # American inversion bracket (and the smallest vol the American root finder returns)
VOL_MAX = 5.0  # calc/instruments.py's MAX_VOL: no vol above it is accepted anywhere
XTOL = 1e-15  # brentq's absolute vol tolerance (its rtol is 4 x machine epsilon)

_FIELDS = ("price", "spot", "strike", "t", "r", "q")


def _refusal(price, spot, strike, t, r, q) -> str | None:
    """Why these fields cannot give a vol (before any pricing), or None."""
    for name, value in zip(_FIELDS, (price, spot, strike, t, r, q), strict=True):
        if not math.isfinite(value):
            return f"{name} {value} is not finite"
    if t <= 0.0:
        return f"t {t} is not positive (the option has expired)"
    if spot <= 0.0:
        return f"spot {spot} is not positive"
    if strike <= 0.0:
        return f"strike {strike} is not positive"
    return None


def _bounds(spot, strike, t, r, q, is_call, american) -> tuple[float, float]:
    """(intrinsic value, upper bound) of the price, as in the module docstring."""
    fwd_s, fwd_k = spot * math.exp(-q * t), strike * math.exp(-r * t)
    if is_call:
        lower, upper = max(fwd_s - fwd_k, 0.0), fwd_s
        return (max(lower, spot - strike), max(upper, spot)) if american else (lower, upper)
    lower, upper = max(fwd_k - fwd_s, 0.0), fwd_k
    return (max(lower, strike - spot), max(upper, strike)) if american else (lower, upper)


def implied_vol_one(
    model: int,
    price: float,
    spot: float,
    strike: float,
    t: float,
    r: float,
    q: float,
    is_call: bool,
    american: bool,
    method: int = options.BS2002,
) -> tuple[float, str | None]:
    """(vol, None) or (NaN, reason) for one contract."""
    price, spot, strike, t, r, q = (float(x) for x in (price, spot, strike, t, r, q))
    refusal = _refusal(price, spot, strike, t, r, q)
    if refusal:
        return math.nan, refusal
    try:
        return _implied_vol(model, price, spot, strike, t, r, q, is_call, american, method)
    except (ArithmeticError, ValueError, RuntimeError) as exc:  # e.g. e^{rT} overflows for a huge rate
        return (
            math.nan,
            f"no vol for price {price:.10g} (spot {spot}, strike {strike}, t {t}, r {r}, q {q}): {exc}",
        )


def _implied_vol(model, price, spot, strike, t, r, q, is_call, american, method) -> tuple[float, str | None]:
    if model == options.MODEL_BLACK76:
        q = r
    lower, upper = _bounds(spot, strike, t, r, q, is_call, american)
    if price < lower:
        return math.nan, f"price {price:.10g} is below the intrinsic value {lower:.10g}"
    if price >= upper:
        return math.nan, f"price {price:.10g} is at or above the upper bound {upper:.10g}"
    if price == lower:  # European: the limit vol -> 0; American: exercised now, over a range of vols
        return math.nan, f"price {price:.10g} is the intrinsic value (no vol is implied)"
    if not american:
        forward = spot * math.exp((r - q) * t)
        try:
            vol = _lbr_vol(price * math.exp(r * t), forward, strike, t, 1.0 if is_call else -1.0)
        except (BelowIntrinsicException, AboveMaximumException) as exc:  # rounding at the bounds
            return math.nan, f"price {price:.10g}: {type(exc).__name__}"
        if not (math.isfinite(vol) and vol > 0.0):  # within rounding of the intrinsic value
            return math.nan, f"price {price:.10g} is the intrinsic value (no vol is implied)"
        if vol > VOL_MAX:
            return math.nan, f"price {price:.10g} needs a vol of {vol:.4g}, above {VOL_MAX:g}"
        return vol, None

    def gap(vol: float) -> float:
        return options.price_one(model, spot, strike, t, r, q, vol, is_call, True, method) - price

    low, high = gap(VOL_MIN), gap(VOL_MAX)
    if low > 0.0:
        return (
            math.nan,
            f"price {price:.10g} needs a vol below {VOL_MIN} (the price there is {low + price:.10g})",
        )
    if high < 0.0:
        return (
            math.nan,
            f"price {price:.10g} needs a vol above {VOL_MAX} (the price there is {high + price:.10g})",
        )
    if low == 0.0:
        return VOL_MIN, None
    return brentq(gap, VOL_MIN, VOL_MAX, xtol=XTOL, maxiter=200), None


def implied_vols(
    model,
    price,
    spot,
    strike,
    t,
    r,
    q,
    is_call,
    american,
    method: int = options.BS2002,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Implied vols of arrays (or scalars, broadcast) of contracts: (vols, reasons or None)."""
    arrays = np.broadcast_arrays(
        np.asarray(model), *(np.asarray(x, dtype=float) for x in (price, spot, strike, t, r, q)),
        np.asarray(is_call, dtype=bool), np.asarray(american, dtype=bool),
    )  # fmt: skip
    flat = [a.ravel() for a in arrays]
    n = flat[0].shape[0]
    vols = np.empty(n)
    reasons = np.full(n, None, dtype=object)
    for i in range(n):
        m, p, s, k, t_i, r_i, q_i, c, a = (x[i] for x in flat)
        vols[i], reasons[i] = implied_vol_one(int(m), p, s, k, t_i, r_i, q_i, bool(c), bool(a), method)
    shape = arrays[0].shape
    bad = np.array([x is not None for x in reasons], dtype=bool)
    return vols.reshape(shape), (reasons.reshape(shape) if bad.any() else None)
