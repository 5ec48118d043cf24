"""`marginflow demo-history`: N trading days of demo journals from the real price file (trade ticks on a
Brownian bridge from each real close to the next, fills for the demo accounts) and the CCP's actual calls.

The actual calls come from an independent end-of-day calculation in plain numpy (no engine code), with the
CCP's own small differences: its window ends at the day's close (the engine's ends the day before), its
window is 500 returns (calc's default is 504), its historical VaR is an interpolated quantile (the engine's
is the k-th worst loss) and it rounds calls up to a multiple of 1,000.

    marginflow demo-history --days 60 --out var/demo-history
    -> var/demo-history/journal/<date>/{trade,fill}.arrows  and  var/demo-history/actual_calls.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from calc.history import InputError, PriceHistory, load_prices
from calc.inputs import AccountSpec, load_accounts, load_positions
from calc.instruments import load_instruments
from calc.models import BUILTIN_MODELS
from marginflow import config as configuration
from schemas.tables import TABLES
from tickerplant import journal

NS = 1_000_000_000
SESSION_OPEN_NS = (14 * 3600 + 30 * 60) * NS  # 09:30 New York (EST) in UTC
SESSION_CLOSE_NS = 21 * 3600 * NS  # 16:00 New York (EST) in UTC: the last tick of each sym is its real close
CALL_TIME = "22:00:00"  # when the CCP issues its end-of-day call (UTC, on the business date)
CCP_NAME = "DEMO-CCP"
VOL_DAYS = 20  # daily returns behind each sym's intraday bridge volatility


@dataclass(frozen=True)
class DemoOptions:
    """What to generate: days, ticks per sym per day (all syms tick together, one message per round),
    fills per account per day, the tickerplant batch window, the random seed and the CCP's rounding."""

    days: int = 20
    ticks: int = 390
    fills: int = 4
    batch_ms: float = (
        1000.0  # rows of one table within this window share a journal message (kdb+tick's 1 s timer)
    )
    seed: int = 7
    end_date: str | None = None
    ccp_round: float = 1000.0
    ccp_lookback: int = 500

    def check(self) -> None:
        if self.days < 1:
            raise InputError(f"--days: must be >= 1, got {self.days}")
        if self.ticks < 1:
            raise InputError(f"--ticks: must be >= 1 (ticks per sym per day), got {self.ticks}")
        if self.fills < 0:
            raise InputError(f"--fills: must be >= 0 (fills per account per day), got {self.fills}")
        if not (math.isfinite(self.batch_ms) and self.batch_ms > 0):
            raise InputError(f"--batch-ms: must be a number > 0, got {self.batch_ms}")
        if not (math.isfinite(self.ccp_round) and self.ccp_round >= 0):
            raise InputError(f"--ccp-round: must be a number >= 0, got {self.ccp_round}")
        if self.ccp_lookback < 2:
            raise InputError(f"--ccp-lookback: must be >= 2 daily returns, got {self.ccp_lookback}")


# ------------------------------------------------------------------------------ the CCP's calculation
@dataclass
class Ccp:
    """The clearing house's end-of-day margin, computed independently of calc/ with plain numpy:
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

    def margins(self, closes: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """Margin per account (rows of `exposure`, dollars per sym) from the window of closes ending at the
        business date (lookback + 1 rows)."""
        r = np.log(closes[1:] / closes[:-1])
        cov = self.covariance(r)
        scale = statistics.NormalDist().inv_cdf(self.confidence) * math.sqrt(self.horizon)
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
            m = max(m, 0.0)
            out[a] = math.ceil(m / self.round_to) * self.round_to if self.round_to > 0 else m
        return out


# ------------------------------------------------------------------------------------- the days
def pick_days(history: PriceHistory, days: int, end_date: str | None, need: int) -> np.ndarray:
    """Indices into the history of the `days` trading days ending at `end_date` (default the file's last
    day); each needs `need` earlier rows (for the risk windows)."""
    last = len(history.dates) - 1
    if end_date:
        try:
            end = np.datetime64(end_date, "D")
        except ValueError:
            raise InputError(f"--end-date: {end_date!r} is not a date YYYY-MM-DD") from None
        last = int(np.searchsorted(history.dates, end, side="right")) - 1
        if last < 0:
            raise InputError(f"--end-date {end_date}: before the price file's first day {history.dates[0]}")
    first = last - days + 1
    if first < need:
        earliest = history.dates[min(need + days - 1, len(history.dates) - 1)]
        raise InputError(
            f"--days {days}: the price file has {last + 1} days up to {history.dates[last]}, and each "
            f"day needs {need} earlier days of history; end on or after {earliest} or ask for fewer days"
        )
    return np.arange(first, last + 1)


def bridge(
    rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, steps: int, sigma: np.ndarray
) -> np.ndarray:
    """(steps, N) prices on a Brownian bridge in log price from p0 (before the first step) to p1 (the last
    step, exactly), daily volatility sigma; rounded to 4 decimals."""
    k = (np.arange(1, steps + 1) / steps)[:, None]
    w = np.cumsum(rng.standard_normal((steps, len(p0))) * (sigma / math.sqrt(steps)), axis=0)
    logp = np.log(p0) + k * (np.log(p1) - np.log(p0)) + (w - k * w[-1])
    px = np.maximum(np.round(np.exp(logp), 4), 1e-4)
    px[-1] = p1
    return px


@dataclass
class DayEvents:
    """One day's messages: `rounds` trade messages (all syms at one instant) and single-row fills."""

    date: str
    round_ns: np.ndarray  # (R,) time of each round
    prices: np.ndarray  # (R, N)
    sizes: np.ndarray  # (R, N)
    fills: dict[str, list] = field(default_factory=dict)  # fill table input columns + "time"


