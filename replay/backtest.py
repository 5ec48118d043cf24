"""`marginflow backtest`: replay journals through the streaming margin engine at full speed, compare each
account's predicted margin path with the CCP's actual calls, run VaR coverage tests, write JSON + HTML.

The replay is the live service's path: MarginEngine fed by calc.events.apply_batch in seq order, one
`changed_rows()` after each journal batch (calc with publish_interval_ms = 0 while it keeps up; when it
lags it publishes once for the batches waiting, with the same margins at each row's seq; `--publish-ms N`
conflates on the journal's clock). Risk parameters are those in force on each date: the price history up
to the previous close, as if the history file were reloaded each morning (`--params asof`, the default),
or the configured history as the live service loads it (`--params config`); a journaled `param` event
triggers a full recompute, as in calc.

    marginflow backtest --journal var/demo-history/journal --actual var/demo-history/actual_calls.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from calc.engine import MarginEngine, option_inputs
from calc.events import INPUT_TABLES, OUTPUT_TABLES, apply_batch
from calc.history import InputError, PriceHistory, load_prices
from calc.inputs import Positions, load_accounts, load_positions, params_from_config
from calc.models import BUILTIN_MODELS, RiskParams
from calc.warm import warm_up
from marginflow import config as configuration
from replay import accuracy, coverage, report
from tickerplant import journal
from tickerplant import journal_reader as reader

PATH_COLUMNS = ("date", "time", "account", "model", "margin", "var", "es", "stress", "last_seq", "param_id")


# ------------------------------------------------------------------------------ the engine per day
def params_as_of(calc: Any, history: PriceHistory, date: str) -> RiskParams:
    """Risk parameters in force on `date`: the configured model settings on the history before `date`,
    named like MarginEngine.from_config names them."""
    cut = int(np.searchsorted(history.dates, np.datetime64(date, "D"), side="left"))
    h = (
        PriceHistory(history.dates[:cut], history.syms, history.closes[:cut])
        if cut < len(history.dates)
        else history
    )
    if len(h.dates) < 2:
        raise InputError(
            f"{date}: the price history {Path(calc.history_file).name} has no closes before this date"
        )
    return params_from_config(calc, h)


def engine_as_of(
    calc: Any, history: PriceHistory, date: str, accounts: Collection[str] | None = None
) -> MarginEngine:
    """The engine calc would start on `date`: configured accounts (those of `accounts` only, if given) and
    start-of-day positions, parameters as of `date`, prices = the last close before it. For a date after
    the history's end this is exactly MarginEngine.from_config(calc)."""
    params = params_as_of(calc, history, date)
    cut = int(np.searchsorted(history.dates, np.datetime64(date, "D"), side="left"))
    prices = dict(zip(history.syms, history.closes[cut - 1].tolist(), strict=True))
    specs = load_accounts(calc.accounts_file, calc.default_policy)
    positions = load_positions(calc.positions_file)
    if accounts is not None:
        specs = {a: s for a, s in specs.items() if a in accounts}
        keep = [i for i, a in enumerate(positions.account) if a in specs]
        positions = Positions(
            [positions.account[i] for i in keep],
            [positions.sym[i] for i in keep],
            positions.qty[keep],
            positions.multiplier,
            positions.price,
        )
    return MarginEngine(
        params,
        specs,
        positions,
        prices=prices,
        calc_config=calc,
        **option_inputs(calc, history.dates[cut - 1]),
    )


# ------------------------------------------------------------------------------------ the replay
@dataclass
class DayState:
    """An account-by-instrument picture at the start of a day and the prices at its end."""

    date: str
    var: np.ndarray  # (A,) VaR standing at the start of the day
    margin: np.ndarray  # (A,) margin standing at the start of the day
    exposure: np.ndarray  # (A, N) dollar exposures at the start of the day
    price_start: np.ndarray  # (N,)
    price_end: np.ndarray  # (N,)
    mult: np.ndarray  # (N,)


