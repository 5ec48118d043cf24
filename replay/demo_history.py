"""`marginflow demo-history`: N trading days of demo journals from the real price file (trade ticks on a
Brownian bridge from each real close to the next, fills for the demo accounts) and the CCP's actual calls.

The actual calls come from the demo CCP (replay/demo_ccp.py, the one description of it): an independent
calculation in plain numpy (no engine code) at each of its cycles (ITD1 11:00, ITD2 14:00, EOD 18:00
New York), with its own window and rounding plus what a replica misses: an APC floor, a concentration
add-on, margin-rate recalibrations on known dates. Calls are written to the journal's `call` table
(stamped 20 min after the cycle, in seq order with the day's ticks and fills) and to actual_calls.csv.

    marginflow demo-history --days 60 --out var/demo-history
    -> var/demo-history/journal/<date>/{trade,fill,call}.arrows  and  var/demo-history/actual_calls.csv
"""

from __future__ import annotations

import argparse
import csv
import math
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
from replay import demo_ccp
from replay.demo_ccp import CCP_NAME, Ccp
from schemas.tables import TABLES
from tickerplant import journal

NS = 1_000_000_000
SESSION_OPEN_NS = (14 * 3600 + 30 * 60) * NS  # 09:30 New York (EST) in UTC
SESSION_CLOSE_NS = 21 * 3600 * NS  # 16:00 New York (EST) in UTC: the last tick of each sym is its real close
CSV_COLUMNS = ("date", "account", "amount", "ccp", "time", "cycle", "requirement", "collateral", "call")
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
    apc_floor_days: int = 2520  # the demo CCP's rules (replay/demo_ccp.py); 0 = no APC floor
    concentration_rate: float = 0.03  # 0 = no concentration add-on
    recalibrate: bool = True  # margin-rate steps on known dates

    def rules(self, calc: Any) -> demo_ccp.CcpRules:
        """The demo CCP's rules: these options over replay/demo_ccp.py's defaults, its cycles from calc."""
        kw: dict[str, Any] = {
            "round_to": self.ccp_round,
            "lookback": self.ccp_lookback,
            "apc_floor_days": self.apc_floor_days,
            "concentration_rate": self.concentration_rate,
        }
        if not self.recalibrate:
            kw["recalibrations"] = ()
        return demo_ccp.CcpRules.from_config(calc, **kw)

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
        if self.apc_floor_days != 0 and self.apc_floor_days < 2:
            raise InputError(
                f"--ccp-floor-days: must be 0 (off) or >= 2 daily returns, got {self.apc_floor_days}"
            )
        if not (math.isfinite(self.concentration_rate) and self.concentration_rate >= 0):
            raise InputError(
                f"--ccp-concentration-rate: must be a number >= 0, got {self.concentration_rate}"
            )


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
        return self.exposure_of(self.accounts, self.syms, self.pos, closes)

    @staticmethod
    def exposure_of(
        accounts: list[str], syms: list[str], pos: Mapping[tuple[str, str], float], px: np.ndarray
    ) -> np.ndarray:
        """(A, N) dollar exposures of positions `pos` at prices `px`."""
        ix = {s: i for i, s in enumerate(syms)}
        x = np.zeros((len(accounts), len(syms)))
        acc = {a: i for i, a in enumerate(accounts)}
        for (a, s), q in pos.items():
            if a in acc:
                x[acc[a], ix[s]] += q * px[ix[s]]
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


def write_day(
    root: Path,
    ev: DayEvents,
    syms: list[str],
    last_seq: int,
    batch_ms: float,
    calls: Sequence[tuple[int, dict[str, list]]] = (),
) -> int:
    """Journal one day as the tickerplant would: seq per row in arrival order (a round is one message of
    N rows, a fill one message, a cycle's calls one message stamped at its report time), rows of one table
    within a `batch_ms` window in one journal message. Returns the new last seq."""
    n_sym = len(syms)
    n_round, n_fill = len(ev.round_ns), len(ev.fills["time"])
    t_fill = np.asarray(ev.fills["time"], dtype=np.int64)
    t_call = np.array([t for t, _ in calls], dtype=np.int64)
    n_call = np.array([len(c["account"]) for _, c in calls], dtype=np.int64)
    msg_t = np.concatenate([ev.round_ns, t_fill, t_call])
    size = np.concatenate([np.full(n_round, n_sym), np.ones(n_fill, dtype=np.int64), n_call])
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
        f["seq"] = start[n_round : n_round + n_fill]
        fill = pa.record_batch(
            {c: f[c] for c in TABLES["fill"].column_names}, schema=TABLES["fill"].arrow_schema
        )
        tables["fill"] = (fill, t_fill)
    if calls:
        c_t = np.repeat(t_call, n_call)
        cols: dict[str, Any] = {"time": pa.array(c_t, pa.timestamp("ns"))}
        cols["seq"] = np.concatenate(
            [s + np.arange(n) for s, n in zip(start[n_round + n_fill :], n_call, strict=True)]
        )
        for name in TABLES["call"].column_names[2:]:
            cols[name] = [v for _, c in calls for v in c[name]]
        tables["call"] = (pa.record_batch(cols, schema=TABLES["call"].arrow_schema), c_t)
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
    return int(last_seq + n_round * n_sym + n_fill + int(n_call.sum()))


