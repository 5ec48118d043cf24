"""`marginflow forecast train`: fit the learned forecast of the call (calc/forecast.py) on journals and the
CCP's actual calls, compare it on held-out days with the baselines, store it as one JSON file.

The features are calc's own: the journals replay through the engine as in `marginflow backtest`
(replay/backtest.py) and each publish feeds calc's Projector (calc/projection.py), which gives the
FeatureInputs at the lead points: every 15 min from 09:30 (the CCP's time zone) to its last cycle, and
15 min, 1 h and 2 h before each cycle. The target of an entry is its cycle's actual requirement / the
replica - 1. The calls come from the journal's `call` table, or the CSV (--calls) or HDB (--hdb) given.

Walk-forward with a gap: the held-out days (the last 20%) are cut in `FOLDS` blocks; each block is
forecast by a model trained only on entries whose call was reported before the block starts (an entry
taken before the block whose target cycle falls in it is left out: the gap of its horizon). The stored
model is then fitted on every entry. Baselines on the same held-out entries, per horizon: persistence
(the account's last actual requirement), the replica alone, and the replica with its historical error band
(the quantiles of the training entries' residuals). `beats_replica`: the forecast's MAE is below the
replica's at every horizon. Same data and seed: the same file, byte for byte (LightGBM on one thread,
deterministic).

    marginflow forecast train --journal var/demo-history/journal --out var/forecast.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calc import forecast
from calc.history import InputError, load_prices
from calc.inputs import load_accounts
from calc.projection import FeatureInputs, Projector
from marginflow import config as configuration
from replay import accuracy, backtest
from schemas.tables import HORIZONS

NS = 1_000_000_000
STEP_S = 900  # a lead point every 15 min of the session
LEADS_S = (900, 3600, 7200)  # and these before each cycle
SESSION_OPEN = dt.time(9, 30)  # local to the CCP
HELD_OUT = 0.2  # the last 20% of the days
FOLDS = 2
LEAD_BUCKETS_S = (900, 3600, 7200, 14_400, 28_800, 86_400, 10**9)  # error by lead time: upper bounds
PARAMS: dict[str, Any] = {
    "objective": "quantile",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 40,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
ROUNDS = 200


# ------------------------------------------------------------------------------ the dataset
@dataclass
class Dataset:
    """The entries at the lead points: features and what is known of them (equal-length arrays)."""

    x: np.ndarray  # (n, len(FEATURES))
    t: np.ndarray  # sample time, ns
    day: np.ndarray  # sample's UTC date (str)
    account: np.ndarray
    horizon: np.ndarray  # 0 next, 1 eod, 2 t+1
    cycle: np.ndarray  # "date/cycle"
    cycle_t: np.ndarray  # ns
    known_t: np.ndarray  # when the cycle's call was reported, ns
    replica: np.ndarray
    actual: np.ndarray
    persistence: np.ndarray  # the account's last actual requirement at the sample time (nan: none yet)

    @property
    def y(self) -> np.ndarray:
        return self.actual / self.replica - 1.0

    def take(self, ix: np.ndarray) -> Dataset:
        return Dataset(*(getattr(self, f)[ix] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.t)


class Collector:
    """A backtest tap: feeds each publish and each actual call (at its report time) to a Projector, in
    event-time order, and takes FeatureInputs at the lead points."""

    def __init__(
        self,
        calc: Any,
        specs: Mapping[str, Any],
        history: Any,
        calls: Sequence[accuracy.ActualCall],
        step_s: int = STEP_S,
        leads_s: Sequence[int] = LEADS_S,
    ) -> None:
        if not calc.ccps:
            raise InputError("calc.ccps: the forecast needs the CCPs' cycles ([[calc.ccps]])")
        self.proj = Projector(calc, specs, history)
        self.step_ns, self.leads_ns = step_s * NS, [int(s) * NS for s in leads_s]
        self.calls = sorted(calls, key=lambda c: (c.call_time_ns(), c.line))
        self.next_call = 0
        self.points: list[int] = []
        self.days: set[int] = set()
        self.samples: list[tuple[int, list[tuple], FeatureInputs, list[float]]] = []
        self.last_call: dict[str, float] = {}
        self.actual: dict[tuple[str, str, str], tuple[float, int]] = {}  # (date, cycle, account)
        first = self.first = next(iter(self.proj.schedules))
        self.issues: list[str] = []
        for c in self.calls:
            sched = self.proj.schedules.get(c.ccp or first)
            if sched is None:
                continue
            cyc = c.cycle or (sched.end_of_day(c.date.isoformat()).name if sched.on(c.date) else "")
            self.actual[(c.date.isoformat(), cyc, c.account)] = (c.amount, c.call_time_ns())

    def __call__(self, rows: Mapping[str, Any], t: int) -> None:
        self._day(t)
        self.run_until(t)
        self.proj.on_margin(rows, t)

    def _day(self, t: int) -> None:
        d = t // (86_400 * NS)
        if d in self.days:
            return
        self.days.add(d)
        day = dt.date(1970, 1, 1) + dt.timedelta(days=int(d))
        pts = set(self.points)
        for sched in self.proj.schedules.values():
            cycles = sched.on(day)
            if not cycles:
                continue
            open_ns = int(dt.datetime.combine(day, SESSION_OPEN, tzinfo=sched.zone).timestamp()) * NS
            pts.update(range(open_ns, cycles[-1].time_ns + 1, self.step_ns))
            for c in cycles:
                pts.add(c.time_ns)
                pts.update(c.time_ns - lead for lead in self.leads_ns)
        self.points = sorted(p for p in pts if p >= t)

    def run_until(self, t: int) -> None:
        """Deliver the calls reported and take the samples due before `t`."""
        while True:
            tc = self.calls[self.next_call].call_time_ns() if self.next_call < len(self.calls) else None
            tp = self.points[0] if self.points else None
            if tc is not None and tc < t and (tp is None or tc <= tp):
                self._deliver(tc)
            elif tp is not None and tp < t:
                self.points.pop(0)
                self._sample(tp)
            else:
                return

    def _deliver(self, tc: int) -> None:
        group: list[accuracy.ActualCall] = []
        while self.next_call < len(self.calls) and self.calls[self.next_call].call_time_ns() == tc:
            group.append(self.calls[self.next_call])
            self.next_call += 1
        self.proj.advance(tc)
        rows: dict[str, list] = {
            "account": [],
            "ccp": [],
            "business_date": [],
            "cycle": [],
            "requirement": [],
        }
        for c in group:
            ccp = c.ccp or self.first
            sched = self.proj.schedules.get(ccp)
            cyc = c.cycle or (sched.end_of_day(c.date.isoformat()).name if sched and sched.on(c.date) else "")
            for k, v in zip(rows, (c.account, ccp, c.date.isoformat(), cyc, c.amount), strict=True):
                rows[k].append(v)
            self.last_call[c.account] = c.amount
        _, issues = self.proj.on_calls(rows)
        self.issues += issues

    def _sample(self, t: int) -> None:
        self.proj.advance(t)
        keys, x = self.proj.inputs(t)
        if len(x):
            self.samples.append((t, keys, x, [self.last_call.get(k[0], math.nan) for k in keys]))

    def dataset(self) -> Dataset:
        """The samples with a known actual call and a replica > 0."""
        self.run_until(2**63 - 1)
        cols: dict[str, list] = {k: [] for k in Dataset.__dataclass_fields__ if k != "x"}
        xs: list[FeatureInputs] = []
        for t, keys, x, pers in self.samples:
            keep = []
            for k, (acc, h, c) in enumerate(keys):
                a = self.actual.get((c.business_date, c.name, acc))
                if a is None or not x.replica[k] > 0:
                    continue
                keep.append(k)
                day = str(np.datetime64(t, "ns").astype("datetime64[D]"))
                for f, v in zip(
                    cols,
                    (
                        t,
                        day,
                        acc,
                        HORIZONS.index(h),
                        f"{c.business_date}/{c.name}",
                        c.time_ns,
                        a[1],
                        float(x.replica[k]),
                        a[0],
                        pers[k],
                    ),
                    strict=True,
                ):
                    cols[f].append(v)
            if keep:
                ix = np.array(keep)
                xs.append(FeatureInputs(*(getattr(x, f)[ix] for f in x.__dataclass_fields__)))
        mat = np.vstack([forecast.matrix(x) for x in xs]) if xs else np.zeros((0, len(forecast.FEATURES)))
        arr = {
            k: np.array(v, dtype=object if k in ("day", "account", "cycle") else None)
            for k, v in cols.items()
        }
        for k in ("t", "cycle_t", "known_t"):
            arr[k] = arr[k].astype(np.int64) if len(arr[k]) else np.zeros(0, np.int64)
        for k in ("horizon", "replica", "actual", "persistence"):
            arr[k] = arr[k].astype(np.float64) if len(arr[k]) else np.zeros(0)
        return Dataset(mat, **arr)


def collect(
    root: str | Path,
    calc: Any,
    calls: Sequence[accuracy.ActualCall],
    start: str | None = None,
    end: str | None = None,
    publish_ms: float = 0.0,
) -> tuple[Dataset, backtest.Replay, list[str]]:
    """Replay the journals (the accounts with calls only) with a Collector tap: (dataset, the replay,
    issues)."""
    called = {c.account for c in calls}
    specs = {a: s for a, s in load_accounts(calc.accounts_file, calc.default_policy).items() if a in called}
    col = Collector(calc, specs, load_prices(calc.history_file), calls)
    rp = backtest.replay(root, calc, start, end, publish_ms=publish_ms, tap=col, accounts=set(specs))
    ds = col.dataset()
    return ds, rp, col.issues[:20]


# ------------------------------------------------------------------------------ fitting, comparing
def fit(ds: Dataset, seed: int, rounds: int = ROUNDS) -> tuple[Any, Any]:
    """(P50, P95) LightGBM boosters of ds.y on ds.x."""
    import lightgbm as lgb

    out = []
    for alpha in (0.5, 0.95):
        params = dict(PARAMS, alpha=alpha, seed=seed)
        data = lgb.Dataset(ds.x, label=ds.y, feature_name=list(forecast.FEATURES), params={"verbose": -1})
        out.append(lgb.train(params, data, num_boost_round=rounds))
    return out[0], out[1]


def band(y: np.ndarray) -> dict[str, float]:
    """The replica's historical error band: the P50 and P95 of relative residuals (0 with none)."""
    if not len(y):
        return {"p50": 0.0, "p95": 0.0}
    q = np.quantile(y, [0.5, 0.95])
    return {"p50": float(q[0]), "p95": float(q[1])}


