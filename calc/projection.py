"""The forecast of the call, live: per account, the requirement and call its CCP would make at the next
cycle, at end of day and at the next day's end of day, each with P50 and P95, and the parallel run that
matches each actual call with what was forecast for it at fixed lead times. Plain state, no I/O.

    proj = Projector(calc_config, account_specs, history)      # history: market volatilities (features)
    proj.advance(now_ns)                  # the event clock: cycles passed record each account's replica
    proj.on_margin(margin_rows, now_ns)   # calc's published margin rows
    proj.forecast_rows(now_ns, seq)       # `forecast` table columns of the accounts whose forecast moved
    proj.on_calls(call_rows)              # `call` rows -> (`callcheck` columns, issues)

The replica is calc's margin (positions and prices now) under the CCP's rounding; the forecast is the
replica times (1 + residual quantiles), the residual model being a trained one (calc/forecast.py, used only
when it beat the replica on held-out days) or else the replica's own recent errors at that CCP (pooled
over accounts; none yet: the band is the replica itself). The clock is the events' (tickerplant stamps),
so a replay forecasts exactly what the live run did.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from calc.cycles import CycleAt, Schedule
from calc.history import PriceHistory
from calc.inputs import AccountSpec
from marginflow.config import CalcConfig
from schemas.tables import HORIZONS, TABLES

NS = 1_000_000_000
HOUR_NS = 3600 * NS
REFRESH_NS = 60 * NS  # every account's forecast is re-evaluated at least this often (event time)
MOVE = 1e-3  # a forecast row is published again when P50 or P95 moved more than this (relative)
BAND_CALLS = 250  # the replica's error band: the last this many relative errors per CCP
VOL_DECAYS = (0.94, 0.97, 0.99)
FORECAST_COLUMNS = [c.name for c in TABLES["forecast"].input_columns]
CALLCHECK_COLUMNS = [c.name for c in TABLES["callcheck"].input_columns]


@dataclass
class FeatureInputs:
    """What the residual model sees, one entry per (account, horizon): equal-length float arrays (nan =
    not known). calc/forecast.py turns them into its feature matrix; training replays build them with
    this same Projector, so live and training features are one definition."""

    replica: np.ndarray  # the replica's requirement (the CCP's rounding)
    var: np.ndarray  # the margin row's VaR, ES and stress
    es: np.ndarray
    stress: np.ndarray
    margin_last_cycle: np.ndarray  # the account's replica at its CCP's previous cycle
    margin_1h: np.ndarray  # its margin one hour before now
    to_cycle_s: np.ndarray  # seconds to the horizon's cycle
    horizon: np.ndarray  # 0 next, 1 eod, 2 t+1
    last_break: np.ndarray  # the account's last actual / replica-at-cycle - 1
    mean_break5: np.ndarray  # mean of its last 5
    weekday: np.ndarray  # of the cycle's business date, 0 = Monday
    month_end: np.ndarray  # 1.0 in the last 3 business days of the month
    vol94: np.ndarray  # EWMA daily vol of the price history's equal-weight index, previous close
    vol97: np.ndarray
    vol99: np.ndarray

    @classmethod
    def empty(cls, n: int = 0) -> FeatureInputs:
        return cls(*(np.full(n, np.nan) for _ in fields(cls)))

    def __len__(self) -> int:
        return len(self.replica)


class ResidualModel(Protocol):
    """A trained forecast of the replica's relative residual (actual / replica - 1): calc/forecast.py."""

    id: str

    def quantiles(self, x: FeatureInputs) -> tuple[np.ndarray, np.ndarray]: ...


def market_vols(history: PriceHistory | None) -> tuple[np.ndarray, np.ndarray]:
    """(dates, vols (T, 3)): EWMA daily volatility of the equal-weight index of the history's syms after
    each date's close, at VOL_DECAYS (seeded with the first 20 returns' variance)."""
    if history is None or len(history.dates) < 3:
        return np.zeros(0, dtype="datetime64[D]"), np.zeros((0, len(VOL_DECAYS)))
    c = history.closes
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.nanmean(np.where((c[1:] > 0) & (c[:-1] > 0), c[1:] / c[:-1] - 1.0, np.nan), axis=1)
    r = np.nan_to_num(r)
    out = np.empty((len(r), len(VOL_DECAYS)))
    for j, lam in enumerate(VOL_DECAYS):
        v = float(np.var(r[:20])) if len(r) >= 2 else 0.0
        for t, x in enumerate(r.tolist()):  # once per history load, not on the hot path
            v = lam * v + (1.0 - lam) * x * x
            out[t, j] = v
    return history.dates[1:], np.sqrt(out)


