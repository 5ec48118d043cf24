"""Sharded calc (#16) against a real 3-node NATS JetStream cluster (R3 stream): the margins of 1, 2 and 3
shards are the unsharded calc's bit for bit on the same journal; a shard never receives another shard's
fills; a fill that adds an instrument brings its ticks (before and after it); resharding 2 -> 3 gives
the same margins; the front serves every shard's rows and routes a what-if to the owner. calc/shard.py's
plain functions first."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import msgspec
import pytest

from calc import shard
from calc.engine import MarginEngine
from calc.history import load_prices
from calc.shard import Shard, parse_shard, read_assignment, shard_of
from marginflow import config, process
from marginflow.up import free_port, http_get
from rdb.server import Rdb
from rdb.subscription import follow
from schemas import bus as buswire
from tests.support import ROOT
from tests.support.http import Http
from tests.support.rows import fills
from tests.support.servers import running_calc, tp_config, wait_for
from tests.support.tokens import local_token
from tickerplant.client import Publisher
from tickerplant.server import TickerplantServer

ACCOUNTS = ("TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06", "DERIV07", "OPT08")
SYMS = ["AAPL", "KO", "XOM", "JNJ", "MSFT", "JPM"]  # the instruments tests.support.rows.fills trades
CLOSE = load_prices(config.load().calc.history_file).latest
STREAMS = itertools.count(1)
EXACT = (
    "model",
    "margin",
    "var",
    "es",
    "stress",
    "collateral",
    "utilisation",
    "change",
    "drivers",
    "components",
)


# ---- no cluster --------------------------------------------------------------------------------
def test_assignment_is_a_stable_hash_unless_the_file_says_otherwise(tmp_path):
    # blake2b, not hash(): these values hold in every process and Python version
    assert [buswire.bucket(a, 3) for a in ACCOUNTS] == [2, 0, 2, 2, 2, 1, 0, 2]
    assert [buswire.bucket(a, 64) for a in ACCOUNTS] == [5, 40, 13, 9, 1, 20, 31, 2]  # (the bus's buckets)
    # the default: the account's bucket (of [bus] buckets = 64) mod N, so a shard owns whole buckets
    assert [shard_of(a, 3) for a in ACCOUNTS] == [5 % 3, 40 % 3, 13 % 3, 9 % 3, 1 % 3, 20 % 3, 31 % 3, 2 % 3]
    assert [shard_of(a, 2) for a in ACCOUNTS] == [buswire.bucket(a, 2) for a in ACCOUNTS]  # (2 divides 64)
    assert {shard_of(a, 5) for a in map(str, range(200))} == set(range(5))
    f = tmp_path / "big.csv"
    f.write_text("account,shard\nTECH01,0\nNRG03,1\n")
    assigned = read_assignment(f, 3)
    assert shard_of("TECH01", 3, assigned) == 0 and shard_of("NRG03", 3, assigned) == 1
    assert shard_of("MACRO06", 3, assigned) == 20 % 3  # not in the file: its bucket mod 3
    assert Shard(0, 3, assigned).owns("TECH01") and not Shard(2, 3, assigned).owns("TECH01")
    for bad, why in (("account,shard\nTECH01,3\n", "line 2"), ("account,shard\nA,0\nA,1\n", "twice")):
        f.write_text(bad)
        with pytest.raises(ValueError, match=why):
            read_assignment(f, 3)
    for text in ("2/2", "1", "a/2", "0/0"):
        with pytest.raises(ValueError, match="calc.shard"):
            parse_shard(text)
    with pytest.raises(SystemExit, match="calc.shard"):
        config.load(overrides={"calc": {"shard": "3/2"}})


def test_a_shard_engine_holds_its_accounts_and_subscribes_to_their_instruments():
    calc = config.load().calc
    alone = {a: 0 for a in ACCOUNTS} | {"MACRO06": 1}  # (MACRO06 alone on shard 1 of 3)
    eng = shard.shard_engine(calc, Shard(1, 3, alone))
    assert eng.accounts == ["MACRO06"] and list(eng.acc_index) == ["MACRO06"]
    assert eng.engine.accounts == ["MACRO06"]  # only its own: the state arrays have one account's rows
    whole = MarginEngine.from_config(calc)
    assert eng.st.pnl.shape[0] == 1 and whole.st.pnl.shape[0] == len(ACCOUNTS)  # (accounts x scenarios)
    assert eng.memory()["state_bytes"] < whole.memory()["state_bytes"]
    assert eng.syms == whole.syms  # (the whole book's instruments)
    assert eng.changed_rows()["account"] == ["MACRO06"] and eng.snapshot()["account"] == ["MACRO06"]
    with pytest.raises(ValueError, match="not on shard 1/3"):
        eng.what_if("TECH01", [{"sym": "AAPL", "qty": 1.0}])
    feed = shard.Subscription.of(eng)
    assert feed.table_keys["fill"] == ["MACRO06"] and "KO" in feed.syms and "XOM" not in feed.syms
    assert feed.new_syms(_batch("fill", fills(2, 0, accounts=("MACRO06", "TECH01")))) == set()
    new = feed.new_syms(_batch("fill", {**fills(1, 0, accounts=("MACRO06",)), "sym": ["XOM"]}))
    assert new == {"XOM"} and "XOM" in feed.table_keys["trade"]
    mine = feed.mine("fill", _batch("fill", fills(4, 0, accounts=("MACRO06", "TECH01"))))
    assert mine is not None and set(mine.column("account").to_pylist()) == {"MACRO06"}


def _batch(table, cols):
    import pyarrow as pa

    n = len(next(iter(cols.values())))
    return pa.RecordBatch.from_pydict(
        {"time": pa.array([0] * n, pa.timestamp("ns")), "seq": list(range(n)), **cols}
    )


# ---- a real cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(nats_cluster):  # (tests/conftest.py)
    return nats_cluster


@pytest.fixture(scope="module")
def day(cluster, tmp_path_factory):
    """A journal and its R3 stream: a first frame ticking every instrument, then frames of trades,
    quotes and fills over every account (some adding instruments to a shard's accounts)."""
    journal = tmp_path_factory.mktemp("journal")
    bus = {"kind": "nats", "servers": cluster.urls, "stream": f"S{next(STREAMS)}", "replicas": 3}

    async def write():
        async with bus_tp(journal, bus) as srv:
            await publish(srv.url, range(0, 40))

    asyncio.run(asyncio.wait_for(write(), 120))
    return journal, bus


def bus_tp(journal, bus: dict):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run():
        srv = TickerplantServer(
            tp_config(journal, publish_interval_ms=1, kdb_port=0), bus=config.BusConfig(**bus)
        )
        await srv.start()
        try:
            await wait_for(lambda: srv.bus.live, 30, "the bridge")
            srv.url = f"ws://127.0.0.1:{srv.port}"
            yield srv
        finally:
            await srv.stop()

    return run()


def ticks(i: int) -> list[tuple[str, dict]]:
    """Frame i's trade and quote of every instrument the fills trade, within 5% of the history's close,
    but AAPL 70% up from frame 30: past the price band, confirmed after three ticks, which rebuilds its
    holders' state (calc/reference.py: account by account, so a shard's rebuild equals the whole book's)."""
    jump = [1.7 if s == "AAPL" and i >= 30 else 1.0 for s in SYMS]
    px = [CLOSE[s] * jump[k] * (1 + 0.01 * ((i * 7 + k) % 11 - 5)) for k, s in enumerate(SYMS)]
    n = len(SYMS)
    quote = {"sym": SYMS, "bid": [p - 0.05 for p in px], "ask": [p + 0.05 for p in px]}
    return [
        ("trade", {"sym": SYMS, "price": px, "size": [1] * n}),
        ("quote", {**quote, "bid_size": [100] * n, "ask_size": [200] * n}),
    ]


async def publish(url: str, frames) -> int:
    async with Publisher(url) as pub:
        for i in frames:
            await pub.upd_many([*ticks(i), ("fill", fills(3, i * 3, accounts=ACCOUNTS))])
        return await pub.wait_acked(timeout=30)


class Calc:
    """A CalcService (unsharded, or shard K/N reading the bus) with the margin rows it sends clients
    (latest per account) and the fill accounts it received."""

    def __init__(self, service):
        self.service = service
        self.rows: dict[str, dict] = {}
        self.fill_accounts: set[str] = set()
        fan_out = service._fan_out

        def record(update, cols):
            if update.__name__ == "MarginUpdate":
                for i, a in enumerate(cols["account"]):
                    self.rows[a] = {c: v[i] for c, v in cols.items()}
            fan_out(update, cols)

        service._fan_out = record
        if service.feed is not None:
            mine = service.feed.mine

            def seen(table, batch):
                if table == "fill":
                    self.fill_accounts |= set(batch.column("account").to_pylist())
                return mine(table, batch)

            service.feed.mine = seen


async def calcs(stack, srv, journal, bus: dict, n: int, standby: Collection[int] = ()) -> list[Calc]:
    """n shards (n = 0: one unsharded calc over the websocket fan-out), live and, but for the shards
    `standby` (another process holds their lease), publishing: holding their lease, so their rows of
    every account are out. (A shard live before its lease is taken publishes nothing until it takes it:
    comparing at `live` alone found no rows of shard 0/1, whose lease waits for the key-value bucket's
    first create, in 7 of 34 runs.)"""
    out = []
    for k in range(max(n, 1)):
        extra = {"shard": f"{k}/{n}"} if n else {}
        service = await stack.enter_async_context(running_calc(srv.port, journal, bus=bus, **extra))
        out.append(Calc(service))
    for k, c in enumerate(out):
        await wait_for(lambda c=c: c.service.live, 60, "calc live")
        if k not in standby:  # (live and active: its first publish has run, its rows are in `rows`)
            await wait_for(lambda c=c: c.service.active, 30, f"shard {k}/{n}'s lease")
    return out


def assert_same(unsharded: dict[str, dict], shards: list[Calc]) -> None:
    merged: dict[str, dict] = {}
    for k, c in enumerate(shards):
        n = len(shards)
        assert {shard_of(a, n) for a in c.rows} <= {k}, "a shard published another shard's account"
        assert c.fill_accounts <= {a for a in ACCOUNTS if shard_of(a, n) == k}, "another shard's fills"
        # the bus sent it no other shard's fills at all (its buckets are its own: shard = bucket mod N)
        assert c.service.sub.received["fill"] > 0 and c.service.sub.foreign["fill"] == 0
        merged |= c.rows
    assert merged.keys() == unsharded.keys()
    for a, row in unsharded.items():
        mine = merged[a]
        assert [mine[c] for c in EXACT] == [row[c] for c in EXACT], a  # bit for bit


def test_margins_of_1_2_and_3_shards_equal_an_unsharded_calc(day):
    journal, bus = day

    async def run():
        from contextlib import AsyncExitStack

        async with bus_tp(journal, bus) as srv:
            async with AsyncExitStack() as stack:
                (ref,) = await calcs(stack, srv, journal, bus, 0)
            assert len(ref.rows) == len(ACCOUNTS)
            eng = ref.service.engine
            assert eng.st.price[eng.sym_index["AAPL"]] > 1.5 * CLOSE["AAPL"]  # the jump was accepted
            for n in (1, 2, 3):
                async with AsyncExitStack() as stack:
                    shards = await calcs(stack, srv, journal, bus, n)
                    assert_same(ref.rows, shards)
                    if n == 3:  # MACRO06's shard was sent XOM's ticks once its fills bought XOM
                        assert shards[shard_of("MACRO06", 3)].service.sub.widened >= 1

    asyncio.run(asyncio.wait_for(run(), 240))


async def created(kv, key: str, value: bytes, within: float = 10.0) -> int:
    """kv.create once the bucket's stream answers: a new R3 bucket has no leader for a moment, and a
    write then gets "no responders" (what the shard's lease loop retries too)."""
    import nats.js.errors

    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await kv.create(key, value)
        except nats.js.errors.NoStreamResponseError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_a_shard_live_before_it_holds_its_lease_publishes_every_row_once_it_takes_it(day):
    """Another process holds shard 0/1's lease while the shard replays: live, it publishes nothing (what
    a comparison at `live` alone saw: no rows); once the lease is free it takes it and every account's
    row goes out, the unsharded calc's bit for bit."""
    from tickerplant.bus import connect

    journal, bus = day
    bus = {**bus, "lease_ttl_s": 3.0, "lease_bucket": "LATE"}  # (held by the test, renewed every 0.3 s)

    async def run():
        from contextlib import AsyncExitStack

        nc = await connect(config.BusConfig(**bus), "test-lease-holder")
        kv = await nc.jetstream().create_key_value(bucket="LATE", ttl=3.0, history=1, replicas=3)
        revision = await created(kv, "shard-0-of-1", b"another process")

        async def hold():
            nonlocal revision
            while True:
                await asyncio.sleep(0.3)
                revision = await kv.update("shard-0-of-1", b"another process", last=revision)

        holder = asyncio.create_task(hold())
        try:
            async with bus_tp(journal, bus) as srv, AsyncExitStack() as stack:
                (ref,) = await calcs(stack, srv, journal, bus, 0)
                (late,) = await calcs(stack, srv, journal, bus, 1, standby=(0,))
                await asyncio.sleep(1.0)  # (a few of its tries to take the lease)
                assert not late.service.active and late.rows == {} and late.service.engine.last_seq > 0
                await process.cancel_and_wait(holder)
                await kv.delete("shard-0-of-1", last=revision)
                await wait_for(lambda: late.service.active, 10, "the lease taken")
                assert_same(ref.rows, [late])
        finally:
            await process.cancel_and_wait(holder)
            await nc.close()

    asyncio.run(asyncio.wait_for(run(), 120))


def test_live_fills_add_instruments_and_resharding_2_to_3_keeps_the_margins(day):
    """Two shards and an unsharded calc live: a fill buys MACRO06 an instrument its shard had no ticks
    of; its ticks before (the price it was bought at) and after reach the shard. Then three shards
    replay the whole day: the same margins as an unsharded calc."""
    journal, bus = day

    async def run():
        from contextlib import AsyncExitStack

        async with bus_tp(journal, bus) as srv:
            async with AsyncExitStack() as stack:
                (ref,) = await calcs(stack, srv, journal, bus, 0)
                two = await calcs(stack, srv, journal, bus, 2)
                owner = two[shard_of("MACRO06", 2)]
                eng = owner.service.engine
                new = next(s for s in eng.syms[: eng.n_hist] if s not in owner.service.feed.syms)
                widened = owner.service.sub.widened
                async with Publisher(srv.url) as pub:
                    buy = {
                        **fills(1, 900, accounts=("MACRO06",)),
                        "sym": [new],
                        "side": ["B"],
                        "qty": [500.0],
                    }
                    await pub.upd_many(
                        [("trade", {"sym": [new], "price": [77.0], "size": [1]}), ("fill", buy)]
                    )
                    await pub.upd_many([("trade", {"sym": [new], "price": [79.5], "size": [1]})])
                    await pub.wait_acked(timeout=30)
                last = await publish(srv.url, range(40, 50))
                await wait_for(lambda: ref.service.engine.last_seq >= last, 30, "the unsharded calc")
                want = ref.rows["MACRO06"]["margin"]
                same = lambda: owner.rows["MACRO06"]["margin"] == pytest.approx(want, rel=1e-9)  # noqa: E731
                await wait_for(same, 30, "MACRO06's row from its shard")
                assert owner.service.sub.widened > widened and new in owner.service.feed.syms
                for c in two:
                    assert c.fill_accounts <= {a for a in ACCOUNTS if c.service.shard.owns(a)}
                price = lambda e: float(e.st.price[e.sym_index[new]])  # noqa: E731
                assert price(eng) == price(ref.service.engine) == 79.5  # the tick after the fill came
            async with AsyncExitStack() as stack:  # resharding: 3 shards replay the day, then one unsharded
                three = await calcs(stack, srv, journal, bus, 3)
                (again,) = await calcs(stack, srv, journal, bus, 0)
                assert_same(again.rows, three)

    asyncio.run(asyncio.wait_for(run(), 240))


def test_the_front_serves_every_shard_s_rows_and_routes_a_what_if_to_the_owner(day):
    """Snapshots and live rows of every shard, what-ifs routed to the owner, and what a dashboard needs
    beyond them: the day's forecasts for a new screen and an account's history (from the rdb); calc's REST
    API: what-ifs of two shards' accounts equal the engine's, a bad trade named, another desk refused."""
    from calc.front import FrontService
    from tests.support.tokens import desk_token

    journal, bus = day

    async def run():
        from contextlib import AsyncExitStack

        from websockets.asyncio.client import connect

        async with bus_tp(journal, bus) as srv, AsyncExitStack() as stack:
            (ref,) = await calcs(stack, srv, journal, bus, 0)
            two = await calcs(stack, srv, journal, bus, 2)
            rdb = Rdb(config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(journal.parent / "hdb")}}).rdb)
            await rdb.start()
            stack.push_async_callback(rdb.stop)
            follower = asyncio.create_task(follow(rdb, srv.url))
            stack.push_async_callback(process.cancel_and_wait, follower)
            cfg = config.load(
                overrides={
                    "tickerplant": {"port": srv.port},
                    "rdb": {"port": rdb.port},
                    "calc": {"port": 0, "shard": "0/2", "rest_port": free_port()},
                    "bus": bus,
                }
            )
            front = FrontService(cfg)
            await front.start()
            stack.push_async_callback(front.stop)
            await wait_for(lambda: front.live and len(front.rows) == len(ACCOUNTS), 30, "the front")
            status, body = await http_get("127.0.0.1", front.port)
            assert status == 200 and msgspec.json.decode(body)["live"] is True
            status, body = await http_get("127.0.0.1", front.port, "/")
            assert status == 200 and b"<html" in body.lower()  # the dashboard, as calc serves it
            async with connect(f"ws://127.0.0.1:{front.port}", **desk_token("risk")) as ws:
                assert msgspec.json.decode(await ws.recv())["type"] == "auth_reply"
                trades = [{"sym": "AAPL", "qty": -500.0}]
                for account in ("TECH01", "MACRO06"):
                    req = {"type": "what_if", "account": account, "trades": trades, "id": 7}
                    await ws.send(msgspec.json.encode(req).decode())
                    reply = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
                    assert reply["type"] == "what_if_reply", reply
                    want = ref.service.engine.what_if(account, trades)
                    for key in ("margin_before", "margin_after"):
                        assert reply["result"][key] == pytest.approx(want[key], rel=1e-12)
                await ws.send(msgspec.json.encode({"type": "snapshot_request"}).decode())
                snap = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 10))
                assert {r["account"] for r in snap["rows"]} == set(ACCOUNTS)
                merged = {a: r for c in two for a, r in c.rows.items()}
                assert {r["account"]: r["margin"] for r in snap["rows"]} == {
                    a: r["margin"] for a, r in merged.items()
                }
                # a new screen gets every shard's forecasts of the day (as calc's own screens do)
                want = {key for c in two for key in c.service.today.forecasts}
                assert want, "the shards projected no forecast: nothing to check"
                await ws.send(msgspec.json.encode({"type": "subscribe", "accounts": []}).decode())
                got: set = set()
                async with asyncio.timeout(10):
                    while got != want:
                        m = msgspec.json.decode(await ws.recv())
                        if m["type"] == "forecast":
                            got |= {(r["account"], r["horizon"]) for r in m["rows"]}
                # the dashboard's chart: the account's margin history, from the rdb
                async with asyncio.timeout(20):
                    while True:
                        await ws.send(json.dumps({"type": "history_request", "account": "TECH01", "id": 9}))
                        m = msgspec.json.decode(await ws.recv())
                        while m["type"] != "history" and m.get("id") != 9:
                            m = msgspec.json.decode(await ws.recv())
                        assert m["type"] == "history" and m["account"] == "TECH01", m
                        if m["margin"] and m["margin"][-1] == front.rows["TECH01"]["margin"]:
                            break
                        await asyncio.sleep(0.2)  # (the rdb still applying the shards' rows)
            # calc's REST API for every shard's accounts: what-ifs answered by the owners
            body = {"trades": [{"account": a, "sym": "AAPL", "qty": -500.0} for a in ("TECH01", "MACRO06")]}
            async with Http("127.0.0.1", front.rest.port, local_token("desk:risk")) as h:
                status, _, payload = await h.request("POST", "/v1/what-if", body)
                assert status == 200, payload
                for got in json.loads(payload)["results"]:
                    want = ref.service.engine.what_if(got["account"], [{"sym": "AAPL", "qty": -500.0}])
                    for key in ("margin_before", "margin_after"):
                        assert got[key] == pytest.approx(want[key], rel=1e-12)
                status, _, payload = await h.request("GET", "/v1/accounts")
                assert status == 200 and {a["account"] for a in json.loads(payload)["accounts"]} == set(
                    ACCOUNTS
                )
                bad = {"account": "TECH01", "trades": [{"sym": "NOPE", "qty": 1.0}]}
                status, _, payload = await h.request("POST", "/v1/what-if", bad)
                assert status == 422 and json.loads(payload)["field"] == "$.trades[0]", payload
            async with Http("127.0.0.1", front.rest.port, local_token("desk:equity-tech")) as h:
                status, _, payload = await h.request("POST", "/v1/what-if", {**bad, "account": "DIV02"})
                assert status == 403, payload  # another desk's account

    asyncio.run(asyncio.wait_for(run(), 120))


