"""What the Bjerksund-Stensland approximation's two kernels share: the 2002 constants and the test of
whether a call is exercised early at all; the scalar kernel (calc/options.py) and the one with the
scenarios as vector lanes (calc/american_rows.py)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

T1 = 0.5 * (math.sqrt(5.0) - 1.0)  # BS2002: t1 / T, the golden-ratio split of the time to expiry
RHO = math.sqrt(T1)  # BS2002: the correlation of the bivariate normals, sqrt(t1 / T)
RHO_C = math.sqrt(1.0 - T1)  # sqrt(1 - rho^2)
SQRT_T1 = RHO  # sqrt(t1) = sqrt(t1 / T) sqrt(T)
# M(a, b, rho) = N(a) N(b) + 1/(2 pi) int_0^asin(rho) exp(-(a^2 + b^2 - 2ab sin u) / (2 cos^2 u)) du
# (Drezner-Wesolowsky), on a 13-point Gauss-Legendre rule (Genz takes 20 points for 0.75 <= |rho| < 0.925):
# at this one rho, over a, b in [-38, 8.3], 13 points agree with a 60-point rule to 1.1e-16 absolute, as do
# 14 and 16 (8e-17), 12 err by 1.2e-15; on prices (25,600 American contracts x 200 scenarios, session
# 20) 13, 14 and 16 points are alike against 60 (on prices >= 0.01 largest 2.2e-12 relative, 99th
# percentile 5.5-6.9e-15), 12 not (2.0e-14). With s_j = sin(asin(rho) (1 + x_j) / 2), the integrand is
# exp(A_j ab - B_j (a^2 + b^2) / 2). The arrays have BVN_LANES entries, the ones past GL_N of weight 0
# (exp(0) x 0), so that the scalar kernel's sum over them fills two 8-lane vectors; the scenario lanes
# (american_rows) take GL_N.
GL_N = 13
BVN_LANES = 16
GL_X, GL_W = np.polynomial.legendre.leggauss(GL_N)
SIN = np.sin(math.asin(RHO) * (1.0 + GL_X) / 2.0)
BVN_A = np.zeros(BVN_LANES)
BVN_B = np.zeros(BVN_LANES)
BVN_W = np.zeros(BVN_LANES)
BVN_A[:GL_N] = SIN / (1.0 - SIN * SIN)
BVN_B[:GL_N] = 1.0 / (1.0 - SIN * SIN)
BVN_W[:GL_N] = GL_W * math.asin(RHO) / (4.0 * math.pi)
EPS = 2.220446049250313e-16


@njit(cache=True, inline="always")
def exercised_early(r: float, q: float, rfd: float, dd: float) -> bool:
    """Whether the approximation prices an early exercise of a call (rfd = e^{-rT}, dd = e^{-qT}): not when
    q <= 0 and q <= r (never optimal), nor for r < q < 0 (a double boundary) or q == 0 > r (beta = 1,
    degenerate), which are outside it: there the European value, or immediate exercise if worth more."""
    return not (dd >= 1.0 and dd >= rfd) and not (dd > 1.0 and rfd > dd) and not (q == 0.0 and r < 0.0)
