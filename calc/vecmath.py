"""Branch-free exp(x <= 0) and standard normal CDF for the option kernels, written so that LLVM turns a
numba loop of them into vector code (numba here has no SVML: math.exp and math.erfc in a loop are scalar
libm calls).

- ``exp_vec(x)``: exp(x) for x <= 0 as fdlibm's ``__ieee754_exp`` without its branches (error < 1 ulp).
- ``ncdf(x)``: N(x) = erfc(-x / sqrt 2) / 2 as ``t exp(-z^2 + P(t))``, t = 2 / (2 + z), z = |x| / sqrt 2
  (the form of Numerical Recipes' ``erfccheb``, 3rd ed. 6.2.2): ``P`` is our own fit of
  ln(erfc(z) e^{z^2} / t) over z in [0, 27], a degree-25 Chebyshev interpolant (mpmath, 50 digits)
  rewritten in powers of y (t mapped onto [-1, 1]) and evaluated by Estrin's scheme (short dependency
  chains); ``tests/calc/test_vecmath.py`` derives the coefficients again and holds N to mpmath. z^2 is
  taken exactly (Dekker's split of |x|), so the lower tail keeps its relative accuracy (a few ulp) down
  to N(-38.4) ~ 1e-323, and beyond z = 27 N is 0 (x <= -38.2) or 1. About 5 ns in a vectorised loop
  against libm erfc's 20 (BENCHMARKS.md, "Options", session 17).
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


# ncdf: P(y) = sum_k NCDF_P[k] y^k, y = (t - A) 2 / (1 - A) - 1 for t = 2 / (2 + z) in [A, 1],
# A = 2 / (2 + Z_MAX) (`python tests/calc/test_vecmath.py` derives and prints them again).
Z_MAX = 27.0  # erfc(27) = 5e-319: past it N is 0 or 1
NCDF_P = (
    -0.625195311888113,
    0.631699684589737,
    0.032409287681125366,
    -0.03969826023071336,
    -0.005057692508171907,
    0.006518319888087174,
    0.00040707167075892963,
    -0.0014044549493216554,
    0.00013733781501740227,
    0.0002990967404586564,
    -9.848997527643425e-05,
    -4.874481025702123e-05,
    3.696625021997361e-05,
    1.6051414269200752e-06,
    -9.518494714633033e-06,
    2.552205683983489e-06,
    1.4532401481321865e-06,
    -1.0764638251203817e-06,
    3.2907001247694055e-08,
    2.2725815926617947e-07,
    -8.574503849945431e-08,
    -1.758027222726927e-08,
    2.2042194402082773e-08,
    -3.2970698215084516e-09,
    -2.2305921413217236e-09,
    7.433472873673129e-10,
)
_A = 2.0 / (2.0 + Z_MAX)
_Y_SCALE = 2.0 / (1.0 - _A)
_SPLIT = 134217729.0  # 2^27 + 1: Dekker's split of a double into two 26-bit halves
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@njit(cache=True, inline="always", error_model="numpy")
def _p(y):
    """P(y) by Estrin's scheme: pairs, then pairs of pairs (depth 5 instead of Horner's 25)."""
    c = NCDF_P
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
    p = _p((t - _A) * _Y_SCALE - 1.0)
    # z^2 = x^2 / 2 = (hi^2 + lo (|x| + hi)) / 2 with hi^2 exact; e^{-hi^2 / 2} as the square of
    # e^{-hi^2 / 4} (each factor >= e^{-365}, no clamp), the rest in the second exponential
    h = _SPLIT * ax
    hi = h - (h - ax)
    lo = ax - hi
    g = exp_vec(-0.25 * (hi * hi))
    half_erfc = 0.5 * t * g * g * exp_vec(p - 0.5 * lo * (ax + hi))
    half_erfc = 0.0 if ax * _INV_SQRT2 > Z_MAX else half_erfc
    return half_erfc if x <= 0.0 else 1.0 - half_erfc