def cycle_calls(
    dccp: demo_ccp.DemoCcp,
    history: PriceHistory,
    t: int,
    ev: DayEvents,
    start: dict[tuple[str, str], float],
    book: Book,
    rate: float,
    collateral: dict[str, float],
) -> list[tuple[int, dict[str, list]]]:
    """The demo CCP's calls of day `t` (one message per cycle, stamped at its report time): positions and
    prices at each cycle time; the collateral moves by each call."""
    rules = dccp.rules
    out = []
    midnight = int(np.datetime64(ev.date, "ns").astype(np.int64))
    for name, t_ns in rules.cycle_times(ev.date):
        stamp = t_ns + rules.report_delay_s * NS
        if stamp >= midnight + 86_400 * NS:
            raise InputError(f"cycle {name} at {ev.date}: reported after the UTC day ends (report delay)")
        r = int(np.searchsorted(ev.round_ns, t_ns, side="right")) - 1
        px = ev.prices[r] if r >= 0 else history.closes[t - 1]
        pos = demo_ccp.position_at(start, ev.fills, t_ns)
        x = Book.exposure_of(book.accounts, book.syms, pos, px)
        req = dccp.requirement(history.closes[t - dccp.need : t], px, x, rate)
        cols: dict[str, list] = {c: [] for c in TABLES["call"].column_names[2:]}
        for a, m in zip(book.accounts, req.tolist(), strict=True):
            held = collateral[a]
            call = demo_ccp.call_of(m, held, rules.minimum_transfer)
            collateral[a] = held + call
            for c, v in zip(cols, (ev.date, name, CCP_NAME, a, m, call, held), strict=True):
                cols[c].append(v)
        out.append((stamp, cols))
    return out


# ------------------------------------------------------------------------------------- generate
@dataclass
class DemoResult:
    dates: list[str]
    journal: Path
    actual: Path
    trades: int
    fills: int
    calls: int
    recalibrations: list[tuple[str, float]] = field(default_factory=list)  # (date, factor)


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
    need = max(
        calc.lookback_days + 1, opts.ccp_lookback, opts.apc_floor_days, VOL_DAYS + 1, calc.horizon_days + 1
    )
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
    dccp = demo_ccp.DemoCcp(ccp, opts.rules(calc))
    rng = np.random.default_rng(opts.seed)
    seq = 0
    trades = fills = 0
    collateral = {a: float(sp.collateral) for a, sp in specs.items()}
    calls: list[tuple[int, dict[str, list]]] = []
    for i, (t, date) in enumerate(zip(days.tolist(), dates, strict=True)):
        r = np.log(history.closes[t - VOL_DAYS : t] / history.closes[t - VOL_DAYS - 1 : t - 1])
        sigma = np.maximum(r.std(axis=0, ddof=1), 0.005)
        sod = dict(book.pos)
        ev = day_events(rng, date, history.closes[t - 1], history.closes[t], sigma, opts, book)
        day_calls = cycle_calls(dccp, history, t, ev, sod, book, dccp.rules.rate_on(i, len(days)), collateral)
        seq = write_day(root, ev, syms, seq, opts.batch_ms, day_calls)
        trades += ev.prices.size
        fills += len(ev.fills["time"])
        calls += day_calls
    actual = out / "actual_calls.csv"
    n_calls = 0
    with open(actual, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for stamp, c in calls:
            hhmmss = str(np.datetime64(stamp, "ns").astype("datetime64[s]"))[11:]
            for k in range(len(c["account"])):
                w.writerow(
                    [
                        c["business_date"][k],
                        c["account"][k],
                        f"{c['requirement'][k]:.2f}",
                        CCP_NAME,
                        hhmmss,
                        c["cycle"][k],
                        f"{c['requirement'][k]:.2f}",
                        f"{c['collateral'][k]:.2f}",
                        f"{c['call'][k]:.2f}",
                    ]
                )
                n_calls += 1
    recal = [
        (dates[demo_ccp.recalibration_index(f, len(dates))], m)
        for f, m in dccp.rules.recalibrations
        if len(dates) > 1
    ]
    return DemoResult(dates, root, actual, trades, fills, n_calls, recal)


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
    for flag, kind, default, text in (  # the demo CCP's rules (replay/demo_ccp.py)
        ("--ccp-floor-days", int, 2520, "APC floor: parametric VaR over this many daily returns; 0 = off"),
        ("--ccp-concentration-rate", float, 0.03, "add-on per dollar of a position above $2m; 0 = off"),
    ):
        ap.add_argument(flag, type=kind, default=default, help=f"the CCP's {text} (default {default})")
    ap.add_argument(
        "--no-recalibration", action="store_true", help="the CCP keeps its margin rates (no steps)"
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
        args.ccp_floor_days,
        args.ccp_concentration_rate,
        not args.no_recalibration,
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
    print(f"actual calls: {res.actual} and the journal's call table ({res.calls} calls by {CCP_NAME})")
    if res.recalibrations:
        steps = ", ".join(f"{d} x{m:g}" for d, m in res.recalibrations)
        print(f"{CCP_NAME} recalibrates its margin rates: {steps}")
    print(
        f"next: marginflow backtest --journal {res.journal} --actual {res.actual} "
        f"--out {Path(args.out) / 'report'}"
    )
    return 0