class CalcProcess:
    """`marginflow calc --shard K/N` as a real subprocess on the bus (for kill -9), its output in `log`."""

    def __init__(self, tp_port: int, bus: dict, shard: str, log: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        over = config._merge(json.loads(env.get(config.OVERRIDES_ENV) or "{}"), {"bus": bus})
        env[config.OVERRIDES_ENV] = json.dumps(over)
        cmd = [
            sys.executable,
            "-m",
            "marginflow.cli",
            "calc",
            "--shard",
            shard,
            "--port",
            "0",
            "--rest-port",
            "0",
        ]
        self.log = log
        with open(log, "wb") as out:
            cmd += ["--tp-port", str(tp_port)]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = 0
        end = time.monotonic() + 60
        while not self.port and self.proc.poll() is None and time.monotonic() < end:
            if m := re.search(r"calc ready ws://[\d.]+:(\d+)", log.read_text()):
                self.port = int(m.group(1))
            time.sleep(0.05)
        if not self.port:
            raise RuntimeError(f"calc did not start (exit {self.proc.poll()}):\n{log.read_text()}")

    async def health(self) -> dict:
        status, body = await http_get("127.0.0.1", self.port)
        return json.loads(body)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_kill_9_of_the_active_shard_its_standby_s_rows_reach_the_front_within_5_s(day):
    from calc.front import FrontService

    journal, bus = day
    bus = {**bus, "lease_ttl_s": 1.5, "lease_bucket": "KILL9"}

    async def run():
        from contextlib import AsyncExitStack

        async with bus_tp(journal, bus) as srv, AsyncExitStack() as stack:
            active = await asyncio.to_thread(CalcProcess, srv.port, bus, "0/2", journal.parent / "active.log")
            stack.callback(active.kill)
            health: dict = {}

            async def active_is_live() -> None:
                while not (health.get("live") and health["shard"]["active"]):
                    await asyncio.sleep(0.1)
                    health.update(await active.health())

            try:
                await asyncio.wait_for(active_is_live(), 60)
            except TimeoutError:
                raise AssertionError(f"{health}\n{active.log.read_text()[-3000:]}") from None
            standby = (await calcs(stack, srv, journal, bus, 2, standby=(0,)))[0]  # (and shard 1/2)
            assert not standby.service.active  # the process holds the lease
            over = {"tickerplant": {"port": srv.port}, "calc": {"port": 0, "shard": "0/2"}, "bus": bus}
            front = FrontService(config.load(overrides=over))
            await front.start()
            stack.push_async_callback(front.stop)
            await wait_for(lambda: front.live, 30, "the front")
            account = next(a for a in ACCOUNTS if shard_of(a, 2) == 0)
            active.kill()
            t0 = time.monotonic()
            async with Publisher(srv.url) as pub:
                await pub.upd("fill", {**fills(1, 5000, accounts=(account,)), "qty": [300.0]})
                seq = await pub.wait_acked(timeout=10)
            await wait_for(
                lambda: front.rows.get(account, {}).get("last_seq", 0) >= seq, 10, "the standby's row"
            )
            took = time.monotonic() - t0
            assert took < 5.0, took
            assert standby.service.active and standby.service.lease.takeovers == 1
            (fresh,) = await calcs(stack, srv, journal, bus, 0)  # an engine fed the journal
            for c in ("margin", "var", "es", "stress"):
                assert front.rows[account][c] == pytest.approx(fresh.rows[account][c], rel=1e-9)

    asyncio.run(asyncio.wait_for(run(), 180))
