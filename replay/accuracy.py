"""Predicted margin paths vs the CCP's actual calls: read the actual-calls CSV, compare, and measure errors.

Bad input (unknown accounts, dates outside the backtest, bad numbers, missing columns) becomes report lines
in `issues`, never an exception.

API:
- `read_actual_calls(path) -> (list[ActualCall], issues)`;
  `parse_actual_calls(text, name) -> (calls, issues)`.
  CSV with a header row; required columns `date,account,amount`, optional `ccp,time` (any order, any case).
  `date`: YYYY-MM-DD, YYYYMMDD or YYYY.MM.DD (the business date the call is for). `amount`: a finite
  number >= 0. `time`: when the CCP issued the number, UTC: either a time of day on `date`
  (HH:MM[:SS[.fraction]]) or a full ISO 8601 timestamp (`2024-01-03T07:30:00Z`; an offset is converted
  to UTC), for calls issued the next morning. Without `time` the call is taken at the end of `date`
  (23:59:59.999999999 UTC): the prediction compared is the one standing at the close. A `.gz` file is
  read through gzip. Rows with a bad field are skipped with a line naming the row, the field and why.
- `compare(predicted, actual, tolerance=0.05, dates=None) -> AccuracyResult`.
  `predicted`: {account: path}, a path being either a sequence of (time_ns, margin) pairs or a pair of
  numpy arrays (times_ns, margins); times are UTC nanoseconds. An account's predicted margin at time t
  is the value of its last point at or before t (a step function). `dates`: the backtest's business
  dates (ISO strings or datetime.date); by default the UTC dates on which any path has a point.
- `paths_from_margin_batches(batches, column="margin")`: the `predicted` dict from `margin` table
  record batches (as tickerplant/journal_reader.py yields them).
- `AccuracyResult.to_dict()` is JSON-ready.

Metrics, per account and overall (all compared calls pooled), with error = predicted - actual:
- `mae`: mean |error|. `mape_pct`: mean |error| / actual * 100 over calls with actual > 0 (calls with a
  zero amount are left out of it). `bias`: mean error (> 0: over-prediction, the conservative side);
  `bias_pct` likewise over calls with actual > 0. `rmse`: root mean squared error.
- `worst_under`: the call with the largest shortfall actual - predicted > 0 (None if there is none).
- `hit_rate`: share of calls whose prediction at the call time is within the tolerance band
  |predicted - actual| <= tolerance * actual.
- Lead time of one call (amount A issued at t_c): if the prediction at t_c is outside the band, the call
  is a miss and has no lead time. Otherwise let t_s be the time of the earliest path point such that it
  and every later point up to t_c are inside the band (the start of the final uninterrupted in-band
  stretch); lead time = t_c - t_s, in seconds. If the path is inside the band from its first point,
  t_s is that point and the lead time is marked `censored` (the true lead is at least that long).
  Per account: `lead_time_median_s`, `lead_time_mean_s`, `lead_time_min_s` over hits.

Issue lines: unknown account (calls skipped, with line numbers), call date not in the backtest (skipped,
per date), no prediction at or before the call time, backtest dates with predictions but no call for an
account, duplicate calls (the later row is skipped), several CCPs for one account and date (summed,
since the prediction is per account), non-finite predicted points (dropped).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

DAY_NS = 86_400_000_000_000
END_OF_DAY_NS = DAY_NS - 1  # default call time within its date: the prediction standing at the close
REQUIRED_COLUMNS = ("date", "account", "amount")
OPTIONAL_COLUMNS = ("ccp", "time", "cycle", "requirement", "collateral", "call")  # the `call` table's
EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class ActualCall:
    """One official margin requirement: for `account` on business `date`, issued at `time_ns` (UTC)."""

    date: dt.date
    account: str
    amount: float
    ccp: str = ""
    time_ns: int | None = None  # None: the end of `date` (see END_OF_DAY_NS)
    line: int = 0  # line in the source file (0: not from a file)
    cycle: str = ""  # the CCP's cycle ("" = one call a day)

    def call_time_ns(self, default_offset_ns: int = END_OF_DAY_NS) -> int:
        if self.time_ns is not None:
            return self.time_ns
        return (self.date - EPOCH).days * DAY_NS + default_offset_ns


# ------------------------------------------------------------------------------------- reading
_DATE_FORMATS = (
    re.compile(r"^(\d{4})-(\d{2})-(\d{2})$"),
    re.compile(r"^(\d{4})(\d{2})(\d{2})$"),
    re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$"),
)
_TIME_OF_DAY = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?$")
_TIMESTAMP = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{1,2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)\s*(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_date(text: str) -> dt.date:
    """A business date from YYYY-MM-DD, YYYYMMDD or YYYY.MM.DD (ValueError with the reason otherwise)."""
    s = text.strip()
    for rx in _DATE_FORMATS:
        m = rx.match(s)
        if m:
            y, mo, d = (int(g) for g in m.groups())
            try:
                return dt.date(y, mo, d)
            except ValueError as e:
                raise ValueError(f"{s!r} is not a valid date ({e})") from None
    raise ValueError(f"{s!r} is not a date (expected YYYY-MM-DD, YYYYMMDD or YYYY.MM.DD)")


def _time_of_day_ns(s: str) -> int:
    m = _TIME_OF_DAY.match(s)
    if not m:
        raise ValueError(f"{s!r} is not a time (expected HH:MM[:SS[.fraction]])")
    h, mi = int(m.group(1)), int(m.group(2))
    sec = int(m.group(3) or 0)
    frac = int((m.group(4) or "0").ljust(9, "0"))
    if h > 23 or mi > 59 or sec > 59:
        raise ValueError(f"{s!r} is not a valid time of day")
    return ((h * 60 + mi) * 60 + sec) * 1_000_000_000 + frac


def parse_call_time(text: str, date: dt.date) -> int:
    """UTC nanoseconds of a `time` field: a time of day on `date`, or a full ISO 8601 timestamp."""
    s = text.strip()
    m = _TIMESTAMP.match(s)
    if m:
        day = parse_date(m.group(1))
        ns = (day - EPOCH).days * DAY_NS + _time_of_day_ns(m.group(2))
        tz = m.group(3)
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            digits = tz[1:].replace(":", "")
            offset = (int(digits[:2]) * 60 + int(digits[2:])) * 60 * 1_000_000_000
            ns -= sign * offset
        return ns
    if _TIME_OF_DAY.match(s):
        return (date - EPOCH).days * DAY_NS + _time_of_day_ns(s)
    raise ValueError(f"{s!r} is not a time (expected HH:MM[:SS[.fraction]] or an ISO 8601 timestamp)")


def _parse_amount(s: str) -> float:
    t = s.strip()
    if not t:
        raise ValueError("is missing")
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"{t!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{t!r} is not a finite number")
    if v < 0:
        raise ValueError(f"{t!r} is negative: a margin requirement is >= 0")
    return v


def parse_actual_calls(text: str, name: str = "actual calls") -> tuple[list[ActualCall], list[str]]:
    """Calls and issue lines from CSV text (see the module docstring for the format)."""
    issues: list[str] = []
    calls: list[ActualCall] = []
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [
        (i + 1, ln)
        for i, ln in enumerate(text.splitlines())
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if not lines:
        return [], [
            f"{name}: the file is empty (expected a header with columns {', '.join(REQUIRED_COLUMNS)})"
        ]
    rows = csv.reader([ln for _, ln in lines])
    try:
        header = [h.strip().lower() for h in next(rows)]
    except csv.Error as e:
        return [], [f"{name} line {lines[0][0]}: header is not valid CSV ({e})"]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        issues.append(
            f"{name} line {lines[0][0]}: column(s) {', '.join(dup)} appear more than once; the first is used"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        return [], issues + [
            f"{name} line {lines[0][0]}: missing required column(s) {', '.join(missing)} "
            f"(header has: {', '.join(header) or 'nothing'}; required: {', '.join(REQUIRED_COLUMNS)}, "
            f"optional: {', '.join(OPTIONAL_COLUMNS)})"
        ]
    extra = [h for h in header if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        issues.append(f"{name} line {lines[0][0]}: column(s) {', '.join(extra)} are not used")
    col = {h: header.index(h) for h in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if h in header}
    seen: dict[tuple[dt.date, str, str, str], int] = {}
    k = 1
    while True:
        try:
            fields = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            issues.append(f"{name} line {lines[k][0]}: row skipped, not valid CSV ({e})")
            k += 1
            continue
        lineno = lines[k][0]
        k += 1
        where = f"{name} line {lineno}"
        if len(fields) != len(header):
            issues.append(
                f"{where}: row skipped, it has {len(fields)} fields but the header has {len(header)}"
            )
            continue
        errs: list[str] = []
        date = None
        dtext = fields[col["date"]].strip()
        if not dtext:
            errs.append("date is missing")
        else:
            try:
                date = parse_date(dtext)
            except ValueError as e:
                errs.append(f"date {e}")
        account = fields[col["account"]].strip()
        if not account:
            errs.append("account is missing")
        amount = None
        try:
            amount = _parse_amount(fields[col["amount"]])
        except ValueError as e:
            errs.append(f"amount {e}")
        ccp = fields[col["ccp"]].strip() if "ccp" in col else ""
        cycle = fields[col["cycle"]].strip() if "cycle" in col else ""
        time_ns = None
        ttext = fields[col["time"]].strip() if "time" in col else ""
        if ttext and date is not None:
            try:
                time_ns = parse_call_time(ttext, date)
            except ValueError as e:
                errs.append(f"time {e}")
        if errs:
            issues.append(f"{where}: row skipped: {'; '.join(errs)}")
            continue
        assert date is not None and amount is not None
        key = (date, account, ccp, cycle)
        if key in seen:
            issues.append(
                f"{where}: row skipped, duplicate call for account {account!r} on {date.isoformat()}"
                f"{' at ' + ccp if ccp else ''}{' cycle ' + cycle if cycle else ''} "
                f"(first on line {seen[key]})"
            )
            continue
        seen[key] = lineno
        calls.append(ActualCall(date, account, amount, ccp, time_ns, lineno, cycle))
    if not calls and not any("row skipped" in i for i in issues):
        issues.append(f"{name}: no calls (the file has a header only)")
    return calls, issues


def end_of_day(calls: Sequence[ActualCall]) -> list[ActualCall]:
    """Of calls with cycles, each account's last call of each date and CCP (the end-of-day cycle): what
    `compare` measures a margin path against (one call per account and date)."""
    last: dict[tuple[dt.date, str, str], ActualCall] = {}
    for c in calls:
        k = (c.date, c.account, c.ccp)
        if k not in last or c.call_time_ns() >= last[k].call_time_ns():
            last[k] = c
    return sorted(last.values(), key=lambda c: c.line)


def calls_from_journal(
    root: str | Path, dates: Iterable[str] | None = None
) -> tuple[list[ActualCall], list[str]]:
    """The journal's `call` table rows as ActualCalls (amount = requirement, time = the row's stamp, line
    = its seq), over `dates` (default every journal date); a torn file is an issue line."""
    from tickerplant import journal
    from tickerplant import journal_reader as reader

    calls: list[ActualCall] = []
    issues: list[str] = []
    for d in dates if dates is not None else journal.journal_dates(root):
        if "call" not in journal.day_files(root, d):
            continue
        try:
            t = reader.read_table(root, d, "call")
        except (OSError, pa.ArrowException) as e:
            issues.append(f"{d}: call.arrows: {e}")
            continue
        cols = t.to_pydict()
        times = t.column("time").cast(pa.int64()).to_pylist()
        for i, a in enumerate(cols["account"]):
            calls.append(
                ActualCall(
                    dt.date.fromisoformat(cols["business_date"][i]),
                    a,
                    float(cols["requirement"][i]),
                    cols["ccp"][i],
                    int(times[i]),
                    int(cols["seq"][i]),
                    cols["cycle"][i],
                )
            )
    return calls, issues


def read_calls(
    root: str | Path, csv_path: str | Path | None, dates: Sequence[str] | None = None
) -> tuple[list[ActualCall], list[str]]:
    """The actual calls: the CSV's when one is given (the CCP's report file), else the journal's `call`
    table over `dates`."""
    if csv_path is not None:
        return read_actual_calls(csv_path)
    return calls_from_journal(root, dates)


def read_actual_calls(path: str | Path) -> tuple[list[ActualCall], list[str]]:
    """Read an actual-calls CSV file (plain or .gz); a missing or unreadable file is an issue, not an
    error."""
    p = Path(path)
    name = p.name
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except FileNotFoundError:
        return [], [f"{name}: file not found ({p})"]
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return [], [f"{name}: cannot read the file ({e})"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [f"{name}: not UTF-8 text (byte {e.start}: {e.reason})"]
    return parse_actual_calls(text, name)


# ------------------------------------------------------------------------------------- comparing
@dataclass
class CallComparison:
    """One actual call next to the prediction standing at its time."""

    account: str
    date: str
    ccp: str
    actual: float
    predicted: float
    error: float  # predicted - actual
    pct_error: float | None  # error / actual * 100; None when actual is 0
    call_time_ns: int
    predicted_time_ns: int  # time of the path point whose value was standing at the call
    within: bool  # |error| <= tolerance * actual
    lead_time_s: float | None
    within_since_ns: int | None
    censored: bool  # in band since the path's first point: the true lead time is at least lead_time_s
    line: int


@dataclass
class AccuracyMetrics:
    """Error figures over a set of compared calls (see the module docstring for definitions)."""

    calls: int
    mae: float | None = None
    rmse: float | None = None
    mape_pct: float | None = None
    bias: float | None = None
    bias_pct: float | None = None
    worst_under: dict[str, Any] | None = None
    hit_rate: float | None = None
    misses: int = 0
    lead_time_median_s: float | None = None
    lead_time_mean_s: float | None = None
    lead_time_min_s: float | None = None


@dataclass
class AccuracyResult:
    tolerance: float
    accounts: dict[str, AccuracyMetrics]
    overall: AccuracyMetrics
    calls: list[CallComparison]
    issues: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "overall": asdict(self.overall),
            "accounts": {a: asdict(m) for a, m in self.accounts.items()},
            "calls": [asdict(c) for c in self.calls],
            "issues": list(self.issues),
        }


PathInput = Sequence[tuple[int, float]] | tuple[np.ndarray, np.ndarray]


def as_path(account: str, obj: Any, issues: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(times int64, values float64) sorted by time; non-finite values dropped with an issue."""
    try:
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], np.ndarray):
            ts = np.asarray(obj[0]).astype(np.int64).ravel()
            vs = np.asarray(obj[1], dtype=np.float64).ravel()
        elif len(obj) == 0:
            ts, vs = np.empty(0, np.int64), np.empty(0, np.float64)
        else:
            arr = list(obj)
            ts = np.array([int(t) for t, _ in arr], dtype=np.int64)
            vs = np.array([float(v) for _, v in arr], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        issues.append(
            f"predicted: account {account!r} skipped, its path is not (time_ns, margin) pairs ({e})"
        )
        return np.empty(0, np.int64), np.empty(0, np.float64)
    if ts.size != vs.size:
        issues.append(f"predicted: account {account!r} skipped, {ts.size} times but {vs.size} values")
        return np.empty(0, np.int64), np.empty(0, np.float64)
    bad = ~np.isfinite(vs)
    if bad.any():
        issues.append(
            f"predicted: account {account!r}: {int(bad.sum())} point(s) with a non-finite margin dropped"
        )
        ts, vs = ts[~bad], vs[~bad]
    if ts.size > 1 and np.any(np.diff(ts) < 0):
        order = np.argsort(ts, kind="stable")
        ts, vs = ts[order], vs[order]
    return ts, vs


def _iso(date: dt.date | str) -> str:
    return date.isoformat() if isinstance(date, dt.date) else parse_date(str(date)).isoformat()


def _ns_to_date(ns: np.ndarray) -> np.ndarray:
    return np.floor_divide(ns, DAY_NS)


def _since(ts: np.ndarray, vs: np.ndarray, idx: int, lo: float, hi: float) -> int:
    """Index of the first point of the final in-band run ending at idx (vs[idx] is in band)."""
    end, step = idx + 1, 256
    while end > 0:
        start = max(0, end - step)
        seg = vs[start:end]
        out = np.flatnonzero((seg < lo) | (seg > hi))
        if out.size:
            return start + int(out[-1]) + 1
        end, step = start, step * 2
    return 0


def _lines(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit] if r)
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f" (line{'s' if len(rows) > 1 else ''} {shown}{more})" if shown else ""


