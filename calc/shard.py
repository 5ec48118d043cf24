"""Sharded calc (#16): which shard owns an account, a shard's engine, and what a shard subscribes to.

`marginflow calc --shard K/N` (K = 0..N-1; config `calc.shard`) owns the accounts `shard_of` gives it:
the explicit assignment file first (`calc.shard_file`, CSV `account,shard`, for big accounts), else the
account's bus bucket mod N (`schemas.bus.bucket`: blake2b of its UTF-8 bytes mod `[bus] buckets`, the
same in every process, machine and Python version). Every account belongs to exactly one shard of N, so
the shards' margin rows together are one unsharded calc's. Because a shard owns whole buckets by
default, the bus sends it no other shard's fills (subjects `mf.fill.<bucket>`, schemas/bus.py); an
account the file moves leaves its bucket shared: the shards of that bucket receive each other's rows of
it and drop them (NatsSubscriber's key filter, `Subscription.mine`).

A shard's engine holds only its accounts and their start-of-day positions (`shard_engine`), and it
reads from the bus (`[bus] kind = "nats"`, tickerplant/nats_client.py) only:
- fill, call, and its own alert / forecast rows of its accounts: the buckets of its accounts (at most
  `[bus] buckets` filter subjects per table, however many accounts);
- trades and quotes of the instruments its accounts hold (and the underlyings of held options): their
  buckets, the other instruments of those buckets dropped by sym;
- every param row.
A fill that adds an instrument (`Subscription.first_new`) widens the filter: the instrument's ticks of
the day before the fill come first (NatsSubscriber.widen), applied before the fill; the batch is cut at
that fill, and its later rows and the instrument's later ticks follow in seq order: no gap, no
duplicate. An engine that receives the same batches in the same order per instrument computes the same
numbers: after a replay (one kernel step), a shard's margin rows equal an unsharded calc's bit for bit
(tests/calc/test_shard.py); rows carry `last_seq`, the shard's own last applied seq.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from marginflow.config import BusConfig
from schemas import bus

if TYPE_CHECKING:
    from calc.engine import MarginEngine
    from marginflow.config import CalcConfig

log = logging.getLogger("marginflow.calc.shard")
ACCOUNT_TABLES = ("fill", "call", "alert", "forecast")  # a shard reads these for its accounts only
TICK_TABLES = ("trade", "quote")  # ... these for its instruments only
# the tables whose batches waiting together in the consumer a shard takes as one (NatsSubscriber's
# `coalesce`): the ticks, and the fills (a fill that adds an instrument cuts the joined batch there:
# calc/server.py's _shard_batch). Not joining fills left a shard, at 1,000 one-row fills/s, applying and
# publishing each fill on its own (~3.5 ms of the shard's loop each on 2 busy cores): it fell behind and
# its fill -> margin latency grew through the run (BENCHMARKS.md, "Fill -> margin row at 1,000 fills/s")
JOINED_TABLES = (*TICK_TABLES, "fill")


DEFAULT_BUCKETS = BusConfig().buckets  # (the [bus] default: one definition, in the config struct)


@dataclass(frozen=True)
class Shard:
    """Shard `k` of `n` (0 <= k < n) with its explicit assignments (account -> shard), over the bus's
    `buckets`."""

    k: int
    n: int
    assigned: Mapping[str, int] = field(default_factory=dict)
    buckets: int = DEFAULT_BUCKETS

    def owns(self, account: str) -> bool:
        return shard_of(account, self.n, self.assigned, self.buckets) == self.k

    @property
    def name(self) -> str:
        return f"{self.k}/{self.n}"


def parse_shard(text: str) -> tuple[int, int]:
    """ "K/N" -> (K, N), refused with the reason (K in 0..N-1, N >= 1)."""
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise ValueError(f"calc.shard: 'K/N' with K = 0..N-1, got {text!r}")
    kk, nn = int(k), int(n)
    if nn < 1 or not 0 <= kk < nn:
        raise ValueError(f"calc.shard: K must be 0..N-1 and N >= 1, got {text!r}")
    return kk, nn


def shard_of(
    account: str, n: int, assigned: Mapping[str, int] | None = None, buckets: int = DEFAULT_BUCKETS
) -> int:
    """The shard of `n` that owns `account`: its explicit assignment if it has one, else its bus bucket
    (of `buckets`) mod n: a bucket's accounts all on one shard (for n dividing `buckets`, this is
    blake2b(account) mod n)."""
    if assigned and account in assigned:
        return assigned[account]
    return bus.bucket(account, buckets) % n


def read_assignment(path: str | Path, n: int) -> dict[str, int]:
    """`account,shard` CSV (header required) -> {account: shard}; refused with the line and reason
    (a shard outside 0..n-1, an account twice)."""
    out: dict[str, int] = {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is None or {"account", "shard"} - set(rows.fieldnames):
            raise ValueError(f"{path}: header must name columns account,shard")
        for line, row in enumerate(rows, start=2):
            account, text = (row["account"] or "").strip(), (row["shard"] or "").strip()
            if not account or not text.isdigit() or int(text) >= n:
                raise ValueError(f"{path} line {line}: shard must be 0..{n - 1} for an account, got {row}")
            if account in out:
                raise ValueError(f"{path} line {line}: account {account!r} assigned twice")
            out[account] = int(text)
    return out


def write_assignment(path: str | Path, assigned: Mapping[str, int]) -> None:
    """{account: shard} -> the `account,shard` CSV read_assignment reads (accounts sorted)."""
    Path(path).write_text("account,shard\n" + "".join(f"{a},{k}\n" for a, k in sorted(assigned.items())))


def from_config(calc: CalcConfig, buckets: int = DEFAULT_BUCKETS) -> Shard | None:
    """The shard [calc] names (`shard`, `shard_file`) over [bus] `buckets`, or None for an unsharded
    calc."""
    if not calc.shard:
        return None
    k, n = parse_shard(calc.shard)
    return Shard(k, n, read_assignment(calc.shard_file, n) if calc.shard_file else {}, buckets)


def shard_engine(calc: CalcConfig, shard: Shard) -> ShardEngine:
    """MarginEngine.from_config with the shard's accounts only and their start-of-day positions (the
    instruments of every account's, so the instrument universe is the whole book's), seen through
    ShardEngine. Its state arrays are the shard's accounts' rows only; an account's numbers are the
    same as in the whole book's engine (see ShardEngine)."""
    import numpy as np

    from calc.engine import MarginEngine, option_inputs
    from calc.history import load_prices
    from calc.inputs import Positions, load_accounts, load_positions, params_from_config

    accounts = load_accounts(calc.accounts_file, calc.default_policy)
    owned = [a for a in accounts if shard.owns(a)]
    if not owned:
        raise ValueError(f"calc.shard {shard.name}: owns none of the accounts in {calc.accounts_file}")
    every = load_positions(calc.positions_file)
    keep = np.flatnonzero([shard.owns(a) for a in every.account])
    account, sym = np.array(every.account, dtype=object)[keep], np.array(every.sym, dtype=object)[keep]
    pos = Positions(account.tolist(), sym.tolist(), every.qty[keep], every.multiplier, every.price)
    history = load_prices(calc.history_file)
    params = params_from_config(calc, history)
    extra = option_inputs(calc, history.dates[-1])
    mine = {a: spec for a, spec in accounts.items() if shard.owns(a)}
    engine = MarginEngine(
        params, mine, pos, prices=history.latest, calc_config=calc, instruments=list(every.sym), **extra
    )
    return ShardEngine(engine, shard, owned)


