"""`marginflow shards plan`: an assignment file (calc.shard_file) that keeps the holders of each option
together, so that N shards divide the repricing of an options book instead of each repricing most of it.

Every shard reprices, in all scenarios, each option contract any of its accounts holds, whenever its
underlying ticks (calc/optionbook.py); under the hash assignment an option with h holders is held in
about 1 - (1 - 1/N)^h of N shards (~94% of them for 4 holders and 2 shards, BENCHMARKS.md "sharded calc").
The plan is a greedy balanced partition of the accounts: the work of a shard is the cost of the distinct
contracts it holds (a European price 1, an American one fullreval.AMERICAN_COST) plus its accounts'
positions (POSITION_COST each: their terms in the holders' tails); accounts are placed largest first on
the shard whose work grows least (where their contracts already are) as long as it stays within SLACK of
an even share, else on the least loaded, a group of accounts linked by shared contracts whole where it
fits (`plan`); then moved one at a time while a move lowers the larger of the two shards' work by more
than it adds to the total.

    marginflow shards plan --shards 2 --out var/shards.csv   # positions and instruments from config
    # then in every shard's config: [calc] shard_file = "var/shards.csv"; marginflow calc --shard K/2

It plans from the start-of-day positions file (with `--journal DIR`, also what today's fills traded, for a
reshard during the day); accounts it does not list (no positions) keep the hash.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from calc.fullreval import AMERICAN_COST
from calc.history import InputError
from calc.inputs import load_positions
from calc.instruments import load_instruments
from calc.shard import shard_of, write_assignment
from tickerplant import journal
from tickerplant.journal_reader import read_files

# a holder's position per scenario, in European prices: its term in each of its account's tail candidates
# (no row update since session 21: bench_option_book's European tick, 10,000 option positions x 1,000
# scenarios, numbers 1.45 -> 2.54 ms on both cores, ~0.11 ns a position-scenario, against 3.0 ns a price)
POSITION_COST = 0.04
SLACK = 1.1  # a shard may take up to 10% more than an even share of the work while its accounts go together
MOVE_PASSES = 4  # refinement passes over the accounts


@dataclass(frozen=True)
class ShardLoad:
    """One shard of an assignment: its accounts, their positions, the distinct contracts it holds and
    their share of the book's, and its work (see the module docstring)."""

    shard: int
    accounts: int
    positions: int
    contracts: int
    contract_share: float
    work: float


def _own_work(held: Mapping[str, Collection[str]]) -> dict[str, float]:
    return {a: POSITION_COST * len(syms) for a, syms in held.items()}


def loads(
    held: Mapping[str, Collection[str]], option_cost: Mapping[str, float], assigned: Mapping[str, int], n: int
) -> list[ShardLoad]:
    """The ShardLoad of each of n shards when account a is on assigned[a]."""
    own = _own_work(held)
    accounts, positions = [0] * n, [0] * n
    contracts: list[set[str]] = [set() for _ in range(n)]
    work = [0.0] * n
    for a, syms in held.items():
        k = assigned[a]
        accounts[k] += 1
        positions[k] += len(syms)
        work[k] += own[a]
        contracts[k] |= {s for s in syms if s in option_cost}
    book = len({s for syms in held.values() for s in syms if s in option_cost}) or 1
    for k in range(n):
        work[k] += sum(option_cost[c] for c in contracts[k])
    return [
        ShardLoad(k, accounts[k], positions[k], len(contracts[k]), len(contracts[k]) / book, work[k])
        for k in range(n)
    ]