def _metrics(rows: list[CallComparison]) -> AccuracyMetrics:
    n = len(rows)
    if n == 0:
        return AccuracyMetrics(0)
    err = np.array([r.error for r in rows])
    act = np.array([r.actual for r in rows])
    pos = act > 0
    short = -err  # actual - predicted
    worst = int(np.argmax(short))
    worst_under = None
    if short[worst] > 0:
        r = rows[worst]
        worst_under = {
            "account": r.account,
            "date": r.date,
            "actual": r.actual,
            "predicted": r.predicted,
            "shortfall": float(short[worst]),
            "shortfall_pct": float(short[worst] / r.actual * 100) if r.actual > 0 else None,
        }
    hits = [r for r in rows if r.within]
    leads = np.array([r.lead_time_s for r in hits if r.lead_time_s is not None])
    return AccuracyMetrics(
        calls=n,
        mae=float(np.mean(np.abs(err))),
        rmse=float(math.sqrt(np.mean(err * err))),
        mape_pct=float(np.mean(np.abs(err[pos]) / act[pos]) * 100) if pos.any() else None,
        bias=float(np.mean(err)),
        bias_pct=float(np.mean(err[pos] / act[pos]) * 100) if pos.any() else None,
        worst_under=worst_under,
        hit_rate=len(hits) / n,
        misses=n - len(hits),
        lead_time_median_s=float(np.median(leads)) if leads.size else None,
        lead_time_mean_s=float(np.mean(leads)) if leads.size else None,
        lead_time_min_s=float(np.min(leads)) if leads.size else None,
    )


