"""VaR coverage back-tests: exceptions of realised P&L against predicted VaR, Kupiec, Christoffersen,
Basel zones.

Plain functions over numpy arrays and dicts; the chi-square and binomial tails are scipy.stats'.

API (all pure; `p` is the expected exception rate, 1 - confidence, e.g. 0.01 for 99% VaR):
- `hypothetical_pnl(quantities, prices, multipliers=None) -> np.ndarray`: Basel "hypothetical" P&L, the
  portfolio held at the start of period t (quantities[t]) revalued from prices[t] to prices[t + 1].
- `exceptions(pnl, var) -> np.ndarray[bool]`: day t is an exception when the loss exceeds the VaR,
  `pnl[t] < -var[t]` (VaR is a positive loss amount; a loss equal to the VaR is not an exception).
- `kupiec_pof(x, T, p) -> TestResult`: proportion-of-failures LR (1 dof).
- `transition_counts(hits) -> (n00, n01, n10, n11)`; `christoffersen_independence(hits | counts)` (1 dof).
- `conditional_coverage(hits, p) -> TestResult`: LR_cc = LR_pof + LR_ind (2 dof).
- `traffic_light(x, T, p=0.01) -> TrafficLight`: Basel zone, scaled to any T by the binomial rule below.
- `chi2_sf(x, dof)`, `binom_cdf(k, n, p)`: the tails the tests use (scipy.stats, with checked arguments).
- `coverage_series(pnl, var, p, dates=None) -> SeriesCoverage`: all of the above for one account.
- `coverage(series, p) -> CoverageResult`: per account plus pooled, with an `issues` list for bad input
  (length mismatch, NaN/inf, negative VaR) instead of exceptions; `CoverageResult.to_dict()` is JSON-ready.

Formulas (0 * ln 0 is taken as 0, so x = 0, x = T and empty transition rows are well defined):
- Kupiec (1995): with x exceptions in T days and pi = x / T,
  LR_pof = -2 [ (T-x) ln(1-p) + x ln p ] + 2 [ (T-x) ln(1-pi) + x ln pi ]  ~ chi2(1).
- Christoffersen (1998) independence: n_ij = number of days with state i followed by a day with state j
  (1 = exception), over the T-1 consecutive pairs; pi01 = n01/(n00+n01), pi11 = n11/(n10+n11),
  pi = (n01+n11)/(T-1);
  LR_ind = -2 [ (n00+n10) ln(1-pi) + (n01+n11) ln pi ]
           + 2 [ n00 ln(1-pi01) + n01 ln pi01 + n10 ln(1-pi11) + n11 ln pi11 ]  ~ chi2(1).
  With T < 2 there is no transition: LR_ind = 0, p-value 1, and the result's `note` says why.
- Conditional coverage: LR_cc = LR_pof (on all T days) + LR_ind  ~ chi2(2). This is the sum used in
  practice (Jorion, *Value at Risk*; Campbell 2005); Christoffersen's exact form computes the
  unconditional part on the T-1 conditioned days, which differs only through the first day.
- Basel traffic light (BCBS 1996, "Supervisory framework for the use of backtesting"): the yellow zone
  begins at the smallest count x whose binomial probability P(X <= x | T, p) reaches 95%, the red zone
  where it reaches 99.99%. For T = 250, p = 0.01 this gives green 0-4, yellow 5-9, red 10+, the
  published table. For other T (or p) the same two probabilities give the boundaries, so a 500-day
  sample is judged by the 500-day binomial, not by rescaling counts. Zero exceptions is always green
  (with fewer than ~60 days P(X <= 0) alone exceeds 95%); below 250 days the result carries a note.
  `plus_factor` (the capital multiplier add-on of the 1996 table) is reported only for T = 250 and
  p = 0.01, where it is defined.
- Pooled (all accounts): exceptions and days are summed for Kupiec and the traffic light; transition
  counts are summed per account (no transition spans two accounts) for Christoffersen. Pooling assumes
  accounts are independent; per-account results are the primary ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

YELLOW_PROBABILITY = 0.95  # P(X <= x) at which the yellow zone begins
RED_PROBABILITY = 0.9999  # P(X <= x) at which the red zone begins
# BCBS (1996) table 2: plus factor by number of exceptions in 250 days at 99%.
PLUS_FACTOR_250 = {5: 0.40, 6: 0.50, 7: 0.65, 8: 0.75, 9: 0.85}


# ---------------------------------------------------------------------------------------------- tails
def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi-square with a positive integer number of degrees of freedom
    (scipy.stats.chi2.sf); ValueError for a dof that is not a positive integer or an x that is NaN."""
    if not isinstance(dof, int) or dof < 1:
        raise ValueError(f"dof must be a positive integer, got {dof!r}")
    if math.isnan(x):
        raise ValueError("x is NaN")
    return 1.0 if x <= 0 else float(stats.chi2.sf(x, dof))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p) (scipy.stats.binom.cdf); ValueError for a p outside (0, 1) or
    n < 0."""
    _check_rate(p)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return float(stats.binom.cdf(k, n, p))


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TestResult:
    """A likelihood-ratio test: statistic, its chi-square degrees of freedom and p-value."""

    name: str
    statistic: float
    dof: int
    p_value: float
    note: str = ""

    def reject(self, level: float = 0.05) -> bool:
        """True when the model is rejected at the given significance level."""
        return self.p_value < level

    def to_dict(self) -> dict[str, Any]:
        numbers = {k: getattr(self, k) for k in ("name", "statistic", "dof", "p_value")}
        return {**numbers, "reject_5pct": self.reject(0.05), "note": self.note}


@dataclass(frozen=True)
class TrafficLight:
    """Basel zone of `exceptions` in `days` at rate `p`, with the boundaries for that sample size."""

    zone: str  # "green" | "yellow" | "red"
    exceptions: int
    days: int
    p: float
    cumulative_probability: float  # P(X <= exceptions) under a correct model
    green_max: int  # largest green count for (days, p)
    yellow_max: int  # largest yellow count; red is above
    plus_factor: float | None  # BCBS add-on for T = 250, p = 0.01; None otherwise
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_rate(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise ValueError(f"p (expected exception rate) must be in (0, 1), got {p!r}")


def _xlogy(n: float, q: float) -> float:
    """n * ln(q) with 0 * ln(0) = 0."""
    return 0.0 if n == 0 else n * math.log(q)


def _counts(x: int, T: int) -> None:
    if T < 0 or x < 0 or x > T:
        raise ValueError(f"need 0 <= exceptions <= days, got exceptions={x}, days={T}")


# -------------------------------------------------------------------------------------------- tests
def hypothetical_pnl(
    quantities: np.ndarray, prices: np.ndarray, multipliers: np.ndarray | None = None
) -> np.ndarray:
    """P&L of the start-of-period portfolio over each period: sum_i q[t,i] * m_i * (P[t+1,i] - P[t,i]).

    quantities: (T, N) positions held at the start of period t; prices: (T + 1, N) prices at the start
    of each period and the end of the last one; multipliers: (N,) contract sizes (default 1). Trading
    during the period is deliberately left out (that is what makes the P&L comparable with the VaR of the
    start-of-period portfolio). Raises ValueError naming the field on shape or non-finite values.
    """
    q = np.asarray(quantities, dtype=np.float64)
    px = np.asarray(prices, dtype=np.float64)
    if q.ndim != 2 or px.ndim != 2:
        raise ValueError(
            f"quantities and prices must be 2-d (periods x instruments), got {q.shape} and {px.shape}"
        )
    if px.shape != (q.shape[0] + 1, q.shape[1]):
        raise ValueError(
            f"prices must have shape {(q.shape[0] + 1, q.shape[1])} for quantities {q.shape}, got {px.shape}"
        )
    m = np.ones(q.shape[1]) if multipliers is None else np.asarray(multipliers, dtype=np.float64).ravel()
    if m.shape != (q.shape[1],):
        raise ValueError(f"multipliers must have {q.shape[1]} entries, got {m.size}")
    for name, arr in (("quantities", q), ("prices", px), ("multipliers", m)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"{name}{[int(i) for i in bad[0]]} is {arr[tuple(bad[0])]}: values must be finite"
            )
    return (q * m * np.diff(px, axis=0)).sum(axis=1)


def exceptions(pnl: Sequence[float] | np.ndarray, var: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean exception series: realised loss strictly larger than the VaR (pnl < -var).

    Raises ValueError naming the field and the first bad index for length mismatch, NaN/inf or
    negative VaR; `coverage()` reports those as issues instead.
    """
    a = np.asarray(pnl, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    if a.ndim != 1 or v.ndim != 1:
        raise ValueError(f"pnl and var must be 1-d, got shapes {a.shape} and {v.shape}")
    if a.shape != v.shape:
        raise ValueError(f"pnl has {a.size} days but var has {v.size}")
    for name, arr in (("pnl", a), ("var", v)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] is {arr[bad[0]]}: values must be finite")
    neg = np.flatnonzero(v < 0)
    if neg.size:
        raise ValueError(f"var[{neg[0]}] is {v[neg[0]]}: VaR must be a loss amount >= 0")
    return a < -v


def kupiec_pof(x: int, T: int, p: float) -> TestResult:
    """Kupiec proportion-of-failures test of x exceptions in T days against rate p (1 dof)."""
    _check_rate(p)
    _counts(x, T)
    if T == 0:
        return TestResult("kupiec_pof", 0.0, 1, 1.0, "no days")
    pi = x / T
    ll_null = _xlogy(T - x, 1.0 - p) + _xlogy(x, p)
    ll_alt = _xlogy(T - x, 1.0 - pi) + _xlogy(x, pi)
    lr = max(0.0, -2.0 * (ll_null - ll_alt))
    return TestResult("kupiec_pof", lr, 1, chi2_sf(lr, 1))


def transition_counts(hits: Sequence[bool] | np.ndarray) -> tuple[int, int, int, int]:
    """(n00, n01, n10, n11): consecutive-day pairs by (state today, state tomorrow), 1 = exception."""
    h = np.asarray(hits, dtype=bool)
    if h.ndim != 1:
        raise ValueError(f"hits must be 1-d, got shape {h.shape}")
    if h.size < 2:
        return 0, 0, 0, 0
    prev, nxt = h[:-1], h[1:]
    n11 = int(np.count_nonzero(prev & nxt))
    n10 = int(np.count_nonzero(prev & ~nxt))
    n01 = int(np.count_nonzero(~prev & nxt))
    n00 = int(h.size - 1 - n11 - n10 - n01)
    return n00, n01, n10, n11


def christoffersen_independence(
    hits_or_counts: Sequence[bool] | np.ndarray | tuple[int, int, int, int],
) -> TestResult:
    """Christoffersen independence test (1 dof) from an exception series or its transition counts.

    Pass a tuple of four ints (n00, n01, n10, n11) to pool counts over several series.
    """
    if (
        isinstance(hits_or_counts, tuple)
        and len(hits_or_counts) == 4
        and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in hits_or_counts
        )
    ):
        n00, n01, n10, n11 = (int(c) for c in hits_or_counts)
        if min(n00, n01, n10, n11) < 0:
            raise ValueError(f"transition counts must be >= 0, got {hits_or_counts}")
    else:
        n00, n01, n10, n11 = transition_counts(hits_or_counts)
    n = n00 + n01 + n10 + n11
    if n == 0:
        return TestResult("christoffersen_independence", 0.0, 1, 1.0, "fewer than 2 days: no transitions")
    pi = (n01 + n11) / n
    pi01 = n01 / (n00 + n01) if n00 + n01 else 0.0
    pi11 = n11 / (n10 + n11) if n10 + n11 else 0.0
    ll_null = _xlogy(n00 + n10, 1.0 - pi) + _xlogy(n01 + n11, pi)
    ll_alt = _xlogy(n00, 1.0 - pi01) + _xlogy(n01, pi01) + _xlogy(n10, 1.0 - pi11) + _xlogy(n11, pi11)
    lr = max(0.0, -2.0 * (ll_null - ll_alt))
    note = ""
    if n01 + n11 == 0:
        note = "no exception after the first day: independence cannot be rejected"
    elif n10 + n11 == 0:
        note = "no exception before the last day: no day follows an exception"
    return TestResult("christoffersen_independence", lr, 1, chi2_sf(lr, 1), note)


