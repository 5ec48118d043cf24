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
from collections.abc import Mapping, Sequence
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
PATH_STEP_NS = 60 * NS  # an account's margin path keeps one point a minute (its margin an hour ago)
REFRESH_NS = 60 * NS  # every account's forecast is re-evaluated at least this often (event time)
# A forecast row is published again for an account and horizon when its cycle, collateral or method
# changed or P50 / P95 moved more than BIG_MOVE (relative), else when they moved more than MOVE and its
# last row is at least MIN_ROW_NS old (a margin jittering across a rounding step wrote a row every publish)
MOVE, BIG_MOVE, MIN_ROW_NS = 5e-3, 0.05, 5 * NS
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
    margin_1h: np.ndarray  # its margin one hour before its last margin row
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


@dataclass
class _Entries:
    """Beside FeatureInputs, per entry: the account's index, the horizon's, the cycle's time, the
    collateral; `blocks` = (ccp, first, end, horizon, cycle) runs of entries of one CCP and horizon."""

    acc: np.ndarray
    horizon: np.ndarray
    cycle_ns: np.ndarray
    collateral: np.ndarray
    blocks: list[tuple[str, int, int, str, CycleAt]]

    def keys(self, names: Sequence[str], sel: np.ndarray | None = None) -> list[tuple[str, str, CycleAt]]:
        """(account, horizon, cycle) of each entry (or of entries `sel`, ascending)."""
        out: list[tuple[str, str, CycleAt]] = []
        for _, lo, hi, h, c in self.blocks:
            ks = range(lo, hi) if sel is None else sel[(sel >= lo) & (sel < hi)].tolist()
            out.extend((names[self.acc[k]], h, c) for k in ks)
        return out

    @classmethod
    def empty(cls) -> _Entries:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, np.zeros(0), [])


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


class _Account:
    """What an account's forecast needs beyond its numbers (Projector.num): its CCP, margin path, breaks."""

    __slots__ = ("ccp", "path", "breaks")

    def __init__(self, ccp: str) -> None:
        self.ccp = ccp
        self.path: deque[tuple[int, float]] = deque()  # (time, margin): one a minute, the last hour
        self.breaks: deque[float] = deque(maxlen=5)  # actual / replica-at-cycle - 1 of its last calls


# Projector.num columns: the account's latest margin row numbers and its replica at the previous cycle
# (and its margin an hour before its last row, its last break and the mean of its last 5)
N_MARGIN, N_VAR, N_ES, N_STRESS, N_COLLATERAL, N_LAST_CYCLE, N_M1H, N_BREAK, N_BREAK5 = range(9)
N_NUM = 9


@dataclass
class _Standing:
    """The forecasts standing for one cycle at one lead time, per account index (nan: none)."""

    p50: np.ndarray
    p95: np.ndarray
    method: np.ndarray  # (object) the method of each