def compare(
    predicted: Mapping[str, PathInput],
    actual: Iterable[ActualCall],
    tolerance: float = 0.05,
    dates: Iterable[dt.date | str] | None = None,
    default_offset_ns: int = END_OF_DAY_NS,
) -> AccuracyResult:
    """Compare each actual call with the prediction standing at its time; metrics per account and overall."""
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    issues: list[str] = []
    paths = {str(a): as_path(str(a), p, issues) for a, p in predicted.items()}
    if dates is None:
        day_ix = set()
        for ts, _ in paths.values():
            day_ix.update(np.unique(_ns_to_date(ts)).tolist())
        covered = {(EPOCH + dt.timedelta(days=int(d))).isoformat() for d in day_ix}
    else:
        covered = set()
        for d in dates:
            try:
                covered.add(_iso(d))
            except ValueError as e:
                issues.append(f"backtest dates: {e}")
    span = f"{min(covered)}..{max(covered)}" if covered else "no dates"

    # group calls by (account, date); sum several CCPs for one account and date
    groups: dict[tuple[str, str], list[ActualCall]] = defaultdict(list)
    for c in actual:
        groups[(c.account, c.date.isoformat())].append(c)
    unknown: dict[str, list[int]] = defaultdict(list)
    outside: dict[str, list[int]] = defaultdict(list)
    no_pred: list[str] = []
    rows: list[CallComparison] = []
    called: dict[str, set[str]] = defaultdict(set)
    for (account, day), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if account not in paths:
            unknown[account] += [c.line for c in cs]
            continue
        if day not in covered:
            outside[day] += [c.line for c in cs]
            continue
        called[account].add(day)
        if len(cs) > 1:
            issues.append(
                f"account {account!r} on {day}: calls from {len(cs)} CCPs "
                f"({', '.join(c.ccp or '?' for c in cs)}) summed, since the prediction is per account"
                f"{_lines([c.line for c in cs])}"
            )
        amount = float(sum(c.amount for c in cs))
        t_call = max(c.call_time_ns(default_offset_ns) for c in cs)
        ccp = "+".join(c.ccp for c in cs if c.ccp)
        ts, vs = paths[account]
        idx = int(np.searchsorted(ts, t_call, side="right")) - 1
        if idx < 0:
            no_pred.append(
                f"account {account!r} on {day}: no prediction at or before the call time, call skipped"
                f"{_lines([c.line for c in cs])}"
            )
            continue
        pred = float(vs[idx])
        err = pred - amount
        band = tolerance * amount
        within = abs(err) <= band
        lead = since_ns = None
        censored = False
        if within:
            first = _since(ts, vs, idx, amount - band, amount + band)
            since_ns = int(ts[first])
            lead = (t_call - since_ns) / 1e9
            censored = first == 0
        rows.append(
            CallComparison(
                account,
                day,
                ccp,
                amount,
                pred,
                err,
                err / amount * 100 if amount > 0 else None,
                t_call,
                int(ts[idx]),
                bool(within),
                lead,
                since_ns,
                censored,
                min((c.line for c in cs), default=0),
            )
        )
    for account, lines in sorted(unknown.items()):
        issues.append(
            f"account {account!r} is not in the backtest: {len(lines)} call(s) skipped{_lines(lines)}"
        )
    for day, lines in sorted(outside.items()):
        issues.append(
            f"date {day} is not in the backtest ({span}): {len(lines)} call(s) skipped{_lines(lines)}"
        )
    issues += no_pred
    for account, (ts, _) in sorted(paths.items()):
        if not ts.size:
            continue
        days = {(EPOCH + dt.timedelta(days=int(d))).isoformat() for d in np.unique(_ns_to_date(ts))}
        gap = sorted((days & covered) - called[account])
        if gap:
            shown = ", ".join(gap[:10]) + (f" and {len(gap) - 10} more" if len(gap) > 10 else "")
            issues.append(
                f"account {account!r}: no actual call on {len(gap)} backtest date(s) with predictions: "
                f"{shown}"
            )
    per: dict[str, list[CallComparison]] = defaultdict(list)
    for r in rows:
        per[r.account].append(r)
    return AccuracyResult(
        float(tolerance), {a: _metrics(per[a]) for a in sorted(per)}, _metrics(rows), rows, issues
    )


