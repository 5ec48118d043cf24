"""The demo clearing house of `marginflow demo-history`: what it charges, when, and why it is not calc's
replica. The one place this behaviour is defined and documented; nothing here is shared with the forecast
(calc/forecast.py, replay/forecast_train.py), which must learn it from the calls alone.

Per account and cycle, from the positions and prices at the cycle time (plain numpy, no engine code):

1. base: the account's model (var / hvar / stress, and its policy) over the CCP's own window: `lookback`
   (500) daily returns ending at the cycle, the cycle's prices standing in for today's close (the engine's
   window is 504 returns ending at the previous close), historical VaR as an interpolated quantile (the
   engine's is the k-th worst loss). Class `Ccp` (unchanged from the first demo CCP).
2. recalibration: the base times the CCP's margin-rate multiplier in force on the business date; the rate
   steps by `recalibrations` [(fraction of the generated days, factor), ...] on the dates at those
   fractions of the range (the default: x1.12, x0.90, x1.15 at 30%, 55% and 80%), announced nowhere.
3. APC floor (EMIR RTS 153/2013 art. 28(1)(c)): the margin is not below the parametric VaR over the last
   `apc_floor_days` (2520, ten years) daily returns ending at the cycle, at the same confidence/horizon.
4. concentration add-on: `concentration_rate` x the part of each position's |dollar exposure| above
   `concentration_threshold` (per sym), summed.
5. requirement = ceil((max(rate x base, floor) + add-on) / round_to) x round_to.

Cycles: the [[calc.ccps]] entry named DEMO-CCP (ITD1 11:00, ITD2 14:00, EOD 18:00 New York by default);
an intraday cycle prices at the bridge's last tick at or before its time (the EOD cycle at the close). The
call: requirement - collateral held, 0 if smaller than the minimum transfer; the collateral then moves by
the call. Calls are reported `report_delay_s` (20 min) after the cycle: the `call` rows' stamp.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calc.history import InputError
from calc.inputs import AccountSpec

NS = 1_000_000_000
CCP_NAME = "DEMO-CCP"
DEFAULT_CYCLES = (("ITD1", "11:00"), ("ITD2", "14:00"), ("EOD", "18:00"))
DEFAULT_ZONE = "America/New_York"


@dataclass(frozen=True)
class CcpRules:
    """What makes the demo CCP differ from the replica (see the module docstring)."""

    round_to: float = 1000.0
    lookback: int = 500
    apc_floor_days: int = 2520  # 0 = no floor
    concentration_threshold: float = 2_000_000.0  # dollars per sym
    concentration_rate: float = 0.03  # 0 = no add-on
    recalibrations: tuple[tuple[float, float], ...] = ((0.30, 1.12), (0.55, 0.90), (0.80, 1.15))
    report_delay_s: int = 1200
    minimum_transfer: float = 10_000.0
    zone: str = DEFAULT_ZONE
    cycles: tuple[tuple[str, str], ...] = DEFAULT_CYCLES

    @classmethod
    def from_config(cls, calc: Any, **kw: Any) -> CcpRules:
        """Cycles, time zone and minimum transfer of the [[calc.ccps]] entry named DEMO-CCP (defaults
        without one); `kw` the rest."""
        for c in getattr(calc, "ccps", ()):
            if c.name == CCP_NAME:
                kw.setdefault("cycles", tuple((y.name, y.time) for y in c.cycles))
                kw.setdefault("zone", c.timezone)
                kw.setdefault("minimum_transfer", c.minimum_transfer)
        return cls(**kw)

    def rate_on(self, index: int, days: int) -> float:
        """The margin-rate multiplier in force on day `index` of `days` generated days."""
        m = 1.0
        for frac, factor in self.recalibrations:
            if index >= recalibration_index(frac, days):
                m *= factor
        return m

    def cycle_times(self, date: str) -> list[tuple[str, int]]:
        """(cycle name, UTC ns) of the day's cycles in time order."""
        day, zone = dt.date.fromisoformat(date), zoneinfo.ZoneInfo(self.zone)
        out = []
        for name, hhmm in self.cycles:
            t = dt.datetime.combine(day, dt.time.fromisoformat(hhmm), tzinfo=zone).astimezone(dt.UTC)
            out.append((name, int(t.timestamp()) * NS))
        return out


