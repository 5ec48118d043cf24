"""Full revaluation of options in historical simulation (issue #14 item 3): the option contracts a book
prices, their value and Greeks now, and per contract the scenario P&L of one unit, mult x (V_s - V_0).

Scenario s moves an option's underlying by its simple h-day return (spot x (1 + r[s])) and its implied
vol by the scenario's vol multiplier (RiskParams.vol_ratio, the EWMA-volatility proxy; 1 with
vol_scenarios "none"); time to expiry stays (theta False) or ages by the holding period (theta True).
The vol of a contract is sticky by strike: set at load from the vol surface at the underlying's price
then (else the instruments file's `vol`), and moved only by an option quote (calc/impliedvol.py).

    book = OptionContracts.build(instruments, surface, sym_index, as_of, option_rate, spot_of)
    value, delta, gamma, vega = book.greeks(spot)               # spot: (C,) the underlyings' prices
    rows, v0 = book.rows(spot, spot_mult, vol_mult, col, theta_years)  # (C, S) per unit, mult included;
                                    # spot_mult, vol_mult (S, N) per underlying column, col (C,) each one's
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from calc.history import InputError
from calc.instruments import Instruments, time_to_expiry
from calc.options import BS1993, BS2002, price_greeks, scenario_rows
from calc.volsurface import VolSurface, implied_vol

AMERICAN = {"bs2002": BS2002, "bs1993": BS1993}  # [calc] american -> calc/options.py's `method`
PARALLEL_FROM = 50_000  # European-price equivalents from which both cores share a revaluation (below: one)
AMERICAN_COST = 60  # an American price (BS2002) costs about this many European ones (bench_options.py:
# ~510 ns against ~9 ns on one thread, 2026-12-04)


@dataclass
class OptionContracts:
    """The options of an instrument master that a book may hold, as arrays in one order (contract c):
    the book's instrument index of the option (`inst`) and of its underlying (`und`), and what prices
    it. `vol` is mutable (option quotes move it); `t` is years to expiry at `as_of`."""

    syms: list[str]
    inst: np.ndarray  # int64
    und: np.ndarray  # int64
    model: np.ndarray  # int64 (calc/options.py MODEL_*)
    strike: np.ndarray
    expiry: np.ndarray  # datetime64[D]
    t: np.ndarray
    rate: np.ndarray
    q: np.ndarray
    vol: np.ndarray
    is_call: np.ndarray  # bool
    american: np.ndarray  # bool
    mult: np.ndarray
    as_of: np.datetime64
    method: int = BS2002  # American exercise: Bjerksund-Stensland 2002 (or BS1993, ~10x faster)

    def __len__(self) -> int:
        return len(self.syms)

    @classmethod
    def build(
        cls,
        instruments: Instruments,
        surface: VolSurface | None,
        sym_index: Mapping[str, int],
        as_of: Any,
        option_rate: float,
        spot_of: Callable[[np.ndarray], np.ndarray],
        only: np.ndarray | None = None,
        american: str = "bs2002",
    ) -> OptionContracts:
        """The options of `instruments` (or those of indices `only`) indexed into a book whose instruments
        are `sym_index` (the options and their underlyings must be in it); `spot_of(und)` gives the
        underlyings' prices now (for the surface's moneyness). Refused: an option with neither a surface
        vol nor a `vol`. `american`: "bs2002" or "bs1993", the approximation American options take."""
        opt = instruments.options if only is None else np.asarray(only, dtype=np.int64)
        syms = [instruments.syms[i] for i in opt]
        under_syms = [instruments.syms[u] for u in instruments.underlying[opt]]
        inst = np.array([sym_index[s] for s in syms], dtype=np.int64)
        und = np.array([sym_index[s] for s in under_syms], dtype=np.int64)
        as_of = np.datetime64(as_of, "D")
        t = np.asarray(time_to_expiry(instruments.expiry[opt], as_of), dtype=np.float64).reshape(-1)
        strike = instruments.strike[opt].astype(np.float64)
        vol = instruments.vol[opt].astype(np.float64)
        if surface is not None and len(opt):
            on = np.array([u in surface.underlyings for u in under_syms], dtype=bool) & (t > 0)
            if on.any():
                spot = spot_of(und[on])
                vol[on] = implied_vol(
                    surface, np.array(under_syms, dtype=object)[on], t[on], strike[on] / spot, as_of
                )
        missing = ~(vol > 0)
        if missing.any():
            s = syms[int(np.flatnonzero(missing)[0])]
            raise InputError(
                f"instruments: option {s!r} has no vol (no `vol` column value and not on the vol surface)"
            )
        rate = np.where(np.isnan(instruments.rate[opt]), option_rate, instruments.rate[opt])
        return cls(
            syms=syms,
            inst=inst,
            und=und,
            model=instruments.model[opt].astype(np.int64),
            strike=strike,
            expiry=instruments.expiry[opt],
            t=t,
            rate=rate.astype(np.float64),
            q=np.nan_to_num(instruments.dividend_yield[opt].astype(np.float64)),
            vol=vol,
            is_call=instruments.is_call[opt].astype(np.bool_),
            american=instruments.american[opt].astype(np.bool_),
            mult=instruments.multiplier[opt].astype(np.float64),
            as_of=as_of,
            method=AMERICAN[american],
        )

    def greeks(self, spot: np.ndarray, c: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, ...]:
        """(value, delta, gamma, vega) per unit of contracts `c` (before the multiplier) at `spot`."""
        return price_greeks(
            self.model[c],
            np.ascontiguousarray(spot, dtype=np.float64),
            self.strike[c],
            self.t[c],
            self.rate[c],
            self.q[c],
            self.vol[c],
            self.is_call[c],
            self.american[c],
            self.method,
        )

    def rows(
        self,
        spot: np.ndarray,
        spot_mult: np.ndarray,
        vol_mult: np.ndarray,
        col: np.ndarray,
        theta_years: float = 0.0,
        c: np.ndarray | slice = slice(None),
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, value): rows (len(c), S) = mult x (V_s - V_0) of one unit of contracts `c`, V_s repriced at
        spot x spot_mult[s, col] and vol x vol_mult[s, col] (col: each contract's column of the (S, N)
        multipliers, e.g. its underlying's) with time to expiry less `theta_years`; value: V_0 per unit at
        `spot` (not aged). One kernel call, no copy of the multipliers (calc/options.py scenario_rows)."""
        model, strike, rate, q = self.model[c], self.strike[c], self.rate[c], self.q[c]
        vol, is_call, american, t = self.vol[c], self.is_call[c], self.american[c], self.t[c]
        spot = np.ascontiguousarray(spot, dtype=np.float64)
        v0 = price_greeks(model, spot, strike, t, rate, q, vol, is_call, american, self.method)[0]
        t_s = np.maximum(t - theta_years, 0.0) if theta_years else t
        work = spot_mult.shape[0] * (
            len(american) + AMERICAN_COST * int(american.sum())
        )  # in European prices
        col = np.ascontiguousarray(col, dtype=np.int64)
        args = (model, spot, strike, t_s, rate, q, vol, is_call, american, self.mult[c], v0, col)
        threads = numba.get_num_threads()
        if work < PARALLEL_FROM:  # a small book: one thread (waking the pool costs more than the work)
            numba.set_num_threads(1)  # (numba's thread count is per calling thread)
        try:
            return scenario_rows(*args, spot_mult, vol_mult, self.method), v0
        finally:
            numba.set_num_threads(threads)


def resolve_as_of(setting: str, last_close: Any) -> np.datetime64:
    """The options' valuation date from [calc] as_of: "" = `last_close` (the price history's last
    date), "today" = the UTC date, else an ISO date (InputError naming calc.as_of otherwise)."""
    if setting == "":
        return np.datetime64(last_close, "D")
    if setting == "today":
        return np.datetime64("today", "D")
    try:
        return np.datetime64(setting, "D")
    except ValueError:
        raise InputError(f'calc.as_of: {setting!r} is not "", "today" or an ISO date') from None