class Book:
    """The demo accounts' positions as the fills move them (a mean-reverting walk around the start)."""

    def __init__(
        self, specs: Mapping[str, AccountSpec], start: dict[tuple[str, str], float], syms: list[str]
    ):
        self.accounts = list(specs)
        self.syms = syms
        self.target = dict(start)
        self.pos = dict(start)

    def exposure(self, closes: np.ndarray) -> np.ndarray:
        ix = {s: i for i, s in enumerate(self.syms)}
        x = np.zeros((len(self.accounts), len(self.syms)))
        acc = {a: i for i, a in enumerate(self.accounts)}
        for (a, s), q in self.pos.items():
            if a in acc:
                x[acc[a], ix[s]] += q * closes[ix[s]]
        return x

    def fill(self, rng: np.random.Generator, account: str, price_of: Any) -> tuple[str, str, float, float]:
        held = [s for (a, s), q in self.pos.items() if a == account and q != 0]
        sym = (
            str(rng.choice(held))
            if held and rng.random() < 0.9
            else self.syms[int(rng.integers(len(self.syms)))]
        )
        price = float(price_of(sym))
        cur, tgt = self.pos.get((account, sym), 0.0), self.target.get((account, sym), 0.0)
        base = max(abs(cur), abs(tgt))
        qty = float(max(1, round((base if base else 50_000.0 / price) * rng.uniform(0.02, 0.08))))
        toward = np.sign(tgt - cur)
        side_up = (rng.random() < 0.7) == (toward > 0) if toward != 0 else rng.random() < 0.5
        self.pos[(account, sym)] = cur + (qty if side_up else -qty)
        return sym, "B" if side_up else "S", qty, round(price * (1 + rng.uniform(-2e-4, 2e-4)), 4)


def day_events(
    rng: np.random.Generator,
    date: str,
    p0: np.ndarray,
    p1: np.ndarray,
    sigma: np.ndarray,
    opts: DemoOptions,
    book: Book,
) -> DayEvents:
    """Ticks from the previous close to the day's close and the day's fills (time-ordered)."""
    midnight = int(np.datetime64(date, "ns").astype(np.int64))
    steps = opts.ticks
    round_ns = (
        midnight + SESSION_OPEN_NS + (np.arange(1, steps + 1) * (SESSION_CLOSE_NS - SESSION_OPEN_NS)) // steps
    )
    prices = bridge(rng, p0, p1, steps, sigma)
    sizes = rng.integers(1, 50, size=prices.shape) * 100
    n_fill = opts.fills * len(book.accounts)
    t_fill = np.sort(rng.integers(midnight + SESSION_OPEN_NS, round_ns[-1], size=n_fill))
    who = rng.permutation(np.repeat(np.arange(len(book.accounts)), opts.fills))
    ix = {s: i for i, s in enumerate(book.syms)}
    cols: dict[str, list] = {
        k: [] for k in ("time", "account", "sym", "side", "qty", "price", "order_id", "exec_id")
    }
    for k, (t, a) in enumerate(zip(t_fill.tolist(), who.tolist(), strict=True)):
        r = int(np.searchsorted(round_ns, t, side="right")) - 1
        account = book.accounts[a]
        sym, side, qty, price = book.fill(
            rng, account, lambda s, r=r: prices[r, ix[s]] if r >= 0 else p0[ix[s]]
        )
        tag = date.replace("-", "")
        for c, v in zip(
            cols, (t, account, sym, side, qty, price, f"O{tag}-{k:05d}", f"X{tag}-{k:05d}"), strict=True
        ):
            cols[c].append(v)
    return DayEvents(date, round_ns, prices, sizes, cols)


