"""calc/vecmath.py against mpmath: the normal CDF's coefficients derived again (Chebyshev interpolation at
50 digits), N(x) within a few ulp of mpmath's over [-38.4, 9] in a vectorised loop and called alone, its
edge cases, the loop vectorised; the branch-free exponential within 1 ulp over [-700, 0].
`python tests/calc/test_vecmath.py` prints the coefficients (for calc/vecmath.py's NCDF_Q)."""

from __future__ import annotations

import math
import re

import mpmath as mp
import numpy as np
import pytest
from numba import njit

from calc import vecmath


def derive_ncdf_coefficients(n: int = len(vecmath.NCDF_Q), z_max: float = vecmath.Z_MAX) -> list[float]:
    """Q's coefficients in powers of y: f(y) = erfc(z) e^{z^2} / t, t = 2 / (2 + z) =
    A + (y + 1)(1 - A) / 2, interpolated at the n Chebyshev nodes of [-1, 1] (coefficients
    c_j = 2/n sum_k f(y_k) T_j(y_k), c_0 halved), then sum_j c_j T_j(y) expanded in powers of y, all at
    50 digits, rounded once."""
    mp.mp.dps = 50
    a = mp.mpf(2) / (2 + mp.mpf(z_max))

    def f(y: mp.mpf) -> mp.mpf:
        t = a + (y + 1) / 2 * (1 - a)
        z = 2 / t - 2
        return mp.erfc(z) * mp.exp(z * z) / t

    theta = [mp.pi * (k + mp.mpf(1) / 2) / n for k in range(n)]
    fs = [f(mp.cos(th)) for th in theta]
    cheb = [2 * mp.fsum(fk * mp.cos(j * th) for fk, th in zip(fs, theta, strict=True)) / n for j in range(n)]
    cheb[0] /= 2
    powers = [mp.mpf(0)] * n
    t_prev, t_j = [mp.mpf(0)] * n, [mp.mpf(1)] + [mp.mpf(0)] * (n - 1)  # T_{-1} (unused), T_0 in powers of y
    for j in range(n):
        powers = [p + cheb[j] * c for p, c in zip(powers, t_j, strict=True)]
        # T_{j+1} = 2 y T_j - T_{j-1} (T_1 = y)
        nxt = [mp.mpf(0)] + [2 * c for c in t_j[:-1]] if j else [mp.mpf(0), mp.mpf(1)] + [mp.mpf(0)] * (n - 2)
        t_prev, t_j = t_j, [c - p for c, p in zip(nxt, t_prev, strict=True)] if j else nxt
    return [float(p) for p in powers]


def test_the_normal_cdf_coefficients_are_the_derivation_s() -> None:
    assert derive_ncdf_coefficients() == list(vecmath.NCDF_Q)


