"""Bjerksund-Stensland 2002 prices of one American contract across a row of scenarios, the scenarios as
vector lanes: the engine's American revaluation (calc/options.py `_rows_of`), the formula of `_bs_call`.

The scalar kernel prices one scenario at a time: its ~38 normal CDFs (libm erfc) and ~80 exponentials run
one by one. Here a block of BLOCK scenarios goes through the same formula a step at a time, each step a
small loop over the block that LLVM turns into vector code (vecmath.ncdf, vecmath.exp_vec: at most a few
of them per loop, so numba compiles it in seconds), the logs in one scalar loop. Scenarios the formula
must not take here (a spot, strike or vol not finite or <= 0, an exponent past 700 where the clamped
exponential would stand for infinity) are flagged for the scalar kernel, which the caller runs on them.
A block whose lanes are all settled without the formula's terms (exercised now, or a boundary never
reached) skips them, as does a bivariate normal whose every lane takes a cut-off (short-dated books).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from calc.bs2002 import BVN_A, BVN_B, BVN_W, EPS, GL_N, SQRT_T1, T1, exercised_early
from calc.vecmath import exp_vec, ncdf

BLOCK = 64  # scenarios per block: ~100 rows of scratch x 64 x 8 B = 50 KiB, in L2

_BIG = 700.0  # an exponent past this: the scalar kernel (exp_vec clamps at 709)

# scratch rows (of BLOCK lanes each)
(S, X, VOL, VOL2, SD, EURO, BETA, BINF, B0, SCALE, I1, I2, LX, LNX, LI1, LI2, LOW, F, BIGW, BAD,
 ONE, ZERO, CA, LCA, C1, LC1, G1, G2, Z1, Z2, W1, W2, W3, W4, MB, AB, HS, ACC, M1, M2, M3, M4,
 TMP) = range(43)  # fmt: skip
NB = 43  # psi's four second arguments of M: rows NB .. NB + 3
EA = NB + 4  # 3 gammas x (a1..a4, N(a1)..N(a4)): rows EA + 8 g .. EA + 8 g + 7
ROWS = EA + 24


@njit(cache=True, error_model="numpy")
def _ncdf_rows(w, dst, src, n):
    for lane in range(n):
        w[dst, lane] = ncdf(w[src, lane])


@njit(cache=True, error_model="numpy")
def _boundary(w, dst, n, tau, sqrt_tau, b):
    """I = B0 + (B_inf - B0)(1 - e^h), h = -(b tau + 2 vol sqrt(tau)) scale (options._boundary)."""
    for lane in range(n):
        h = -(b * tau + 2.0 * w[VOL, lane] * sqrt_tau) * w[SCALE, lane]
        w[BIGW, lane] = h if h > w[BIGW, lane] else w[BIGW, lane]
        eh = exp_vec(h)
        b0 = w[B0, lane]
        w[dst, lane] = b0 + (w[BINF, lane] - b0) * (1.0 - eh)


@njit(cache=True, error_model="numpy")
def _stage_a(w, n, t, r, q, b, sqrt_t, b0_factor):
    """vol^2, vol sqrt(T), beta, B_inf, B0, the scale of both boundaries, and the boundaries."""
    for lane in range(n):
        vol = w[VOL, lane]
        vol2 = vol * vol
        w[VOL2, lane] = vol2
        w[SD, lane] = vol * sqrt_t
        u = b / vol2 - 0.5
        root = np.sqrt(u * u + 2.0 * r / vol2)
        beta = root - u
        x = w[X, lane]
        b_inf = beta / (beta - 1.0) * x
        b0 = x if q == 0.0 else (x if x > b0_factor * x else b0_factor * x)
        w[BETA, lane], w[BINF, lane], w[B0, lane] = beta, b_inf, b0
        w[SCALE, lane] = x * x / ((b_inf - b0) * b0)
    _boundary(w, I2, n, t, sqrt_t, b)
    _boundary(w, I1, n, T1 * t, SQRT_T1 * sqrt_t, b)


@njit(cache=True, error_model="numpy")
def _logs(w, n, rfd, dd, carry_t):
    """The logs (libm, one scalar loop): ln S, ln X, ln I1, ln I2, the never-reached test's and d1's."""
    for lane in range(n):
        s, x = w[S, lane], w[X, lane]
        w[LX, lane], w[LNX, lane] = math.log(s), math.log(x)
        w[LI1, lane], w[LI2, lane] = math.log(w[I1, lane]), math.log(w[I2, lane])
        w[LOW, lane] = math.log(w[I1, lane] * rfd / (s * dd)) / w[SD, lane]
        w[TMP, lane] = (math.log(s / x) + carry_t) / w[SD, lane] + 0.5 * w[SD, lane]  # d1


@njit(cache=True, error_model="numpy")
def _euro(w, n, rfd, dd):
    """The European call (options._european_value) from d1 in TMP."""
    for lane in range(n):
        w[G1, lane] = w[TMP, lane] - w[SD, lane]
    _ncdf_rows(w, Z1, TMP, n)
    _ncdf_rows(w, Z2, G1, n)
    for lane in range(n):
        w[EURO, lane] = w[S, lane] * dd * w[Z1, lane] - w[X, lane] * rfd * w[Z2, lane]


@njit(cache=True, error_model="numpy")
def _psi_a(w, n, t1, gamma_row, gamma, b, base):
    """psi's first arguments a1..a4 for one gamma and their N (options._psi_a), into rows base..base + 7;
    gamma from row `gamma_row` when >= 0, else the constant `gamma`."""
    sqrt_t1 = math.sqrt(t1)
    for lane in range(n):
        g = w[gamma_row, lane] if gamma_row >= 0 else gamma
        vol = w[VOL, lane]
        mu1 = (b + (g - 0.5) * vol * vol) * t1
        iv1 = 1.0 / (vol * sqrt_t1)
        x, li1, li2 = w[LX, lane], w[LI1, lane], w[LI2, lane]
        w[base, lane] = (li1 - mu1 - x) * iv1
        w[base + 1, lane] = (x + li1 - 2.0 * li2 - mu1) * iv1
        w[base + 2, lane] = (li1 + mu1 - x) * iv1
        w[base + 3, lane] = (x + li1 - 2.0 * li2 + mu1) * iv1
    for j in range(4):
        _ncdf_rows(w, base + 4 + j, base + j, n)


@njit(cache=True, error_model="numpy")
def _track(w, n, row):
    """BIGW = the largest exponent seen per lane (a lane past _BIG goes to the scalar kernel)."""
    for lane in range(n):
        v = w[row, lane]
        w[BIGW, lane] = v if v > w[BIGW, lane] else w[BIGW, lane]


@njit(cache=True, error_model="numpy")
def _phi(w, n, sign, t, gamma_row, gamma, h_row, c_row, lc_row, shared, r, b):
    """F += sign c e^{lc} phi(S, t | gamma, H, I2) (options._phi without the Greeks); `shared` >= 0: the
    EA rows whose N(a1), N(a2) are this phi's two normal CDFs."""
    sqrt_t = math.sqrt(t)
    for lane in range(n):
        g = w[gamma_row, lane] if gamma_row >= 0 else gamma
        vol, vol2, x = w[VOL, lane], w[VOL2, lane], w[LX, lane]
        iv = 1.0 / (vol * sqrt_t)
        lam = (-r + g * b + 0.5 * g * (g - 1.0) * vol2) * t
        mu = (b + (g - 0.5) * vol2) * t
        kappa = 2.0 * b / vol2 + (2.0 * g - 1.0)
        ln_h, ln_i = w[h_row, lane], w[LI2, lane]
        w[Z1, lane] = (ln_h - mu - x) * iv
        w[Z2, lane] = (x + ln_h - 2.0 * ln_i - mu) * iv
        w1 = w[lc_row, lane] + lam + g * x
        w[W1, lane] = w1
        w[W2, lane] = w1 + kappa * (ln_i - x)
    if shared >= 0:
        for lane in range(n):
            w[G1, lane], w[G2, lane] = w[shared + 4, lane], w[shared + 5, lane]
    else:
        _ncdf_rows(w, G1, Z1, n)
        _ncdf_rows(w, G2, Z2, n)
    _track(w, n, W1)
    _track(w, n, W2)
    for lane in range(n):
        c = w[c_row, lane]
        e1 = c * exp_vec(w[W1, lane])
        e2 = c * exp_vec(w[W2, lane])
        w[F, lane] = w[F, lane] + sign * (e1 * w[G1, lane] - e2 * w[G2, lane])


