"""Option pricing kernels (issue #14 item 2): price, delta, gamma and vega of listed options, in numba.

Models, chosen per contract by ``model`` (``MODEL_BSM`` or ``MODEL_BLACK76``):

- Black-Scholes-Merton with a continuous dividend yield ``q`` (equity options; ``spot`` is the stock price);
- Black-76 (options on futures; ``spot`` is the forward ``F``, discounted at ``r``; ``q`` is ignored and
  taken as ``r``, i.e. zero cost of carry);
- American exercise (``american`` True): the Bjerksund-Stensland closed-form approximation. The engine
  (``method=BS2002``, the default everywhere) uses the 2002 version (Bjerksund & Stensland, "Closed form
  valuation of American options", NHH discussion paper 2002/09; Haug, "The Complete Guide to Option
  Pricing Formulas", 2nd ed., 3.10.2): the time to expiry split at ``t1 = (sqrt 5 - 1) / 2 T`` into two
  periods, each with a flat exercise boundary, which needs the bivariate normal ``M(a, b, rho)`` at
  ``rho = +-sqrt(t1 / T)`` (Drezner-Wesolowsky's integral on a 13-point Gauss-Legendre rule as in Genz,
  ~1e-16 absolute, its exponentials vectorised; 20 of them a price, sharing their normal CDFs where
  the arguments coincide, so 2002 costs ~4x the 1993 version). ``method=BS1993`` is the
  1993 one-boundary version as QuantLib's ``BjerksundStenslandApproximationEngine`` implements it
  (QuantLib 1.44 has no 2002 engine, so this is the one the tests hold to QuantLib at 1e-8). Both are
  values of feasible exercise strategies, so lower bounds of the American value; 2002 is the closer on
  average (relative error 0.39% against 0.49% on the test grid) but not everywhere (at high vol and long
  expiry its boundary is too low and it is below 1993). Puts by the put-call transformation
  ``P(S, K, T, r, q, s) = C(K, S, T, q, r, s)``. When early exercise is never optimal for a call
  (``q <= 0`` and ``q <= r``) the American price is the European one, and so is it where the
  approximation is below the European value or not finite.

  American Greeks are the analytic derivatives of the closed form: delta and gamma (the boundaries do
  not depend on the spot; puts through the transformation and the homogeneity ``C = S C_S + K C_K``) and
  vega (through the boundaries, beta and every exponent, which all depend on vol). Where the value is the
  European one the Greeks are the European ones, and those of ``S - K`` (``K - S``) when exercised now.

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
  the tails), puts use ``N(-d)`` rather than parity, the closed forms' power terms are taken in log space,
  and a non-finite American approximation or a boundary more than 12.5 standard deviations above the
  forward (never reached) gives the European value.

``revalue`` is the historical-simulation full revaluation: ``V[s, i]`` for per-scenario multipliers of
spot and vol, parallel over scenarios, price only (no Greeks), the per-contract discount factors, carry
and sqrt(T) computed once out of the scenario loop. ``scenario_rows`` is the engine's: contract-major
rows, a European contract's scenarios in one vectorised loop, an American one's (BS2002) in vector lanes
(calc/american_rows.py), the scalar kernel for the scenarios those do not take.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from calc.american_rows import american_row
from calc.bs2002 import BVN_A as _BVN_A
from calc.bs2002 import BVN_B as _BVN_B
from calc.bs2002 import BVN_W as _BVN_W
from calc.bs2002 import EPS as _EPS
from calc.bs2002 import RHO as _RHO
from calc.bs2002 import RHO_C as _RHO_C
from calc.bs2002 import SQRT_T1 as _SQRT_T1
from calc.bs2002 import T1 as _T1
from calc.bs2002 import exercised_early
from calc.instruments import MODELS
from calc.vecmath import exp_vec, ncdf

MODEL_BSM, MODEL_BLACK76 = MODELS.index("bsm"), MODELS.index("black76")  # Instruments.model codes
BS1993, BS2002 = 1993, 2002  # `method`: which Bjerksund-Stensland approximation prices American exercise
APPROX, EUROPEAN, IMMEDIATE = 0, 1, 2  # which value an American option takes (see _bs_call)

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, inline="always")
def _ncdf(x: float) -> float:
    """N(x) in scalar code: libm's erfc (~15 ns a call there; vecmath.ncdf is ~40 ns alone, ~4 ns in a
    vectorised loop, where _rows_of takes it)."""
    return 0.5 * math.erfc(-x / _SQRT2)


@njit(cache=True, inline="always")
def _npdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


@njit(cache=True, inline="always")
def _carry_yield(model, r, q):
    """The dividend yield the formulas take: q, or r for Black-76 (zero cost of carry)."""
    return r if model == MODEL_BLACK76 else q


@njit(cache=True, inline="always")
def _discounts(t, r, q):
    """(e^{-rT}, e^{-qT}, sqrt(T)) with T = max(t, 0): the per-contract constants of the formulas."""
    t = max(t, 0.0)
    return math.exp(-r * t), math.exp(-q * t), math.sqrt(t)


@njit(cache=True, inline="always", error_model="numpy")
def _d1(s, k, carry_t, sd):
    return (math.log(s / k) + carry_t) / sd + 0.5 * sd


@njit(cache=True, inline="always", error_model="numpy")
def _european_value(s, k, df, dq, carry_t, sd, is_call):
    """The BSM price for s, k, sd = vol sqrt(T) > 0: df = e^{-rT}, dq = e^{-qT}, carry_t = (r - q) T."""
    d1 = _d1(s, k, carry_t, sd)
    d2 = d1 - sd
    if is_call:
        return s * dq * _ncdf(d1) - k * df * _ncdf(d2)
    return k * df * _ncdf(-d2) - s * dq * _ncdf(-d1)


@njit(cache=True, error_model="numpy")
def _european(s, k, t, r, q, vol, is_call, greeks=True):
    """(price, delta, gamma, vega) of a European option under BSM with yield q (Black-76: q = r); with
    `greeks` False the price only (gamma and vega 0, delta 0 unless an edge case gives it)."""
    if t <= 0.0:
        if is_call:
            return max(s - k, 0.0), 1.0 if s > k else 0.0, 0.0, 0.0
        return max(k - s, 0.0), -1.0 if s < k else 0.0, 0.0, 0.0
    df, dq, sqrt_t = _discounts(t, r, q)
    sd = vol * sqrt_t
    if sd <= 0.0 or k <= 0.0 or s <= 0.0:
        fwd_value = s * dq - k * df
        if is_call:
            return max(fwd_value, 0.0), dq if fwd_value > 0.0 else 0.0, 0.0, 0.0
        return max(-fwd_value, 0.0), -dq if fwd_value < 0.0 else 0.0, 0.0, 0.0
    price = _european_value(s, k, df, dq, (r - q) * t, sd, is_call)
    if not greeks:
        return price, 0.0, 0.0, 0.0
    d1 = _d1(s, k, (r - q) * t, sd)
    gamma = dq * _npdf(d1) / (s * sd)
    vega = s * dq * _npdf(d1) * sqrt_t
    return price, dq * _ncdf(d1) if is_call else -dq * _ncdf(-d1), gamma, vega


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _bvn_sum(ab, hs):
    """sum_j w_j exp(A_j ab - B_j hs), the Gauss-Legendre sum of _bvn; reassociable (the only flag), so
    LLVM sums it in vector lanes and evaluates the exponentials 8 at a time (over BVN_LANES, the nodes
    padded with weights 0 to two vectors)."""
    acc = 0.0
    for j in range(_BVN_W.shape[0]):
        acc += _BVN_W[j] * exp_vec(_BVN_A[j] * ab - _BVN_B[j] * hs)
    return acc


@njit(cache=True, inline="always", error_model="numpy")
def _bvn(a, b, sign, n_a):
    """M(a, b, sign * _RHO): P(X <= a, Y <= b) for standard normals of correlation +-sqrt(t1 / T), given
    n_a = N(a) (shared between the terms of one price, see _psi_a)."""
    if a < -38.5 or b < -38.5:  # N(-38.5) underflows to 0
        return 0.0
    if a > 8.3:  # P(X > a) < 5e-17: M = N(b) to the last bit of a price
        return _ncdf(b)
    if b > 8.3:
        return n_a
    return n_a * _ncdf(b) + sign * _bvn_sum(sign * a * b, 0.5 * (a * a + b * b))


# The closed forms are sums of terms c e^{w(x)} G(z(x)) in x = ln S, with w and z affine in x and G a
# normal CDF N(z) or a bivariate M(a, b, rho). Each is evaluated as a jet (F, F_x, F_xx, F_vol): delta and
# gamma follow from S V_S = F_x and S^2 V_SS = F_xx - F_x, vega is F_vol (each quantity's derivative in vol
# carried beside it, the ``*_s`` arguments). With `greeks` False only F is computed.


@njit(cache=True, inline="always", error_model="numpy")
def _n_jet(z, dz, zs, greeks, g):
    """(G, G_x, G_xx, G_vol) of G = N(z), z affine in x with slope dz and d z / d vol = zs; g = N(z) if
    known, else negative."""
    if g < 0.0:
        g = _ncdf(z)
    if not greeks:
        return g, 0.0, 0.0, 0.0
    f = _npdf(z)
    return g, dz * f, -z * dz * dz * f, zs * f


@njit(cache=True, inline="always", error_model="numpy")
def _m_jet(a, da, a_s, b, db, b_s, sign, greeks, n_a):
    """(G, G_x, G_xx, G_vol) of G = M(a, b, sign * _RHO), a and b affine in x with slopes da, db and
    derivatives a_s, b_s in vol (rho does not depend on vol); n_a = N(a)."""
    g = _bvn(a, b, sign, n_a)
    if not greeks:
        return g, 0.0, 0.0, 0.0
    rho = sign * _RHO
    pa = _npdf(a)
    pb = _npdf(b)
    ma = pa * _ncdf((b - rho * a) / _RHO_C)  # dM/da
    mb = pb * _ncdf((a - rho * b) / _RHO_C)  # dM/db
    mab = pa * _npdf((b - rho * a) / _RHO_C) / _RHO_C  # the bivariate density
    maa = -a * ma - rho * mab
    mbb = -b * mb - rho * mab
    return g, ma * da + mb * db, maa * da * da + 2.0 * mab * da * db + mbb * db * db, ma * a_s + mb * b_s


@njit(cache=True, inline="always", error_model="numpy")
def _term(c, c_s, w, w_s, p, g, greeks):
    """The jet (F, F_x, F_xx, F_vol) of c e^{w} G where w has slope p in x, c and w derivatives c_s, w_s
    in vol, and g = (G, G_x, G_xx, G_vol)."""
    ew = math.exp(w)
    e = c * ew
    if not greeks:
        return e * g[0], 0.0, 0.0, 0.0
    return (
        e * g[0],
        e * (p * g[0] + g[1]),
        e * (p * p * g[0] + 2.0 * p * g[1] + g[2]),
        e * (g[3] + w_s * g[0]) + c_s * ew * g[0],
    )


@njit(cache=True, inline="always")
def _jadd(u, v, sign):
    return u[0] + sign * v[0], u[1] + sign * v[1], u[2] + sign * v[2], u[3] + sign * v[3]


@njit(cache=True, error_model="numpy")
def _phi(x, t, gamma, g_s, ln_h, h_s, ln_i, i_s, r, b, vol, c, c_s, lc, lc_s, greeks, n1=-1.0, n2=-1.0):
    """c e^{lc} phi(S, t | gamma, H, I) of Bjerksund-Stensland, as a jet in x = ln S with its derivative
    in vol (``*_s``: the derivatives in vol of gamma, ln H, ln I, c and lc):
    phi = e^{lambda t} S^gamma [N(-d) - (I/S)^kappa N(-d - 2 ln(I/S) / (vol sqrt t))]; n1, n2 the two
    normal CDFs if known (phi(t1 | gamma, I1, I2)'s are psi's N(e1), N(e2): _psi_a), else negative."""
    vol2 = vol * vol
    dv = math.sqrt(t)  # d v / d vol
    iv = 1.0 / (vol * dv)
    lam = (-r + gamma * b + 0.5 * gamma * (gamma - 1.0) * vol2) * t
    mu = (b + (gamma - 0.5) * vol2) * t
    kappa = 2.0 * b / vol2 + (2.0 * gamma - 1.0)
    z1 = (ln_h - mu - x) * iv
    z2 = (x + ln_h - 2.0 * ln_i - mu) * iv
    w1 = lc + lam + gamma * x
    w2 = w1 + kappa * (ln_i - x)
    z1_s = z2_s = w1_s = w2_s = 0.0
    if greeks:
        lam_s = (g_s * b + (gamma - 0.5) * g_s * vol2 + gamma * (gamma - 1.0) * vol) * t
        mu_s = (g_s * vol2 + (2.0 * gamma - 1.0) * vol) * t
        kappa_s = -4.0 * b / (vol2 * vol) + 2.0 * g_s
        z1_s = (h_s - mu_s - z1 * dv) * iv
        z2_s = (h_s - 2.0 * i_s - mu_s - z2 * dv) * iv
        w1_s = lc_s + lam_s + g_s * x
        w2_s = w1_s + kappa_s * (ln_i - x) + kappa * i_s
    g1 = _n_jet(z1, -iv, z1_s, greeks, n1)
    g2 = _n_jet(z2, iv, z2_s, greeks, n2)
    f1 = _term(c, c_s, w1, w1_s, gamma, g1, greeks)
    return _jadd(f1, _term(c, c_s, w2, w2_s, gamma - kappa, g2, greeks), -1.0)


@njit(cache=True, inline="always", error_model="numpy")
def _psi_a(x, t1, gamma, ln_i2, ln_i1, b, vol):
    """((a1..a4), (N(a1)..N(a4))): the first arguments of psi's four M, -e1..-e4 in Haug's notation. They
    do not depend on H, so the two psi of one gamma share them, and phi(t1 | gamma, I1, I2) takes the
    first two as its own (one normal CDF each instead of three)."""
    mu1 = (b + (gamma - 0.5) * vol * vol) * t1
    iv1 = 1.0 / (vol * math.sqrt(t1))
    a1, a2 = (ln_i1 - mu1 - x) * iv1, (x + ln_i1 - 2.0 * ln_i2 - mu1) * iv1
    a3, a4 = (ln_i1 + mu1 - x) * iv1, (x + ln_i1 - 2.0 * ln_i2 + mu1) * iv1
    return (a1, a2, a3, a4), (_ncdf(a1), _ncdf(a2), _ncdf(a3), _ncdf(a4))


@njit(cache=True, error_model="numpy")
def _psi(x, t, t1, gamma, g_s, ln_h, h_s, ln_i2, i2_s, ln_i1, i1_s, r, b, vol, c, c_s, lc, lc_s, greeks, ea):
    """c e^{lc} psi(S, T | gamma, H, I2, I1, t1) of Bjerksund-Stensland 2002 (Haug's eq. for psi, with
    e1..e4, f1..f4), as a jet in x = ln S with its derivative in vol (arguments as for _phi; ea the first
    arguments of M and their N, _psi_a(x, t1, gamma, ln_i2, ln_i1, b, vol))."""
    vol2 = vol * vol
    dv, dv1 = math.sqrt(t), math.sqrt(t1)  # d v / d vol, d v1 / d vol
    iv, iv1 = 1.0 / (vol * dv), 1.0 / (vol * dv1)
    lam = (-r + gamma * b + 0.5 * gamma * (gamma - 1.0) * vol2) * t
    drift = b + (gamma - 0.5) * vol2
    mu = drift * t
    kappa = 2.0 * b / vol2 + (2.0 * gamma - 1.0)
    a, n_a = ea
    # the numerators of the second arguments of M, over v
    nb = (
        ln_h - mu - x,
        x + ln_h - 2.0 * ln_i2 - mu,
        x + ln_h - 2.0 * ln_i1 - mu,
        ln_h + 2.0 * ln_i2 - 2.0 * ln_i1 - mu - x,
    )
    w = lc + lam + gamma * x
    w2, w3, w4 = w + kappa * (ln_i2 - x), w + kappa * (ln_i1 - x), w + kappa * (ln_i1 - ln_i2)
    sa = sb = (0.0, 0.0, 0.0, 0.0)
    w_s = w2_s = w3_s = w4_s = 0.0
    if greeks:
        lam_s = (g_s * b + (gamma - 0.5) * g_s * vol2 + gamma * (gamma - 1.0) * vol) * t
        drift_s = g_s * vol2 + (2.0 * gamma - 1.0) * vol
        mu_s, mu1_s = drift_s * t, drift_s * t1
        kappa_s = -4.0 * b / (vol2 * vol) + 2.0 * g_s
        sa = (
            (i1_s - mu1_s - a[0] * dv1) * iv1,
            (i1_s - 2.0 * i2_s - mu1_s - a[1] * dv1) * iv1,
            (i1_s + mu1_s - a[2] * dv1) * iv1,
            (i1_s - 2.0 * i2_s + mu1_s - a[3] * dv1) * iv1,
        )
        sb = (
            (h_s - mu_s - nb[0] * iv * dv) * iv,
            (h_s - 2.0 * i2_s - mu_s - nb[1] * iv * dv) * iv,
            (h_s - 2.0 * i1_s - mu_s - nb[2] * iv * dv) * iv,
            (h_s + 2.0 * i2_s - 2.0 * i1_s - mu_s - nb[3] * iv * dv) * iv,
        )
        w_s = lc_s + lam_s + g_s * x
        w2_s = w_s + kappa_s * (ln_i2 - x) + kappa * i2_s
        w3_s = w_s + kappa_s * (ln_i1 - x) + kappa * i1_s
        w4_s = w_s + kappa_s * (ln_i1 - ln_i2) + kappa * (i1_s - i2_s)
    m1 = _m_jet(a[0], -iv1, sa[0], nb[0] * iv, -iv, sb[0], 1.0, greeks, n_a[0])
    m2 = _m_jet(a[1], iv1, sa[1], nb[1] * iv, iv, sb[1], 1.0, greeks, n_a[1])
    m3 = _m_jet(a[2], -iv1, sa[2], nb[2] * iv, iv, sb[2], -1.0, greeks, n_a[2])
    m4 = _m_jet(a[3], iv1, sa[3], nb[3] * iv, -iv, sb[3], -1.0, greeks, n_a[3])
    out = _term(c, c_s, w, w_s, gamma, m1, greeks)
    out = _jadd(out, _term(c, c_s, w2, w2_s, gamma - kappa, m2, greeks), -1.0)
    out = _jadd(out, _term(c, c_s, w3, w3_s, gamma - kappa, m3, greeks), -1.0)
    return _jadd(out, _term(c, c_s, w4, w4_s, gamma, m4, greeks), 1.0)


@njit(cache=True, inline="always", error_model="numpy")
def _boundary(tau, sqrt_tau, b, vol, b0, b_inf, b_inf_s, scale, scale_s):
    """(I, dI/dvol) of the flat exercise boundary I = B0 + (B_inf - B0)(1 - e^{h}),
    h = -(b tau + 2 vol sqrt(tau)) scale."""
    h = -(b * tau + 2.0 * vol * sqrt_tau) * scale
    h_s = -2.0 * sqrt_tau * scale - (b * tau + 2.0 * vol * sqrt_tau) * scale_s
    eh = math.exp(h)
    return b0 + (b_inf - b0) * (1.0 - eh), b_inf_s * (1.0 - eh) - (b_inf - b0) * eh * h_s


@njit(cache=True, error_model="numpy")
def _bs_call(s, x, t, r, q, vol, method, greeks, rfd, dd, sqrt_t):
    """Bjerksund-Stensland American call (1993 as QuantLib, or 2002): (price, S V_S, S^2 V_SS, V_vol,
    regime) for s, x, t, vol > 0, given rfd = e^{-rT}, dd = e^{-qT} and sqrt(T); the derivatives only
    when `greeks` and regime is APPROX.

    regime: ``APPROX`` (the approximation's value), ``EUROPEAN`` (early exercise never optimal, or the
    European value is the larger) or ``IMMEDIATE`` (exercise now).
    """
    vol2 = vol * vol
    sd = vol * sqrt_t
    euro = _european_value(s, x, rfd, dd, (r - q) * t, sd, True)
    value, fx, fxx, fs = -1.0, 0.0, 0.0, 0.0
    if exercised_early(r, q, rfd, dd):
        b = r - q
        u = b / vol2 - 0.5
        root = math.sqrt(u * u + 2.0 * r / vol2)
        beta = root - u
        b_inf = beta / (beta - 1.0) * x
        b0 = x if q == 0.0 else max(x, r / q * x)
        if method == BS1993:
            t1, scale = t, b0 / (b_inf - b0)
        else:
            t1, scale = _T1 * t, x * x / ((b_inf - b0) * b0)
        beta_s = b_inf_s = scale_s = 0.0
        if greeks:
            u_s = -2.0 * b / (vol2 * vol)
            beta_s = (u * u_s - 2.0 * r / (vol2 * vol)) / root - u_s
            b_inf_s = -x * beta_s / (beta - 1.0) ** 2
            scale_s = -scale * b_inf_s / (b_inf - b0)
        i2, i2_ds = _boundary(t, sqrt_t, b, vol, b0, b_inf, b_inf_s, scale, scale_s)
        i1, i1_ds = x, 0.0
        if method != BS1993:
            i1, i1_ds = _boundary(t1, _SQRT_T1 * sqrt_t, b, vol, b0, b_inf, b_inf_s, scale, scale_s)
        lowest = i2 if method == BS1993 else i1
        if s >= i2:
            value = s - x
        elif not math.log(lowest * rfd / (s * dd)) / sd > 12.5:  # else never reached
            lx, ln_x, ln_i1, ln_i2 = math.log(s), math.log(x), math.log(i1), math.log(i2)
            i1_s, i2_s = i1_ds / i1, i2_ds / i2  # derivatives in vol of ln I1, ln I2
            # alpha2 S^beta - alpha2 phi(t1|beta,I2,I2) + phi(t1|1,I2,I2) - phi(t1|1,I1,I2)
            # - X phi(t1|0,I2,I2) + X phi(t1|0,I1,I2) + alpha1 phi(t1|beta,I1,I2), alpha = (I - X) I^-beta,
            # each phi(t1|gamma,H,I2) a call _phi(.., gamma, d gamma, ln H, d ln H, ln I2, d ln I2, ..,
            # c, dc, lc, d lc) for c e^{lc} phi
            la2, la2_s = -beta * ln_i2, -(beta_s * ln_i2 + beta * i2_s)
            two = (ln_i2, i2_s, r, b, vol)
            # 2002: psi's first arguments for gamma = beta, 1, 0 and their N, shared with phi(t1|gamma,I1,I2)
            # (1993: none, a negative N tells phi to compute its own)
            ea_b = ea_1 = ea_0 = ((0.0, 0.0, 0.0, 0.0), (-1.0, -1.0, -1.0, -1.0))
            if method != BS1993:
                ea_b = _psi_a(lx, t1, beta, ln_i2, ln_i1, b, vol)
                ea_1 = _psi_a(lx, t1, 1.0, ln_i2, ln_i1, b, vol)
                ea_0 = _psi_a(lx, t1, 0.0, ln_i2, ln_i1, b, vol)
            n_1, n_0 = ea_1[1], ea_0[1]
            f = _term(i2 - x, i2_ds, beta * lx + la2, beta_s * lx + la2_s, beta, (1.0, 0.0, 0.0, 0.0), greeks)
            f = _jadd(f, _phi(lx, t1, beta, beta_s, ln_i2, i2_s, *two, i2 - x, i2_ds, la2, la2_s, greeks), -1)
            f = _jadd(f, _phi(lx, t1, 1.0, 0.0, ln_i2, i2_s, *two, 1.0, 0.0, 0.0, 0.0, greeks), 1.0)
            f = _jadd(
                f, _phi(lx, t1, 1.0, 0.0, ln_i1, i1_s, *two, 1.0, 0.0, 0.0, 0.0, greeks, n_1[0], n_1[1]), -1
            )
            f = _jadd(f, _phi(lx, t1, 0.0, 0.0, ln_i2, i2_s, *two, x, 0.0, 0.0, 0.0, greeks), -1.0)
            f = _jadd(
                f, _phi(lx, t1, 0.0, 0.0, ln_i1, i1_s, *two, x, 0.0, 0.0, 0.0, greeks, n_0[0], n_0[1]), 1
            )
            if method != BS1993:
                a1, la1, la1_s = i1 - x, -beta * ln_i1, -(beta_s * ln_i1 + beta * i1_s)
                n_b = ea_b[1]
                f = _jadd(
                    f,
                    _phi(
                        lx, t1, beta, beta_s, ln_i1, i1_s, *two, a1, i1_ds, la1, la1_s, greeks, n_b[0], n_b[1]
                    ),
                    1,
                )
                # - alpha1 psi(T|beta,I1,I2,I1,t1) + psi(T|1,I1,..) - psi(T|1,X,..) - X psi(T|0,I1,..)
                # + X psi(T|0,X,I2,I1,t1)
                both = (ln_i2, i2_s, ln_i1, i1_s, r, b, vol)
                f = _jadd(
                    f,
                    _psi(lx, t, t1, beta, beta_s, ln_i1, i1_s, *both, a1, i1_ds, la1, la1_s, greeks, ea_b),
                    -1,
                )
                f = _jadd(
                    f, _psi(lx, t, t1, 1.0, 0.0, ln_i1, i1_s, *both, 1.0, 0.0, 0.0, 0.0, greeks, ea_1), 1
                )
                f = _jadd(
                    f, _psi(lx, t, t1, 1.0, 0.0, ln_x, 0.0, *both, 1.0, 0.0, 0.0, 0.0, greeks, ea_1), -1
                )
                f = _jadd(
                    f, _psi(lx, t, t1, 0.0, 0.0, ln_i1, i1_s, *both, x, 0.0, 0.0, 0.0, greeks, ea_0), -1
                )
                f = _jadd(f, _psi(lx, t, t1, 0.0, 0.0, ln_x, 0.0, *both, x, 0.0, 0.0, 0.0, greeks, ea_0), 1)
            value, fx, fxx, fs = f
    if not (math.isfinite(value) and value >= euro):
        value = euro
    if value < (s - x) * (1.0 + 10.0 * _EPS):  # as QuantLib: exercise now
        return s - x, s, 0.0, 0.0, IMMEDIATE
    if value > euro:
        return value, fx, fxx, fs, APPROX
    return value, 0.0, 0.0, 0.0, EUROPEAN


@njit(cache=True, error_model="numpy")
def _american_value(s, k, t, r, q, vol, is_call, method, greeks, df, dq, sqrt_t):
    """(price, delta, gamma, vega, regime) of an American option (the Greeks only when `greeks` and
    APPROX), given df = e^{-rT}, dq = e^{-qT} and sqrt(T) (see _discounts)."""
    if t <= 0.0 or vol <= 0.0 or k <= 0.0 or s <= 0.0:  # deterministic: European or immediate exercise
        euro = _european(s, k, t, r, q, vol, is_call, False)[0]
        intrinsic = max(s - k, 0.0) if is_call else max(k - s, 0.0)
        return (euro, 0.0, 0.0, 0.0, EUROPEAN) if euro >= intrinsic else (intrinsic, 0.0, 0.0, 0.0, IMMEDIATE)
    if is_call:
        price, fx, fxx, vega, regime = _bs_call(s, k, t, r, q, vol, method, greeks, df, dq, sqrt_t)
        return price, fx / s, (fxx - fx) / (s * s), vega, regime
    # put-call transformation: P(S, K) = C(K, S) with r and q swapped; C is homogeneous of degree one in
    # (spot, strike), so dP/dS = dC/dX = (C - K C_K') / S and d2P/dS2 = K^2 C'' / S^2 (' = d/d call spot)
    price, fx, fxx, vega, regime = _bs_call(k, s, t, q, r, vol, method, greeks, dq, df, sqrt_t)
    return price, (price - fx) / s, (fxx - fx) / (s * s), vega, regime


@njit(cache=True, error_model="numpy")
def _american(s, k, t, r, q, vol, is_call, method):
    """(price, delta, gamma, vega) of an American option (see the module docstring for the Greeks)."""
    df, dq, sqrt_t = _discounts(t, r, q)
    price, delta, gamma, vega, regime = _american_value(
        s, k, t, r, q, vol, is_call, method, True, df, dq, sqrt_t
    )
    if regime == EUROPEAN:
        return _european(s, k, t, r, q, vol, is_call)
    if regime == IMMEDIATE:
        return price, 1.0 if is_call else -1.0, 0.0, 0.0
    return price, delta, gamma, vega


@njit(cache=True)
def price_greeks_one(model, s, k, t, r, q, vol, is_call, american, method=BS2002):
    """(price, delta, gamma, vega) of one contract: the scalar kernel."""
    q = _carry_yield(model, r, q)
    if american:
        return _american(s, k, t, r, q, vol, is_call, method)
    return _european(s, k, t, r, q, vol, is_call)


@njit(cache=True)
def price_one(model, s, k, t, r, q, vol, is_call, american, method=BS2002):
    """Price of one contract (no Greeks): the revaluation kernel."""
    q = _carry_yield(model, r, q)
    if american:
        df, dq, sqrt_t = _discounts(t, r, q)
        return _american_value(s, k, t, r, q, vol, is_call, method, False, df, dq, sqrt_t)[0]
    return _european(s, k, t, r, q, vol, is_call, False)[0]


@njit(cache=True)
def price_greeks(model, spot, strike, t, r, q, vol, is_call, american, method=BS2002):
    """Arrays (price, delta, gamma, vega) for arrays of contracts (all inputs of one length)."""
    n = spot.shape[0]
    price = np.empty(n)
    delta = np.empty(n)
    gamma = np.empty(n)
    vega = np.empty(n)
    for i in range(n):
        price[i], delta[i], gamma[i], vega[i] = price_greeks_one(
            model[i], spot[i], strike[i], t[i], r[i], q[i], vol[i], is_call[i], american[i], method
        )
    return price, delta, gamma, vega


@njit(cache=True)
def _carry(model, t, r, q):
    """Per contract e^{-rT}, e^{-qT} (q = r for Black-76), (r - q) T and sqrt(T), out of the scenario loop."""
    n = t.shape[0]
    consts = np.empty((n, 4))
    for i in range(n):
        q_i = _carry_yield(model[i], r[i], q[i])
        consts[i, 0], consts[i, 1], consts[i, 3] = _discounts(t[i], r[i], q_i)
        consts[i, 2] = (r[i] - q_i) * max(t[i], 0.0)
    return consts


@njit(cache=True, error_model="numpy", inline="always")
def _value_at(i, s_i, vol_i, p):
    """Contract i's price at spot s_i and vol vol_i; p = (consts (`_carry`), model, strike, t, r, q,
    is_call, american, method): the scenario revaluation's one pricing."""
    consts, model, strike, t, r, q, is_call, american, method = p
    k = strike[i]
    sd = vol_i * consts[i, 3]
    if american[i]:
        q_i = _carry_yield(model[i], r[i], q[i])
        return _american_value(
            s_i,
            k,
            t[i],
            r[i],
            q_i,
            vol_i,
            is_call[i],
            method,
            False,
            consts[i, 0],
            consts[i, 1],
            consts[i, 3],
        )[0]
    if t[i] <= 0.0 or not sd > 0.0 or not s_i > 0.0 or not k > 0.0:
        return price_one(model[i], s_i, k, t[i], r[i], q[i], vol_i, is_call[i], False)
    return _european_value(s_i, k, consts[i, 0], consts[i, 1], consts[i, 2], sd, is_call[i])