@dataclass
class Replay:
    """What the replay produced: margin rows (as calc would have published them), day states, counts."""

    accounts: list[str]
    syms: list[str]
    dates: list[str] = field(default_factory=list)
    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in PATH_COLUMNS})
    days: list[DayState] = field(default_factory=list)
    events: int = 0
    batches: int = 0
    seconds: float = 0.0
    alerts: Counter = field(default_factory=Counter)  # (rule, state) -> count
    params: list[str] = field(default_factory=list)  # param ids in force, in order
    models: dict[str, str] = field(default_factory=dict)  # account -> margin model
    calc: Any = field(default=None, repr=False)  # the [calc] config (param events read stored files by it)
    param_events: list[str] = field(default_factory=list)
    rejected: int = 0
    issues: list[str] = field(default_factory=list)
    options: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per instrument: an option
    tap: Callable[[Any, int], None] | None = field(default=None, repr=False)  # sees each margin publish

    def predicted(self, column: str = "margin") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{account: (times_ns, values)}: each account's predicted path."""
        acc = np.array(self.rows["account"], dtype=object)
        t = np.array(self.rows["time"], dtype=np.int64)
        v = np.array(self.rows[column], dtype=np.float64)
        return {a: (t[acc == a], v[acc == a]) for a in self.accounts}

    def table(self) -> pa.Table:
        cols = dict(self.rows)
        cols["time"] = pa.array(np.array(cols["time"], dtype=np.int64), pa.timestamp("ns"))
        return pa.table(cols)


class Progress:
    """One self-overwriting stderr line with the event rate, refreshed at most every `every` seconds."""

    def __init__(self, stream: TextIO | None, every: float = 0.25):
        self.stream = stream
        self.every = every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, date: str, events: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.stream is None or (not force and now - self.last < self.every):
            return
        self.last = now
        rate = events / max(now - self.t0, 1e-9)
        self.stream.write(f"\rbacktest {date}  {events:>12,} events  {rate:>11,.0f} events/s")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _issue_once(issues: list[str], seen: set[str], key: str, line: str) -> None:
    if key not in seen:
        seen.add(key)
        issues.append(line)


def replay(
    root: str | Path,
    calc: Any,
    start: str | None = None,
    end: str | None = None,
    params: str = "asof",
    progress: Callable[..., None] | None = None,
    publish_ms: float = 0.0,
    tap: Callable[[Any, int], None] | None = None,
    accounts: Collection[str] | None = None,
) -> Replay:
    """Replay the journal days start..end (inclusive) through the engine; see the module docstring and
        _replay_day for `publish_ms`. `tap(margin_rows, time_ns)` sees each publish (the forecast's replay,
        replay/forecast_train.py); `accounts`: only these accounts (params "asof"; their fills, the others'
    are rejected). Bad journal content becomes `issues` lines; a config the engine refuses
        raises InputError."""
    root = Path(root)
    dates = [d for d in journal.journal_dates(root) if (not start or d >= start) and (not end or d <= end)]
    history = load_prices(calc.history_file)
    eng: MarginEngine | None = None
    out: Replay | None = None
    seen: set[str] = set()
    t0 = time.perf_counter()
    for date in dates:
        midnight = int(np.datetime64(date, "ns").astype(np.int64))
        if eng is None:
            eng = (
                engine_as_of(calc, history, date, accounts)
                if params == "asof"
                else MarginEngine.from_config(calc)
            )
            out = Replay(
                list(eng.accounts),
                list(eng.syms),
                models={sp.account: sp.model for sp in eng.specs},
                calc=calc,
                options=eng.st.orow >= 0,
                tap=tap,
            )
            out.params.append(eng.param_id)
        elif params == "asof":
            p = params_as_of(calc, history, date)
            if p.param_id != eng.param_id:
                eng.set_params(p)
                out.params.append(p.param_id)  # type: ignore[union-attr]
        assert out is not None
        returns = eng.st.rt.shape[1]  # the scenarios in force
        if (
            params == "asof"
            and 0 < calc.lookback_days
            and returns + calc.horizon_days - 1 < calc.lookback_days
        ):
            _issue_once(
                out.issues,
                seen,
                "short",
                f"{date}: risk parameters from {returns} returns, fewer than "
                f"calc.lookback_days = {calc.lookback_days} (the price history starts {history.dates[0]})",
            )
        out.dates.append(date)
        _record(out, eng, date, midnight)
        snap = eng.snapshot()
        full = eng.compute_full()
        price_start = eng.st.price.copy()
        day = journal.day_files(root, date)
        files = {t: p for t, p in day.items() if t in INPUT_TABLES}
        for t in day:
            if t not in INPUT_TABLES and t not in OUTPUT_TABLES and t != "call":  # calls: read_calls
                _issue_once(
                    out.issues, seen, f"table:{t}", f"{date}: table {t!r} is not an input of calc; ignored"
                )
        for p in files.values():
            s = journal.scan(p)
            if s.error:
                out.issues.append(f"{date}: {p.name}: {s.error}; replayed the {s.rows:,} rows before it")
        _replay_day(out, eng, date, reader.read_files(files), publish_ms, progress)
        out.days.append(
            DayState(
                date,
                np.array(snap["var"]),
                np.array(snap["margin"]),
                full["exposure"],
                price_start,
                eng.st.price.copy(),
                eng.st.mult.copy(),
            )
        )
        if progress is not None:
            progress(date, out.events, force=True)
    if out is None:
        out = Replay([], [])
        out.issues.append(
            f"{root}: no journal dates" + (f" in {start or '...'}..{end or '...'}" if start or end else "")
        )
        return out
    out.seconds = time.perf_counter() - t0
    assert eng is not None
    out.rejected = eng.rejected
    if eng.rejected:
        shown = "; ".join(list(eng.rejects)[:5])
        out.issues.append(f"{eng.rejected:,} event row(s) rejected by the engine (first: {shown})")
    return out


