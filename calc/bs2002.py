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
# (Drezner-Wesolowsky), on a 16-point Gauss-Legendre rule (Genz takes 20 points for 0.75 <= |rho| < 0.925;
# at this one rho, 16 points agree with a 60-point rule to 1.1e-16 absolute over a, b in [-38, 8.3], as do
# 20; 14 points to 8e-17 against mpmath, 12 err by 1.2e-15, and 16 fill two 8-lane vectors, so fewer
# would save nothing): with s_j = sin(asin(rho) (1 + x_j) / 2), the integrand is
# exp(A_j ab - B_j (a^2 + b^2) / 2).
GL_N = 16
GL_X, GL_W = np.polynomial.legendre.leggauss(GL_N)
SIN = np.sin(math.asin(RHO) * (1.0 + GL_X) / 2.0)
BVN_A = SIN / (1.0 - SIN * SIN)
BVN_B = 1.0 / (1.0 - SIN * SIN)
BVN_W = GL_W * math.asin(RHO) / (4.0 * math.pi)
EPS = 2.220446049250313e-16


@njit(cache=True, inline="always")
def exercised_early(r: float, q: float, rfd: float, dd: float) -> bool:
    """Whether the approximation prices an early exercise of a call (rfd = e^{-rT}, dd = e^{-qT}): not when
    q <= 0 and q <= r (never optimal), nor for r < q < 0 (a double boundary) or q == 0 > r (beta = 1,
    degenerate), which are outside it: there the European value, or immediate exercise if worth more."""
    return not (dd >= 1.0 and dd >= rfd) and not (dd > 1.0 and rfd > dd) and not (q == 0.0 and r < 0.0)