@njit(cache=True, error_model="numpy")
def _revalue_scenario(out, si, spot, vol, spot_mult, vol_mult, p):
    for i in range(spot.shape[0]):
        out[si, i] = _value_at(i, spot[i] * spot_mult[si, i], vol[i] * vol_mult[si, i], p)


@njit(cache=True, error_model="numpy")
def _rows_of(out, i, spot, vol, mult, v0, sm, vm, lsm, p):
    """Contract i's row out[i] = mult (V_s - V_0) from its underlying's multipliers sm, vm (and lsm = log sm),
    one per scenario. European: a loop LLVM vectorises (vecmath.ncdf), then the scalar kernel for the
    scenarios the formula does not take (a multiplier <= 0 or not finite); American under BS2002: the
    scenarios as vector lanes (american_rows), the scalar kernel for what it flags; else the scalar kernel."""
    consts, model, strike, t, r, q, is_call, american, method = p
    m, base, k, s0, vol0 = mult[i], v0[i], strike[i], spot[i], vol[i]
    n_s = sm.shape[0]
    if american[i] and method == BS2002 and t[i] > 0.0 and s0 > 0.0 and k > 0.0:
        # the scenarios as vector lanes (calc/american_rows.py); what it flags, and a contract it
        # leaves (never exercised early: European), by the scalar kernel below
        flagged = np.empty(n_s, np.bool_)
        q_i = _carry_yield(model[i], r[i], q[i])
        args = (s0, vol0, sm, vm, k, t[i], r[i], q_i, is_call[i], consts[i, 0], consts[i, 1], consts[i, 3])
        if american_row(out[i], flagged, m, base, *args):
            for si in range(n_s):
                if flagged[si]:
                    out[i, si] = m * (_value_at(i, s0 * sm[si], vol0 * vm[si], p) - base)
            return
    if american[i] or not (t[i] > 0.0 and s0 > 0.0 and k > 0.0):
        for si in range(n_s):
            out[i, si] = m * (_value_at(i, s0 * sm[si], vol0 * vm[si], p) - base)
        return
    # log(S_s / K) = log(S / K) + log(spot multiplier)
    df, dq, carry_t, sqrt_t = consts[i, 0], consts[i, 1], consts[i, 2], consts[i, 3]
    a = math.log(s0 / k) + carry_t
    row = out[i]
    if is_call[i]:
        for si in range(n_s):
            sd = vol0 * vm[si] * sqrt_t
            d1 = (a + lsm[si]) / sd + 0.5 * sd
            row[si] = m * (s0 * sm[si] * dq * ncdf(d1) - k * df * ncdf(d1 - sd) - base)
    else:
        for si in range(n_s):
            sd = vol0 * vm[si] * sqrt_t
            d1 = (a + lsm[si]) / sd + 0.5 * sd
            row[si] = m * (k * df * ncdf(sd - d1) - s0 * sm[si] * dq * ncdf(-d1) - base)
    for si in range(n_s):
        if not (vol0 * vm[si] * sqrt_t > 0.0 and s0 * sm[si] > 0.0):
            row[si] = m * (_value_at(i, s0 * sm[si], vol0 * vm[si], p) - base)


