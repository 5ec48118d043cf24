"""The implied volatility surface (issue #14 item 2): a risk parameter file, loaded with
`marginflow params load FILE --kind vol_surface` and journaled as a `param` event, giving per underlying
a grid of implied vols by expiry date and moneyness.

    underlying,expiry,moneyness,vol        # moneyness = strike / spot of the underlying (1.0 = at the money)
    AAPL,2023-03-17,0.9,0.36

    surface = load_vol_surface("data/demo/volsurface.csv")   # InputError naming row and field
    implied_vol(surface, "AAPL", T, strike / spot, as_of="2022-12-28")   # numpy arrays in, an array out

Interpolation: within one expiry, LINEARLY IN VOL across moneyness; across expiries LINEARLY IN TOTAL
VARIANCE w = vol^2 * T (T = time_to_expiry of the grid's expiry from `as_of`, calendar days / 365), the
vol then being sqrt(w / T); flat beyond the grid in both directions (the vol of the nearest moneyness,
the vol of the first / last live expiry). Expiries on or before `as_of` are dropped. Each underlying may
have its own moneyness points per expiry. calc stores and journals this file but does not use it in
margins yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError
from calc.instruments import MAX_VOL, read_rows, time_to_expiry

COLUMNS = ("underlying", "expiry", "moneyness", "vol")


@dataclass(frozen=True)
class Slice:
    """One expiry of one underlying: moneyness ascending, the vol at each."""

    expiry: np.datetime64
    moneyness: np.ndarray  # float64, ascending, > 0
    vol: np.ndarray  # float64 in (0, MAX_VOL]


@dataclass(frozen=True)
class VolSurface:
    """Per underlying, its slices in ascending expiry order."""

    source: str
    slices: dict[str, list[Slice]]

    @property
    def underlyings(self) -> list[str]:
        return list(self.slices)


def load_vol_surface(path: str | Path) -> VolSurface:
    """Read and validate a vol surface CSV: names by the tickerplant's rule, an ISO expiry date, moneyness
    (strike / spot) a finite number > 0, vol in (0, 5], each (underlying, expiry, moneyness) once."""
    grid: dict[str, dict[np.datetime64, dict[float, float]]] = {}
    first: dict[tuple[str, np.datetime64, float], int] = {}
    for row in read_rows(path, COLUMNS):
        u, e = row.name("underlying"), row.date("expiry")
        m, v = row.number("moneyness"), row.number("vol")
        if not m > 0:
            raise row.error("moneyness", "empty" if math.isnan(m) else f"{m!r} is not > 0 (strike / spot)")
        if not 0 < v <= MAX_VOL:
            raise row.error("vol", "empty" if math.isnan(v) else f"{v!r} is not in (0, {MAX_VOL:g}]")
        if (u, e, m) in first:
            raise row.error(
                "moneyness", f"{u} {e} moneyness {m!r} appears twice (first in row {first[u, e, m]})"
            )
        first[u, e, m] = row.row
        grid.setdefault(u, {}).setdefault(e, {})[m] = v
    slices = {
        u: [
            Slice(e, np.array(sorted(by_m)), np.array([by_m[m] for m in sorted(by_m)]))
            for e, by_m in sorted(by_e.items())
        ]
        for u, by_e in grid.items()
    }
    return VolSurface(str(path), slices)


def implied_vol(
    surface: VolSurface, underlying: Any, expiry_T: Any, moneyness: Any, as_of: Any
) -> np.ndarray:
    """The implied vol of contracts with time to expiry `expiry_T` (years) and `moneyness` (strike / spot)
    on `underlying` (one name, or one per contract), the grid's expiries measured from `as_of`: linear in
    vol across moneyness, linear in total variance across expiries, flat beyond the grid (see the module
    docstring). Vectorised: a Python loop per underlying and per expiry slice, none per contract.
    InputError for an underlying the surface lacks or whose expiries are all on or before `as_of`."""
    T = np.atleast_1d(np.asarray(expiry_T, dtype=np.float64))
    m = np.atleast_1d(np.asarray(moneyness, dtype=np.float64))
    names = np.atleast_1d(np.asarray(underlying, dtype=object))
    T, m, names = np.broadcast_arrays(T, m, names)
    out = np.full(T.shape, np.nan)
    for u in dict.fromkeys(names.tolist()):
        sel = names == u
        out[sel] = _one_underlying(surface, u, T[sel], m[sel], as_of)
    return out


def _one_underlying(surface: VolSurface, u: str, T: np.ndarray, m: np.ndarray, as_of: Any) -> np.ndarray:
    if u not in surface.slices:
        raise InputError(f"vol surface {surface.source}: no underlying {u!r}")
    slices = surface.slices[u]
    grid_T = np.array([time_to_expiry(s.expiry, as_of) for s in slices])
    live = [s for s, t in zip(slices, grid_T, strict=True) if t > 0]
    grid_T = grid_T[grid_T > 0]
    if not live:
        raise InputError(f"vol surface {surface.source}: every expiry of {u!r} is on or before {as_of}")
    vols = np.stack([np.interp(m, s.moneyness, s.vol) for s in live])  # (slices, contracts), flat ends
    if len(live) == 1:
        return vols[0]
    w = vols**2 * grid_T[:, None]
    hi = np.clip(np.searchsorted(grid_T, T), 1, len(live) - 1)
    lo = hi - 1
    k = np.arange(len(T))
    t_lo, t_hi = grid_T[lo], grid_T[hi]
    frac = (T - t_lo) / (t_hi - t_lo)
    w_T = w[lo, k] + (w[hi, k] - w[lo, k]) * frac
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.sqrt(w_T / T)
    return np.where(T <= grid_T[0], vols[0], np.where(T >= grid_T[-1], vols[-1], inside))
