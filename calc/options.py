"""Option pricing kernels (issue #14 item 2): price, delta, gamma and vega of listed options, in numba.

Models, chosen per contract by ``model`` (``MODEL_BSM`` or ``MODEL_BLACK76``):

- Black-Scholes-Merton with a continuous dividend yield ``q`` (equity options; ``spot`` is the stock price);
- Black-76 (options on futures; ``spot`` is the forward ``F``, discounted at ``r``; ``q`` is ignored and
  taken as ``r``, i.e. zero cost of carry);
- American exercise (``american`` True): the Bjerksund-Stensland closed-form approximation as QuantLib's
  ``BjerksundStenslandApproximationEngine`` implements it (the 1993 flat-boundary version, so that the
  tests can hold it to QuantLib at 1e-8), puts by the put-call transformation
  ``P(S, K, T, r, q, s) = C(K, S, T, q, r, s)``. When early exercise is never optimal for a call
  (``q <= 0`` and ``q <= r``) the American price is the European one. Its Greeks are 5-point finite
  differences of the approximation's price (bumps ``DS_REL`` and ``DVOL``), or the European / intrinsic
  Greeks where the value is the European one or immediate exercise; European Greeks are analytic.
  (QuantLib 1.44's engine is the 1993 version; the 2002 two-step boundary is not implemented.)

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

from calc.instruments import MODELS

MODEL_BSM, MODEL_BLACK76 = MODELS.index("bsm"), MODELS.index("black76")  # Instruments.model codes
APPROX, EUROPEAN, IMMEDIATE = 0, 1, 2  # which value an American option takes (see _bs_call)

DS_REL = 1e-3  # American delta/gamma: 5-point difference bump, relative to spot x vol x sqrt(T) (<= 1)
DVOL = 1e-3  # American vega: 5-point difference bump, relative to vol

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


@njit(cache=True, error_model="numpy")
def _bs_phi(s, gamma, h, i, rt, bt, variance):
    lam = -rt + gamma * bt + 0.5 * gamma * (gamma - 1.0) * variance
    sv = math.sqrt(variance)
    d = -(math.log(s / h) + (bt + (gamma - 0.5) * variance)) / sv
    kappa = 2.0 * bt / variance + (2.0 * gamma - 1.0)
    return math.exp(lam) * (_ncdf(d) - (i / s) ** kappa * _ncdf(d - 2.0 * math.log(i / s) / sv))


@njit(cache=True, error_model="numpy")
def _bs_call(s, x, t, r, q, vol):
    """Bjerksund-Stensland (1993, as QuantLib) American call: (price, regime); s, x, t, vol > 0.

    regime: ``APPROX`` (the approximation's value), ``EUROPEAN`` (early exercise never optimal, or the
    European value is the larger) or ``IMMEDIATE`` (exercise now).
    """
    euro = _european(s, x, t, r, q, vol, True)[0]
    rfd = math.exp(-r * t)
    dd = math.exp(-q * t)
    value = -1.0
    # q <= 0 and q <= r: never exercised early; r < q < 0 (double boundary) and q == 0 > r (beta = 1,
    # degenerate) are outside the approximation: European, or immediate exercise if worth more.
    if not (dd >= 1.0 and dd >= rfd) and not (dd > 1.0 and rfd > dd) and not (q == 0.0 and r < 0.0):
        variance = vol * vol * t
        bt = (r - q) * t
        rt = r * t
        beta = (0.5 - bt / variance) + math.sqrt((bt / variance - 0.5) ** 2 + 2.0 * rt / variance)
        b_inf = beta / (beta - 1.0) * x
        b0 = x if bt == rt else max(x, rt / (rt - bt) * x)
        ht = -(bt + 2.0 * math.sqrt(variance)) * b0 / (b_inf - b0)
        ib = b0 + (b_inf - b0) * (1.0 - math.exp(ht))
        if s >= ib:
            value = s - x
        elif not math.log(ib * rfd / (s * dd)) / math.sqrt(variance) > 12.5:  # else runaway: European
            value = (
                (ib - x) * (s / ib) ** beta * (1.0 - _bs_phi(s, beta, ib, ib, rt, bt, variance))
                + s * _bs_phi(s, 1.0, ib, ib, rt, bt, variance)
                - s * _bs_phi(s, 1.0, x, ib, rt, bt, variance)
                - x * _bs_phi(s, 0.0, ib, ib, rt, bt, variance)
                + x * _bs_phi(s, 0.0, x, ib, rt, bt, variance)
            )
    if not (math.isfinite(value) and value >= euro):
        value = euro
    if value < (s - x) * (1.0 + 10.0 * 2.220446049250313e-16):  # as QuantLib: exercise now
        return s - x, IMMEDIATE
    return value, APPROX if value > euro else EUROPEAN


@njit(cache=True, error_model="numpy")
def _american_price(s, k, t, r, q, vol, is_call):
    """(price, regime) of an American option."""
    if t <= 0.0 or vol <= 0.0 or k <= 0.0 or s <= 0.0:  # deterministic: European or immediate exercise
        euro = _european(s, k, t, r, q, vol, is_call)[0]
        intrinsic = max(s - k, 0.0) if is_call else max(k - s, 0.0)
        return (euro, EUROPEAN) if euro >= intrinsic else (intrinsic, IMMEDIATE)
    if is_call:
        return _bs_call(s, k, t, r, q, vol)
    return _bs_call(k, s, t, q, r, vol)  # put-call transformation


@njit(cache=True, error_model="numpy")
def _american(s, k, t, r, q, vol, is_call):
    """(price, delta, gamma, vega) of an American option.

    Where the value is the European one the Greeks are the European analytic ones; when exercised now
    they are those of the intrinsic value; otherwise 5-point finite differences of the price.
    """
    price, regime = _american_price(s, k, t, r, q, vol, is_call)
    if regime == EUROPEAN:
        return _european(s, k, t, r, q, vol, is_call)
    if regime == IMMEDIATE:
        return price, 1.0 if is_call else -1.0, 0.0, 0.0
    h = DS_REL * s * min(1.0, vol * math.sqrt(t))
    up = _american_price(s + h, k, t, r, q, vol, is_call)[0]
    down = _american_price(s - h, k, t, r, q, vol, is_call)[0]
    up2 = _american_price(s + 2.0 * h, k, t, r, q, vol, is_call)[0]
    down2 = _american_price(s - 2.0 * h, k, t, r, q, vol, is_call)[0]
    delta = (8.0 * (up - down) - (up2 - down2)) / (12.0 * h)
    gamma = (16.0 * (up + down) - (up2 + down2) - 30.0 * price) / (12.0 * h * h)
    dv = DVOL * vol
    v1 = (
        _american_price(s, k, t, r, q, vol + dv, is_call)[0]
        - _american_price(s, k, t, r, q, vol - dv, is_call)[0]
    )
    v2 = (
        _american_price(s, k, t, r, q, vol + 2.0 * dv, is_call)[0]
        - _american_price(s, k, t, r, q, vol - 2.0 * dv, is_call)[0]
    )
    return price, delta, gamma, (8.0 * v1 - v2) / (12.0 * dv)


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
        return _american_price(s, k, t, r, q, vol, is_call)[0]
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
def _carry(model, t, r, q):
    """Per contract e^{-rT}, e^{-qT} (q = r for Black-76), (r - q) T and sqrt(T), out of the scenario loop."""
    n = t.shape[0]
    consts = np.empty((n, 4))
    for i in range(n):
        q_i = r[i] if model[i] == MODEL_BLACK76 else q[i]
        t_i = max(t[i], 0.0)
        consts[i, 0] = math.exp(-r[i] * t_i)
        consts[i, 1] = math.exp(-q_i * t_i)
        consts[i, 2] = (r[i] - q_i) * t_i
        consts[i, 3] = math.sqrt(t_i)
    return consts


@njit(cache=True)
def _revalue_scenario(
    out, si, consts, model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult
):
    for i in range(spot.shape[0]):
        s_i = spot[i] * spot_mult[si, i]
        vol_i = vol[i] * vol_mult[si, i]
        k = strike[i]
        sd = vol_i * consts[i, 3]
        if american[i] or t[i] <= 0.0 or not sd > 0.0 or not s_i > 0.0 or not k > 0.0:
            out[si, i] = price_one(model[i], s_i, k, t[i], r[i], q[i], vol_i, is_call[i], american[i])
            continue
        # the European branch of _european, with the per-contract constants precomputed
        d1 = (math.log(s_i / k) + consts[i, 2]) / sd + 0.5 * sd
        d2 = d1 - sd
        if is_call[i]:
            out[si, i] = s_i * consts[i, 1] * _ncdf(d1) - k * consts[i, 0] * _ncdf(d2)
        else:
            out[si, i] = k * consts[i, 0] * _ncdf(-d2) - s_i * consts[i, 1] * _ncdf(-d1)


@njit(cache=True, parallel=True)
def revalue(model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult):
    """V[s, i]: contract i repriced with spot[i] * spot_mult[s, i] and vol[i] * vol_mult[s, i].

    ``spot_mult`` and ``vol_mult`` are (scenarios x contracts); time to expiry is unchanged (the
    caller ages ``t`` for theta). Parallel over scenarios.
    """
    out = np.empty(spot_mult.shape)
    c = _carry(model, t, r, q)
    for si in prange(spot_mult.shape[0]):
        _revalue_scenario(
            out, si, c, model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult
        )
    return out