def conditional_coverage(hits: Sequence[bool] | np.ndarray, p: float) -> TestResult:
    """Christoffersen conditional coverage LR_cc = LR_pof + LR_ind (2 dof)."""
    h = np.asarray(hits, dtype=bool)
    pof = kupiec_pof(int(np.count_nonzero(h)), int(h.size), p)
    ind = christoffersen_independence(h)
    return _combine(pof, ind)


def _combine(pof: TestResult, ind: TestResult) -> TestResult:
    lr = pof.statistic + ind.statistic
    return TestResult("christoffersen_conditional_coverage", lr, 2, chi2_sf(lr, 2), ind.note)


def zone_boundaries(T: int, p: float = 0.01) -> tuple[int, int]:
    """(green_max, yellow_max) for T days at rate p: the counts just below the 95% / 99.99% points."""
    _check_rate(p)
    if T < 0:
        raise ValueError(f"days must be >= 0, got {T}")
    cdf = stats.binom.cdf(np.arange(T), T, p)  # P(X <= k) for k < T (P(X <= T) = 1 sets no boundary)

    def below(level: float) -> int:
        reached = np.flatnonzero(cdf >= level)
        return int(reached[0]) - 1 if reached.size else T

    green_max = max(below(YELLOW_PROBABILITY), 0)  # no exception is never evidence against the model
    return green_max, max(below(RED_PROBABILITY), green_max)


