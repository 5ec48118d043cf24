"""End-to-end latency: a fill published to the tickerplant -> the margin row received by a websocket
client of calc (a program: msgpack), p50/p99 at 1,000 and 10,000 events/s, tickerplant (zero-latency)
and calc (publish_interval_ms = 0) in their own processes; calc's margin rows journaled with each
publish or collected for 20 ms (calc.journal_interval_ms), calc sleeping between batches or busy
polling for 5 ms (calc.busy_poll_ms), and the whole system's shape (an rdb following the tickerplant
too); two 5 s runs per rate, each after 1 s of fills at that rate (the
warm-up's own latency is reported beside). Also: websocket clients one calc serves at 10 updates/s each
before the latency doubles. Prints markdown tables, the CPU other programs used during each run, and the
machine's speed before and after. `--only rate=10000 --only rdb=yes` (etc.) runs only the matching cases."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from marginflow import auth  # noqa: E402
from tickerplant.client import Publisher  # noqa: E402

ACCOUNTS = ["TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06"]
SYMS = ["AAPL", "KO", "XOM", "JNJ", "MSFT", "JPM", "PG", "GE"]


def risk_token() -> dict:
    """connect() keyword arguments for calc's API as the demo risk desk (its local token in the handshake)."""
    return {"additional_headers": {"Authorization": f"Bearer {auth.local_token('desk:risk')}"}}


WARMUP_S = 1.0  # seconds of fills sent at the measured rate before measuring