@njit(cache=True, error_model="numpy")
def _m(w, n, dst, a_row, b_row, na_row, sign):
    """w[dst] = M(a, b, sign rho) (options._bvn), N(a) in row na_row: the GL_N-node sum with the scenarios
    as lanes, then the cut-offs as selects."""
    _ncdf_rows(w, MB, b_row, n)
    cut = 0
    for lane in range(n):
        a, bb = w[a_row, lane], w[b_row, lane]
        w[AB, lane] = sign * a * bb
        w[HS, lane] = 0.5 * (a * a + bb * bb)
        w[ACC, lane] = 0.0
        cut += (a > 8.3) | (bb > 8.3) | (a < -38.5) | (bb < -38.5)
    if cut < n:  # (a block whose every lane takes a cut-off below needs no sum)
        for j in range(GL_N):
            wj, aj, bj = BVN_W[j], BVN_A[j], BVN_B[j]
            for lane in range(n):
                w[ACC, lane] += wj * exp_vec(aj * w[AB, lane] - bj * w[HS, lane])
    for lane in range(n):
        a, bb, n_a = w[a_row, lane], w[b_row, lane], w[na_row, lane]
        v = n_a * w[MB, lane] + sign * w[ACC, lane]
        v = n_a if bb > 8.3 else v
        v = w[MB, lane] if a > 8.3 else v
        v = 0.0 if (a < -38.5) | (bb < -38.5) else v
        w[dst, lane] = v