class ShardEngine:
    """A MarginEngine of its shard's accounts only (rows, alerts, what-if: the shard's), which refuses a
    what-if for another shard's account by name; everything else is the engine's.

    An account's numbers do not depend on the other accounts in its engine: the lazy HS tail's flush
    point comes from the account's name (calc/state.py flush_share), a rebuild's products are per
    account (calc/reference.py slot_products; kernels.rebuild_pnl). So a shard's margins equal the whole
    book's engine's bit for bit (tests/calc/test_shard.py), with state arrays (accounts x scenarios) of
    its own accounts only. Still coupled: `calc.resync_events` counts the events this process applied
    (a shard resyncs at other points of the stream than an unsharded calc: the last bits may differ
    after the first resync, 1,000,000 events by default)."""

    def __init__(self, engine: MarginEngine, shard: Shard, owned: list[str]):
        self.engine, self.shard = engine, shard
        self.accounts = owned
        self.acc_index = engine.acc_index
        self._mine = frozenset(owned)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def what_if(self, account: str, trades: Any, compare: bool = False) -> dict[str, Any]:
        if account not in self._mine:
            raise ValueError(f"account {account!r} is not on shard {self.shard.name}")
        return self.engine.what_if(account, trades, compare)


@dataclass
class Subscription:
    """What a shard asks the bus for (NatsSubscriber's `tables` / `table_keys`), widened as fills add
    instruments."""

    engine: ShardEngine
    accounts: frozenset[str]
    syms: set[str] = field(default_factory=set)  # instruments whose ticks it receives

    @classmethod
    def of(cls, engine: ShardEngine) -> Subscription:
        st = engine.st
        held = {engine.syms[int(j)] for j in st.inst[st.qty != 0].tolist()}
        sub = cls(engine, frozenset(engine.accounts))
        sub.syms = sub.with_underlyings(held)
        return sub

    def with_underlyings(self, syms: Iterable[str]) -> set[str]:
        out = set(syms)
        m = self.engine.master
        if m is not None:
            out |= {m.syms[int(m.underlying[m.index[s]])] for s in out if s in m.index}
        return out

    @property
    def tables(self) -> list[str]:
        ticks = list(TICK_TABLES) if self.syms else []
        return [*ACCOUNT_TABLES, *ticks, "param"]

    @property
    def table_keys(self) -> dict[str, Collection[str]]:
        keys: dict[str, Collection[str]] = {t: sorted(self.accounts) for t in ACCOUNT_TABLES}
        keys.update({t: sorted(self.syms) for t in TICK_TABLES})
        return keys

    def mine(self, table: str, batch: pa.RecordBatch) -> pa.RecordBatch | None:
        """`batch` without other shards' rows (None if nothing is left): the bus sends only ours, the
        websocket fan-out every account's."""
        if table not in ACCOUNT_TABLES:
            return batch
        accounts = batch.column("account").to_pylist()
        keep = [a in self.accounts for a in accounts]
        if all(keep):
            return batch
        return batch.filter(pa.array(keep)) if any(keep) else None

    def first_new(self, fills: pa.RecordBatch) -> int | None:
        """The row of the first of the shard's fills in `fills` that adds an instrument (or underlying)
        it has no ticks of (None: none does)."""
        accounts, syms = fills.column("account").to_pylist(), fills.column("sym").to_pylist()
        for i, (a, s) in enumerate(zip(accounts, syms, strict=True)):
            if a in self.accounts and s is not None and self.with_underlyings([s]) - self.syms:
                return i
        return None

    def new_syms(self, fills: pa.RecordBatch) -> set[str]:
        """The instruments (and underlyings) the shard's fills in `fills` add; noted as subscribed."""
        mine = [
            s
            for a, s in zip(fills.column("account").to_pylist(), fills.column("sym").to_pylist(), strict=True)
            if a in self.accounts
        ]
        new = self.with_underlyings(s for s in mine if s is not None) - self.syms
        self.syms |= new
        return new