def start(args: list[str], pattern: str, env: dict, root: Path = ROOT) -> tuple[subprocess.Popen, int]:
    """`marginflow <args>` of the tree at `root` (another checkout: its code), once its output matches
    `pattern`: (the process, the port the pattern's group gives)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginflow.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=root,
        env=env,
    )
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError(f"{args[0]} did not start")


async def measure(tp_url: str, calc_url: str, rate: float, seconds: float, warmup: float = WARMUP_S) -> dict:
    """Fills at `rate`/s for `warmup` + `seconds`; the fills of the first `warmup` seconds are not measured
    (processes that sat idle run 3-4x slower for a few hundred ms: see BENCHMARKS.md). Latency of a fill
    message = arrival of the first margin row with last_seq >= its seq - its send time. Matched after the
    run: the row can arrive before the tickerplant's ack tells the publisher the seq (the tickerplant
    publishes before it acks)."""
    run = secrets.token_hex(4)  # exec_ids unique per run: the tickerplant refuses a repeated one
    sends: list[tuple[float, int]] = []  # (time sent, seq of the message's last row)
    cold: list[tuple[float, int]] = []  # the same for the warm-up fills
    arrivals: list[tuple[float, int]] = []  # (time received, highest last_seq in the margin message)
    done = asyncio.Event()

    async def client():  # a program: msgpack
        async with connect(f"{calc_url}/ws?format=msgpack", max_queue=None, **risk_token()) as ws:
            await ws.recv()
            await ws.send(msgspec.msgpack.encode({"type": "subscribe"}))
            closer = asyncio.create_task(close_when(done, ws))
            async for data in ws:  # ends when `done` closes the connection
                received = time.perf_counter()  # when the frame reached the program, before decoding it
                msg = msgspec.msgpack.decode(data)
                if msg["type"] == "margin":
                    arrivals.append((received, max(r["last_seq"] for r in msg["rows"])))
            await closer

    reader = asyncio.create_task(client())
    await asyncio.sleep(1.0)
    # as the servers do once started (marginflow.process.freeze_startup_objects): otherwise this process's
    # full collections (every ~0.5 s here) walk every imported module's objects, stall it for ~4 ms and
    # show up as the servers' latency
    gc.collect()
    gc.freeze()
    async with Publisher(tp_url) as pub:
        t0 = time.perf_counter()
        i = measured = 0
        while time.perf_counter() - t0 < warmup + seconds:
            due = int((time.perf_counter() - t0) * rate)
            batch = due - i
            if batch > 0:
                cols = {
                    "account": [ACCOUNTS[(i + k) % 6] for k in range(batch)],
                    "sym": [SYMS[(i + k) % 8] for k in range(batch)],
                    "side": ["B" if (i + k) % 2 else "S" for k in range(batch)],
                    "qty": [10.0] * batch,
                    "price": [100.0] * batch,
                    "order_id": [f"o{run}-{i + k}" for k in range(batch)],
                    "exec_id": [f"e{run}-{i + k}" for k in range(batch)],
                }  # unique per run: a repeat is refused
                ts = time.perf_counter()
                await pub.upd("fill", cols)
                seq = await pub.wait_acked()  # the message's last row: latency of the whole message
                if ts - t0 >= warmup:
                    sends.append((ts, seq))
                    measured += batch
                else:
                    cold.append((ts, seq))
                i = due
            await asyncio.sleep(0.0002)
        await asyncio.sleep(1.0)
    done.set()
    await asyncio.gather(reader, return_exceptions=True)
    gc.unfreeze()
    lat, lat_cold = latencies(sends, arrivals) * 1000, latencies(cold, arrivals) * 1000
    return {
        "events": measured,
        "samples": len(lat),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "cold_p50": percentile(lat_cold, 50),
        "cold_p99": percentile(lat_cold, 99),
    }


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


async def close_when(done: asyncio.Event, ws) -> None:
    await done.wait()
    await ws.close()


def latencies(sends: list[tuple[float, int]], arrivals: list[tuple[float, int]]) -> np.ndarray:
    """Seconds from each send to the first arrival whose seq covers it (sends never covered: left out)."""
    if not sends or not arrivals:
        return np.zeros(0)
    t_arr, top = np.array(arrivals).T
    top = np.maximum.accumulate(top)  # rows arrive in seq order; guard anyway
    t_sent, seq = np.array(sends).T
    k = np.searchsorted(top, seq, side="left")
    ok = k < len(top)
    return t_arr[k[ok]] - t_sent[ok]


async def dashboards(calc_url: str, n: int) -> None:
    """n browser-like clients (JSON, subscribed to every account) reading and decoding every frame;
    prints "ready" once all are subscribed, runs until terminated."""

    async def dashboard(subscribed: asyncio.Event) -> None:
        async with connect(f"{calc_url}/ws", max_queue=None, **risk_token()) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe"}))
            subscribed.set()
            async for data in ws:
                json.loads(data)

    ready = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(dashboard(e)) for e in ready]
    for e in ready:
        await e.wait()
    print("ready", flush=True)
    await asyncio.gather(*tasks)


def start_dashboards(calc_url: str, n: int) -> subprocess.Popen | None:
    """The other clients in a process of their own (their reading and decoding is not the measured
    client's: in one event loop it would queue the measured frame behind theirs)."""
    if n <= 0:
        return None
    proc = subprocess.Popen(
        [sys.executable, __file__, "--dashboards", calc_url, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("dashboards did not start")
    return proc


def start_pair(
    d: str,
    journal_ms: float,
    busy_poll_ms: float = 0.0,
    rdb: bool = False,
    rdb_set: dict | None = None,
    calc_set: dict | None = None,
) -> tuple[list[subprocess.Popen], str, str]:
    """tickerplant (zero-latency mode) and calc (publish interval 0) as processes on free ports, and with
    `rdb` an rdb following the tickerplant as under `marginflow up` (it subscribes first, as there); `rdb_set`
    and `calc_set` override [rdb] and [calc] settings. Returns the processes (stopping order), the URLs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["MARGINFLOW_OVERRIDES"] = json.dumps(
        {"tickerplant": {"kdb_port": 0}, "rdb": {"kdb_port": 0, **(rdb_set or {})}}
    )
    tp, tp_port = start(
        ["tp", "--port", "0", "--journal", d, "--publish-interval-ms", "0"], r"ready wss?://[\d.]+:(\d+)", env
    )
    procs = [tp]
    if rdb:
        procs.append(
            start(
                ["rdb", "--port", "0", "--hdb", f"{d}/hdb", "--tp", f"ws://127.0.0.1:{tp_port}"],
                r"rdb ready ws://[\d.]+:(\d+)",
                env,
            )[0]
        )
    env["MARGINFLOW_OVERRIDES"] = json.dumps(
        {
            "calc": {
                "publish_interval_ms": 0,
                "journal_interval_ms": journal_ms,
                "busy_poll_ms": busy_poll_ms,
                "rest_port": 0,
                **(calc_set or {}),
            }
        }
    )
    calc, calc_port = start(
        ["calc", "--port", "0", "--tp-port", str(tp_port)], r"calc ready ws://[\d.]+:(\d+)", env
    )
    procs.append(calc)
    return procs[::-1], f"ws://127.0.0.1:{tp_port}", f"ws://127.0.0.1:{calc_port}"


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL what has not stopped in 10 s (never a server left behind)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            print(f"{' '.join(p.args[3:5])} did not stop in 10 s: killed", file=sys.stderr)
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the machine has been busy, all cores (Linux /proc/stat: user, nice, system, irq, softirq;
    idle, iowait and the hypervisor's steal left out; guest time is inside user already)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU seconds the hypervisor has taken from this VM's cores ("steal", /proc/stat): the share of a run
    it took says how much of the machine the run really had."""
    ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(ticks[8]) / os.sysconf("SC_CLK_TCK")


def measured_elsewhere(
    procs: list[subprocess.Popen], tp_url: str, calc_url: str, rate: float, seconds: float
) -> tuple[dict, float, float, float]:
    """measure(...), the CPU the rest of the machine used meanwhile, in cores (another program's load
    moves the latency: printed beside it), the hypervisor's steal over it (a share of the cores), and calc's
    own CPU in cores (procs[0]: what busy polling costs)."""
    pids = [p.pid for p in procs] + [os.getpid()]
    ours0, busy0, steal0 = sum(cpu_seconds(p) for p in pids), busy_seconds(), steal_seconds()
    calc0 = cpu_seconds(procs[0].pid)
    t0 = time.perf_counter()
    r = asyncio.run(measure(tp_url, calc_url, rate, seconds))
    elapsed = time.perf_counter() - t0
    others = (busy_seconds() - busy0 - (sum(cpu_seconds(p) for p in pids) - ours0)) / elapsed
    calc = (cpu_seconds(procs[0].pid) - calc0) / elapsed
    return r, max(0.0, others), (steal_seconds() - steal0) / elapsed / (os.cpu_count() or 1), calc


def machine_speed() -> float:
    """Seconds for a fixed 5 M-iteration Python loop (~0.5 s when this VM is at its usual speed)."""
    t = time.perf_counter()
    total = 0
    for k in range(5_000_000):
        total += k
    return time.perf_counter() - t


CASES = (  # (calc journal_interval_ms, calc busy_poll_ms, an rdb following)
    (0.0, 0.0, False),
    (20.0, 0.0, False),
    (20.0, 5.0, False),
    (20.0, 0.0, True),
    (20.0, 5.0, True),
)
RATES = (1000, 10000)


def parse_only(items: list[str]) -> dict[str, str]:
    """`--only key=value` filters (rate, journal_ms, busy_ms, rdb=yes|no, clients=yes|no) -> a dict, or
    SystemExit naming the bad item."""
    keys = {"rate", "journal_ms", "busy_ms", "rdb", "clients"}
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys or not value:
            raise SystemExit(f"--only {item!r}: expected key=value with key one of {sorted(keys)}")
        out[key] = value
    return out


def selected(only: dict[str, str], journal_ms: float, busy_ms: float, rdb: bool, rate: int) -> bool:
    """Whether a case passes every `--only` filter."""
    have = {"rate": rate, "journal_ms": journal_ms, "busy_ms": busy_ms}
    if "rdb" in only and only["rdb"] != ("yes" if rdb else "no"):
        return False
    return all(float(only[k]) == v for k, v in have.items() if k in only)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only the cases matching (repeatable): rate=10000, journal_ms=20, busy_ms=0, rdb=yes|no; "
        "clients=no skips the websocket-clients table (any --only without clients=yes skips it too)",
    )
    ap.add_argument("--runs", type=int, default=2, help="runs per case (default 2)")
    ap.add_argument(
        "--rdb-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="an [rdb] setting for the rdb following (repeatable), e.g. threads=1 or 'nice=\"idle\"'",
    )
    ap.add_argument(
        "--calc-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a [calc] setting (repeatable), e.g. forecast_interval_ms=0",
    )
    args = ap.parse_args(argv)
    only, runs = parse_only(args.only), args.runs
    rdb_set, calc_set = (
        {k: json.loads(v) for k, _, v in (item.partition("=") for item in items)}
        for items in (args.rdb_set, args.calc_set)
    )
    if rdb_set or calc_set:
        print(f"settings: rdb {rdb_set}, calc {calc_set}")
    print(f"machine: 5 M-iteration Python loop {machine_speed():.2f} s\n")
    print(
        "| calc journal_interval_ms | calc busy_poll_ms | rdb following | fills/s offered | run "
        "| fills measured | latency samples | p50 ms | p99 ms | first second (warm-up) p50 / p99 ms "
        "| calc CPU (cores) | other programs' CPU (cores) | steal |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for journal_ms, busy_ms, rdb in CASES:
        rates = [r for r in RATES if selected(only, journal_ms, busy_ms, rdb, r)]
        if not rates:
            continue
        with tempfile.TemporaryDirectory() as d:
            procs, tp_url, calc_url = start_pair(d, journal_ms, busy_ms, rdb, rdb_set, calc_set)
            try:
                for rate in rates:
                    for run in range(1, runs + 1):
                        r, others, steal, calc_cpu = measured_elsewhere(procs, tp_url, calc_url, rate, 5.0)
                        print(
                            f"| {journal_ms:g} | {busy_ms:g} | {'yes' if rdb else 'no'} | {rate:,} | {run} "
                            f"| {r['events']:,} | {r['samples']:,} | {r['p50']:.2f} | {r['p99']:.2f} "
                            f"| {r['cold_p50']:.2f} / {r['cold_p99']:.2f} | {calc_cpu:.2f} "
                            f"| {others:.2f} | {steal:.0%} |",
                            flush=True,
                        )
            finally:
                stop(*procs)
    if only.get("clients", "no" if only else "yes") == "yes":
        clients()
    print(f"\nmachine: 5 M-iteration Python loop {machine_speed():.2f} s")


def clients() -> None:
    """The websocket-clients table: latency and calc's CPU as more clients follow every account."""
    print(
        "\n| websocket clients at 10 updates/s each (10 fills/s; all follow every account; "
        "the measured one served last, the others in a process of their own) | p50 ms | p99 ms | calc CPU |"
    )
    print("| ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as d:
        procs, tp_url, calc_url = start_pair(d, 20.0)
        calc = procs[0]
        try:
            for n in (1, 10, 50, 100, 200, 400):
                others = start_dashboards(
                    calc_url, n - 1
                )  # connected first: the measured client is served last
                try:
                    cpu0, t0 = cpu_seconds(calc.pid), time.perf_counter()
                    r = asyncio.run(measure(tp_url, calc_url, 10, 10.0))
                    calc_cpu = (cpu_seconds(calc.pid) - cpu0) / (time.perf_counter() - t0)
                finally:
                    if others:
                        stop(others)
                print(f"| {n} | {r['p50']:.2f} | {r['p99']:.2f} | {calc_cpu:.1%} |", flush=True)
        finally:
            stop(*procs)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dashboards"]:
        asyncio.run(dashboards(sys.argv[2], int(sys.argv[3])))
    else:
        main(sys.argv[1:])