@njit(cache=True, error_model="numpy")
def _psi(w, n, sign, t, t1, gamma_row, gamma, h_row, c_row, lc_row, ea, r, b):
    """F += sign c e^{lc} psi(S, T | gamma, H, I2, I1, t1) (options._psi without the Greeks); ea: the EA
    rows of this gamma."""
    sqrt_t = math.sqrt(t)
    for lane in range(n):  # the second arguments of the four M
        g = w[gamma_row, lane] if gamma_row >= 0 else gamma
        vol2, x = w[VOL2, lane], w[LX, lane]
        iv = 1.0 / (w[VOL, lane] * sqrt_t)
        mu = (b + (g - 0.5) * vol2) * t
        ln_h, li1, li2 = w[h_row, lane], w[LI1, lane], w[LI2, lane]
        w[NB, lane] = (ln_h - mu - x) * iv
        w[NB + 1, lane] = (x + ln_h - 2.0 * li2 - mu) * iv
        w[NB + 2, lane] = (x + ln_h - 2.0 * li1 - mu) * iv
        w[NB + 3, lane] = (ln_h + 2.0 * li2 - 2.0 * li1 - mu - x) * iv
    for k in range(4):
        _m(w, n, M1 + k, ea + k, NB + k, ea + 4 + k, 1.0 if k < 2 else -1.0)
    for lane in range(n):
        g = w[gamma_row, lane] if gamma_row >= 0 else gamma
        vol2, x = w[VOL2, lane], w[LX, lane]
        lam = (-r + g * b + 0.5 * g * (g - 1.0) * vol2) * t
        kappa = 2.0 * b / vol2 + (2.0 * g - 1.0)
        li1, li2 = w[LI1, lane], w[LI2, lane]
        w0 = w[lc_row, lane] + lam + g * x
        w[W1, lane] = w0
        w[W2, lane] = w0 + kappa * (li2 - x)
        w[W3, lane] = w0 + kappa * (li1 - x)
        w[W4, lane] = w0 + kappa * (li1 - li2)
    for row in (W1, W2, W3, W4):
        _track(w, n, row)
    for lane in range(n):
        c = w[c_row, lane]
        out = c * exp_vec(w[W1, lane]) * w[M1, lane]
        out = out - c * exp_vec(w[W2, lane]) * w[M2, lane]
        out = out - c * exp_vec(w[W3, lane]) * w[M3, lane]
        out = out + c * exp_vec(w[W4, lane]) * w[M4, lane]
        w[F, lane] = w[F, lane] + sign * out


@njit(cache=True, error_model="numpy")
def _approx(w, n, t, t1, r, b):
    """F = the approximation's value (options._bs_call's sum of terms), BIGW its largest exponent."""
    for lane in range(n):
        beta, x = w[BETA, lane], w[X, lane]
        w[CA, lane], w[LCA, lane] = w[I2, lane] - x, -beta * w[LI2, lane]  # alpha2 = (I2 - X) I2^-beta
        w[C1, lane], w[LC1, lane] = w[I1, lane] - x, -beta * w[LI1, lane]  # alpha1
        w[TMP, lane] = beta * w[LX, lane] + w[LCA, lane]
    _track(w, n, TMP)
    ea_b, ea_1, ea_0 = EA, EA + 8, EA + 16
    _psi_a(w, n, t1, BETA, 0.0, b, ea_b)
    _psi_a(w, n, t1, -1, 1.0, b, ea_1)
    _psi_a(w, n, t1, -1, 0.0, b, ea_0)
    for lane in range(n):
        w[F, lane] = w[CA, lane] * exp_vec(w[TMP, lane])
    _phi(w, n, -1.0, t1, BETA, 0.0, LI2, CA, LCA, -1, r, b)
    _phi(w, n, 1.0, t1, -1, 1.0, LI2, ONE, ZERO, -1, r, b)
    _phi(w, n, -1.0, t1, -1, 1.0, LI1, ONE, ZERO, ea_1, r, b)
    _phi(w, n, -1.0, t1, -1, 0.0, LI2, X, ZERO, -1, r, b)
    _phi(w, n, 1.0, t1, -1, 0.0, LI1, X, ZERO, ea_0, r, b)
    _phi(w, n, 1.0, t1, BETA, 0.0, LI1, C1, LC1, ea_b, r, b)
    _psi(w, n, -1.0, t, t1, BETA, 0.0, LI1, C1, LC1, ea_b, r, b)
    _psi(w, n, 1.0, t, t1, -1, 1.0, LI1, ONE, ZERO, ea_1, r, b)
    _psi(w, n, -1.0, t, t1, -1, 1.0, LNX, ONE, ZERO, ea_1, r, b)
    _psi(w, n, -1.0, t, t1, -1, 0.0, LI1, X, ZERO, ea_0, r, b)
    _psi(w, n, 1.0, t, t1, -1, 0.0, LNX, X, ZERO, ea_0, r, b)