def write_day(root: Path, ev: DayEvents, syms: list[str], last_seq: int, batch_ms: float) -> int:
    """Journal one day as the tickerplant would: seq per row in arrival order (a round is one message of
    N rows, a fill one message), rows of one table within a `batch_ms` window in one journal message.
    Returns the new last seq."""
    n_sym = len(syms)
    n_round, n_fill = len(ev.round_ns), len(ev.fills["time"])
    t_fill = np.asarray(ev.fills["time"], dtype=np.int64)
    msg_t = np.concatenate([ev.round_ns, t_fill])
    size = np.concatenate([np.full(n_round, n_sym), np.ones(n_fill, dtype=np.int64)])
    order = np.argsort(msg_t, kind="stable")  # a fill at a round's instant arrives after the round
    start = np.empty_like(size)
    start[order] = last_seq + 1 + np.cumsum(size[order]) - size[order]
    midnight = int(np.datetime64(ev.date, "ns").astype(np.int64))
    window = int(batch_ms * 1_000_000)

    trade_seq = (start[:n_round, None] + np.arange(n_sym)).ravel()
    trade_t = np.repeat(ev.round_ns, n_sym)
    sym_arr = pa.array(syms).take(pa.array(np.tile(np.arange(n_sym), n_round)))
    trade = pa.record_batch(
        {
            "time": pa.array(trade_t, pa.timestamp("ns")),
            "seq": pa.array(trade_seq),
            "sym": sym_arr,
            "price": pa.array(ev.prices.ravel()),
            "size": pa.array(ev.sizes.ravel().astype(np.int64)),
        },
        schema=TABLES["trade"].arrow_schema,
    )
    tables = {"trade": (trade, trade_t)}
    if n_fill:
        f = dict(ev.fills)
        f["time"] = pa.array(t_fill, pa.timestamp("ns"))
        f["seq"] = start[n_round:]
        fill = pa.record_batch(
            {c: f[c] for c in TABLES["fill"].column_names}, schema=TABLES["fill"].arrow_schema
        )
        tables["fill"] = (fill, t_fill)
    for table, (batch, t) in tables.items():
        w = (t - midnight) // window
        cuts = np.flatnonzero(np.diff(w)) + 1
        bounds = [0, *cuts.tolist(), len(t)]
        out = journal.JournalFile(journal.table_path(root, ev.date, table), TABLES[table].arrow_schema)
        try:
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                out.append(batch.slice(lo, hi - lo).serialize())
        finally:
            out.close()
    return int(last_seq + n_round * n_sym + n_fill)


# ------------------------------------------------------------------------------------- generate
@dataclass
class DemoResult:
    dates: list[str]
    journal: Path
    actual: Path
    trades: int
    fills: int
    calls: int


