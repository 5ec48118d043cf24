"""Option pricing kernels (issue #14 item 2): price, delta, gamma and vega of listed options, in numba.

Models, chosen per contract by ``model`` (``MODEL_BSM`` or ``MODEL_BLACK76``):

- Black-Scholes-Merton with a continuous dividend yield ``q`` (equity options; ``spot`` is the stock price);
- Black-76 (options on futures; ``spot`` is the forward ``F``, discounted at ``r``; ``q`` is ignored and
  taken as ``r``, i.e. zero cost of carry);
- American exercise (``american`` True): the Bjerksund-Stensland closed-form approximation as QuantLib's
  ``BjerksundStenslandApproximationEngine`` implements it (the 1993 flat-boundary version, so that the
  tests can hold it to QuantLib at 1e-8), puts by the put-call transformation
  ``P(S, K, T, r, q, s) = C(K, S, T, q, r, s)``. When early exercise is never optimal for a call
  (``q <= 0`` and ``q <= r``) the American price is the European one. Its Greeks are central finite
  differences of the approximation's price (bumps ``DS_REL`` of spot and ``DVOL`` of vol); European
  Greeks are analytic.

All inputs are float64 arrays of one length (``is_call`` and ``american`` bool, ``model`` integer);
``t`` is the time to expiry in years (calendar days / 365, computed by the caller). Vega is per unit
of volatility (1.0 = 100 vol points), delta and gamma are with respect to ``spot`` (the forward for
Black-76).

Edge cases (no NaN comes out of finite inputs):

- ``t <= 0``: the intrinsic value ``max(S - K, 0)`` (call) / ``max(K - S, 0)`` (put); delta is 1 (-1)
  when strictly in the money, else 0; gamma and vega 0;
- ``vol <= 0`` (or a non-positive strike or spot): the discounted intrinsic value of the forward,
  ``max(S e^{-qT} - K e^{-rT}, 0)`` for a call; delta ``e^{-qT}`` when in the money; gamma, vega 0.
  American: the larger of that and the immediate-exercise value.
- deep in/out of the money, tiny or huge vol: the normal CDF is ``0.5 erfc(-x / sqrt 2)`` (accurate in
  the tails), puts use ``N(-d)`` rather than parity, and a non-finite American approximation (runaway
  boundary) falls back to the European value.

``revalue`` is the historical-simulation full revaluation: ``V[s, i]`` for per-scenario multipliers of
spot and vol, parallel over scenarios.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

MODEL_BSM = 0
MODEL_BLACK76 = 1
MODELS = {"bsm": MODEL_BSM, "black76": MODEL_BLACK76}

DS_REL = 1e-4  # American delta/gamma: central difference bump, relative to spot
DVOL = 1e-4  # American vega: central difference bump of vol (absolute)

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, inline="always")
def _ncdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


@njit(cache=True, inline="always")
def _npdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


@njit(cache=True)
def _european(s, k, t, r, q, vol, is_call):
    """(price, delta, gamma, vega) of a European option under BSM with yield q (Black-76: q = r)."""
    if t <= 0.0:
        if is_call:
            return max(s - k, 0.0), 1.0 if s > k else 0.0, 0.0, 0.0
        return max(k - s, 0.0), -1.0 if s < k else 0.0, 0.0, 0.0
    df = math.exp(-r * t)
    dq = math.exp(-q * t)
    sd = vol * math.sqrt(t)
    if sd <= 0.0 or k <= 0.0 or s <= 0.0:
        fwd_value = s * dq - k * df
        if is_call:
            return max(fwd_value, 0.0), dq if fwd_value > 0.0 else 0.0, 0.0, 0.0
        return max(-fwd_value, 0.0), -dq if fwd_value < 0.0 else 0.0, 0.0, 0.0
    d1 = (math.log(s / k) + (r - q) * t) / sd + 0.5 * sd
    d2 = d1 - sd
    gamma = dq * _npdf(d1) / (s * sd)
    vega = s * dq * _npdf(d1) * math.sqrt(t)
    if is_call:
        return s * dq * _ncdf(d1) - k * df * _ncdf(d2), dq * _ncdf(d1), gamma, vega
    return k * df * _ncdf(-d2) - s * dq * _ncdf(-d1), -dq * _ncdf(-d1), gamma, vega


@njit(cache=True)
def _bs_phi(s, gamma, h, i, rt, bt, variance):
    lam = -rt + gamma * bt + 0.5 * gamma * (gamma - 1.0) * variance
    sv = math.sqrt(variance)
    d = -(math.log(s / h) + (bt + (gamma - 0.5) * variance)) / sv
    kappa = 2.0 * bt / variance + (2.0 * gamma - 1.0)
    return math.exp(lam) * (_ncdf(d) - (i / s) ** kappa * _ncdf(d - 2.0 * math.log(i / s) / sv))


@njit(cache=True)
def _bs_call(s, x, t, r, q, vol):
    """Bjerksund-Stensland (1993, as QuantLib) American call price; s, x, t, vol > 0."""
    euro = _european(s, x, t, r, q, vol, True)[0]
    rfd = math.exp(-r * t)
    dd = math.exp(-q * t)
    if dd >= 1.0 and dd >= rfd:  # early exercise never optimal
        return max(euro, s - x)
    if dd > 1.0 and rfd > dd:  # r < q < 0: double boundary, not covered by the approximation
        return max(euro, s - x)
    variance = vol * vol * t
    bt = (r - q) * t
    rt = r * t
    disc = (bt / variance - 0.5) ** 2 + 2.0 * rt / variance
    if disc < 0.0:
        return max(euro, s - x)
    beta = (0.5 - bt / variance) + math.sqrt(disc)
    b_inf = beta / (beta - 1.0) * x
    b0 = x if bt == rt else max(x, rt / (rt - bt) * x)
    ht = -(bt + 2.0 * math.sqrt(variance)) * b0 / (b_inf - b0)
    ib = b0 + (b_inf - b0) * (1.0 - math.exp(ht))
    fwd = s * dd / rfd
    if s >= ib:
        value = s - x
    elif math.log(ib / fwd) / math.sqrt(variance) > 12.5:  # runaway boundary: European (as QuantLib)
        value = euro
    else:
        value = (
            (ib - x) * (s / ib) ** beta * (1.0 - _bs_phi(s, beta, ib, ib, rt, bt, variance))
            + s * _bs_phi(s, 1.0, ib, ib, rt, bt, variance)
            - s * _bs_phi(s, 1.0, x, ib, rt, bt, variance)
            - x * _bs_phi(s, 0.0, ib, ib, rt, bt, variance)
            + x * _bs_phi(s, 0.0, x, ib, rt, bt, variance)
        )
        if not math.isfinite(value):
            value = euro
    return max(value, euro, s - x)


@njit(cache=True)
def _american_price(s, k, t, r, q, vol, is_call):
    if t <= 0.0:
        return max(s - k, 0.0) if is_call else max(k - s, 0.0)
    if vol <= 0.0 or k <= 0.0 or s <= 0.0:
        euro = _european(s, k, t, r, q, vol, is_call)[0]
        return max(euro, s - k) if is_call else max(euro, k - s)
    if is_call:
        return _bs_call(s, k, t, r, q, vol)
    return _bs_call(k, s, t, q, r, vol)  # put-call transformation


@njit(cache=True)
def _american(s, k, t, r, q, vol, is_call):
    """(price, delta, gamma, vega) of an American option; Greeks by central differences."""
    if t <= 0.0 or vol <= 0.0 or k <= 0.0 or s <= 0.0:  # deterministic: European or immediate exercise
        euro = _european(s, k, t, r, q, vol, is_call)
        intrinsic = max(s - k, 0.0) if is_call else max(k - s, 0.0)
        if euro[0] >= intrinsic:
            return euro
        return intrinsic, 1.0 if is_call else -1.0, 0.0, 0.0
    price = _american_price(s, k, t, r, q, vol, is_call)
    h = DS_REL * s
    up = _american_price(s + h, k, t, r, q, vol, is_call)
    down = _american_price(s - h, k, t, r, q, vol, is_call)
    dv = min(DVOL, 0.5 * vol)
    vega_up = _american_price(s, k, t, r, q, vol + dv, is_call)
    vega_down = _american_price(s, k, t, r, q, vol - dv, is_call)
    return (
        price,
        (up - down) / (2.0 * h),
        (up - 2.0 * price + down) / (h * h),
        (vega_up - vega_down) / (2.0 * dv),
    )


@njit(cache=True)
def price_greeks_one(model, s, k, t, r, q, vol, is_call, american):
    """(price, delta, gamma, vega) of one contract: the scalar kernel."""
    if model == MODEL_BLACK76:
        q = r
    if american:
        return _american(s, k, t, r, q, vol, is_call)
    return _european(s, k, t, r, q, vol, is_call)


@njit(cache=True)
def price_one(model, s, k, t, r, q, vol, is_call, american):
    """Price of one contract (no Greeks): the revaluation kernel."""
    if model == MODEL_BLACK76:
        q = r
    if american:
        return _american_price(s, k, t, r, q, vol, is_call)
    return _european(s, k, t, r, q, vol, is_call)[0]


@njit(cache=True)
def price_greeks(model, spot, strike, t, r, q, vol, is_call, american):
    """Arrays (price, delta, gamma, vega) for arrays of contracts (all inputs of one length)."""
    n = spot.shape[0]
    price = np.empty(n)
    delta = np.empty(n)
    gamma = np.empty(n)
    vega = np.empty(n)
    for i in range(n):
        price[i], delta[i], gamma[i], vega[i] = price_greeks_one(
            model[i], spot[i], strike[i], t[i], r[i], q[i], vol[i], is_call[i], american[i]
        )
    return price, delta, gamma, vega


@njit(cache=True)
def _revalue_scenario(out, si, model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult):
    for i in range(spot.shape[0]):
        s_i = spot[i] * spot_mult[si, i]
        vol_i = vol[i] * vol_mult[si, i]
        out[si, i] = price_one(model[i], s_i, strike[i], t[i], r[i], q[i], vol_i, is_call[i], american[i])


@njit(cache=True, parallel=True)
def revalue(model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult):
    """V[s, i]: contract i repriced with spot[i] * spot_mult[s, i] and vol[i] * vol_mult[s, i].

    ``spot_mult`` and ``vol_mult`` are (scenarios x contracts); time to expiry is unchanged (the
    caller ages ``t`` for theta). Parallel over scenarios.
    """
    out = np.empty(spot_mult.shape)
    for si in prange(spot_mult.shape[0]):
        _revalue_scenario(out, si, model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult)
    return out


@njit(cache=True)
def revalue_serial(model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult):
    """``revalue`` on one thread (the benchmark's single-thread figure)."""
    out = np.empty(spot_mult.shape)
    for si in range(spot_mult.shape[0]):
        _revalue_scenario(out, si, model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult)
    return out