def _apply(out: Replay, eng: MarginEngine, date: str, table: str, batches: list[pa.RecordBatch]) -> bool:
    """Apply one batch (or a run of one table's batches, concatenated) as calc.server does
    (calc.events.apply_batch); a batch the engine cannot take, or a param event that cannot be applied
    (the previous file stays in force, as in live calc), becomes an issue line. Returns whether anything
    was applied."""
    batch = batches[0] if len(batches) == 1 else pa.concat_batches(batches)
    try:
        results = apply_batch(eng, table, batch, out.calc)
    except (KeyError, ValueError, TypeError, pa.ArrowException) as e:
        seq = batch.column("seq") if "seq" in batch.schema.names else None
        where = f"seq {seq[0]}..{seq[-1]}" if seq is not None and len(seq) else f"batch {out.batches}"
        out.issues.append(f"{date}: {table} {where}: batch skipped, {type(e).__name__}: {e}")
        return False
    for r in results:
        out.param_events.append(f"{date} {r.row['kind']} {r.row['file_id']}")
        if not r.applied:
            out.issues.append(
                f"{date}: param seq {r.row['seq']} ({r.row['file_id']}) not applied: {r.message}"
            )
    return True


def _last_time(batch: pa.RecordBatch) -> int:
    t = batch.column("time")
    return int(t[len(t) - 1].value)


def _replay_day(
    out: Replay,
    eng: MarginEngine,
    date: str,
    items: Iterable[tuple[str, pa.RecordBatch]],
    publish_ms: float,
    progress: Callable[..., None] | None,
) -> None:
    """publish_ms 0: margin rows after every batch (calc with publish_interval_ms = 0). publish_ms > 0:
    after the last batch of each publish_ms window of journal time (calc's timer, on the journal's clock);
    consecutive batches of one table within a window are applied as one (the engine queues events until
    its next refresh, so the rows are the same)."""
    if publish_ms <= 0:
        for table, batch in items:
            out.batches += 1
            out.events += batch.num_rows
            if _apply(out, eng, date, table, [batch]):
                _record(out, eng, date, _last_time(batch))
            if progress is not None and not out.batches & 255:
                progress(date, out.events)
        return
    width = int(publish_ms * 1_000_000)
    run: list[pa.RecordBatch] = []
    run_table, window, last_t, dirty = "", -1, 0, False
    for table, batch in items:
        out.batches += 1
        out.events += batch.num_rows
        w = _last_time(batch) // width
        if run and (table != run_table or w != window or table == "param"):
            dirty |= _apply(out, eng, date, run_table, run)
            run = []
        if dirty and w != window:
            _record(out, eng, date, last_t)
            dirty = False
        run.append(batch)
        run_table, window, last_t = table, w, _last_time(batch)
        if progress is not None and not out.batches & 255:
            progress(date, out.events)
    if run:
        dirty |= _apply(out, eng, date, run_table, run)
    if dirty:
        _record(out, eng, date, last_t)