def generate(calc: Any, out: str | Path, opts: DemoOptions, force: bool = False) -> DemoResult:
    """Write the journals and actual_calls.csv under `out` (see the module docstring)."""
    opts.check()
    history = load_prices(calc.history_file)
    # the demo CCP margins the stock accounts: accounts on external models (SPAN) and accounts holding
    # instruments of the instrument master (options) have no price history of their own here
    positions = load_positions(calc.positions_file)
    syms = list(history.syms)
    listed = set(load_instruments(calc.instruments_file).syms) - set(syms) if calc.instruments_file else set()
    holds_listed = {a for a, s in zip(positions.account, positions.sym, strict=True) if s in listed}
    specs = {
        a: s
        for a, s in load_accounts(calc.accounts_file, calc.default_policy).items()
        if s.model in BUILTIN_MODELS and a not in holds_listed
    }
    unknown = sorted(
        {s for a, s in zip(positions.account, positions.sym, strict=True) if a in specs} - set(syms)
    )
    if unknown:
        raise InputError(
            f"{calc.positions_file}: sym {unknown[0]!r} is not in the price file {calc.history_file}"
        )
    need = max(calc.lookback_days + 1, opts.ccp_lookback, VOL_DAYS + 1, calc.horizon_days + 1)
    days = pick_days(history, opts.days, opts.end_date, need)
    window = history.closes[days[0] - need : days[-1] + 1]
    PriceHistory(history.dates[days[0] - need : days[-1] + 1], syms, window).validate(str(calc.history_file))
    dates = [str(history.dates[t]) for t in days]

    out = Path(out)
    root = out / "journal"
    taken = [d for d in dates if journal.day_files(root, d)]
    if taken and not force:
        raise InputError(
            f"{root}: journals already exist for {len(taken)} of the dates ({taken[0]}...); "
            f"choose another --out or pass --force to replace them"
        )
    for d in taken:
        for p in journal.day_files(root, d).values():
            p.unlink()
    start: dict[tuple[str, str], float] = {}
    for a, s, q in zip(positions.account, positions.sym, positions.qty.tolist(), strict=True):
        if a in specs:
            start[(a, s)] = start.get((a, s), 0.0) + q
    book = Book(specs, start, syms)
    ccp = Ccp.from_config(calc, syms, specs, opts.ccp_round, opts.ccp_lookback)
    rng = np.random.default_rng(opts.seed)
    seq = 0
    trades = fills = 0
    calls: list[tuple[str, str, float]] = []
    for t, date in zip(days.tolist(), dates, strict=True):
        r = np.log(history.closes[t - VOL_DAYS : t] / history.closes[t - VOL_DAYS - 1 : t - 1])
        sigma = np.maximum(r.std(axis=0, ddof=1), 0.005)
        ev = day_events(rng, date, history.closes[t - 1], history.closes[t], sigma, opts, book)
        seq = write_day(root, ev, syms, seq, opts.batch_ms)
        trades += ev.prices.size
        fills += len(ev.fills["time"])
        amounts = ccp.margins(history.closes[t - ccp.lookback : t + 1], book.exposure(history.closes[t]))
        calls += [(date, a, float(m)) for a, m in zip(book.accounts, amounts.tolist(), strict=True)]
    actual = out / "actual_calls.csv"
    with open(actual, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "account", "amount", "ccp", "time"])
        for date, a, m in calls:
            w.writerow([date, a, f"{m:.2f}", CCP_NAME, CALL_TIME])
    return DemoResult(dates, root, actual, trades, fills, len(calls))


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marginflow demo-history",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config")
    ap.add_argument("--days", type=int, default=20, help="trading days to write (default 20)")
    ap.add_argument("--out", default="var/demo-history", help="output folder (default var/demo-history)")
    ap.add_argument("--end-date", help="last business date YYYY-MM-DD (default: the price file's last day)")
    ap.add_argument(
        "--ticks", type=int, default=390, help="trade ticks per sym per day (default 390: one a minute)"
    )
    ap.add_argument("--fills", type=int, default=4, help="fills per account per day (default 4)")
    ap.add_argument(
        "--batch-ms",
        type=float,
        default=1000.0,
        help="tickerplant batch window: rows of a table within it share a journal message (default 1000)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--ccp-round",
        type=float,
        default=1000.0,
        help="the CCP rounds calls up to a multiple of this (default 1000)",
    )
    ap.add_argument(
        "--ccp-lookback",
        type=int,
        default=500,
        help="daily returns in the CCP's window, ending at the business date (default 500)",
    )
    ap.add_argument("--force", action="store_true", help="replace journals already written for these dates")
    args = ap.parse_args(list(argv))
    cfg = configuration.load(args.config)
    opts = DemoOptions(
        args.days,
        args.ticks,
        args.fills,
        args.batch_ms,
        args.seed,
        args.end_date,
        args.ccp_round,
        args.ccp_lookback,
    )
    try:
        res = generate(cfg.calc, args.out, opts, args.force)
    except (InputError, OSError) as e:
        print(f"demo-history: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(res.dates)} days {res.dates[0]}..{res.dates[-1]}: {res.trades + res.fills:,} events "
        f"({res.trades:,} trades, {res.fills:,} fills) in {res.journal}"
    )
    print(f"actual calls: {res.actual} ({res.calls} calls by {CCP_NAME})")
    print(
        f"next: marginflow backtest --journal {res.journal} --actual {res.actual} "
        f"--out {Path(args.out) / 'report'}"
    )
    return 0