class _Shards:
    """n shards being filled: each one's holders per contract and work; where each account is."""

    def __init__(
        self, n: int, own: Mapping[str, float], opts: Mapping[str, list[str]], cost: Mapping[str, float]
    ):
        self.n, self.own, self.opts, self.cost = n, own, opts, cost
        self.count: list[dict[str, int]] = [{} for _ in range(n)]  # shard -> contract -> its holders there
        self.work = [0.0] * n
        self.where: dict[str, int] = {}

    def added(self, a: str, k: int) -> float:
        """The work account a adds to shard k: its own, and its contracts k does not hold yet."""
        return self.own[a] + sum(self.cost[c] for c in self.opts[a] if c not in self.count[k])

    def removed(self, a: str) -> float:
        k = self.where[a]
        return self.own[a] + sum(self.cost[c] for c in self.opts[a] if self.count[k][c] == 1)

    def put(self, a: str, k: int) -> None:
        self.work[k] += self.added(a, k)
        for c in self.opts[a]:
            self.count[k][c] = self.count[k].get(c, 0) + 1
        self.where[a] = k

    def take(self, a: str) -> None:
        self.work[self.where[a]] -= self.removed(a)
        k = self.where.pop(a)
        for c in self.opts[a]:
            self.count[k][c] -= 1
            if not self.count[k][c]:
                del self.count[k][c]

    def least_loaded(self) -> int:
        return min(range(self.n), key=lambda k: (self.work[k], k))


def _groups(order: list[str], opts: Mapping[str, list[str]]) -> list[list[str]]:
    """The accounts linked by the contracts they share (connected components), each in breadth-first
    order from its first account in `order` (so each next account shares a contract with one before it),
    the groups in the order of their first accounts."""
    holders: dict[str, list[str]] = {}
    for a in order:
        for c in opts[a]:
            holders.setdefault(c, []).append(a)
    seen: set[str] = set()
    groups = []
    for start in order:
        if start in seen:
            continue
        seen.add(start)
        group, i = [start], 0
        while i < len(group):
            for c in opts[group[i]]:
                for b in holders[c]:
                    if b not in seen:
                        seen.add(b)
                        group.append(b)
            i += 1
        groups.append(group)
    return groups


def plan(held: Mapping[str, Collection[str]], option_cost: Mapping[str, float], n: int) -> dict[str, int]:
    """account -> shard of 0..n-1 for every account of `held` (account -> the syms it holds), given the
    repricing cost of each option sym (others are linear); the same input gives the same plan.

    The accounts linked by shared contracts go whole to the least loaded shard while that stays within
    SLACK of an even share of the work; a group too big for that is placed account by account (breadth
    first) where each adds least work within the share (or where all its contracts already are), else on
    the least loaded; then single moves that lower the larger of the two shards' work by more than they
    add to the total (copies of contracts), MOVE_PASSES times at most."""
    own = _own_work(held)
    opts = {a: sorted(s for s in syms if s in option_cost) for a, syms in held.items()}
    order = sorted(held, key=lambda a: (-(own[a] + sum(option_cost[c] for c in opts[a])), a))
    every = {c for cs in opts.values() for c in cs}
    cap = SLACK * (sum(own.values()) + sum(option_cost[c] for c in every)) / n
    sh = _Shards(n, own, opts, option_cost)
    groups = _groups(order, opts)
    weight = {
        id(g): sum(own[a] for a in g) + sum(option_cost[c] for c in {c for a in g for c in opts[a]})
        for g in groups
    }
    for group in sorted(groups, key=lambda g: -weight[id(g)]):  # (stable: ties keep `order`)
        k = sh.least_loaded()
        if sh.work[k] + weight[id(group)] <= cap:
            for a in group:
                sh.put(a, k)
            continue
        for a in group:  # (where it adds no contract it goes even past the share: a copy costs more)
            fits = [k for k in range(n) if sh.work[k] + sh.added(a, k) <= cap or sh.added(a, k) <= own[a]]
            sh.put(a, min(fits, key=lambda k: (sh.added(a, k), sh.work[k], k)) if fits else sh.least_loaded())
    for _ in range(MOVE_PASSES):
        moved = False
        for a in order:
            k = sh.where[a]
            out = sh.removed(a)
            best, best_peak = k, sh.work[k]
            for j in range(n):
                add = sh.added(a, j)
                peak = max(sh.work[k] - out, sh.work[j] + add)
                # a move that copies contracts must lower the peak by more than the copies cost in all
                if j != k and peak < best_peak - 1e-9 and add - out <= sh.work[k] - peak + 1e-9:
                    best, best_peak = j, peak
            if best != k:
                sh.take(a)
                sh.put(a, best)
                moved = True
        if not moved:
            break
    return sh.where