def traffic_light(x: int, T: int = 250, p: float = 0.01) -> TrafficLight:
    """Basel traffic-light zone of x exceptions in T days (see the module docstring for the rule)."""
    _check_rate(p)
    _counts(x, T)
    green_max, yellow_max = zone_boundaries(T, p)
    zone = "green" if x <= green_max else "yellow" if x <= yellow_max else "red"
    plus = None
    if T == 250 and abs(p - 0.01) < 1e-12:
        plus = 0.0 if zone == "green" else 1.0 if zone == "red" else PLUS_FACTOR_250[x]
    note = ""
    if T < 250:
        note = f"{T} days: fewer than the 250 the Basel zones were set for; the zone is indicative"
    return TrafficLight(zone, x, T, p, binom_cdf(x, T, p), green_max, yellow_max, plus, note)


# ------------------------------------------------------------------------------------ whole series
@dataclass
class SeriesCoverage:
    """Coverage figures for one exception series (one account, or pooled)."""

    days: int
    exceptions: int
    expected: float
    rate: float
    kupiec: TestResult
    independence: TestResult
    conditional: TestResult
    traffic_light: TrafficLight
    transitions: tuple[int, int, int, int]
    exception_dates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "exceptions": self.exceptions,
            "expected": self.expected,
            "rate": self.rate,
            "kupiec": self.kupiec.to_dict(),
            "independence": self.independence.to_dict(),
            "conditional_coverage": self.conditional.to_dict(),
            "traffic_light": self.traffic_light.to_dict(),
            "transitions": dict(zip(("n00", "n01", "n10", "n11"), self.transitions, strict=True)),
            "exception_dates": list(self.exception_dates),
        }