def recalibration_index(frac: float, days: int) -> int:
    """The day index (0-based) of a recalibration at `frac` of `days` days (never day 0)."""
    return max(1, int(frac * (days - 1)))


@dataclass
class Ccp:
    """The clearing house's base margin, computed independently of calc/ with plain numpy:
    parametric VaR z sqrt(h) sqrt(x'Cx); historical VaR as the interpolated `confidence` quantile of
    scenario losses (ES: mean loss beyond it); stress = worst of -x.shock + z sqrt(h) sqrt(x'S x) with S the
    covariance under stressed volatilities and clipped stressed correlations; policy max_stress = the larger
    of model and stress. The covariance window is the `lookback` returns ending at the business date."""

    syms: list[str]
    specs: Mapping[str, AccountSpec]
    confidence: float
    horizon: int
    lookback: int
    ewma_lambda: float = 0.0
    hvar_on: str = "var"
    shocks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (K, N)
    corr_mult: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vol_mult: np.ndarray = field(default_factory=lambda: np.zeros(0))
    round_to: float = 1000.0

    @classmethod
    def from_config(
        cls, calc: Any, syms: list[str], specs: Mapping[str, AccountSpec], round_to: float, lookback: int
    ) -> Ccp:
        """The CCP's settings: calc's models, confidence, horizon and stress scenarios, its own lookback."""
        rows, cm, vm = [], [], []
        for sc in calc.stress:
            rows.append(
                [sc.shocks.get(s, sc.shocks.get(calc.sectors.get(s, "\0"), sc.default_shock)) for s in syms]
            )
            cm.append(sc.correlation_multiplier)
            vm.append(sc.volatility_multiplier)
        return cls(
            syms,
            specs,
            calc.confidence,
            calc.horizon_days,
            lookback,
            calc.ewma_lambda,
            calc.hvar_margin,
            np.array(rows, dtype=np.float64).reshape(len(rows), len(syms)),
            np.array(cm, dtype=np.float64),
            np.array(vm, dtype=np.float64),
            round_to,
        )

    def covariance(self, r: np.ndarray) -> np.ndarray:
        if self.ewma_lambda == 0.0:
            return np.cov(r, rowvar=False, ddof=1)
        lam = self.ewma_lambda
        w = np.array([(1 - lam) * lam ** (len(r) - 1 - t) for t in range(len(r))])
        w = w / w.sum()
        return np.einsum("t,ti,tj->ij", w, r, r)

    @property
    def scale(self) -> float:
        return statistics.NormalDist().inv_cdf(self.confidence) * math.sqrt(self.horizon)

    def base(self, closes: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """Unrounded margin per account (rows of `exposure`, dollars per sym) from the window of closes
        ending at the business date (lookback + 1 rows)."""
        r = np.log(closes[1:] / closes[:-1])
        cov = self.covariance(r)
        scale = self.scale
        csum = np.concatenate([np.zeros((1, r.shape[1])), np.cumsum(r, axis=0)])
        scen = np.exp(csum[self.horizon :] - csum[: -self.horizon]) - 1.0  # h-day simple returns, overlapping
        sd = np.sqrt(np.diag(cov))
        rho = cov / np.outer(sd, sd)
        out = np.zeros(len(exposure))
        for a, (name, spec) in enumerate(self.specs.items()):
            x = exposure[a]
            par = scale * math.sqrt(max(float(x @ cov @ x), 0.0))
            losses = -(scen @ x)
            hs_var = float(np.quantile(losses, self.confidence))
            hs_es = float(losses[losses >= hs_var].mean())
            worst = 0.0
            for k in range(len(self.shocks)):
                s = self.shocks[k]
                stressed_rho = np.clip(rho * self.corr_mult[k], -1.0, 1.0)
                np.fill_diagonal(stressed_rho, 1.0)
                f = self.vol_mult[k] * sd * (1.0 + s)
                loss = -float(x @ s) + scale * math.sqrt(
                    max(float(x @ (stressed_rho * np.outer(f, f)) @ x), 0.0)
                )
                worst = max(worst, loss)
            model = {"var": par, "hvar": hs_es if self.hvar_on == "es" else hs_var, "stress": worst}.get(
                spec.model
            )
            if model is None:
                raise InputError(
                    f"account {name!r}: the demo CCP knows models var, hvar and stress, not {spec.model!r}"
                )
            m = max(model, worst) if spec.policy == "max_stress" else model
            out[a] = max(m, 0.0)
        return out

    def margins(self, closes: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """The base margin rounded up to the CCP's multiple."""
        return round_up(self.base(closes, exposure), self.round_to)


def round_up(m: np.ndarray, step: float) -> np.ndarray:
    return np.ceil(m / step) * step if step > 0 else m


def floor_var(closes: np.ndarray, exposure: np.ndarray, scale: float) -> np.ndarray:
    """The APC floor per account: parametric VaR scale x sqrt(x'Cx), C over all the returns of `closes`."""
    cov = np.cov(np.log(closes[1:] / closes[:-1]), rowvar=False, ddof=1)
    q = np.einsum("ai,ij,aj->a", exposure, cov, exposure)
    return scale * np.sqrt(np.maximum(q, 0.0))


def concentration(exposure: np.ndarray, threshold: float, rate: float) -> np.ndarray:
    """The add-on per account: rate x sum over syms of (|exposure| - threshold)+."""
    return rate * np.maximum(np.abs(exposure) - threshold, 0.0).sum(axis=1)


@dataclass
class DemoCcp:
    """The demo CCP: `Ccp`'s base with its rules; `requirement` per account at one cycle."""

    ccp: Ccp
    rules: CcpRules

    @property
    def need(self) -> int:
        """Daily closes needed before a business date."""
        return max(self.rules.lookback, self.rules.apc_floor_days)

    def parts(self, closes: np.ndarray, cycle_px: np.ndarray, exposure: np.ndarray, rate: float) -> dict:
        """The requirement's parts: `closes` the daily closes before the business date (at least `need`
        rows), `cycle_px` the prices at the cycle, `exposure` (A, N) dollars at those prices."""
        lb, fl = self.rules.lookback, self.rules.apc_floor_days
        window = np.vstack([closes[-lb:], cycle_px[None, :]])
        base = self.ccp.base(window, exposure)
        floor = (
            floor_var(np.vstack([closes[-fl:], cycle_px[None, :]]), exposure, self.ccp.scale)
            if fl > 0
            else np.zeros(len(exposure))
        )
        addon = concentration(exposure, self.rules.concentration_threshold, self.rules.concentration_rate)
        total = np.maximum(rate * base, floor) + addon
        return {
            "base": base,
            "floor": floor,
            "addon": addon,
            "requirement": round_up(total, self.rules.round_to),
        }

    def requirement(
        self, closes: np.ndarray, cycle_px: np.ndarray, exposure: np.ndarray, rate: float
    ) -> np.ndarray:
        return self.parts(closes, cycle_px, exposure, rate)["requirement"]


def call_of(requirement: float, collateral: float, minimum_transfer: float) -> float:
    """The demo CCP's call: requirement - collateral, 0 below the minimum transfer amount."""
    d = requirement - collateral
    return 0.0 if abs(d) < minimum_transfer else d


def position_at(
    start: Mapping[tuple[str, str], float], fills: Mapping[str, Sequence], upto_ns: int
) -> dict[tuple[str, str], float]:
    """Positions after the day's fills stamped at or before `upto_ns` (fill table columns + time)."""
    pos = dict(start)
    for t, a, s, side, q in zip(
        fills["time"], fills["account"], fills["sym"], fills["side"], fills["qty"], strict=True
    ):
        if t <= upto_ns:
            pos[(a, s)] = pos.get((a, s), 0.0) + (q if side == "B" else -q)
    return pos
