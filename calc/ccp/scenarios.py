"""The scenario sets of a CCP model from a price history (plain numpy, built once per parameter set, not
on the event path). Each set: per scenario s and instrument i the simple h-day return (S, N), the
implied-vol multiplier of options on i (the EWMA-volatility proxy history.ewma_vol_ratio; None with
vol_scenarios "none") and the scenario's end date. Overlapping h-day windows, as calc/models.py.

- "filtered": the last `lookback_days` daily returns up to `as_of`, volatility-filtered
  (history.filter_returns) when ewma_lambda > 0;
- "stressed": the closes from stress_from to stress_to (the returns between them), unfiltered;
- "floor" (apc "floor" only): the last `apc_floor_days` daily returns up to `as_of`, unfiltered.

    sets = build_sets(history.select(syms), spec, "2022-12-28", vol_scenarios="proxy")
    sets["filtered"].returns, sets["filtered"].vol_mult, sets["filtered"].end_dates
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from calc.ccp.presets import CcpSpec
from calc.history import InputError, PriceHistory, scenario_returns, vol_multipliers


@dataclass(frozen=True)
class ScenarioSet:
    name: str
    syms: list[str]
    returns: np.ndarray  # (S, N) simple returns over the holding period
    vol_mult: np.ndarray | None  # (S, N) implied-vol multipliers, None = vols do not move
    end_dates: np.ndarray  # (S,) datetime64[D]: the last day of each scenario's window

    def __len__(self) -> int:
        return len(self.returns)


def scenario_set(
    name: str,
    w: PriceHistory,
    horizon_days: int,
    filter_lambda: float,
    vol_lambda: float | None,
    implied_vols: PriceHistory | None = None,
) -> ScenarioSet:
    """One set from the closes `w`: h-day simple returns of its daily log returns (filtered when
    filter_lambda > 0); vol multipliers from the unfiltered returns with decay vol_lambda (None: none)."""
    what = f"{name} scenario set"
    w.validate(what)
    n_daily = len(w.dates) - 1
    if horizon_days > n_daily:
        raise InputError(
            f"{what}: holding_days {horizon_days} needs at least that many daily returns, got {n_daily}"
        )
    returns = scenario_returns(w.closes, horizon_days, filter_lambda > 0, filter_lambda)
    vol_mult = None if vol_lambda is None else vol_multipliers(w, horizon_days, vol_lambda, implied_vols)
    return ScenarioSet(name, list(w.syms), returns, vol_mult, w.dates[horizon_days:])


def _dates_between(h: PriceHistory, lo: Any, hi: Any) -> PriceHistory:
    on = (h.dates >= lo) & (h.dates <= hi)
    return PriceHistory(h.dates[on], h.syms, h.closes[on])


def build_sets(
    history: PriceHistory,
    spec: CcpSpec,
    as_of: Any,
    vol_scenarios: str = "proxy",
    vol_lambda: float = 0.94,
    where: str = "",
    implied_vols: PriceHistory | None = None,
) -> dict[str, ScenarioSet]:
    """The sets `spec` uses (see the module docstring) from `history` up to `as_of`. The vol proxy's
    EWMA decay is the spec's ewma_lambda when > 0, else `vol_lambda`; an implied-vol history
    (`implied_vols`) replaces the proxy where it has the underlying (history.vol_multipliers). Errors
    name `where` (default the model's name) and the field: a stressed period outside the history, too
    short a history."""
    where = where or f"ccp model {spec.name!r}"
    as_of = np.datetime64(as_of, "D")
    first, last = history.dates[0], history.dates[-1]
    if as_of < first:
        raise InputError(f"as_of: {as_of} is before the price history's first date {first}")
    cut = _dates_between(history, first, as_of)
    h = spec.holding_days
    lam_v = None if vol_scenarios == "none" else (spec.ewma_lambda or vol_lambda)
    sets = {
        "filtered": scenario_set(
            "filtered", cut.window(spec.lookback_days), h, spec.ewma_lambda, lam_v, implied_vols
        )
    }
    if spec.stress_from:
        lo, hi = np.datetime64(spec.stress_from, "D"), np.datetime64(spec.stress_to, "D")
        if lo < first or hi > cut.dates[-1]:
            raise InputError(
                f"{where}: stress_from .. stress_to {lo} .. {hi} is not within the price history "
                f"{first} .. {min(last, as_of)}"
            )
        sets["stressed"] = scenario_set("stressed", _dates_between(cut, lo, hi), h, 0.0, lam_v, implied_vols)
    if spec.apc == "floor":
        n = len(cut.dates) - 1
        if n < spec.apc_floor_days:
            raise InputError(
                f"{where}: apc_floor_days {spec.apc_floor_days} needs that many daily returns up to {as_of}, "
                f"the price history has {n}"
            )
        sets["floor"] = scenario_set("floor", cut.window(spec.apc_floor_days), h, 0.0, lam_v, implied_vols)
    return sets