def _summarise(
    x: int, T: int, counts: tuple[int, int, int, int], p: float, dates: list[str]
) -> SeriesCoverage:
    pof = kupiec_pof(x, T, p)
    ind = christoffersen_independence(counts)
    return SeriesCoverage(
        T, x, p * T, x / T if T else 0.0, pof, ind, _combine(pof, ind), traffic_light(x, T, p), counts, dates
    )


def coverage_series(
    pnl: Sequence[float] | np.ndarray,
    var: Sequence[float] | np.ndarray,
    p: float = 0.01,
    dates: Sequence[str] | None = None,
) -> SeriesCoverage:
    """Exceptions and all tests for one P&L / VaR series (raises ValueError on bad input)."""
    hits = exceptions(pnl, var)
    ds = [str(d) for d in dates] if dates is not None else [str(i) for i in range(hits.size)]
    if len(ds) != hits.size:
        raise ValueError(f"dates has {len(ds)} entries but pnl has {hits.size}")
    return _summarise(
        int(np.count_nonzero(hits)),
        int(hits.size),
        transition_counts(hits),
        p,
        [ds[i] for i in np.flatnonzero(hits)],
    )


@dataclass
class AccountDays:
    """One account's daily rows: business date, realised next-period P&L, predicted VaR (or margin)."""

    dates: list[str]
    pnl: np.ndarray
    var: np.ndarray
    exception: np.ndarray  # bool, pnl < -var

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": list(self.dates),
            "pnl": self.pnl.tolist(),
            "var": self.var.tolist(),
            "exception": self.exception.tolist(),
        }


