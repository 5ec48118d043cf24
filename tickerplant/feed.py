"""Feed handlers: the market simulator (20 real stocks moving with the covariance of their real daily
returns, as trades, quotes and fills) and a file feed publishing the rows of a CSV or Parquet file.

Both publish through the reconnecting Publisher: a tickerplant restart pauses them (the unacked
messages are resent, the bounded buffer holds the feed back) instead of ending them. The simulator's
order and exec ids carry a per-run prefix (`run_id`), so a restarted feed never reuses an exec_id
(the tickerplant would refuse the fill as a duplicate).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from marginflow import auth, process
from marginflow import config as configuration
from marginflow.config import FeedConfig
from schemas.tables import TABLES
from tickerplant.client import Publisher

log = logging.getLogger("marginflow.feed")
TRADING_DAY_SECONDS = 6.5 * 3600
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def run_id() -> str:
    """Unique per simulator run: the start time in ns and the pid, base 36 (e.g. 'lx3k9q2m1a4-2n9c')."""
    return f"{base36(time.time_ns())}-{base36(os.getpid())}"


def load_closes(path: str | Path, lookback: int = 504) -> tuple[list[str], np.ndarray]:
    """Wide daily closes (Date, then one column per sym) -> syms and the last `lookback`+1 rows."""
    frame = pl.read_csv(path)
    syms = [c for c in frame.columns if c.lower() != "date"]
    closes = frame.select(syms).drop_nulls().to_numpy()[-(lookback + 1) :]
    return syms, closes.astype(np.float64)


@dataclass
class MarketSimulator:
    """Correlated log-normal moves: each step draws L·z with L the Cholesky factor of the real daily
    return covariance, scaled to the step's share of a (compressed) trading day."""

    syms: list[str]
    prices: np.ndarray
    chol: np.ndarray
    accounts: list[str]
    fill_ratio: float
    rng: np.random.Generator
    day_seconds: float = 600.0  # one simulated trading day passes in this many wall seconds
    order_no: int = 0
    contracts: dict[str, list[str]] = field(default_factory=dict)  # account -> the only syms it trades
    run: str = field(default_factory=run_id)  # prefix of order and exec ids: never reused across runs

    @classmethod
    def from_config(cls, cfg: FeedConfig, accounts: list[str]) -> MarketSimulator:
        syms, closes = load_closes(cfg.prices_file)
        returns = np.diff(np.log(closes), axis=0)
        cov = np.cov(returns, rowvar=False)
        return cls(
            syms,
            closes[-1].copy(),
            np.linalg.cholesky(cov),
            accounts,
            cfg.fill_ratio,
            np.random.default_rng(cfg.seed),
        )

    def step(self, seconds: float) -> None:
        z = self.rng.standard_normal(len(self.syms))
        shock = self.chol @ z * np.sqrt(seconds / self.day_seconds)
        self.prices *= np.exp(shock)

    def messages(self, n: int) -> list[tuple[str, dict[str, list]]]:
        """n events (trades, quotes, fills) at the current prices, grouped per table."""
        rng = self.rng
        kinds = rng.random(n)
        idx = rng.integers(0, len(self.syms), n)
        n_fill = int((kinds < self.fill_ratio).sum()) if self.accounts else 0
        n_trade = int(((kinds >= self.fill_ratio) & (kinds < 0.5)).sum())
        n_quote = n - n_fill - n_trade
        out: list[tuple[str, dict[str, list]]] = []
        if n_trade:
            i = idx[:n_trade]
            px = np.round(self.prices[i] * (1 + rng.normal(0, 2e-4, n_trade)), 4)
            out.append(
                (
                    "trade",
                    {
                        "sym": [self.syms[k] for k in i],
                        "price": px.tolist(),
                        "size": (rng.integers(1, 20, n_trade) * 100).tolist(),
                    },
                )
            )
        if n_quote:
            i = idx[n_trade : n_trade + n_quote]
            mid = self.prices[i]
            half = np.maximum(mid * 1e-4, 0.005)
            out.append(
                (
                    "quote",
                    {
                        "sym": [self.syms[k] for k in i],
                        "bid": np.round(mid - half, 4).tolist(),
                        "ask": np.round(mid + half, 4).tolist(),
                        "bid_size": (rng.integers(1, 50, n_quote) * 100).tolist(),
                        "ask_size": (rng.integers(1, 50, n_quote) * 100).tolist(),
                    },
                )
            )
        if n_fill:
            i = idx[n - n_fill :]
            acc = rng.integers(0, len(self.accounts), n_fill)
            first = self.order_no + 1
            self.order_no += n_fill
            names = [self.accounts[a] for a in acc]
            syms = [self.syms[k] for k in i]
            qty = (rng.integers(1, 10, n_fill) * 10).astype(float)
            price = np.round(self.prices[i], 4)
            for f, name in enumerate(names):  # derivatives accounts trade their own contracts, a few lots
                if name in self.contracts:
                    syms[f] = self.contracts[name][int(rng.integers(0, len(self.contracts[name])))]
                    qty[f] = float(rng.integers(1, 4))
            out.append(
                (
                    "fill",
                    {
                        "account": names,
                        "sym": syms,
                        "side": rng.choice(["B", "S"], n_fill).tolist(),
                        "qty": qty.tolist(),
                        "price": price.tolist(),
                        "order_id": [f"O{self.run}-{k}" for k in range(first, self.order_no + 1)],
                        "exec_id": [f"E{self.run}-{k}" for k in range(first, self.order_no + 1)],
                    },
                )
            )
        return out