class Lease:
    """Which of the processes running one shard publishes (failover): the holder of key
    `shard-<k>-of-<n>` in the JetStream key-value bucket `[bus] lease_bucket`, whose entries lapse
    `lease_ttl_s` after they were written. The holder renews it every third of that (an update on the
    revision it wrote, refused once another process took the key); the others try to create it twice as
    often, which succeeds once it lapsed (its holder died or stalled). A holder that cannot renew for
    most of the TTL (the bus unreachable) gives it up, so two processes never both publish for long; a
    standby follows the stream all along (its state is current) and publishes once it holds the lease.
    `held` says which this process is; `changed(held)` is awaited on every change."""

    def __init__(self, cfg: BusConfig, shard: Shard, owner: str, changed: Callable[[bool], Awaitable[None]]):
        self.cfg, self.shard, self.owner, self.changed = cfg, shard, owner, changed
        self.key = f"shard-{shard.k}-of-{shard.n}"
        self.held = False
        self.revision = 0
        self.renewed_at = 0.0  # time.monotonic() of the last successful create or renewal
        self.takeovers = 0  # times this process took the lease

    async def run(self) -> None:
        import nats.errors
        import nats.js.errors

        from tickerplant.bus import connect

        ttl = self.cfg.lease_ttl_s
        nc = await connect(self.cfg, f"marginflow-lease-{self.key}")
        kv = None
        try:
            js = nc.jetstream()
            try:
                kv = await js.create_key_value(
                    bucket=self.cfg.lease_bucket, ttl=ttl, history=1, replicas=self.cfg.replicas
                )
            except nats.js.errors.BadRequestError:  # made by another process with other settings: use it
                kv = await js.key_value(self.cfg.lease_bucket)
            ttl = (await kv.status()).ttl or ttl  # (the bucket's, if another process made it otherwise)
            while True:
                try:
                    if self.held:
                        self.revision = await kv.update(self.key, self.owner.encode(), last=self.revision)
                    else:
                        self.revision = await kv.create(self.key, self.owner.encode())
                        self.takeovers += 1
                    self.renewed_at = time.monotonic()
                    await self._set(True)
                except nats.js.errors.KeyWrongLastSequenceError:
                    await self._set(False)  # another process holds it
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
                    log.warning("shard %s lease: %s", self.shard.name, e)
                    if self.held and time.monotonic() - self.renewed_at > 0.8 * ttl:
                        await self._set(False)  # it may lapse any moment: stop publishing first
                await asyncio.sleep(ttl / 3 if self.held else ttl / 6)
        finally:
            if self.held and kv is not None:  # a clean stop hands the lease over at once
                try:
                    await kv.delete(self.key, last=self.revision)
                except Exception:  # noqa: BLE001 - the bus may be gone: the lease then lapses by itself
                    pass
            self.held, self.revision = (
                False,
                0,
            )  # (no `changed`: a stopping calc still journals its last rows)
            await nc.close()

    async def _set(self, held: bool) -> None:
        if held != self.held:
            self.held = held
            if not held:
                self.revision = 0
            log.info(
                "shard %s: lease %s", self.shard.name, "taken: publishing" if held else "not held: standby"
            )
            await self.changed(held)