def paths_from_margin_batches(
    batches: Iterable[Any], column: str = "margin"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{account: (times_ns, values)} from `margin` table record batches (or (table, batch) items of
    tickerplant.journal_reader, non-margin tables ignored), in the order the rows arrive."""
    accts: list[pa.Array] = []
    times: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for b in batches:
        if isinstance(b, tuple):
            table, b = b
            if table != "margin":
                continue
        if b.num_rows == 0:
            continue
        accts.append(b.column("account"))
        times.append(b.column("time").cast(pa.int64()).to_numpy())
        vals.append(np.asarray(b.column(column).to_numpy(), dtype=np.float64))
    if not accts:
        return {}
    enc = pa.chunked_array(accts).combine_chunks().dictionary_encode()
    codes = enc.indices.to_numpy()
    names = enc.dictionary.to_pylist()
    t = np.concatenate(times)
    v = np.concatenate(vals)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return {
        str(names[i]): (t[order[bounds[i] : bounds[i + 1]]], v[order[bounds[i] : bounds[i + 1]]])
        for i in sorted(range(len(names)), key=lambda i: names[i])
    }


__all__ = [
    "ActualCall",
    "AccuracyMetrics",
    "AccuracyResult",
    "CallComparison",
    "compare",
    "parse_actual_calls",
    "as_path",
    "parse_call_time",
    "parse_date",
    "paths_from_margin_batches",
    "read_actual_calls",
]
