"""Branch-free exp(x <= 0) and standard normal CDF for the option kernels, written so that LLVM turns a
numba loop of them into vector code (numba here has no SVML: math.exp and math.erfc in a loop are scalar
libm calls).

- ``exp_vec(x)``: exp(x) for x <= 0 as fdlibm's ``__ieee754_exp`` without its branches (error < 1 ulp).
- ``ncdf(x)``: N(x) = erfc(-x / sqrt 2) / 2 as ``t Q(t) e^{-z^2}``, t = 2 / (2 + z), z = |x| / sqrt 2 (the
  variable of Numerical Recipes' ``erfccheb``, 3rd ed. 6.2.2): ``Q`` is our own fit of erfc(z) e^{z^2} / t
  over z in [0, 27], a degree-25 Chebyshev interpolant (mpmath, 50 digits) rewritten in powers of y (t
  mapped onto [-1, 1]) and evaluated by Estrin's scheme (short dependency chains);
  ``tests/calc/test_vecmath.py`` derives the coefficients again and holds N to mpmath. z^2 is split
  exactly (Dekker's split of |x|: e^{-z^2} = e^{-hi^2 / 2} e^{-e}, the small e by its Taylor series), so
  the lower tail keeps its relative accuracy (a few ulp) down to N(-38.4) ~ 1e-323, and beyond z = 27 N
  is 0 (x <= -38.2) or 1. About 3.7 ns in a vectorised loop (one exponential), against 5.8 for the fit of
  ln Q that took two (sessions 17-19) and libm erfc's 20 (BENCHMARKS.md, "Options").
Both are numba functions a kernel calls; none of a caller's fastmath flags may reach them (the split and the
argument reduction depend on exact rounding): ``exp_vec`` is not inlined by numba (LLVM inlines it with
its own strict flags), ``ncdf`` is, and its callers take no fastmath.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _as_float(typingctx, bits):
    """The float64 whose IEEE bits are the int64 `bits` (a bitcast: what numba has no scalar form of)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# exp: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by fdlibm's rational form; k rounded by adding and subtracting
# 1.5 * 2^52, 2^k built from its bits. Arguments below -700 are taken as -700 (exp(-700) = 1e-304), above
# 709 as 709.
_LN2_HI, _LN2_LO, _INV_LN2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10, 1.44269504088896338700
_EXP_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05)
_EXP_P += (-1.65339022054652515390e-06, 4.13813679705723846039e-08)
_ROUND = 6755399441055744.0  # 1.5 * 2^52: x + _ROUND - _ROUND rounds x (|x| < 2^51) to an integer


@njit(cache=True, error_model="numpy")
def exp_vec(x):
    """exp(x) for x in [-700, 709] (see above; outside taken as its end: e^709 = 8.2e307), branch-free:
    the clamps are selects, not numba's max() and min(), which keep a loop around them scalar."""
    x = -700.0 if x < -700.0 else x
    x = 709.0 if x > 709.0 else x
    k = (x * _INV_LN2 + _ROUND) - _ROUND
    hi = x - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    t = r * r
    p1, p2, p3, p4, p5 = _EXP_P
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    return (1.0 - ((lo - (r * c) / (2.0 - c)) - hi)) * _as_float((np.int64(k) + 1023) << 52)


# ncdf: Q(y) = sum_k NCDF_Q[k] y^k, y = (t - A) 2 / (1 - A) - 1 for t = 2 / (2 + z) in [A, 1],
# A = 2 / (2 + Z_MAX) (`python tests/calc/test_vecmath.py` derives and prints them again).
Z_MAX = 27.0  # erfc(27) = 5e-319: past it N is 0 or 1
NCDF_Q = (
    0.5351568958073251,
    0.33805844228751003,
    0.1241197594737163,
    0.012194828795699685,
    -0.008834724162129142,
    -0.0017940039978031237,
    0.0011092739736107504,
    0.00014280304456119474,
    -0.00018505424016622621,
    1.4460520464997737e-05,
    2.7705807709844155e-05,
    -1.0561092351990924e-05,
    -1.7374228672092645e-06,
    2.6807588715379026e-06,
    -6.970896457752792e-07,
    -2.6686113736042114e-07,
    2.7004661385699306e-07,
    -6.935757780249813e-08,
    -2.824096134866409e-08,
    3.235443578815579e-08,
    -9.559429968836746e-09,
    -4.030549452929771e-09,
    4.04820955153834e-09,
    -5.144535009078318e-10,
    -5.114339040355897e-10,
    1.6177817521841032e-10,
)
_A = 2.0 / (2.0 + Z_MAX)
_Y_SCALE = 2.0 / (1.0 - _A)
_SPLIT = 134217729.0  # 2^27 + 1: Dekker's split of a double into two 26-bit halves
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@njit(cache=True, inline="always", error_model="numpy")
def _q(y):
    """Q(y) by Estrin's scheme: pairs, then pairs of pairs (depth 5 instead of Horner's 25)."""
    c = NCDF_Q
    y2 = y * y
    y4 = y2 * y2
    y8 = y4 * y4
    y16 = y8 * y8
    r0 = (c[0] + c[1] * y) + (c[2] + c[3] * y) * y2
    r1 = (c[4] + c[5] * y) + (c[6] + c[7] * y) * y2
    r2 = (c[8] + c[9] * y) + (c[10] + c[11] * y) * y2
    r3 = (c[12] + c[13] * y) + (c[14] + c[15] * y) * y2
    r4 = (c[16] + c[17] * y) + (c[18] + c[19] * y) * y2
    r5 = (c[20] + c[21] * y) + (c[22] + c[23] * y) * y2
    r6 = c[24] + c[25] * y
    return ((r0 + r1 * y4) + (r2 + r3 * y4) * y8) + ((r4 + r5 * y4) + r6 * y8) * y16


@njit(cache=True, inline="always", error_model="numpy")
def ncdf(x):
    """N(x), the standard normal CDF (see the module docstring); NaN for NaN."""
    ax = abs(x)
    z = min(ax * _INV_SQRT2, Z_MAX)
    t = 2.0 / (2.0 + z)
    q = _q((t - _A) * _Y_SCALE - 1.0)
    # z^2 = x^2 / 2 = hi^2 / 2 + e, e = lo (|x| + hi) / 2 (hi^2 exact, |e| <= 2^-27 x^2 <= 1.1e-5):
    # e^{-hi^2 / 2} as the square of e^{-hi^2 / 4} (each factor >= e^{-365}, no clamp), e^{-e} to e^3
    # (the next term < 1e-21)
    h = _SPLIT * ax
    hi = h - (h - ax)
    lo = ax - hi
    g = exp_vec(-0.25 * (hi * hi))
    e = 0.5 * lo * (ax + hi)
    half_erfc = 0.5 * t * q * (g * g) * (1.0 - e * (1.0 - e * (0.5 - e * (1.0 / 6.0))))
    half_erfc = 0.0 if ax * _INV_SQRT2 > Z_MAX else half_erfc
    half_erfc = 0.5 if ax == 0.0 else half_erfc  # (Q(1) evaluates to 1 - 2 ulp)
    return half_erfc if x <= 0.0 else 1.0 - half_erfc
