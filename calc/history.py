"""Price history and covariance inputs for the margin models: load daily closes (wide or long; CSV,
CSV.gz or Parquet), derive log / overlapping h-day / volatility-filtered returns and covariances.

Every loader refuses bad input with an `InputError` naming the file, the field and the reason.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


class InputError(ValueError):
    """Bad input file or value; the message is one line naming the field and the reason."""


@dataclass(frozen=True)
class PriceHistory:
    """Daily closes: `closes[t, i]` is the close of `syms[i]` on `dates[t]` (dates ascending)."""

    dates: np.ndarray  # datetime64[D], ascending, unique
    syms: list[str]
    closes: np.ndarray  # (T, N) float64

    def window(self, lookback_days: int | None) -> PriceHistory:
        """The last `lookback_days` daily returns' worth of closes (lookback + 1 rows); None = all."""
        if lookback_days is None or lookback_days <= 0 or lookback_days + 1 >= len(self.dates):
            return self
        n = lookback_days + 1
        return PriceHistory(self.dates[-n:], self.syms, self.closes[-n:])

    def select(self, syms: list[str]) -> PriceHistory:
        """Columns for `syms`, in that order; an unknown sym is refused."""
        index = {s: i for i, s in enumerate(self.syms)}
        missing = [s for s in syms if s not in index]
        if missing:
            raise InputError(f"unknown sym {missing[0]!r}: not in the price history ({len(missing)} missing)")
        return PriceHistory(self.dates, list(syms), self.closes[:, [index[s] for s in syms]])

    def validate(self, what: str = "price history") -> PriceHistory:
        """Refuse NaN, infinite or non-positive closes, naming the sym and the date; at least 2 rows."""
        if len(self.dates) < 2:
            raise InputError(f"{what}: empty history (need at least 2 daily closes, got {len(self.dates)})")
        bad = ~np.isfinite(self.closes) | (self.closes <= 0)
        if bad.any():
            t, i = np.argwhere(bad)[0]
            v = self.closes[t, i]
            reason = "NaN price" if math.isnan(v) else f"price {v!r} is not a finite number > 0"
            raise InputError(f"{what}: {reason} for sym {self.syms[i]!r} on {self.dates[t]}")
        return self

    @property
    def latest(self) -> dict[str, float]:
        return dict(zip(self.syms, self.closes[-1].tolist(), strict=True))


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(path)
        if name.endswith((".csv", ".csv.gz", ".gz", ".txt")):
            return pacsv.read_csv(path)  # compression is inferred from the extension
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    raise InputError(f"{path}: unknown file type (expected .csv, .csv.gz or .parquet)")


def read_table(path: str | Path) -> pa.Table:
    """A CSV, CSV.gz or Parquet file as an Arrow table (refused with a clear line if unreadable)."""
    return _read_table(Path(path))


def _column(table: pa.Table, path: Path, *names: str) -> tuple[str, pa.ChunkedArray]:
    lower = {c.lower(): c for c in table.column_names}
    for n in names:
        if n in lower:
            return lower[n], table.column(lower[n])
    raise InputError(f"{path}: missing column {names[0]!r} (columns are {table.column_names})")