def metrics(actual: np.ndarray, p50: np.ndarray, p95: np.ndarray) -> dict[str, float | None]:
    """MAE, MAPE %, bias (p50 - actual), P95 coverage (share actual <= p95), worst under-prediction."""
    if not len(actual):
        return {"n": 0, "mae": None, "mape_pct": None, "bias": None, "coverage95": None, "worst_under": None}
    err = p50 - actual
    pos = actual > 0
    return {
        "n": int(len(actual)),
        "mae": float(np.mean(np.abs(err))),
        "mape_pct": float(np.mean(np.abs(err[pos]) / actual[pos]) * 100) if pos.any() else None,
        "bias": float(np.mean(err)),
        "coverage95": float(np.mean(actual <= p95 + 1e-9)),
        "worst_under": float(min(err.min(), 0.0)),
    }


def split(ds: Dataset, held_out: float = HELD_OUT) -> tuple[list[str], list[str]]:
    """(training days, held-out days): the last `held_out` share of the sample days (at least one)."""
    days = sorted(set(ds.day.tolist()))
    n_test = max(1, int(round(len(days) * held_out))) if len(days) > 1 else 0
    return days[: len(days) - n_test], days[len(days) - n_test :]


@dataclass
class Evaluation:
    """Held-out predictions of every method and their comparison."""

    test: Dataset
    pred: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (p50, p95)
    comparison: dict[str, Any] = field(default_factory=dict)
    band: dict[str, float] = field(default_factory=dict)