def holdings(
    positions_file: str | Path, instruments_file: str | Path | None, journal_dir: str | Path | None = None
) -> tuple[dict, dict]:
    """(account -> syms held, option sym -> repricing cost) from a positions file, the fills of the
    journal's last day when `journal_dir` is given (an instrument traded today counts as held: a plan
    for a reshard during the day), and an instrument master (no master: every sym is linear)."""
    pos = load_positions(positions_file)
    held: dict[str, set[str]] = {}
    for a, s, q in zip(pos.account, pos.sym, pos.qty.tolist(), strict=True):
        if q != 0:
            held.setdefault(a, set()).add(s)
    days = journal.journal_dates(journal_dir) if journal_dir else []
    if journal_dir and not days:
        raise InputError(f"--journal: {journal_dir}: no journal day there")
    if days:
        fills = {t: f for t, f in journal.day_files(journal_dir, days[-1]).items() if t == "fill"}
        for _, batch in read_files(fills):
            for a, s in zip(
                batch.column("account").to_pylist(), batch.column("sym").to_pylist(), strict=True
            ):
                held.setdefault(a, set()).add(s)
    cost: dict[str, float] = {}
    if instruments_file:
        master = load_instruments(instruments_file)
        for i in master.options.tolist():
            cost[master.syms[i]] = float(AMERICAN_COST) if master.american[i] else 1.0
    return held, cost


def table(title: str, rows: Sequence[ShardLoad]) -> str:
    peak = max(r.work for r in rows)
    mean = sum(r.work for r in rows) / len(rows)
    out = [f"{title}: peak work {peak:,.1f} = {peak / mean if mean else 1:.2f}x the mean", ""]
    out += [
        "| shard | accounts | positions | contracts held | share of the book's | work |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.shard} | {r.accounts:,} | {r.positions:,} | {r.contracts:,} | {r.contract_share:.0%} "
        f"| {r.work:,.1f} |"
        for r in rows
    ]
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="marginflow shards", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="write an account,shard file that keeps each option's holders together")
    p.add_argument("--shards", type=int, required=True, help="N, the number of shards")
    p.add_argument("--config", help="config file (calc.positions_file, calc.instruments_file, [bus] buckets)")
    p.add_argument("--positions", help="positions CSV (default: calc.positions_file)")
    p.add_argument("--instruments", help="instrument master CSV (default: calc.instruments_file)")
    p.add_argument("--journal", help="also the fills of this journal's last day (a plan during the day)")
    p.add_argument("--out", help="the account,shard CSV to write (default: print the tables only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from marginflow import config

    cfg = config.load(args.config)
    n = args.shards
    if n < 1:
        print("marginflow shards plan: --shards must be >= 1", file=sys.stderr)
        return 2
    try:
        held, cost = holdings(
            args.positions or cfg.calc.positions_file,
            args.instruments or cfg.calc.instruments_file,
            args.journal,
        )
    except (InputError, OSError, ValueError) as e:  # a missing or malformed file: its name and why
        print(f"marginflow shards plan: {e}", file=sys.stderr)
        return 2
    hashed = {a: shard_of(a, n, None, cfg.bus.buckets) for a in held}
    planned = plan(held, cost, n)
    print(
        table(
            f"the hash assignment ({len(held):,} accounts, {len(cost):,} options in the master)",
            loads(held, cost, hashed, n),
        )
    )
    print()
    print(table("the plan", loads(held, cost, planned, n)))
    if args.out:
        write_assignment(args.out, planned)
        print(f"\nwrote {args.out}: set calc.shard_file to it on every shard of {n}")
    return 0