def _record(out: Replay, eng: MarginEngine, date: str, t: int) -> None:
    rows = eng.changed_rows(drivers=False)  # the path keeps the numbers, not the drivers
    n = len(rows["account"])
    alerts = eng.take_alerts()
    for rule, state in zip(alerts["rule"], alerts["state"], strict=True):
        out.alerts[(rule, state)] += 1
    if not n:
        return
    if out.tap is not None:
        out.tap(rows, t)
    r = out.rows
    r["date"] += [date] * n
    r["time"] += [t] * n
    for c in PATH_COLUMNS[2:]:
        r[c] += rows[c]


# ------------------------------------------------------------------------------------- coverage
def coverage_input(rp: Replay, on: str = "var") -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """{account: (dates, pnl, predicted)}: for each day, the hypothetical P&L of the start-of-day portfolio
    from the day's start prices to its end prices (replay.coverage.hypothetical_pnl) against the VaR (or
    margin) standing at the start of the day."""
    out: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    if not rp.days:
        return out
    dates = [d.date for d in rp.days]
    for a, name in enumerate(rp.accounts):
        if rp.models.get(name, "var") not in BUILTIN_MODELS:
            rp.issues.append(
                f"coverage: account {name!r} (model {rp.models[name]}) left out: its contracts have "
                f"no realised prices in the journal to value the start-of-day portfolio"
            )
            continue
        if len(rp.options) and any((d.exposure[a, rp.options] != 0).any() for d in rp.days):
            rp.issues.append(
                f"coverage: account {name!r} left out: it holds options, whose day P&L needs a full "
                "revaluation the coverage test does not do yet"
            )
            continue
        pnl = np.zeros(len(rp.days))
        for i, d in enumerate(rp.days):
            held = d.exposure[a] != 0
            if not held.any():
                continue
            unit = d.price_start[held] * d.mult[held]
            q = (d.exposure[a, held] / unit)[None, :]
            px = np.vstack([d.price_start[held], d.price_end[held]])
            try:
                pnl[i] = coverage.hypothetical_pnl(q, px, d.mult[held])[0]
            except ValueError as e:
                pnl[i] = math.nan  # coverage() drops the day with a line
                rp.issues.append(f"coverage: account {name!r} {d.date}: {e}")
        pred = np.array([(d.var if on == "var" else d.margin)[a] for d in rp.days])
        out[name] = (dates, pnl, pred)
    return out


# --------------------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    h, m = divmod(int(round(s)) // 60, 60)
    return f"{h}h{m:02d}m"


def summary(rp: Replay, acc: accuracy.AccuracyResult | None, cov: coverage.CoverageResult | None) -> str:
    """The short table printed at the end: accuracy and coverage per account and overall."""
    head = [
        "account",
        "calls",
        "MAE",
        "MAPE%",
        "bias",
        "worst under",
        "hit%",
        "lead",
        "days",
        "exc",
        "Kupiec p",
        "CC p",
        "zone",
    ]
    lines = []
    names = [*rp.accounts, "all"]
    for name in names:
        m = (acc.overall if name == "all" else acc.accounts.get(name)) if acc else None
        c = (cov.pooled if name == "all" else cov.accounts.get(name)) if cov else None
        worst = m.worst_under["shortfall"] if m is not None and m.worst_under else None
        lines.append(
            [
                name,
                _fmt(m.calls if m else None, "d"),
                _fmt(m.mae if m else None),
                _fmt(m.mape_pct if m else None, ".2f"),
                _fmt(m.bias if m else None, "+,.0f"),
                _fmt(worst),
                _fmt(m.hit_rate * 100 if m and m.hit_rate is not None else None, ".0f"),
                _dur(m.lead_time_median_s if m else None),
                _fmt(c.days if c else None, "d"),
                _fmt(c.exceptions if c else None, "d"),
                _fmt(c.kupiec.p_value if c else None, ".3f"),
                _fmt(c.conditional.p_value if c else None, ".3f"),
                c.traffic_light.zone if c else "-",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(head), *map(fmt, lines)])