class Projector:
    """Per-account forecast state (numbers in arrays indexed like `names`); see the module docstring."""

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
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.num = np.full((0, N_NUM), np.nan)
        self.dirty = np.zeros(0, dtype=np.bool_)
        self.evaluated_at = np.zeros(0, dtype=np.int64)
        self.band: dict[str, deque[float]] = {name: deque(maxlen=BAND_CALLS) for name in self.schedules}
        self.replica_at: dict[tuple[str, str], np.ndarray] = {}  # (business_date, cycle) -> per account
        self.standing: dict[tuple[str, str, int], _Standing] = {}  # (business_date, cycle, lead)
        self.last_cycle: dict[str, int] = {}  # ccp -> time of the last cycle recorded
        self.vol_dates, self.vols = market_vols(history)
        self.issues = 0
        self.calls_seen = 0  # calls matched so far (the error band's cache key)
        self._hz_cache: dict[str, tuple[int, dict[str, CycleAt]]] = {}
        self._band_cache: dict[str, tuple[int, tuple[float, float]]] = {}
        self._day_cache: dict[tuple[str, str], tuple[float, float, float, float, float]] = {}
        self._pub = np.full((0, len(HORIZONS), 5), np.nan)  # per account and horizon, the last row's cycle
        self._pub_method = ""  # time, collateral, p50, p95, its time; and the method of the last rows
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
                self.accounts[name] = _Account(ccp)
        n, old = len(self.accounts), len(self.names)
        self.names = list(self.accounts)
        self.index = {a: i for i, a in enumerate(self.names)}
        self.num = np.concatenate([self.num, np.full((n - old, N_NUM), np.nan)])
        self.dirty = np.concatenate([self.dirty, np.ones(n - old, dtype=np.bool_)])
        self.evaluated_at = np.concatenate([self.evaluated_at, np.full(n - old, -1, dtype=np.int64)])
        self._pub = np.concatenate([self._pub, np.full((n - old, len(HORIZONS), 5), np.nan)])
        self.ccp_of = np.array([list(self.schedules).index(self.accounts[a].ccp) for a in self.names])

    def set_model(self, model: ResidualModel | None) -> None:
        self.model = model
        self.dirty[:] = True

    @property
    def method(self) -> str:
        return f"model:{self.model.id}" if self.model is not None else "replica"

    def advance(self, now_ns: int) -> None:
        """Move the event clock: each CCP cycle passed since the last call records every account's replica
        standing at it (the requirement that cycle would have made, for the breaks of its actual call)."""
        for c_i, (name, sched) in enumerate(self.schedules.items()):
            done = self.last_cycle.get(name)
            prev = sched.previous(now_ns)
            if prev is None or (done is not None and prev.time_ns <= done):
                continue
            self.last_cycle[name] = prev.time_ns
            if done is None:
                continue  # the clock's first reading: nothing was standing yet
            mine = self.ccp_of == c_i
            rep = np.where(mine, sched.requirements(self.num[:, N_MARGIN]), np.nan)
            self.replica_at[(prev.business_date, prev.name)] = rep
            has = mine & np.isfinite(rep)
            self.num[has, N_LAST_CYCLE] = rep[has]
            self.dirty |= has
            self._prune(now_ns)

    def on_margin(self, rows: Mapping[str, Sequence[Any]], now_ns: int) -> None:
        """calc's published margin rows (margin table columns)."""
        names = rows.get("account", ())
        if not names:
            return
        ix = np.fromiter((self.index.get(n, -1) for n in names), np.int64, len(names))
        ok = ix >= 0
        cols = [rows[c] for c in ("margin", "var", "es", "stress", "collateral")]
        vals = np.array(cols, dtype=np.float64).T[ok]
        ix = ix[ok]
        self.num[ix, :5] = vals
        self.dirty[ix] = True
        for i, m in zip(ix.tolist(), vals[:, 0].tolist(), strict=True):
            path = self.accounts[self.names[i]].path
            if path and path[-1][0] // PATH_STEP_NS == now_ns // PATH_STEP_NS:
                path[-1] = (path[-1][0], m)  # one point per PATH_STEP_NS: the last in it
            else:
                path.append((now_ns, m))
            while len(path) >= 2 and path[1][0] <= now_ns - HOUR_NS:
                path.popleft()
            self.num[i, N_M1H] = path[0][1] if path[0][0] <= now_ns - HOUR_NS else math.nan

    def restore(self, rows: Mapping[str, Sequence[Any]], times: Sequence[int]) -> None:
        """Journaled `forecast` rows (calc's own, replayed after a restart), in seq order: the forecasts
        that stood at each lead time before the restart, and the replica of each account at each cycle
        (for the breaks of the calls that follow), so the parallel run goes on across a restart."""
        for i, name in enumerate(rows.get("account", ())):
            a = self.index.get(name)
            if a is None:
                continue
            t = int(times[i])
            self.advance(t)
            if rows["horizon"][i] == "next":
                self.num[a, N_MARGIN] = float(rows["replica"][i])  # (already rounded; live rows replace it)
                self.num[a, N_COLLATERAL] = float(rows["replica"][i]) - float(rows["call_p50"][i])
            ct = int(rows["cycle_time"][i])
            for lead in self.leads_ns:
                if t <= ct - lead:
                    s = self._standing(rows["business_date"][i], rows["cycle"][i], lead)
                    s.p50[a], s.p95[a], s.method[a] = (
                        float(rows["p50"][i]),
                        float(rows["p95"][i]),
                        rows["method"][i],
                    )

    def _standing(self, business_date: str, cycle: str, lead: int) -> _Standing:
        s = self.standing.get((business_date, cycle, lead))
        if s is None:
            n = len(self.names)
            s = _Standing(np.full(n, np.nan), np.full(n, np.nan), np.full(n, "", dtype=object))
            self.standing[(business_date, cycle, lead)] = s
        return s

    # ---- the forecast -------------------------------------------------------------------------------
    def _horizons(self, ccp: str, now_ns: int) -> dict[str, CycleAt]:
        hit = self._hz_cache.get(ccp)
        if hit is None or hit[0] != now_ns:
            hit = (now_ns, self.schedules[ccp].horizons(now_ns))
            self._hz_cache[ccp] = hit
        return hit[1]

    def _day(self, ccp: str, business_date: str) -> tuple[float, float, float, float, float]:
        """weekday, month_end, vol94, vol97, vol99 of a cycle's business date (cached)."""
        hit = self._day_cache.get((ccp, business_date))
        if hit is None:
            day = dt.date.fromisoformat(business_date)
            hit = (float(day.weekday()), float(_month_end(self.schedules[ccp], day)), *self._vols(day))
            self._day_cache[(ccp, business_date)] = hit
        return hit

    def inputs(self, now_ns: int, names: Sequence[str] | None = None) -> tuple[list[tuple], FeatureInputs]:
        """The (account, horizon, cycle) entries of `names` (default: every account with a margin) and
        their FeatureInputs: per CCP and horizon, every account's entry at once (numpy)."""
        ix = None if names is None else np.array([self.index[n] for n in names], dtype=np.int64)
        x, e = self._entries(now_ns, ix)
        return e.keys(self.names), x

    def _entries(
        self, now_ns: int, ix: np.ndarray | None = None, margin: np.ndarray | None = None
    ) -> tuple[FeatureInputs, _Entries]:
        """Entries of accounts `ix` (default all) with a margin; `margin` replaces their margins."""
        ix = np.arange(len(self.names)) if ix is None else ix
        m_all = self.num[ix, N_MARGIN] if margin is None else margin
        ok = m_all >= 0
        ix, m_all = ix[ok], m_all[ok]
        start = 0
        parts: list[FeatureInputs] = []
        meta: list[tuple[np.ndarray, ...]] = []
        blocks: list[tuple[str, int, int, str, CycleAt]] = []
        for c_i, ccp in enumerate(self.schedules):
            sel = self.ccp_of[ix] == c_i
            if not sel.any():
                continue
            acc, k = ix[sel], int(sel.sum())
            num = self.num[acc]
            base = {
                "replica": self.schedules[ccp].requirements(m_all[sel]),
                "var": num[:, N_VAR],
                "es": num[:, N_ES],
                "stress": num[:, N_STRESS],
                "margin_last_cycle": num[:, N_LAST_CYCLE],
                "margin_1h": num[:, N_M1H],
                "last_break": num[:, N_BREAK],
                "mean_break5": num[:, N_BREAK5],
            }
            for h_i, (h, c) in enumerate(self._horizons(ccp, now_ns).items()):
                blocks.append((ccp, start, start + k, h, c))
                start += k
                wd, me, v94, v97, v99 = self._day(ccp, c.business_date)
                const = {"to_cycle_s": (c.time_ns - now_ns) / NS, "horizon": float(h_i), "weekday": wd}
                const |= {"month_end": me, "vol94": v94, "vol97": v97, "vol99": v99}
                parts.append(FeatureInputs(**base, **{f: np.full(k, v) for f, v in const.items()}))
                meta.append((acc, np.full(k, h_i), np.full(k, c.time_ns), num[:, N_COLLATERAL]))
        if not parts:
            return FeatureInputs.empty(), _Entries.empty()
        x = FeatureInputs(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(FeatureInputs))
        )
        cols = [np.concatenate([m[j] for m in meta]) for j in range(4)]
        return x, _Entries(*cols, blocks)

    def _vols(self, day: dt.date) -> tuple[float, float, float]:
        i = int(np.searchsorted(self.vol_dates, np.datetime64(day, "D"), side="left")) - 1
        if i < 0:
            return (math.nan,) * 3  # type: ignore[return-value]
        v = self.vols[i]
        return float(v[0]), float(v[1]), float(v[2])

    def _band(self, ccp: str) -> tuple[float, float]:
        """The replica's error quantiles (P50, P95) at a CCP from its recent calls (0, 0 without any)."""
        errs = self.band[ccp]
        hit = self._band_cache.get(ccp)
        if hit is None or hit[0] != self.calls_seen:
            q = np.quantile(np.fromiter(errs, float), [0.5, 0.95]) if errs else np.zeros(2)
            hit = (self.calls_seen, (float(q[0]), float(q[1])))
            self._band_cache[ccp] = hit
        return hit[1]

    def _residuals(self, e: _Entries, x: FeatureInputs) -> tuple[np.ndarray, np.ndarray, str]:
        if self.model is not None and len(x):
            q50, q95 = self.model.quantiles(x)
            return np.asarray(q50, dtype=np.float64), np.asarray(q95, dtype=np.float64), self.method
        q50, q95 = np.zeros(len(x)), np.zeros(len(x))
        for ccp, lo, hi, _, _ in e.blocks:
            q50[lo:hi], q95[lo:hi] = self._band(ccp)
        return q50, q95, "replica"

    def _project(
        self, e: _Entries, x: FeatureInputs
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
        """P50 and P95 of the requirement (replica x (1 + residual quantiles), P95 >= P50 >= 0) and the
        calls they imply (requirement - collateral, 0 below the CCP's minimum transfer)."""
        q50, q95, method = self._residuals(e, x)
        rep = x.replica
        p50 = np.where(np.isfinite(q50), np.maximum(rep * (1.0 + q50), 0.0), rep)
        p95 = np.where(np.isfinite(q95), np.maximum(rep * (1.0 + q95), p50), p50)
        mta = np.zeros(len(x))
        for ccp, lo, hi, _, _ in e.blocks:
            mta[lo:hi] = self.schedules[ccp].minimum_transfer
        calls = [np.where(np.abs(p - e.collateral) < mta, 0.0, p - e.collateral) for p in (p50, p95)]
        return p50, p95, calls[0], calls[1], method

    def forecast_rows(self, now_ns: int, last_seq: int, force: bool = False) -> dict[str, list]:
        """`forecast` columns of the accounts whose forecast moved (margin, collateral, cycle, method, or
        P50 / P95 by more than MOVE) since their last row; every account is re-evaluated at least every
        REFRESH_NS. A published row is also, per lead time, the forecast standing for its cycle from then
        on (the parallel run: an unpublished evaluation is within MOVE of the last row)."""
        out: dict[str, list] = {c: [] for c in FORECAST_COLUMNS}
        due = (self.num[:, N_MARGIN] >= 0) & (force | self.dirty | (now_ns - self.evaluated_at >= REFRESH_NS))
        ix = np.flatnonzero(due)
        if not len(ix):
            return out
        self.dirty[ix], self.evaluated_at[ix] = False, now_ns
        x, e = self._entries(now_ns, ix)
        p50, p95, call50, call95, method = self._project(e, x)
        force = force or method != self._pub_method
        self._pub_method = method
        old = self._pub[e.acc, e.horizon]  # (n, 5): cycle time, collateral, p50, p95, time (nan: never)
        new = np.column_stack([p50, p95])
        move = np.abs(old[:, 2:4] - new) / np.maximum(np.maximum(np.abs(old[:, 2:4]), np.abs(new)), 1.0)
        move = np.where(np.isnan(move), np.inf, move).max(axis=1)
        moved = (
            force
            | (old[:, 0] != e.cycle_ns)
            | (old[:, 1] != e.collateral)
            | (move > BIG_MOVE)
            | ((move > MOVE) & ~(now_ns - old[:, 4] < MIN_ROW_NS))
        )
        sel = np.flatnonzero(moved)
        if not len(sel):
            return out
        self._pub[e.acc[sel], e.horizon[sel]] = np.column_stack(
            [e.cycle_ns[sel], e.collateral[sel], p50[sel], p95[sel], np.full(len(sel), now_ns)]
        )
        for _, lo, hi, _, c in e.blocks:  # the standing forecasts: one block is one cycle
            b = sel[(sel >= lo) & (sel < hi)]
            for lead in self.leads_ns if len(b) else ():
                if now_ns <= c.time_ns - lead:
                    s = self._standing(c.business_date, c.name, lead)
                    acc = e.acc[b]
                    s.p50[acc], s.p95[acc], s.method[acc] = p50[b], p95[b], method
        picked = e.keys(self.names, sel)
        out["account"] = [k[0] for k in picked]
        out["ccp"] = [k[2].ccp for k in picked]
        out["horizon"] = [k[1] for k in picked]
        out["business_date"] = [k[2].business_date for k in picked]
        out["cycle"] = [k[2].name for k in picked]
        out["cycle_time"] = e.cycle_ns[sel].tolist()
        out["replica"] = x.replica[sel].tolist()
        out["p50"], out["p95"] = p50[sel].tolist(), p95[sel].tolist()
        out["call_p50"], out["call_p95"] = call50[sel].tolist(), call95[sel].tolist()
        out["method"] = [method] * len(sel)
        out["last_seq"] = [int(last_seq)] * len(sel)
        return out

    def what_if(self, name: str, margin_after: float, now_ns: int) -> dict[str, Any] | None:
        """A what-if's effect on the call at the account's next cycle: the forecast before (the account's
        state now) and after (its margin replaced by `margin_after`, everything else the same), each
        {requirement p50/p95, call p50/p95}; None for an account without a CCP or a margin yet."""
        a = self.index.get(name)
        if a is None or not self.num[a, N_MARGIN] >= 0 or now_ns <= 0:
            return None
        ccp = self.accounts[name].ccp
        sched, c = self.schedules[ccp], self._horizons(ccp, now_ns)["next"]
        margins = np.array([self.num[a, N_MARGIN], margin_after], dtype=np.float64)
        if self.model is None:  # the replica and its error band: no features needed
            q50, q95 = self._band(ccp)
            rep = sched.requirements(margins)
            p50 = np.maximum(rep * (1.0 + q50), 0.0)
            p95 = np.maximum(rep * (1.0 + q95), p50)
            coll = float(self.num[a, N_COLLATERAL])
            call50 = [sched.call(float(p), coll) for p in p50]
            call95 = [sched.call(float(p), coll) for p in p95]
            method = "replica"
        else:  # one model call for both (the next cycle is each one's first entry)
            x, e = self._entries(now_ns, np.array([a, a]), margins)
            p50_all, p95_all, c50_all, c95_all, method = self._project(e, x)
            first = [lo for _, lo, _, h, _ in e.blocks if h == "next"][0]
            p50, p95 = p50_all[first : first + 2], p95_all[first : first + 2]
            call50, call95 = c50_all[first : first + 2].tolist(), c95_all[first : first + 2].tolist()
        out: dict[str, Any] = {
            side: {"p50": float(p50[k]), "p95": float(p95[k]), "call_p50": call50[k], "call_p95": call95[k]}
            for k, side in enumerate(("before", "after"))
        }
        out |= {"ccp": c.ccp, "cycle": c.name, "business_date": c.business_date, "cycle_time": c.time_ns}
        return out | {"method": method}

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
            a = self.index.get(name)
            if a is None or self.accounts[name].ccp != ccp:
                issues.append(f"{where}: field account: not an account of {ccp} in calc")
                continue
            reps = self.replica_at.get((date, cycle))
            rep = float(reps[a]) if reps is not None and a < len(reps) else math.nan
            if rep > 0:
                err = actual / rep - 1.0
                brk = self.accounts[name].breaks
                brk.append(err)
                self.num[a, N_BREAK], self.num[a, N_BREAK5] = err, sum(brk) / len(brk)
                self.band[ccp].append(err)
                self.calls_seen += 1
                self.dirty[a] = True
            for lead in self.leads_ns:
                s = self.standing.get((date, cycle, lead))
                if s is None or a >= len(s.p50) or not math.isfinite(s.p50[a]):
                    continue
                p50, p95 = float(s.p50[a]), float(s.p95[a])
                row = (name, ccp, date, cycle, lead // NS, actual, p50, p95, p50 - actual, int(actual <= p95))
                for col, v in zip(CALLCHECK_COLUMNS, (*row, s.method[a]), strict=True):
                    out[col].append(v)
        self.issues += len(issues)
        return out, issues

    def _prune(self, now_ns: int) -> None:
        """Forget standing forecasts and replicas of cycles more than 5 days old (calls come the same day)."""
        cutoff = (dt.date(1970, 1, 1) + dt.timedelta(days=now_ns // (86_400 * NS) - 5)).isoformat()
        self.replica_at = {k: v for k, v in self.replica_at.items() if k[0] >= cutoff}
        self.standing = {k: v for k, v in self.standing.items() if k[0] >= cutoff}


def _month_end(sched: Schedule, day: dt.date) -> bool:
    """Whether `day` is among the last 3 business days of its month."""
    left, d = 0, day + dt.timedelta(days=1)
    while d.month == day.month:
        left += sched.business_day(d)
        d += dt.timedelta(days=1)
    return left < 3


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