@njit(cache=True, error_model="numpy")
def _block(w, n, t, r, q, rfd, dd, sqrt_t):
    """The BS2002 call value of the block's lanes (S, X, VOL set; r, q, discounts in call space) into F,
    BAD set where the scalar kernel must price instead."""
    b = r - q
    b0_factor = r / q if q != 0.0 else 1.0
    _stage_a(w, n, t, r, q, b, sqrt_t, b0_factor)
    _logs(w, n, rfd, dd, (r - q) * t)
    _euro(w, n, rfd, dd)
    settled = 0  # lanes exercised now or whose boundary is never reached: their value needs no terms
    for lane in range(n):
        settled += (w[LOW, lane] > 12.5) | (w[S, lane] >= w[I2, lane])
    if settled < n:  # (else F is not read below: every lane takes one of those two selects)
        _approx(w, n, t, T1 * t, r, b)
    for lane in range(n):  # the regimes of _bs_call, as selects
        s, x, euro = w[S, lane], w[X, lane], w[EURO, lane]
        value = w[F, lane]
        value = -1.0 if w[LOW, lane] > 12.5 else value  # never reached: the European value below
        value = s - x if s >= w[I2, lane] else value
        value = euro if not (math.isfinite(value) & (value >= euro)) else value
        value = s - x if value < (s - x) * (1.0 + 10.0 * EPS) else value
        w[F, lane] = value
        w[BAD, lane] = w[BAD, lane] + (1.0 if w[BIGW, lane] > _BIG else 0.0)


@njit(cache=True, error_model="numpy")
def american_row(row, flagged, m, base, s0, vol0, sm, vm, k, t, r, q, is_call, rfd, dd, sqrt_t):
    """row[s] = m (V_s - base) for an American contract (spot s0 sm[s], vol vol0 vm[s], strike k, t > 0,
    rate r, yield q (Black-76: q = r), rfd = e^{-rT}, dd = e^{-qT}); puts by the put-call transformation
    (a call on K struck at S with r and q swapped). flagged[s] = True where the scalar kernel must price
    (the caller does). Returns False, touching nothing, when the contract is never exercised early in
    this approximation (the scalar kernel's European case: cheap there)."""
    rc, qc, rfd_c, dd_c = (r, q, rfd, dd) if is_call else (q, r, dd, rfd)
    if not exercised_early(rc, qc, rfd_c, dd_c):
        return False
    w = np.empty((ROWS, BLOCK))
    w[ONE], w[ZERO] = 1.0, 0.0  # the constant c and lc of the terms that have none
    n_s = row.shape[0]
    for lo in range(0, n_s, BLOCK):
        n = min(BLOCK, n_s - lo)
        for lane in range(n):
            spot = s0 * sm[lo + lane]
            vol = vol0 * vm[lo + lane]
            ok = (spot > 0.0) & (vol > 0.0) & math.isfinite(spot) & math.isfinite(vol)
            w[BAD, lane] = 0.0 if ok else 1.0
            w[BIGW, lane] = -math.inf
            spot = spot if ok else k  # any valid number: the lane is priced again by the scalar kernel
            vol = vol if ok else 0.2
            w[S, lane] = spot if is_call else k
            w[X, lane] = k if is_call else spot
            w[VOL, lane] = vol
        _block(w, n, t, rc, qc, rfd_c, dd_c, sqrt_t)
        for lane in range(n):
            row[lo + lane] = m * (w[F, lane] - base)
            flagged[lo + lane] = w[BAD, lane] > 0.0
    return True