@dataclass
class Outcome:
    """A finished backtest: the replay, the comparisons, the report's meta and issue lines, its files."""

    replay: Replay
    accuracy: accuracy.AccuracyResult | None
    coverage: coverage.CoverageResult | None
    meta: dict[str, Any]
    issues: list[str]
    paths: tuple[Path, Path] | None
    forecast: dict[str, Any] | None = None


def run(
    root: str | Path,
    calc: Any,
    *,
    start: str | None = None,
    end: str | None = None,
    actual: str | Path | None = None,
    out_dir: str | Path | None = None,
    params: str = "asof",
    coverage_on: str = "var",
    tolerance: float = 0.05,
    progress: TextIO | None = None,
    publish_ms: float = 0.0,
    forecast_file: str | Path | None = None,
    seed: int = 7,
) -> Outcome:
    """Replay, compare with the actual calls (the journal's call table and `actual`), test coverage,
    forecast the calls (replay/forecast_train.py: `forecast_file`'s model, else one trained walk-forward
    here), write the report (when out_dir is given)."""
    from replay import forecast_train

    bar = Progress(progress)
    dates = [d for d in journal.journal_dates(root) if (not start or d >= start) and (not end or d <= end)]
    calls, read_issues = accuracy.read_calls(root, actual, dates)
    collector = None
    if calls and calc.ccps:
        collector = forecast_train.Collector(
            calc,
            load_accounts(calc.accounts_file, calc.default_policy),
            load_prices(calc.history_file),
            calls,
        )
    rp = replay(root, calc, start, end, params, bar, publish_ms, tap=collector)
    if progress is not None and rp.events:
        bar.done()
    predicted = rp.predicted("margin")
    acc = None
    issues: list[str] = list(rp.issues)
    if actual is not None or calls:
        issues += read_issues
        acc = accuracy.compare(predicted, accuracy.end_of_day(calls), tolerance, dates=rp.dates or None)
    fc = None
    if collector is not None:
        try:
            fc = forecast_train.backtest_forecast(collector.dataset(), seed, forecast_file)
            issues += [f"forecast: {n}" for n in fc["notes"]]
        except InputError as e:
            issues.append(f"forecast: {e}")
        issues += [f"forecast: {i}" for i in collector.issues[:20]]
    cov = None
    if rp.days:
        p = 1.0 - calc.confidence
        if calc.horizon_days != 1:
            issues.append(
                f"coverage: next-day P&L compared with a {calc.horizon_days}-day VaR (calc.horizon_days); "
                f"expect fewer exceptions than {p:.2%}"
            )
        cov = coverage.coverage(coverage_input(rp, coverage_on), p)
    meta = {
        "journal": str(root),
        "dates": rp.dates,
        "from": rp.dates[0] if rp.dates else None,
        "to": rp.dates[-1] if rp.dates else None,
        "actual_calls": str(actual) if actual else None,
        "events": rp.events,
        "batches": rp.batches,
        "seconds": rp.seconds,
        "events_per_s": rp.events / rp.seconds if rp.seconds else None,
        "accounts": rp.accounts,
        "params_mode": params,
        "params": rp.params,
        "param_events": rp.param_events,
        "coverage_on": coverage_on,
        "confidence": calc.confidence,
        "horizon_days": calc.horizon_days,
        "lookback_days": calc.lookback_days,
        "conflation": (
            f"changed_rows per {publish_ms:g} ms of journal time"
            if publish_ms > 0
            else "changed_rows after every journal batch"
        ),
        "rejected_events": rp.rejected,
        "margin_rows": len(rp.rows["account"]),
        "alerts": {f"{rule} {state}": n for (rule, state), n in sorted(rp.alerts.items())},
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    paths = None
    if out_dir is not None:
        paths = report.write_report(
            out_dir, accuracy=acc, coverage=cov, predicted=predicted, meta=meta, issues=issues, forecast=fc
        )
        if rp.rows["account"]:
            pq.write_table(rp.table(), Path(out_dir) / "predicted_margin.parquet")
    all_issues = issues + (acc.issues if acc else []) + (cov.issues if cov else [])
    return Outcome(rp, acc, cov, meta, all_issues, paths, fc)


def _date_arg(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise InputError(f"{name}: {text!r} is not a date YYYY-MM-DD") from None


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marginflow backtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config")
    ap.add_argument("--journal", help="journal root (default: tickerplant.journal_dir from config)")
    ap.add_argument("--from", dest="start", help="first date YYYY-MM-DD (default: the journal's first)")
    ap.add_argument("--to", dest="end", help="last date YYYY-MM-DD (default: the journal's last)")
    ap.add_argument(
        "--actual",
        help="actual calls CSV: date,account,amount[,ccp,time,cycle,...] (default: the journal's call table)",
    )
    ap.add_argument("--out", default="var/backtest", help="report folder (default var/backtest)")
    ap.add_argument(
        "--params",
        choices=("asof", "config"),
        default="asof",
        help="asof: history up to each date's previous close (default); config: as the live service",
    )
    ap.add_argument(
        "--coverage-on",
        choices=("var", "margin"),
        default="var",
        help="the predicted number the next-day P&L is tested against (default var)",
    )
    ap.add_argument(
        "--tolerance", type=float, default=0.05, help="band for hit rate and lead time (default 0.05)"
    )
    ap.add_argument(
        "--publish-ms",
        type=float,
        default=0.0,
        help="margin rows per this many ms of journal time (calc's publish_interval_ms on the journal's "
        "clock); default 0 = after every journal batch, as calc with publish_interval_ms = 0",
    )
    ap.add_argument(
        "--forecast",
        help="a trained forecast file (marginflow forecast train) to test on the held-out days; default: "
        "one trained walk-forward on these journals",
    )
    ap.add_argument("--seed", type=int, default=7, help="the walk-forward forecast's seed (default 7)")
    ap.add_argument(
        "--progress", action="store_true", help="show the progress line even when stderr is not a tty"
    )
    args = ap.parse_args(list(argv))
    cfg = configuration.load(args.config)
    root = Path(args.journal or cfg.tickerplant.journal_dir)
    try:
        start, end = _date_arg(args.start, "--from"), _date_arg(args.end, "--to")
        if start and end and start > end:
            raise InputError(f"--from {start} is after --to {end}")
        if not (math.isfinite(args.publish_ms) and args.publish_ms >= 0):
            raise InputError(f"--publish-ms: must be a number >= 0, got {args.publish_ms}")
        if not (0 <= args.tolerance < 1):
            raise InputError(f"--tolerance: must be in [0, 1), got {args.tolerance}")
        if not root.is_dir():
            raise InputError(f"--journal: {root} is not a folder")
        if not journal.journal_dates(root):
            raise InputError(f"--journal: {root} has no <YYYY-MM-DD> journal folders")
        warm_up()
        stream = sys.stderr if (args.progress or sys.stderr.isatty()) else None
        res = run(
            root,
            cfg.calc,
            start=start,
            end=end,
            actual=args.actual,
            out_dir=args.out,
            params=args.params,
            coverage_on=args.coverage_on,
            tolerance=args.tolerance,
            progress=stream,
            publish_ms=args.publish_ms,
            forecast_file=args.forecast,
            seed=args.seed,
        )
    except InputError as e:
        print(f"backtest: {e}", file=sys.stderr)
        return 2
    rp, meta, issues = res.replay, res.meta, res.issues
    if not rp.dates:
        print(f"backtest: {rp.issues[0] if rp.issues else 'nothing to replay'}", file=sys.stderr)
        return 2
    rate = f"{meta['events_per_s']:,.0f}" if meta["events_per_s"] else "-"
    print(
        f"backtest {rp.dates[0]}..{rp.dates[-1]}: {len(rp.dates)} days, "
        f"{rp.events:,} events in {rp.seconds:.2f} s "
        f"({rate} events/s), {len(rp.rows['account']):,} margin rows, {len(rp.accounts)} accounts"
    )
    print(summary(rp, res.accuracy, res.coverage))
    if res.forecast is not None:
        from replay import forecast_train

        print(f"forecast of the call, held-out days ({res.forecast['model']}):")
        print(forecast_train.table(res.forecast["comparison"]))
    if issues:
        print(f"{len(issues)} issue(s):")
        for line in issues[:20]:
            print(f"  - {line}")
        if len(issues) > 20:
            print(f"  ... {len(issues) - 20} more in the report")
    if res.paths:
        print(f"report: {res.paths[0]}  {res.paths[1]}")
    return 0