@njit(cache=True, error_model="numpy")
def _ncdf_loop(x: np.ndarray) -> np.ndarray:
    """vecmath.ncdf over an array, in a loop that LLVM vectorises (as calc/options.py's scenario loops)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = vecmath.ncdf(x[i])
    return out


@njit(cache=True)
def _ncdf_one(x: float) -> float:
    return vecmath.ncdf(x)


def _mp_ncdf(x: float) -> float:
    return float(mp.ncdf(mp.mpf(x)))


def test_the_normal_cdf_is_within_a_few_ulp_of_mpmath() -> None:
    """Relative error against mpmath at 30 digits: <= 8 ulp of N(x) at x <= 0 (measured: mean 1.25, max 6
    over each of [-1, 0], [-20, -5], [-38, -20]; libm's 0.5 erfc(-x / sqrt 2) has max 2 ulp on [-1, 0] but
    401 on [-20, -5] and 1,483 beyond, from rounding x / sqrt 2), <= 2 ulp of 1 above; the same numbers
    called alone."""
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [
            [0.0, -0.0, 1e-300, -1e-300, 1e-8, -1e-8, 0.5, -0.5, 8.3, 9.0, -37.0, -38.0],
            -np.logspace(-12, math.log10(37.5), 2500),
            np.logspace(-12, math.log10(9.0), 1500),
            rng.uniform(-38.0, 9.0, 3000),
            rng.normal(0.0, 2.0, 3000),
        ]
    )
    mp.mp.dps = 30
    want = np.array([_mp_ncdf(v) for v in x])
    got = _ncdf_loop(x)
    lower = x <= 0
    rel_ulps = np.abs(got - want) / np.spacing(want)
    worst = rel_ulps[lower & (want > 1e-300)].max()
    assert worst <= 8.0, (x[lower][rel_ulps[lower].argmax()], worst)
    assert np.abs(got - want)[~lower].max() <= 2 * np.spacing(1.0)
    alone = np.array([_ncdf_one(float(v)) for v in x[::11]])
    np.testing.assert_array_equal(alone, got[::11])
    print("ncdf max ulps (x <= 0)", worst)


def test_the_normal_cdf_s_edges() -> None:
    """0 and 1 past the fitted range, the infinities, NaN through, N(0) = 1/2, N(-x) + N(x) = 1."""
    assert _ncdf_one(0.0) == 0.5
    assert _ncdf_one(-39.0) == 0.0 and _ncdf_one(-1e300) == 0.0 and _ncdf_one(-math.inf) == 0.0
    assert _ncdf_one(39.0) == 1.0 and _ncdf_one(1e300) == 1.0 and _ncdf_one(math.inf) == 1.0
    assert math.isnan(_ncdf_one(math.nan))
    assert 0.0 < _ncdf_one(-38.0) < 1e-300
    x = np.linspace(-8.0, 8.0, 1601)
    np.testing.assert_allclose(_ncdf_loop(x) + _ncdf_loop(-x), 1.0, rtol=0, atol=4e-16)


def test_the_normal_cdf_loop_is_vector_code() -> None:
    """The loop is compiled to packed double arithmetic (what makes it ~4x libm erfc's speed): a call or a
    branch added to ncdf would make it scalar (…sd instructions only)."""
    fresh = njit(error_model="numpy")(_ncdf_loop.py_func)  # (compiled here: a cached one has no assembly)
    fresh(np.zeros(8))
    asm = next(iter(fresh.inspect_asm().values()))
    assert re.search(r"\bv?(fmadd\w*|mul|add)pd\b", asm), "ncdf's loop is not vectorised"


@njit(cache=True, error_model="numpy")
def _exp_vec_loop(x: np.ndarray) -> np.ndarray:
    """vecmath.exp_vec over an array, in a loop that LLVM vectorises as it does the kernels' sums."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = vecmath.exp_vec(x[i])
    return out


def test_the_branch_free_exponential_is_within_an_ulp_of_mpmath() -> None:
    """exp_vec against mpmath at 30 digits over all of [-700, 709]: tiny arguments, each half-way point
    k ln2 / 2 of its argument reduction, uniform and log-spaced ones; within 1 ulp in a vectorised loop and
    called alone; below -700 it is exp(-700), above 709 exp(709)."""
    rng = np.random.default_rng(5)
    half_ways = -np.arange(0.5, 1010.0, 1.0) * math.log(2.0)
    x = np.concatenate(
        [
            [0.0, -0.0, -1e-300, -5e-324, -1e-17, -700.0],
            np.nextafter(half_ways[half_ways > -700.0], 0.0),
            half_ways[half_ways > -700.0],
            -np.logspace(-20, math.log10(700.0), 3000),
            rng.uniform(-700.0, 0.0, 3000),
            rng.uniform(-1.0, 0.0, 1000),
            -np.nextafter(half_ways[half_ways > -709.0], 0.0),  # positive arguments, up to 709
            rng.uniform(0.0, 709.0, 3000),
            [709.0, 1e-300, 5e-324],
        ]
    )
    x = x[(x >= -700.0) & (x <= 709.0)]
    mp.mp.dps = 30
    want = np.array([float(mp.exp(mp.mpf(float(v)))) for v in x])
    got = _exp_vec_loop(x)
    ulps = np.abs(got - want) / np.spacing(want)
    assert ulps.max() <= 1.0, (x[ulps.argmax()], ulps.max())
    alone = np.array([vecmath.exp_vec(float(v)) for v in x[::7]])
    np.testing.assert_array_equal(alone, got[::7])
    assert vecmath.exp_vec(-750.0) == vecmath.exp_vec(-700.0) == pytest.approx(math.exp(-700.0), rel=1e-15)
    assert vecmath.exp_vec(800.0) == vecmath.exp_vec(709.0) == pytest.approx(math.exp(709.0), rel=1e-15)


if __name__ == "__main__":
    print("NCDF_Q = (\n" + "".join(f"    {c!r},\n" for c in derive_ncdf_coefficients()) + ")")