def _dates(col: pa.ChunkedArray, path: Path) -> np.ndarray:
    try:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return np.array(col.to_pylist(), dtype="datetime64[D]")
        return col.to_numpy().astype("datetime64[D]")
    except (ValueError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: column 'date': not a date ({e})") from None


def _floats(col: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
        raise InputError(f"{path}: column {name!r}: expected numbers, got {col.type}")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN


def load_prices(path: str | Path) -> PriceHistory:
    """Daily closes from a wide file (a `Date` column then one column per sym) or a long file
    (`date,sym,close`). Rows are sorted by date; a repeated date (or date+sym) is refused.
    NaN checks are left to `PriceHistory.validate`, after the lookback window is cut."""
    path = Path(path)
    table = _read_table(path)
    cols = {c.lower() for c in table.column_names}
    if table.num_rows == 0:
        raise InputError(f"{path}: empty history (no rows)")
    if {"sym", "close"} <= cols:
        _, dcol = _column(table, path, "date")
        _, scol = _column(table, path, "sym")
        _, ccol = _column(table, path, "close")
        dates = _dates(dcol, path)
        syms_col = np.array(scol.to_pylist(), dtype=object)
        closes = _floats(ccol, path, "close")
        udates, t_idx = np.unique(dates, return_inverse=True)
        usyms = list(dict.fromkeys(syms_col.tolist()))
        s_index = {s: i for i, s in enumerate(usyms)}
        i_idx = np.fromiter((s_index[s] for s in syms_col), dtype=np.int64, count=len(syms_col))
        flat = t_idx * len(usyms) + i_idx
        if len(np.unique(flat)) != len(flat):
            dup = np.flatnonzero(np.bincount(flat) > 1)[0]
            raise InputError(
                f"{path}: repeated row for sym {usyms[dup % len(usyms)]!r} on {udates[dup // len(usyms)]}"
            )
        wide = np.full((len(udates), len(usyms)), np.nan)
        wide[t_idx, i_idx] = closes
        return PriceHistory(udates, usyms, wide)
    dname, dcol = _column(table, path, "date")
    if "sym" in cols or "close" in cols:
        missing = "close" if "sym" in cols else "sym"
        raise InputError(f"{path}: missing column {missing!r} (long format is date,sym,close)")
    syms = [c for c in table.column_names if c != dname]
    if not syms:
        raise InputError(f"{path}: no price columns after {dname!r}")
    dates = _dates(dcol, path)
    closes = np.column_stack([_floats(table.column(s), path, s) for s in syms])
    order = np.argsort(dates, kind="stable")
    dates, closes = dates[order], closes[order]
    if len(dates) > 1 and (np.diff(dates.astype(np.int64)) == 0).any():
        t = int(np.flatnonzero(np.diff(dates.astype(np.int64)) == 0)[0])
        raise InputError(f"{path}: repeated date {dates[t]}")
    return PriceHistory(dates, syms, closes)


def load_latest_prices(path: str | Path) -> dict[str, float]:
    """Latest prices: a `sym,price` file, or a price history (wide or long) whose last row is used."""
    path = Path(path)
    table = _read_table(path)
    cols = {c.lower() for c in table.column_names}
    if {"sym", "price"} <= cols:
        _, scol = _column(table, path, "sym")
        _, pcol = _column(table, path, "price")
        prices = _floats(pcol, path, "price")
        out = dict(zip(scol.to_pylist(), prices.tolist(), strict=True))
    else:
        h = load_prices(path)
        out = h.latest
    for s, p in out.items():
        if not (math.isfinite(p) and p > 0):
            raise InputError(
                f"{path}: {'NaN price' if math.isnan(p) else f'price {p!r} is not > 0'} for sym {s!r}"
            )
    return out


# ---------------------------------------------------------------- returns


def log_returns(closes: np.ndarray) -> np.ndarray:
    """Daily log returns, (T-1, N) from (T, N) closes."""
    return np.diff(np.log(closes), axis=0)


def horizon_log_returns(daily: np.ndarray, horizon_days: int) -> np.ndarray:
    """Overlapping h-day log returns: row t is the sum of daily rows t .. t+h-1 (T-h+1 rows)."""
    if horizon_days < 1:
        raise InputError(f"horizon_days: must be >= 1, got {horizon_days}")
    if horizon_days == 1:
        return daily.copy()
    if horizon_days > len(daily):
        raise InputError(
            f"horizon_days: {horizon_days} days needs at least that many daily returns, got {len(daily)}"
        )
    c = np.vstack([np.zeros((1, daily.shape[1])), np.cumsum(daily, axis=0)])
    return c[horizon_days:] - c[:-horizon_days]


def ewma_variance_path(daily: np.ndarray, lam: float) -> np.ndarray:
    """RiskMetrics EWMA variance forecasts, (T+1, N): row t (t < T) is the forecast for day t made
    from days before it, row T the forecast for tomorrow. Seeded with the window's mean square
    return: v[0] = mean(r^2), v[t+1] = lam * v[t] + (1 - lam) * r[t]^2."""
    check_lambda(lam, "filter_lambda", allow_zero=False)
    t_len = len(daily)
    v = np.empty((t_len + 1, daily.shape[1]))
    v[0] = np.mean(daily * daily, axis=0)
    for t in range(t_len):  # T steps of vector work (history preparation, not the event path)
        v[t + 1] = lam * v[t] + (1.0 - lam) * daily[t] * daily[t]
    return v


def ewma_vol_ratio(daily: np.ndarray, horizon_days: int, lam: float) -> np.ndarray:
    """The implied-vol proxy of full revaluation (issue #14): per h-day scenario window (the rows of
    horizon_log_returns) and instrument, the EWMA volatility forecast at the window's end over the one
    at its start, sigma[t+h] / sigma[t] (ewma_variance_path); 1 where the start volatility is 0."""
    v = ewma_variance_path(daily, lam)
    start, end = v[: len(v) - horizon_days], v[horizon_days:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(start > 0, np.sqrt(end / start), 1.0)


def vol_multipliers(
    w: PriceHistory, horizon_days: int, lam: float, implied: PriceHistory | None = None
) -> np.ndarray:
    """Per h-day scenario window of the closes `w` (the rows of horizon_log_returns) and instrument, the
    implied-vol multiplier of options on it: from an implied-vol history `implied` (same layout as a price
    history, one column per underlying, e.g. its at-the-money vol) where it covers both ends of the window,
    iv(window end) / iv(window start), the latest vol on or before each date; else the EWMA proxy
    (ewma_vol_ratio, decay `lam`)."""
    out = ewma_vol_ratio(log_returns(w.closes), horizon_days, lam)
    if implied is None:
        return out
    at = np.searchsorted(implied.dates, w.dates, side="right") - 1  # the latest vol date on or before
    for n, sym in enumerate(w.syms):
        if sym not in implied.syms:
            continue
        col = implied.closes[:, implied.syms.index(sym)]
        iv = np.where(at >= 0, col[np.maximum(at, 0)], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = iv[horizon_days:] / iv[: len(iv) - horizon_days]
        ok = np.isfinite(ratio) & (ratio > 0)
        out[ok, n] = ratio[ok]
    return out


def filter_returns(daily: np.ndarray, lam: float) -> np.ndarray:
    """Volatility-filtered daily log returns (filtered HS, as Eurex Prisma / LCH PAIRS): each day's
    return rescaled to today's EWMA volatility, r[t] * sigma[T] / sigma[t]; a zero-volatility day
    stays 0."""
    v = ewma_variance_path(daily, lam)
    sig = np.sqrt(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sig[:-1] > 0, sig[-1] / sig[:-1], 0.0)
    return daily * scale


def scenario_returns(
    closes: np.ndarray, horizon_days: int, filtered: bool, filter_lambda: float
) -> np.ndarray:
    """Historical-simulation scenarios as simple returns over the holding period, (S, N):
    exp(h-day log return) - 1, from (optionally filtered) daily log returns, overlapping windows."""
    daily = log_returns(closes)
    if filtered:
        daily = filter_returns(daily, filter_lambda)
    return np.expm1(horizon_log_returns(daily, horizon_days))


def check_lambda(lam: float, name: str, allow_zero: bool = True) -> None:
    ok = (0.0 <= lam < 1.0) if allow_zero else (0.0 < lam < 1.0)
    if not (isinstance(lam, float | int) and ok):
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        raise InputError(f"{name}: must be in {rng}, got {lam!r}")


def covariance(daily: np.ndarray, ewma_lambda: float = 0.0) -> np.ndarray:
    """Daily return covariance, (N, N). lambda 0: equal-weight sample covariance (mean removed,
    divided by T-1). lambda in (0,1): RiskMetrics EWMA, zero mean, weights (1-l) l^(T-1-t)
    normalised to sum to 1 over the window (the newest day weighs most)."""
    check_lambda(ewma_lambda, "ewma_lambda")
    t_len = len(daily)
    if t_len < 2:
        raise InputError(f"history: need at least 2 daily returns for a covariance, got {t_len}")
    if ewma_lambda == 0.0:
        d = daily - daily.mean(axis=0)
        c = (d.T @ d) / (t_len - 1)
    else:
        w = (1.0 - ewma_lambda) * ewma_lambda ** np.arange(t_len - 1, -1, -1, dtype=np.float64)
        w /= w.sum()
        c = (daily * w[:, None]).T @ daily
    return (c + c.T) / 2.0  # exactly symmetric (a matrix product may differ in the last bit)


# ---------------------------------------------------------------- covariance files


def load_covariance(path: str | Path) -> tuple[list[str], np.ndarray]:
    """A square CSV of daily return covariances: a header row of syms (an optional leading label
    cell such as `sym`), then one row per sym, optionally labelled. Must be finite and symmetric
    with a non-negative diagonal."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="") as f:  # type: ignore[operator]
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise InputError(f"{path}: empty covariance file (need a header row of syms and one row per sym)")
    header = [c.strip() for c in rows[0]]
    labelled = len(header) == len(rows[1]) and not _is_number(rows[1][0])
    syms = header[1:] if labelled else header
    body = [r[1:] if labelled else r for r in rows[1:]]
    labels = [r[0].strip() for r in rows[1:]] if labelled else syms
    n = len(syms)
    if len(body) != n or any(len(r) != n for r in body):
        raise InputError(
            f"{path}: covariance must be square with {n} columns and rows (one per sym in the header)"
        )
    if labelled and labels != syms:
        raise InputError(f"{path}: row labels {labels[:3]}... differ from the header syms {syms[:3]}...")
    if len(set(syms)) != n:
        raise InputError(f"{path}: repeated sym in the header")
    try:
        cov = np.array([[float(c) for c in r] for r in body])
    except ValueError as e:
        raise InputError(f"{path}: covariance entry is not a number ({e})") from None
    if not np.isfinite(cov).all():
        i, j = np.argwhere(~np.isfinite(cov))[0]
        raise InputError(f"{path}: NaN or infinite covariance for {syms[i]!r},{syms[j]!r}")
    if (np.diag(cov) < 0).any():
        i = int(np.flatnonzero(np.diag(cov) < 0)[0])
        raise InputError(f"{path}: negative variance for sym {syms[i]!r}")
    if not np.allclose(cov, cov.T, rtol=1e-9, atol=1e-15):
        i, j = np.argwhere(~np.isclose(cov, cov.T, rtol=1e-9, atol=1e-15))[0]
        raise InputError(f"{path}: covariance is not symmetric at {syms[i]!r},{syms[j]!r}")
    return syms, (cov + cov.T) / 2.0


def write_covariance(path: str | Path, syms: list[str], cov: np.ndarray) -> None:
    """Write `cov` as `load_covariance` reads it (labelled rows, full double precision)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sym", *syms])
    for s, row in zip(syms, cov, strict=True):
        w.writerow([s, *(repr(float(v)) for v in row)])
    Path(path).write_text(buf.getvalue())


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