@njit(cache=True, parallel=True)
def _columns(col, spot_mult, vol_mult):
    """The multipliers of the columns `col` uses, column-major (one contiguous row of scenarios each, what
    _rows_of reads): (sm, vm, log sm) of shape (used columns, scenarios), and each contract's row in them."""
    seen = np.full(spot_mult.shape[1], -1, np.int64)
    used = np.empty(col.shape[0], np.int64)
    row_of = np.empty(col.shape[0], np.int64)
    n_used = 0
    for i in range(col.shape[0]):
        if seen[col[i]] < 0:
            seen[col[i]] = n_used
            used[n_used] = col[i]
            n_used += 1
        row_of[i] = seen[col[i]]
    n_s = spot_mult.shape[0]
    sm = np.empty((n_used, n_s))
    vm = np.empty((n_used, n_s))
    lsm = np.empty((n_used, n_s))
    for u in prange(n_used):
        c = used[u]
        for si in range(n_s):
            sm[u, si] = spot_mult[si, c]
            vm[u, si] = vol_mult[si, c]
            lsm[u, si] = math.log(spot_mult[si, c]) if spot_mult[si, c] > 0.0 else -math.inf
    return sm, vm, lsm, row_of


@njit(cache=True, parallel=True)
def scenario_rows(
    model, spot, strike, t, r, q, vol, is_call, american, mult, v0, col, spot_mult, vol_mult, method
):
    """rows[i, s] = mult[i] * (V_i(spot[i] * spot_mult[s, col[i]], vol[i] * vol_mult[s, col[i]]) - v0[i]):
    each contract's scenario P&L per unit, contract-major, from the moves of its underlying's column
    `col[i]` of (scenarios x underlyings) multipliers (the used columns copied out once, _columns). Parallel
    over contracts (numba.set_num_threads(1) before the call keeps a small book on the calling thread)."""
    out = np.empty((spot.shape[0], spot_mult.shape[0]))
    p = (_carry(model, t, r, q), model, strike, t, r, q, is_call, american, method)
    sm, vm, lsm, row_of = _columns(col, spot_mult, vol_mult)
    for i in prange(spot.shape[0]):
        u = row_of[i]
        _rows_of(out, i, spot, vol, mult, v0, sm[u], vm[u], lsm[u], p)
    return out


@njit(cache=True, parallel=True)
def revalue(model, spot, strike, t, r, q, vol, is_call, american, spot_mult, vol_mult, method=BS2002):
    """V[s, i]: contract i repriced with spot[i] * spot_mult[s, i] and vol[i] * vol_mult[s, i].

    ``spot_mult`` and ``vol_mult`` are (scenarios x contracts); time to expiry is unchanged (the
    caller ages ``t`` for theta). Parallel over scenarios.
    """
    out = np.empty(spot_mult.shape)
    p = (_carry(model, t, r, q), model, strike, t, r, q, is_call, american, method)
    for si in prange(spot_mult.shape[0]):
        _revalue_scenario(out, si, spot, vol, spot_mult, vol_mult, p)
    return out