def demo_accounts(
    accounts_file: str, positions_file: str, count: int, stocks: set[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """The accounts to simulate fills for (the first `count` of calc's accounts file; 0 = all) and, for
    accounts whose positions are not among the 20 stocks (derivatives, e.g. SPAN), the contracts they hold."""
    path = Path(accounts_file)
    names: list[str] = []
    if path.exists():
        with open(path) as f:
            names = [row["account"] for row in csv.DictReader(f)]
    names = (names[:count] if count else names) or [f"ACC{i:02d}" for i in range(1, (count or 6) + 1)]
    held: dict[str, list[str]] = {}
    if Path(positions_file).exists():
        with open(positions_file) as f:
            for row in csv.DictReader(f):
                held.setdefault(row["account"], []).append(row["sym"])
    contracts = {a: syms for a, syms in held.items() if a in names and not set(syms) <= stocks}
    return names, contracts


async def simulate(
    url: str, sim: MarketSimulator, rate: float, seconds: float | None = None, cycle: float = 0.01
) -> int:
    """Publish `rate` events per second in one frame per cycle; stop after `seconds` (None: forever).
    While the tickerplant is away the publisher's bounded buffer holds the loop back; on its return the
    feed resumes at the rate (it does not burst to catch up more than a second)."""
    sent = 0
    start = last = time.monotonic()
    async with Publisher(url, name="feed", max_unacked=256) as pub:
        while seconds is None or time.monotonic() - start < seconds:
            t0 = time.monotonic()
            n = (
                int(rate * (t0 - start)) - sent
            )  # paced by the clock, so loop overhead does not lower the rate
            if n > max(rate, 1):  # held back (tickerplant away): skip ahead instead of a burst
                sent += n - int(max(rate, 1))
                n = int(max(rate, 1))
            sim.step(t0 - last)
            last = t0
            if n:
                await pub.upd_many(sim.messages(n))  # waits while 256 messages are unacked
                sent += n
            if pub.errors:
                log.error("tickerplant refused: %s", pub.errors[-1].reason)
                pub.errors.clear()
            await asyncio.sleep(max(0.0, cycle - (time.monotonic() - t0)))
        await pub.wait_acked(timeout=None if seconds is None else 60)
    return sent


def demo_simulator(cfg: configuration.Config) -> MarketSimulator:
    """The simulator `marginflow feed` runs: [feed]'s prices and seed, fills for calc's demo accounts."""
    sim = MarketSimulator.from_config(cfg.feed, [])
    sim.accounts, sim.contracts = demo_accounts(
        cfg.calc.accounts_file, cfg.calc.positions_file, cfg.feed.accounts, set(sim.syms)
    )
    return sim


def read_rows(path: str) -> pl.DataFrame:
    return pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)


async def publish_file(
    url: str, table: str, frame: pl.DataFrame, rate: float | None, chunk: int = 1000
) -> int:
    """Publish a file's rows (columns named as the table's input columns), `rate` rows/s or max."""
    names = [c.name for c in TABLES[table].input_columns]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise SystemExit(f"feed: file lacks column(s) {missing} of table {table}")
    start = time.monotonic()
    async with Publisher(url, name="feed-file", max_unacked=64) as pub:
        for off in range(0, frame.height, chunk):
            part = frame.slice(off, chunk)
            await pub.upd(table, {n: part[n].to_list() for n in names})
            if rate:
                await asyncio.sleep(max(0.0, (off + part.height) / rate - (time.monotonic() - start)))
        await pub.wait_acked(timeout=300)  # across tickerplant restarts
        for e in pub.errors:
            print(f"refused: {e.reason}")
    return frame.height


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow feed", description=__doc__)
    ap.add_argument("--config")
    ap.add_argument("--tp", help="tickerplant URL (default ws://<tickerplant.host>:<tickerplant.port>)")
    ap.add_argument("--rate", type=float, help="events per second (simulator) or rows per second (file)")
    ap.add_argument("--seconds", type=float, help="stop after this many seconds (default: run until stopped)")
    ap.add_argument("--file", help="publish the rows of this CSV or Parquet file instead of simulating")
    ap.add_argument("--table", help="with --file: the table the rows belong to")
    args = ap.parse_args(argv)
    cfg = configuration.load(args.config)
    url = args.tp or f"{auth.scheme(cfg.access)}://{cfg.tickerplant.host}:{cfg.tickerplant.port}"
    process.setup_logging("feed")
    if args.file:
        if args.table not in TABLES:
            print(f"feed: --table must be one of {', '.join(TABLES)}")
            return 2
        n = asyncio.run(publish_file(url, args.table, read_rows(args.file), args.rate))
        print(f"published {n} rows of {args.file} to {args.table}")
        return 0
    sim = demo_simulator(cfg)
    rate = args.rate or cfg.feed.rate
    print(
        f"feed: simulating {len(sim.syms)} stocks, {len(sim.accounts)} accounts, {rate:g} events/s -> {url}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _stop)
    try:
        n = asyncio.run(simulate(url, sim, rate, args.seconds))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (from `marginflow up`): a clean stop
        return 0
    print(f"sent {n} events")
    return 0
