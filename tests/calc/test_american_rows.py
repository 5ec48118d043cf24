"""calc/american_rows.py: the Bjerksund-Stensland 2002 price with the scenarios as vector lanes equals the
scalar kernel (calc/options.py, itself held to QuantLib and an mpmath port in tests/calc/test_options.py)
over a grid of contracts and scenario moves, extreme and invalid ones included; what it cannot take it
flags for the scalar kernel, and a contract never exercised early it leaves to it."""

from __future__ import annotations

import itertools

import numpy as np

from calc import american_rows, options

MONEYNESS = (0.5, 0.8, 1.0, 1.05, 1.25, 2.0)  # strike / spot
DAYS = (1, 7, 30, 182, 365, 1095)
VOLS = (0.05, 0.2, 0.6, 1.5)
RATES = ((0.03, 0.01), (0.01, 0.05), (0.05, 0.0), (-0.01, 0.0), (-0.005, 0.02), (0.04, 0.04))  # (r, q)
MODELS = (options.MODEL_BSM, options.MODEL_BLACK76)


def _moves(n_s: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spot and vol multipliers: ordinary days, crashes and spikes, and lanes the formula must not take
    (a spot or vol <= 0, NaN, infinite); n_s not a multiple of the block, so the last block is partial."""
    rng = np.random.default_rng(seed)
    sm = np.exp(rng.normal(0.0, 0.08, n_s))
    vm = np.exp(rng.normal(0.0, 0.2, n_s))
    sm[:6] = (0.05, 0.3, 3.0, 20.0, 1.0, 1.0)
    vm[4:8] = (0.02, 8.0, 1.0, 1.0)
    sm[8:12] = (0.0, -0.5, np.nan, np.inf)
    vm[12:15] = (0.0, np.nan, -1.0)
    return sm, vm


def test_the_vector_lanes_equal_the_scalar_kernel_over_a_grid() -> None:
    n_s = american_rows.BLOCK * 2 + 37
    sm, vm = _moves(n_s, 1)
    grid = list(itertools.product(MONEYNESS, DAYS, VOLS, RATES, (True, False), MODELS))
    n = len(grid)
    spot = np.full(n, 100.0)
    strike = np.array([100.0 * g[0] for g in grid])
    t = np.array([g[1] / 365.0 for g in grid])
    vol = np.array([g[2] for g in grid])
    r = np.array([g[3][0] for g in grid])
    q = np.array([g[3][1] for g in grid])
    is_call = np.array([g[4] for g in grid])
    model = np.array([g[5] for g in grid], np.int64)
    american = np.ones(n, bool)
    mult, v0 = np.full(n, 100.0), np.zeros(n)
    rows = options.scenario_rows(
        model, spot, strike, t, r, q, vol, is_call, american, mult, v0, np.zeros(n, np.int64),
        sm[:, None], vm[:, None], options.BS2002,
    )  # fmt: skip
    scalar = options.revalue(
        model, spot, strike, t, r, q, vol, is_call, american,
        np.repeat(sm[:, None], n, axis=1), np.repeat(vm[:, None], n, axis=1), options.BS2002,
    ).T * 100.0  # fmt: skip
    ok = np.isfinite(scalar)  # (an infinite spot: the scalar kernel's own answer, in both)
    np.testing.assert_array_equal(rows[~ok], scalar[~ok])
    assert ok.mean() > 0.9
    err = np.abs(rows[ok] - scalar[ok]) / np.maximum(np.abs(scalar[ok]), 100.0)
    assert err.max() <= 1e-10, err.max()  # (100 = the multiplier: 1e-10 of a unit price at least)
    assert np.median(err) <= 1e-15


def test_it_flags_what_the_scalar_kernel_must_price_and_leaves_european_contracts() -> None:
    n_s = american_rows.BLOCK + 9
    sm, vm = _moves(n_s, 2)
    row, flagged = np.full(n_s, -7.0), np.zeros(n_s, bool)
    # an American put, q < r: early exercise; prices every lane but the invalid ones
    t, r, q = 0.5, 0.05, 0.01
    consts = (np.exp(-r * t), np.exp(-q * t), np.sqrt(t))
    put = (100.0, 0.3, sm, vm, 95.0, t, r, q, False, *consts)
    assert american_rows.american_row(row, flagged, 1.0, 0.0, *put)
    assert flagged[8:15].all() and not flagged[:8].any() and not flagged[15:].any()
    good = ~flagged
    want = [
        options.price_one(0, 100.0 * a, 95.0, t, r, q, 0.3 * b, False, True)
        for a, b in zip(sm, vm, strict=True)
    ]
    np.testing.assert_allclose(row[good], np.array(want)[good], rtol=1e-12, atol=1e-12)
    # an American call without dividends is never exercised early: left to the scalar kernel, untouched
    row[:] = -7.0
    consts = (np.exp(-r * t), 1.0, np.sqrt(t))
    call = (100.0, 0.3, sm, vm, 95.0, t, r, 0.0, True, *consts)
    assert not american_rows.american_row(row, flagged, 1.0, 0.0, *call)
    assert (row == -7.0).all()


def test_blocks_of_lanes_exercised_now_or_never_reaching_the_boundary() -> None:
    """A block whose every lane is settled without the approximation's terms (a deep in-the-money put:
    exercise now; a short out-of-the-money call: its boundary never reached, the European value) skips
    them; the next block has one lane that is not (a large move) and takes them: both equal the scalar
    kernel, and the settled lanes are the intrinsic and the European values."""
    n_s = american_rows.BLOCK * 2
    rng = np.random.default_rng(4)
    sm, vm = np.exp(rng.normal(0.0, 0.01, n_s)), np.exp(rng.normal(0.0, 0.05, n_s))
    cases = (  # (strike, days, r, q, is_call, the move that unsettles a lane)
        (200.0, 182, 0.05, 0.0, False, 2.5),
        (150.0, 7, 0.01, 0.08, True, 1.5),
    )
    for strike, days, r, q, is_call, move in cases:
        sm_c = sm.copy()
        sm_c[american_rows.BLOCK + 17] = move
        t = days / 365.0
        row, flagged = np.full(n_s, np.nan), np.zeros(n_s, bool)
        args = (100.0, 0.2, sm_c, vm, strike, t, r, q, is_call, np.exp(-r * t), np.exp(-q * t), np.sqrt(t))
        assert american_rows.american_row(row, flagged, 1.0, 0.0, *args)
        assert not flagged.any()
        want = np.array(
            [
                options.price_one(0, 100.0 * a, strike, t, r, q, 0.2 * b, is_call, True)
                for a, b in zip(sm_c, vm, strict=True)
            ]
        )
        np.testing.assert_allclose(row, want, rtol=1e-12, atol=1e-12)
        settled = np.arange(n_s) != american_rows.BLOCK + 17
        euro = np.array(
            [
                options.price_one(0, 100.0 * a, strike, t, r, q, 0.2 * b, is_call, False)
                for a, b in zip(sm_c, vm, strict=True)
            ]
        )
        if is_call:  # (values ~1e-45: the scalar European takes libm's erfc, ~1e-11 off in that tail)
            np.testing.assert_allclose(row[settled], euro[settled], rtol=1e-10, atol=0.0)
        else:
            np.testing.assert_array_equal(row[settled], strike - 100.0 * sm_c[settled])
        assert row[~settled][0] > euro[~settled][0]  # the approximation's value: early exercise worth more