METHODS = ("forecast", "replica", "replica_band", "persistence")


def fold_indices(ds: Dataset, folds: int = FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, test) entry indices of each walk-forward block of the held-out days: the training
    entries are those whose call was reported before the block's first entry (the gap of the horizon)."""
    train_days, test_days = split(ds)
    if not test_days or not train_days:
        raise InputError(f"the forecast needs at least 2 days of calls; the journals give {len(set(ds.day))}")
    out = []
    for block in np.array_split(np.array(test_days, dtype=object), min(folds, len(test_days))):
        ix = np.flatnonzero(np.isin(ds.day, block))
        out.append((np.flatnonzero(ds.known_t < int(ds.t[ix].min())), ix))
    return out


def walk_forward(
    ds: Dataset, seed: int, model: forecast.LgbmResidual | None = None, folds: int = FOLDS
) -> Evaluation:
    """Forecast the held-out days block by block (see the module docstring); `model` given: that trained
    model for every block instead (the backtest of a stored forecast)."""
    train_days, test_days = split(ds)
    parts: list[np.ndarray] = []
    p50s, p95s, bands50, bands95 = [], [], [], []
    for train_ix, ix in fold_indices(ds, folds):
        train = ds.take(train_ix)
        hist_band = band(train.y)
        test = ds.take(ix)
        if model is not None:
            q50, q95 = _predict(model, test.x)
        else:
            if len(train) < 2 * PARAMS["min_data_in_leaf"]:
                raise InputError(
                    f"the forecast needs more training entries: {len(train)} before {test.day[0]}"
                )
            b50, b95 = fit(train, seed)
            q50, q95 = b50.predict(test.x, num_threads=1), b95.predict(test.x, num_threads=1)
        parts.append(ix)
        p50s.append(q50)
        p95s.append(np.maximum(q95, q50))
        bands50.append(np.full(len(ix), hist_band["p50"]))
        bands95.append(np.full(len(ix), hist_band["p95"]))
    ix = np.concatenate(parts)
    test = ds.take(ix)
    rep = test.replica
    q50, q95 = np.concatenate(p50s), np.concatenate(p95s)
    pers = np.where(np.isfinite(test.persistence), test.persistence, rep)
    pred = {
        "forecast": (rep * (1 + q50), rep * (1 + q95)),
        "replica": (rep, rep),
        "replica_band": (rep * (1 + np.concatenate(bands50)), rep * (1 + np.concatenate(bands95))),
        "persistence": (pers, pers),
    }
    ev = Evaluation(test, pred, band=band(ds.take(np.flatnonzero(ds.known_t < int(test.t.min()))).y))
    ev.comparison = compare(ev, train_days, test_days)
    return ev