@dataclass
class _Account:
    ccp: str
    margin: float = math.nan
    var: float = math.nan
    es: float = math.nan
    stress: float = math.nan
    collateral: float = math.nan
    last_cycle: float = math.nan  # replica at the CCP's previous cycle
    path: deque[tuple[int, float]] | None = None  # (time, margin), the last hour and the value before it
    breaks: deque[float] | None = None
    published: dict[str, tuple[str, str, float, float]] | None = (
        None  # horizon -> (cycle key, method, p50, p95)
    )
    evaluated_at: int = -1
    dirty: bool = True


class Projector:
    """Per-account forecast state; see the module docstring."""

    def __init__(
        self,
        calc: CalcConfig,
        specs: Mapping[str, AccountSpec],
        history: PriceHistory | None = None,
        model: ResidualModel | None = None,
    ) -> None:
        self.schedules = {c.name: Schedule.of(c) for c in calc.ccps}
        self.leads_ns = sorted({int(s) * NS for s in calc.forecast_leads_s})
        self.model = model
        self.accounts: dict[str, _Account] = {}
        self.band: dict[str, deque[float]] = {name: deque(maxlen=BAND_CALLS) for name in self.schedules}
        self.replica_at: dict[tuple[str, str, str], float] = {}  # (business_date, cycle, account)
        self.standing: dict[tuple[str, str, str, int], tuple[float, float, str]] = {}  # + lead -> forecast
        self.last_cycle: dict[str, int] = {}  # ccp -> time of the last cycle recorded
        self.vol_dates, self.vols = market_vols(history)
        self.issues = 0
        self.set_accounts(specs)

    # ---- inputs -------------------------------------------------------------------------------------
    def set_accounts(self, specs: Mapping[str, AccountSpec]) -> None:
        """The accounts and the CCP each clears at (its `ccp`, else the first configured); unknown CCP
        names are refused naming the account."""
        if not self.schedules:
            return
        first = next(iter(self.schedules))
        for name, spec in specs.items():
            ccp = getattr(spec, "ccp", "") or first
            if ccp not in self.schedules:
                raise ValueError(
                    f"account {name!r}: ccp {ccp!r} is not in [[calc.ccps]] ({', '.join(self.schedules)})"
                )
            acc = self.accounts.get(name)
            if acc is None or acc.ccp != ccp:
                self.accounts[name] = _Account(ccp, path=deque(), breaks=deque(maxlen=5), published={})

    def set_model(self, model: ResidualModel | None) -> None:
        self.model = model
        for a in self.accounts.values():
            a.dirty = True

    @property
    def method(self) -> str:
        return f"model:{self.model.id}" if self.model is not None else "replica"

    def advance(self, now_ns: int) -> None:
        """Move the event clock: each CCP cycle passed since the last call records every account's replica
        standing at it (the requirement that cycle would have made, for the breaks of its actual call)."""
        for name, sched in self.schedules.items():
            done = self.last_cycle.get(name)
            prev = sched.previous(now_ns)
            if prev is None or (done is not None and prev.time_ns <= done):
                continue
            if done is None:
                self.last_cycle[name] = prev.time_ns  # the clock's first reading: nothing was standing yet
                continue
            self.last_cycle[name] = prev.time_ns
            for acc_name, a in self.accounts.items():
                if a.ccp == name and a.margin == a.margin:
                    r = sched.requirement(a.margin)
                    self.replica_at[(prev.business_date, prev.name, acc_name)] = r
                    a.last_cycle = r
                    a.dirty = True
            self._prune(now_ns)

    def on_margin(self, rows: Mapping[str, Sequence[Any]], now_ns: int) -> None:
        """calc's published margin rows (margin table columns)."""
        for i, name in enumerate(rows.get("account", ())):
            a = self.accounts.get(name)
            if a is None:
                continue
            a.margin, a.var, a.es = float(rows["margin"][i]), float(rows["var"][i]), float(rows["es"][i])
            a.stress, a.collateral = float(rows["stress"][i]), float(rows["collateral"][i])
            assert a.path is not None
            a.path.append((now_ns, a.margin))
            while len(a.path) >= 2 and a.path[1][0] <= now_ns - HOUR_NS:
                a.path.popleft()
            a.dirty = True

    def restore(self, rows: Mapping[str, Sequence[Any]], times: Sequence[int]) -> None:
        """Journaled `forecast` rows (calc's own, replayed after a restart), in seq order: the forecasts
        that stood at each lead time before the restart, and the replica of each account at each cycle
        (for the breaks of the calls that follow), so the parallel run goes on across a restart."""
        for i, name in enumerate(rows.get("account", ())):
            a = self.accounts.get(name)
            if a is None:
                continue
            t = int(times[i])
            self.advance(t)
            if rows["horizon"][i] == "next":
                a.margin = float(rows["replica"][i])  # (already rounded; live rows replace it)
            ct = int(rows["cycle_time"][i])
            for lead in self.leads_ns:
                if t <= ct - lead:
                    key = (rows["business_date"][i], rows["cycle"][i], name, lead)
                    self.standing[key] = (float(rows["p50"][i]), float(rows["p95"][i]), rows["method"][i])

    # ---- the forecast -------------------------------------------------------------------------------
    def _targets(self, names: Sequence[str], now_ns: int) -> list[tuple[str, str, CycleAt]]:
        out = []
        for name in names:
            for h, c in self.schedules[self.accounts[name].ccp].horizons(now_ns).items():
                out.append((name, h, c))
        return out

    def inputs(self, now_ns: int, names: Sequence[str] | None = None) -> tuple[list[tuple], FeatureInputs]:
        """The (account, horizon, cycle) entries of `names` (default: every account with a margin) and
        their FeatureInputs."""
        names = [n for n in (names if names is not None else self.accounts) if self.accounts[n].margin >= 0]
        keys = self._targets(names, now_ns)
        x = FeatureInputs.empty(len(keys))
        for k, (name, h, c) in enumerate(keys):
            a = self.accounts[name]
            sched = self.schedules[a.ccp]
            x.replica[k] = sched.requirement(a.margin)
            x.var[k], x.es[k], x.stress[k] = a.var, a.es, a.stress
            x.margin_last_cycle[k] = a.last_cycle
            x.margin_1h[k] = _value_at(a.path, now_ns - HOUR_NS)
            x.to_cycle_s[k] = (c.time_ns - now_ns) / NS
            x.horizon[k] = HORIZONS.index(h)
            assert a.breaks is not None
            if a.breaks:
                x.last_break[k] = a.breaks[-1]
                x.mean_break5[k] = float(np.mean(a.breaks))
            day = dt.date.fromisoformat(c.business_date)
            x.weekday[k] = day.weekday()
            x.month_end[k] = float(_month_end(sched, day))
            x.vol94[k], x.vol97[k], x.vol99[k] = self._vols(day)
        return keys, x

    def _vols(self, day: dt.date) -> tuple[float, float, float]:
        i = int(np.searchsorted(self.vol_dates, np.datetime64(day, "D"), side="left")) - 1
        if i < 0:
            return (math.nan,) * 3  # type: ignore[return-value]
        v = self.vols[i]
        return float(v[0]), float(v[1]), float(v[2])

    def _residuals(self, keys: list[tuple], x: FeatureInputs) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self.model is not None and len(x):
            q50, q95 = self.model.quantiles(x)
            return (
                np.asarray(q50, dtype=np.float64),
                np.asarray(q95, dtype=np.float64),
                [self.method] * len(x),
            )
        q50, q95 = np.zeros(len(x)), np.zeros(len(x))
        for k, (name, _, _) in enumerate(keys):
            errs = self.band[self.accounts[name].ccp]
            if errs:
                q50[k], q95[k] = np.quantile(np.fromiter(errs, float), [0.5, 0.95])
        return q50, q95, ["replica"] * len(x)

    def forecast_rows(self, now_ns: int, last_seq: int, force: bool = False) -> dict[str, list]:
        """`forecast` columns of the accounts whose forecast moved (margin, cycle, method, or more than MOVE)
        since their last row; every account is re-evaluated at least every REFRESH_NS. Each evaluation
        also records, per lead time, the forecast standing for each target cycle (the parallel run)."""
        due = [
            n
            for n, a in self.accounts.items()
            if a.margin >= 0 and (force or a.dirty or now_ns - a.evaluated_at >= REFRESH_NS)
        ]
        out: dict[str, list] = {c: [] for c in FORECAST_COLUMNS}
        if not due:
            return out
        keys, x = self.inputs(now_ns, due)
        q50, q95, methods = self._residuals(keys, x)
        for k, (name, h, c) in enumerate(keys):
            a = self.accounts[name]
            a.dirty, a.evaluated_at = False, now_ns
            sched = self.schedules[a.ccp]
            rep = float(x.replica[k])
            p50 = max(rep * (1.0 + float(q50[k])), 0.0) if math.isfinite(q50[k]) else rep
            p95 = max(rep * (1.0 + float(q95[k])), p50) if math.isfinite(q95[k]) else p50
            for lead in self.leads_ns:
                if now_ns <= c.time_ns - lead:
                    self.standing[(c.business_date, c.name, name, lead)] = (p50, p95, methods[k])
            cycle_key = f"{c.business_date}/{c.name}"
            assert a.published is not None
            last = a.published.get(h)
            now = (cycle_key, methods[k], a.collateral)
            if not force and last and last[:3] == now and _near(last[3], p50) and _near(last[4], p95):
                continue
            a.published[h] = (*now, p50, p95)
            for col, v in zip(
                FORECAST_COLUMNS,
                (
                    name,
                    a.ccp,
                    h,
                    c.business_date,
                    c.name,
                    c.time_ns,
                    rep,
                    p50,
                    p95,
                    sched.call(p50, a.collateral),
                    sched.call(p95, a.collateral),
                    methods[k],
                    int(last_seq),
                ),
                strict=True,
            ):
                out[col].append(v)
        return out

    def what_if(self, name: str, margin_after: float, now_ns: int) -> dict[str, Any] | None:
        """A what-if's effect on the call at the account's next cycle: the forecast before (the account's
        state now) and after (its margin replaced by `margin_after`, everything else the same), each
        {requirement p50/p95, call p50/p95}; None for an account without a CCP or a margin yet."""
        a = self.accounts.get(name)
        if a is None or not a.margin >= 0 or now_ns <= 0:
            return None
        sched = self.schedules[a.ccp]
        out: dict[str, Any] = {}
        saved = a.margin
        try:
            for side, m in (("before", saved), ("after", margin_after)):
                a.margin = m
                keys, x = self.inputs(now_ns, [name])
                q50, q95, methods = self._residuals(keys, x)
                rep = float(x.replica[0])
                p50 = max(rep * (1.0 + float(q50[0])), 0.0)
                p95 = max(rep * (1.0 + float(q95[0])), p50)
                out[side] = {
                    "p50": p50,
                    "p95": p95,
                    "call_p50": sched.call(p50, a.collateral),
                    "call_p95": sched.call(p95, a.collateral),
                }
        finally:
            a.margin = saved
        c = keys[0][2]
        out |= {"ccp": a.ccp, "cycle": c.name, "business_date": c.business_date, "cycle_time": c.time_ns}
        return out | {"method": methods[0]}

    def next_cycle(self, name: str, now_ns: int) -> CycleAt | None:
        a = self.accounts.get(name)
        return self.schedules[a.ccp].next(now_ns) if a is not None else None

    # ---- actual calls: the parallel run ---------------------------------------------------------------
    def on_calls(self, rows: Mapping[str, Sequence[Any]]) -> tuple[dict[str, list], list[str]]:
        """`call` rows -> the `callcheck` columns (one row per lead time with a standing forecast) and the
        issues (unknown CCP, cycle or account: counted, nothing recorded). Each call's break against the
        replica standing at its cycle feeds the account's features and its CCP's error band."""
        out: dict[str, list] = {c: [] for c in CALLCHECK_COLUMNS}
        issues: list[str] = []
        for i, name in enumerate(rows.get("account", ())):
            ccp, date, cycle = rows["ccp"][i], rows["business_date"][i], rows["cycle"][i]
            actual = float(rows["requirement"][i])
            sched = self.schedules.get(ccp)
            where = f"call row {i} ({name} {date} {cycle})"
            if sched is None:
                issues.append(f"{where}: field ccp: {ccp!r} is not in [[calc.ccps]]")
                continue
            if sched.find(date, cycle) is None:
                issues.append(f"{where}: field cycle: {cycle!r} is not a cycle of {ccp} on {date}")
                continue
            a = self.accounts.get(name)
            if a is None or a.ccp != ccp:
                issues.append(f"{where}: field account: not an account of {ccp} in calc")
                continue
            rep = self.replica_at.get((date, cycle, name))
            if rep is not None and rep > 0:
                err = actual / rep - 1.0
                assert a.breaks is not None
                a.breaks.append(err)
                self.band[ccp].append(err)
                a.dirty = True
            for lead in self.leads_ns:
                f = self.standing.get((date, cycle, name, lead))
                if f is None:
                    continue
                p50, p95, method = f
                for col, v in zip(
                    CALLCHECK_COLUMNS,
                    (
                        name,
                        ccp,
                        date,
                        cycle,
                        lead // NS,
                        actual,
                        p50,
                        p95,
                        p50 - actual,
                        int(actual <= p95),
                        method,
                    ),
                    strict=True,
                ):
                    out[col].append(v)
        self.issues += len(issues)
        return out, issues

    def _prune(self, now_ns: int) -> None:
        """Forget standing forecasts and replicas of cycles more than 5 days old (calls come the same day)."""
        cutoff = (dt.date(1970, 1, 1) + dt.timedelta(days=now_ns // (86_400 * NS) - 5)).isoformat()
        self.replica_at = {k: v for k, v in self.replica_at.items() if k[0] >= cutoff}
        self.standing = {k: v for k, v in self.standing.items() if k[0] >= cutoff}


def _value_at(path: Iterable[tuple[int, float]] | None, t: int) -> float:
    """The margin standing at time t on a (time, margin) path (nan before its first point)."""
    v = math.nan
    for ti, m in path or ():
        if ti > t:
            break
        v = m
    return v


def _month_end(sched: Schedule, day: dt.date) -> bool:
    """Whether `day` is among the last 3 business days of its month."""
    left, d = 0, day + dt.timedelta(days=1)
    while d.month == day.month:
        left += sched.business_day(d)
        d += dt.timedelta(days=1)
    return left < 3


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= MOVE * max(abs(a), abs(b), 1.0)


def accuracy(rows: Mapping[str, Sequence[Any]], tolerance: float = 0.05) -> dict[int, dict[str, float]]:
    """The running accuracy of the parallel run per lead time from `callcheck` columns: calls, MAE, bias,
    hit rate within `tolerance`, worst under-prediction (most negative error, 0 if none), P95 coverage."""
    by: dict[int, list[int]] = {}
    for i, lead in enumerate(rows.get("lead_s", ())):
        by.setdefault(int(lead), []).append(i)
    out: dict[int, dict[str, float]] = {}
    for lead, ix in sorted(by.items()):
        err = np.array([rows["error"][i] for i in ix], dtype=np.float64)
        act = np.array([rows["actual"][i] for i in ix], dtype=np.float64)
        cov = np.array([rows["covered"][i] for i in ix], dtype=np.float64)
        out[lead] = {
            "calls": float(len(ix)),
            "mae": float(np.mean(np.abs(err))),
            "bias": float(np.mean(err)),
            "hit_rate": float(np.mean(np.abs(err) <= tolerance * act)),
            "worst_under": float(min(err.min(), 0.0)),
            "coverage": float(np.mean(cov)),
        }
    return out