@dataclass
class CoverageResult:
    """Per-account and pooled coverage, the daily rows behind them, and input issues."""

    p: float
    accounts: dict[str, SeriesCoverage]
    daily: dict[str, AccountDays]
    pooled: SeriesCoverage | None
    issues: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "confidence": 1.0 - self.p,
            "accounts": {a: s.to_dict() for a, s in self.accounts.items()},
            "pooled": self.pooled.to_dict() if self.pooled else None,
            "daily": {a: d.to_dict() for a, d in self.daily.items()},
            "issues": list(self.issues),
        }


SeriesInput = tuple[Sequence[str], Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def coverage(series: Mapping[str, SeriesInput], p: float = 0.01) -> CoverageResult:
    """Coverage per account from {account: (dates, pnl, var)}, plus the pooled result.

    Days whose pnl or var is NaN/inf, or whose var is negative, are dropped and reported in `issues`;
    an account whose three sequences differ in length is skipped with an issue. Nothing raises on
    bad data (only on a bad `p`).
    """
    _check_rate(p)
    issues: list[str] = []
    per: dict[str, SeriesCoverage] = {}
    daily: dict[str, AccountDays] = {}
    tot_x = tot_t = 0
    tot_counts = [0, 0, 0, 0]
    all_dates: list[str] = []
    for account, item in series.items():
        try:
            dates, pnl, var = item
            ds = [str(d) for d in dates]
            a = np.asarray(pnl, dtype=np.float64).ravel()
            v = np.asarray(var, dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            issues.append(
                f"coverage: account {account!r} skipped: expected (dates, pnl, var) of numbers ({e})"
            )
            continue
        if not (len(ds) == a.size == v.size):
            issues.append(
                f"coverage: account {account!r} skipped: dates, pnl and var have different lengths "
                f"({len(ds)}, {a.size}, {v.size})"
            )
            continue
        ok = np.isfinite(a) & np.isfinite(v) & (v >= 0)
        for i in np.flatnonzero(~ok):
            why = (
                "pnl is not a finite number"
                if not np.isfinite(a[i])
                else "var is not a finite number"
                if not np.isfinite(v[i])
                else "var is negative"
            )
            issues.append(
                f"coverage: account {account!r} {ds[i]}: day dropped, {why} (pnl={a[i]!r}, var={v[i]!r})"
            )
        if not ok.all():
            ds = [d for d, k in zip(ds, ok, strict=True) if k]
            a, v = a[ok], v[ok]
        if a.size == 0:
            issues.append(f"coverage: account {account!r} has no usable days")
            continue
        hits = a < -v
        counts = transition_counts(hits)
        x = int(np.count_nonzero(hits))
        ex_dates = [ds[i] for i in np.flatnonzero(hits)]
        per[account] = _summarise(x, int(a.size), counts, p, ex_dates)
        daily[account] = AccountDays(ds, a, v, hits)
        tot_x += x
        tot_t += int(a.size)
        tot_counts = [c + n for c, n in zip(tot_counts, counts, strict=True)]
        all_dates += ex_dates
    pooled = _summarise(tot_x, tot_t, tuple(tot_counts), p, sorted(all_dates)) if tot_t else None  # type: ignore[arg-type]
    return CoverageResult(p, per, daily, pooled, issues)