def _predict(model: forecast.LgbmResidual, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q50 = np.asarray(model.p50.predict(x, num_threads=1), dtype=np.float64)
    return q50, np.asarray(model.p95.predict(x, num_threads=1), dtype=np.float64)


def compare(ev: Evaluation, train_days: Sequence[str], test_days: Sequence[str]) -> dict[str, Any]:
    """Per horizon and method: metrics; error by lead time; per account; `beats_replica`."""
    test, out = ev.test, {"horizons": {}, "by_lead": {}, "accounts": {}}
    for h, name in enumerate(HORIZONS):
        m = test.horizon == h
        if m.any():
            out["horizons"][name] = {
                meth: metrics(test.actual[m], p50[m], p95[m]) for meth, (p50, p95) in ev.pred.items()
            }
    lead = (test.cycle_t - test.t) / NS
    lo = 0
    for hi in LEAD_BUCKETS_S:
        m = (lead > lo) & (lead <= hi)
        if m.any():
            out["by_lead"][f"{lo}-{hi}" if hi < 10**9 else f"{lo}-"] = {
                meth: metrics(test.actual[m], p50[m], p95[m])["mae"] for meth, (p50, p95) in ev.pred.items()
            }
        lo = hi
    for a in sorted(set(test.account.tolist())):
        m = test.account == a
        out["accounts"][a] = {
            meth: metrics(test.actual[m], p50[m], p95[m]) for meth, (p50, p95) in ev.pred.items()
        }
    beats = {
        h: r["forecast"]["mae"] is not None and r["forecast"]["mae"] < r["replica"]["mae"]
        for h, r in out["horizons"].items()
    }
    out["beats_replica_by_horizon"] = beats
    out["beats_replica"] = bool(beats) and all(beats.values())
    out["train_days"] = [train_days[0], train_days[-1], len(train_days)] if train_days else []
    out["test_days"] = [test_days[0], test_days[-1], len(test_days)]
    out["entries"] = int(len(test))
    return out


def train(ds: Dataset, seed: int) -> tuple[dict[str, Any], Evaluation]:
    """The forecast file's document (deterministic: no clock, sorted keys) and its evaluation."""
    ev = walk_forward(ds, seed)
    b50, b95 = fit(ds, seed)
    doc = {
        "format": forecast.FORMAT,
        "features": list(forecast.FEATURES),
        "models": {"p50": b50.model_to_string(), "p95": b95.model_to_string()},
        "comparison": _round(ev.comparison),
        "beats_replica": bool(ev.comparison["beats_replica"]),
        "band": _round(band(ds.y)),
        "trained": {
            "entries": int(len(ds)),
            "days": [ds.day.min(), ds.day.max(), len(set(ds.day.tolist()))],
            "seed": seed,
            "rounds": ROUNDS,
            "params": PARAMS,
            "held_out": HELD_OUT,
            "folds": FOLDS,
        },
    }
    return doc, ev


def backtest_forecast(ds: Dataset, seed: int, model_file: str | Path | None = None) -> dict[str, Any]:
    """The backtest's forecast section: the held-out comparison of `model_file`'s model (else one trained
    walk-forward on `ds`) and, per account, the series 1 h before each cycle for the band plot."""
    model = forecast.load_any(model_file) if model_file else None
    ev = walk_forward(ds, seed, model)
    test = ev.test
    notes = []
    trained_to = (model.doc.get("trained") or {}).get("days", [None, None])[1] if model else None
    if trained_to and trained_to >= test.day.min():
        notes.append(
            f"the stored model was trained on days up to {trained_to} and the held-out days start "
            f"{test.day.min()}: its figures are in-sample (train it on earlier days, or leave out --forecast "
            "for the walk-forward)"
        )
    p50, p95 = ev.pred["forecast"]
    pick = (test.horizon == 0) & (test.cycle_t - test.t == 3600 * NS)
    series = {}
    for a in sorted(set(test.account[pick].tolist())):
        ix = np.flatnonzero(pick & (test.account == a))
        ix = ix[np.argsort(test.cycle_t[ix], kind="stable")]
        series[a] = {
            "t": test.cycle_t[ix].tolist(),
            "actual": test.actual[ix].tolist(),
            "p50": p50[ix].tolist(),
            "p95": p95[ix].tolist(),
            "replica": test.replica[ix].tolist(),
        }
    return {
        "model": model.id if model else f"trained walk-forward here (seed {seed})",
        "comparison": ev.comparison,
        "band": ev.band,
        "series": series,
        "notes": notes,
    }


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 10) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def dumps(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def table(comparison: Mapping[str, Any]) -> str:
    """The comparison printed: per horizon and method, MAE, MAPE, P95 coverage."""
    lines = [f"{'horizon':<8} {'method':<13} {'entries':>8} {'MAE':>12} {'MAPE%':>7} {'P95 cov':>8}"]
    for h, rows in comparison["horizons"].items():
        for meth in METHODS:
            r = rows[meth]
            mape = f"{r['mape_pct']:.2f}" if r["mape_pct"] is not None else "-"
            lines.append(
                f"{h:<8} {meth:<13} {r['n']:>8} {r['mae']:>12,.0f} {mape:>7} {r['coverage95'] * 100:>7.1f}%"
            )
    verdict = (
        "the forecast beat replica-alone on MAE at every horizon"
        if comparison["beats_replica"]
        else "the forecast did NOT beat replica-alone on MAE at every horizon "
        f"({', '.join(h for h, b in comparison['beats_replica_by_horizon'].items() if not b)}): "
        "calc will use the replica with its error band"
    )
    return "\n".join([*lines, verdict])


# ------------------------------------------------------------------------------ the command
def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marginflow forecast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="fit the forecast on journals and calls; print the comparison")
    tr.add_argument("--config")
    tr.add_argument("--journal", help="journal root (default: tickerplant.journal_dir from config)")
    tr.add_argument("--calls", help="actual calls CSV (instead of the journal's call table)")
    tr.add_argument("--hdb", help="HDB folder: its `call` partitions (instead of the journal's call table)")
    tr.add_argument("--out", required=True, help="the forecast file to write (JSON)")
    tr.add_argument("--seed", type=int, default=7)
    tr.add_argument("--from", dest="start")
    tr.add_argument("--to", dest="end")
    args = ap.parse_args(list(argv))
    cfg = configuration.load(args.config)
    root = Path(args.journal or cfg.tickerplant.journal_dir)
    t0 = time.perf_counter()
    try:
        if not root.is_dir():
            raise InputError(f"--journal: {root} is not a folder")
        if args.hdb:
            calls, issues = calls_from_hdb(args.hdb)
        else:
            calls, issues = accuracy.read_calls(root, args.calls)
        if not calls:
            raise InputError(f"no actual calls: {root} has no call table and no --calls / --hdb was given")
        from calc.warm import warm_up

        warm_up()
        ds, rp, col_issues = collect(root, cfg.calc, calls, args.start, args.end)
        doc, _ = train(ds, args.seed)
    except InputError as e:
        print(f"forecast train: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dumps(doc)
    out.write_bytes(data)
    for line in (issues + col_issues + rp.issues)[:10]:
        print(f"  - {line}", file=sys.stderr)
    print(
        f"trained on {doc['trained']['entries']:,} entries, {doc['trained']['days'][2]} days "
        f"({rp.events:,} events replayed) in {time.perf_counter() - t0:.1f} s"
    )
    print(table(doc["comparison"]))
    print(f"wrote {out} (id lgbm:{hashlib.sha256(data).hexdigest()[:10]})")
    return 0


def calls_from_hdb(hdb: str | Path) -> tuple[list[accuracy.ActualCall], list[str]]:
    """The HDB's `call` partitions (<hdb>/call/date=<YYYY-MM-DD>/*.parquet, rdb/hdb.py's layout)."""
    import pyarrow.parquet as pq

    calls: list[accuracy.ActualCall] = []
    issues: list[str] = []
    for p in sorted(Path(hdb).glob("call/date=*/*.parquet")):
        try:
            t = pq.read_table(p)
        except Exception as e:  # a bad parquet file is an issue line
            issues.append(f"{p}: {e}")
            continue
        cols = t.to_pydict()
        times = t.column("time").cast("int64").to_pylist()
        for i, a in enumerate(cols["account"]):
            calls.append(
                accuracy.ActualCall(
                    dt.date.fromisoformat(str(cols["business_date"][i])),
                    a,
                    float(cols["requirement"][i]),
                    cols["ccp"][i],
                    int(times[i]),
                    int(cols["seq"][i]) if "seq" in cols else i,
                    cols["cycle"][i],
                )
            )
    return calls, issues
