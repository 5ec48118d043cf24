"""The volatility surface (calc/volsurface.py): refusals naming the row and the field; interpolation
linear in vol across moneyness and linear in total variance across expiries against numbers worked out
by hand here; flat extrapolation in both directions; expired slices; many contracts and underlyings in
one vectorised call; the demo file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calc.history import InputError
from calc.instruments import load_instruments, time_to_expiry
from calc.volsurface import implied_vol, load_vol_surface
from tests.support import ROOT

AS_OF = "2023-01-01"
# T1 = 73 / 365 = 0.2 (2023-03-15), T2 = 365 / 365 = 1.0 (2024-01-01); moneyness 0.9, 1.0, 1.1
GRID = """underlying,expiry,moneyness,vol
U,2023-03-15,0.9,0.30
U,2023-03-15,1.0,0.20
U,2023-03-15,1.1,0.25
U,2024-01-01,1.1,0.24
U,2024-01-01,0.9,0.28
U,2024-01-01,1.0,0.22
V,2023-06-01,1.0,0.40
"""


@pytest.fixture
def surface(tmp_path):
    path = tmp_path / "surface.csv"
    path.write_text(GRID)
    return load_vol_surface(path)


def test_grid_expiries_are_the_round_numbers_the_hand_values_use():
    assert time_to_expiry("2023-03-15", AS_OF) == pytest.approx(0.2, abs=1e-15)
    assert time_to_expiry("2024-01-01", AS_OF) == 1.0


def test_total_variance_across_expiries_and_vol_across_moneyness_by_hand(surface):
    T = [0.6, 0.6, 0.6, 0.4, 0.6]
    m = [1.0, 0.95, 0.5, 1.05, 1.1]
    got = implied_vol(surface, "U", T, m, as_of=AS_OF)
    # m = 1.0 at T = 0.6: w1 = 0.20^2 * 0.2 = 0.008, w2 = 0.22^2 * 1.0 = 0.0484, halfway: 0.0282
    assert got[0] == pytest.approx(math.sqrt(0.0282 / 0.6), rel=1e-14)
    # m = 0.95: halfway in vol on each slice, 0.25 and 0.25; a flat vol of 0.25 stays 0.25
    assert got[1] == pytest.approx(0.25, rel=1e-14)
    # m = 0.5: flat below the grid, 0.30 and 0.28: w = 0.018 + 0.5 * (0.0784 - 0.018) = 0.0482
    assert got[2] == pytest.approx(math.sqrt(0.0482 / 0.6), rel=1e-14)
    # m = 1.05, T = 0.4: slice vols 0.225 and 0.23; w1 = 0.225^2 * 0.2, w2 = 0.23^2, a quarter of the way
    w1, w2 = 0.225**2 * 0.2, 0.23**2
    assert got[3] == pytest.approx(math.sqrt((w1 + 0.25 * (w2 - w1)) / 0.4), rel=1e-14)
    # m = 1.1 at T = 0.6: w1 = 0.0125, w2 = 0.0576
    assert got[4] == pytest.approx(math.sqrt((0.0125 + 0.5 * (0.0576 - 0.0125)) / 0.6), rel=1e-14)
    # not linear in vol across expiries: that would give 0.21 for m = 1.0
    assert abs(got[0] - 0.21) > 1e-3


def test_flat_beyond_the_grid_in_both_directions(surface):
    T = [0.1, 0.0, 0.2, 1.0, 2.0, 5.0, 0.05, 3.0]
    m = [1.0, 1.0, 0.9, 1.1, 1.0, 2.0, 0.1, 0.5]
    got = implied_vol(surface, "U", T, m, as_of=AS_OF)
    assert got.tolist() == pytest.approx([0.20, 0.20, 0.30, 0.24, 0.22, 0.24, 0.30, 0.28], rel=1e-14)


def test_expired_slices_are_dropped_and_a_single_slice_is_flat_in_time(surface):
    got = implied_vol(surface, "U", [0.1, 0.5, 3.0], [1.0, 0.95, 1.1], as_of="2023-06-01")
    assert got.tolist() == pytest.approx([0.22, 0.25, 0.24], rel=1e-14)
    assert implied_vol(surface, "V", [0.01, 9.0], [0.5, 3.0], as_of=AS_OF).tolist() == [0.40, 0.40]
    with pytest.raises(InputError, match="every expiry of 'V' is on or before 2023-06-01"):
        implied_vol(surface, "V", 0.5, 1.0, as_of="2023-06-01")
    with pytest.raises(InputError, match="no underlying 'W'"):
        implied_vol(surface, ["U", "W"], 0.5, 1.0, as_of=AS_OF)


def test_vectorised_over_many_contracts_on_several_underlyings(surface):
    rng = np.random.default_rng(14)
    n = 10_000
    names = rng.choice(["U", "V"], n)
    T, m = rng.uniform(0.0, 2.0, n), rng.uniform(0.5, 1.5, n)
    got = implied_vol(surface, names, T, m, as_of=AS_OF)
    assert got.shape == (n,) and np.isfinite(got).all()
    assert (got[names == "V"] == 0.40).all()
    picks = np.flatnonzero(names == "U")[:50]
    one_by_one = [implied_vol(surface, "U", T[i], m[i], as_of=AS_OF)[0] for i in picks]
    assert got[picks].tolist() == one_by_one
    assert implied_vol(surface, "U", 0.6, [0.9, 1.0], as_of=AS_OF).shape == (2,)  # a scalar T broadcasts


BAD = [
    ("U ,2023-03-15,1.0,0.2", "underlying", "leading or trailing whitespace"),
    (",2023-03-15,1.0,0.2", "underlying", "empty (a name is required)"),
    ("U,2023-13-01,1.0,0.2", "expiry", "'2023-13-01' is not an ISO date"),
    ("U,,1.0,0.2", "expiry", "empty (an ISO date"),
    ("U,2023-03-15,0,0.2", "moneyness", "0.0 is not > 0"),
    ("U,2023-03-15,-0.5,0.2", "moneyness", "-0.5 is not > 0"),
    ("U,2023-03-15,,0.2", "moneyness", "empty"),
    ("U,2023-03-15,one,0.2", "moneyness", "'one' is not a number"),
    ("U,2023-03-15,inf,0.2", "moneyness", "'inf' is not a finite number"),
    ("U,2023-03-15,1.0,0", "vol", "0.0 is not in (0, 5]"),
    ("U,2023-03-15,1.0,5.01", "vol", "5.01 is not in (0, 5]"),
    ("U,2023-03-15,1.0,", "vol", "empty"),
    ("U,2023-03-15,0.9,0.2", "moneyness", "U 2023-03-15 moneyness 0.9 appears twice (first in row 1)"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_every_refusal_names_the_row_and_field(tmp_path, line, field, reason):
    path = tmp_path / "s.csv"
    path.write_text(f"underlying,expiry,moneyness,vol\nU,2023-03-15,0.9,0.3\n{line}\n")
    with pytest.raises(InputError) as e:
        load_vol_surface(path)
    assert str(e.value).startswith(f"{path}: row 2 (line 3), field {field}: "), str(e.value)
    assert reason in str(e.value)


def test_header_refusals(tmp_path):
    for header, reason in (
        ("underlying,expiry,vol", "header: column moneyness is missing"),
        ("underlying,expiry,moneyness,vol,strike", "header: unknown column 'strike'"),
    ):
        path = tmp_path / "s.csv"
        path.write_text(f"{header}\nU,2023-03-15,1.0,0.2\n")
        with pytest.raises(InputError, match=f"^{path}: {reason}"):
            load_vol_surface(path)


def test_the_demo_surface_prices_every_demo_option_without_a_vol():
    surface = load_vol_surface(ROOT / "data" / "demo" / "volsurface.csv")
    inst = load_instruments(ROOT / "data" / "demo" / "instruments.csv")
    opts = inst.options[np.isnan(inst.vol[inst.options])]
    assert len(opts) > 0
    names = [inst.syms[u] for u in inst.underlying[opts]]
    assert set(names) <= set(surface.underlyings)
    vols = implied_vol(
        surface, names, time_to_expiry(inst.expiry[opts], "2022-12-28"), 1.0, as_of="2022-12-28"
    )
    assert ((vols > 0.1) & (vols < 1.0)).all()
