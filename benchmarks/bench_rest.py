"""calc's REST API and metrics: what-if latency p50/p99 over HTTP on a 50-position account (one keep-alive
connection, one trade per request; the engine's own what-if time from calc's /metrics beside it), requests/s
from 10 concurrent clients, and calc's events/s with metrics counting on and off (`calc.metrics`), the two
alternated in the same run. tickerplant and calc run as `marginflow tp` / `marginflow calc` processes;
the universe is synthetic (60 stocks, 700 days of history; one hvar account of 50 positions, 9 of 10).
With `--baseline-tree DIR` (a checkout of another commit) the latency rounds alternate between the two
trees' processes. Each latency round prints the share of the cores the hypervisor took meanwhile (steal):
on this VM the p99 follows it. Prints markdown tables.

    .venv/bin/python benchmarks/bench_rest.py [--quick] [--baseline-tree DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_e2e import cpu_seconds, machine_speed, start, steal_seconds, stop  # noqa: E402  (this folder: the processes started as bench_e2e does)

from marginflow import auth, config  # noqa: E402
from marginflow.up import free_port, http_get  # noqa: E402
from tests.support.http import Http  # noqa: E402
from tickerplant.client import Publisher  # noqa: E402

N_SYMS, N_POS, N_ACC = 60, 50, 10
SYMS = [f"S{i:02d}" for i in range(N_SYMS)]
ACCOUNTS = ["BIG50", *(f"A{i:02d}" for i in range(1, N_ACC))]


def universe(d: Path) -> dict:
    """Price history, accounts and positions files under `d`; the [calc] overrides that use them."""
    rng = np.random.default_rng(7)
    days = np.datetime64("2020-01-01") + np.arange(700)
    prices = 100 * np.exp(np.cumsum(rng.normal(0, 0.015, (700, N_SYMS)), axis=0))
    rows = ["Date," + ",".join(SYMS)] + [
        f"{day}," + ",".join(f"{p:.4f}" for p in ps) for day, ps in zip(days, prices, strict=True)
    ]
    (d / "history.csv").write_text("\n".join(rows) + "\n")
    accounts = ["account,model,collateral,policy,desk"]
    accounts += [f"{a},{'hvar' if a == 'BIG50' else 'var'},5000000,model,bench" for a in ACCOUNTS]
    (d / "accounts.csv").write_text("\n".join(accounts) + "\n")
    positions = ["account,sym,qty"]
    for a in ACCOUNTS:
        for j in rng.choice(N_SYMS, N_POS if a == "BIG50" else 10, replace=False):
            positions.append(f"{a},{SYMS[j]},{int(rng.integers(100, 5000)) * int(rng.choice([-1, 1]))}")
    (d / "positions.csv").write_text("\n".join(positions) + "\n")
    return {
        "history_file": str(d / "history.csv"),
        "accounts_file": str(d / "accounts.csv"),
        "positions_file": str(d / "positions.csv"),
        "instruments_file": "",
        "vol_surface_file": "",
        "span_file": "",
        "ccp_models": [],
        "alerts": [],
        "stress": [],
        "publish_interval_ms": 0,
        "as_of": str(days[-1]),
    }


async def calc_events(port: int) -> int:
    status, body = await http_get("127.0.0.1", port)
    return int(json.loads(body)["events"])


async def events_per_second(
    tp_url: str, calc_port: int, calc_pid: int, n: int, seed: int
) -> tuple[float, float]:
    """Publish n events (95% ticks, 5% fills, 50 rows per message) as fast as the tickerplant takes them:
    (calc's events/s = n / the time until it has applied them all, calc's CPU microseconds per event; the
    CPU time is the steadier measure on a shared machine)."""
    rng = np.random.default_rng(seed)
    base = await calc_events(calc_port)
    price = 100.0 * np.ones(N_SYMS)
    async with Publisher(tp_url) as pub:
        t0, cpu0 = time.perf_counter(), cpu_seconds(calc_pid)
        for i in range(n // 50):
            if i % 20 == 19:  # fills
                acc = [ACCOUNTS[k] for k in rng.integers(0, N_ACC, 50)]
                syms = [SYMS[k] for k in rng.integers(0, N_SYMS, 50)]
                fill = {
                    "account": acc,
                    "sym": syms,
                    "side": ["B"] * 50,
                    "qty": [10.0] * 50,
                    "price": [100.0] * 50,
                }
                fill["order_id"] = fill["exec_id"] = [f"{seed}-{i}-{k}" for k in range(50)]
                await pub.upd("fill", fill)
            else:
                ix = rng.integers(0, N_SYMS, 50)
                price[ix] *= np.exp(rng.normal(0, 0.001, 50))
                await pub.upd(
                    "trade", {"sym": [SYMS[k] for k in ix], "price": price[ix].tolist(), "size": [100] * 50}
                )
        await pub.wait_acked(timeout=120)
        if pub.errors:
            raise RuntimeError(f"the tickerplant refused: {pub.errors[0].reason}")
        deadline = time.perf_counter() + 120
        while await calc_events(calc_port) < base + n // 50 * 50:
            if time.perf_counter() > deadline:
                raise RuntimeError("calc did not apply every event within 120 s")
            await asyncio.sleep(0.01)
        done = n // 50 * 50
        return done / (time.perf_counter() - t0), (cpu_seconds(calc_pid) - cpu0) / done * 1e6


async def scrape_what_if(port: int) -> tuple[float, float]:
    """(sum, count) of calc's REST what-if engine time (marginflow_calc_what_if_seconds{api="rest"})."""
    async with Http("127.0.0.1", port, auth.local_token("subscriber")) as h:
        _, _, body = await h.request("GET", "/metrics", headers={"Connection": "close"})
    found = {
        x.name: x.value
        for family in text_string_to_metric_families(body.decode())
        for x in family.samples
        if x.labels.get("api") == "rest"
    }
    return found["marginflow_calc_what_if_seconds_sum"], found["marginflow_calc_what_if_seconds_count"]


async def rest(calc_port: int, rest_port: int, n: int, seconds: float) -> dict:
    token = auth.local_token("admin")
    body = [
        {"account": "BIG50", "trades": [{"sym": SYMS[i % N_SYMS], "qty": 100 + i % 7}]} for i in range(50)
    ]
    async with Http("127.0.0.1", rest_port, token) as h:
        for i in range(300):  # warm-up
            status, _, answer = await h.request("POST", "/v1/what-if", body[i % 50])
            assert status == 200, answer
        gc.collect()  # the client's own full collections (~25 ms over its numpy / parser heap) not measured
        gc.freeze()
        s0, c0 = await scrape_what_if(calc_port)
        lat = []
        for i in range(n):
            t = time.perf_counter()
            await h.request("POST", "/v1/what-if", body[i % 50])
            lat.append(time.perf_counter() - t)
        s1, c1 = await scrape_what_if(calc_port)
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal done
        async with Http("127.0.0.1", rest_port, token) as c:
            i = k
            while time.perf_counter() < deadline:
                status, _, _ = await c.request("POST", "/v1/what-if", body[i % 50])
                assert status == 200
                done += 1
                i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(10)))
    ms = np.array(lat) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "engine_mean": (s1 - s0) / (c1 - c0) * 1e3,
        "rps": done / (time.perf_counter() - t0),
        "n": n,
    }


def access() -> dict:
    """[access] with this tree's credential files by absolute path: a baseline tree's processes (started in
    their own folder) accept this process's local tokens."""
    a = config.current().access
    return {
        "credentials_file": str(ROOT / a.credentials_file),
        "client_credentials_file": str(ROOT / a.client_credentials_file),
    }


def tp_env(env: dict) -> dict:
    """The tickerplant's environment: its kdb+ port off (not the fixed default a running system holds)."""
    return dict(
        env, **{config.OVERRIDES_ENV: json.dumps({"tickerplant": {"kdb_port": 0}, "access": access()})}
    )


def start_pair(d: Path, env: dict, calc_cfg: dict, root: Path = ROOT) -> tuple[list, int, int, int]:
    """tickerplant and calc of the tree at `root` on free ports: (processes in stopping order, tp port,
    calc port, REST port)."""
    tp, tp_port = start(
        ["tp", "--port", "0", "--journal", str(d)], r"ready wss?://[\d.]+:(\d+)", tp_env(env), root
    )
    rest_port = free_port()
    overrides = {"calc": {**calc_cfg, "rest_port": rest_port}, "access": access()}
    try:
        calc, calc_port = start(
            ["calc", "--port", "0", "--tp-port", str(tp_port)],
            r"calc ready ws://[\d.]+:(\d+)",
            dict(env, **{config.OVERRIDES_ENV: json.dumps(overrides)}),
            root,
        )
    except BaseException:
        stop(tp)
        raise
    return [calc, tp], tp_port, calc_port, rest_port


async def latency_round(d: Path, env: dict, calc_cfg: dict, root: Path, quick: bool) -> dict:
    """One REST latency measurement against fresh processes of the tree at `root`, with the hypervisor's
    steal over it (a share of both cores)."""
    procs, tp_port, calc_port, rest_port = start_pair(d, env, calc_cfg, root)
    try:
        await events_per_second(f"ws://127.0.0.1:{tp_port}", calc_port, procs[0].pid, 2_000, seed=999)
        steal0, t0 = steal_seconds(), time.perf_counter()
        r = await rest(calc_port, rest_port, 500 if quick else 3000, 2.0 if quick else 5.0)
        r["steal"] = (steal_seconds() - steal0) / (time.perf_counter() - t0) / (os.cpu_count() or 1)
        return r
    finally:
        stop(*procs)


async def main_async(quick: bool, baseline: str | None, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        d = Path(tmp)
        calc_cfg = universe(d)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(config.OVERRIDES_ENV, None)
        n_events = int(os.environ.get("BENCH_REST_EVENTS", 20_000 if quick else 1_000_000))  # (~1.3 s a run)
        speed = [machine_speed()]
        trees = [("this tree", ROOT)] + ([("baseline", Path(baseline).resolve())] if baseline else [])
        latency: list[tuple[str, dict]] = []
        # a round thrown away first: on this VM the first seconds of load after an idle spell run with
        # several times the hypervisor's steal of the rounds after it (seen in every run)
        latency.append(("(warm-up)", await latency_round(d / "journal-w", env, calc_cfg, ROOT, True)))
        for k in range(rounds):
            for name, root in trees if k % 2 == 0 else trees[::-1]:
                latency.append(
                    (name, await latency_round(d / f"journal-{len(latency)}", env, calc_cfg, root, quick))
                )
        rates: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for round_, counting in enumerate([True, False] if quick else [True, False, False, True]):
            procs, tp_port, calc_port, _ = start_pair(
                d / f"journal-m{round_}", env, {**calc_cfg, "metrics": counting}
            )
            try:
                tp_url = f"ws://127.0.0.1:{tp_port}"
                await events_per_second(tp_url, calc_port, procs[0].pid, 2_000, seed=1000 + round_)  # warm-up
                rates[counting].append(
                    await events_per_second(tp_url, calc_port, procs[0].pid, n_events, seed=round_)
                )
            finally:
                stop(*procs)
        speed.append(machine_speed())
    print(
        "### REST what-if (POST /v1/what-if, account of 50 positions, 1 trade, one keep-alive connection)\n"
    )
    print(
        "| tree | requests | p50 ms | p99 ms | max ms | engine what-if mean ms | req/s, 10 clients "
        "| steal (share of the cores) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in latency:
        cells = [
            name,
            f"{r['n']}",
            f"{r['p50']:.3f}",
            f"{r['p99']:.3f}",
            f"{r['max']:.2f}",
            f"{r['engine_mean']:.3f}",
        ]
        print("| " + " | ".join(cells) + f" | {r['rps']:,.0f} | {r['steal']:.0%} |")
    rate = {flag: np.mean([r for r, _ in runs]) for flag, runs in rates.items()}
    cpu = {flag: np.mean([c for _, c in runs]) for flag, runs in rates.items()}
    what = f"{n_events:,} events per run, 95% ticks, 50 rows a message; runs alternated on, off, off, on"
    print(f"\n### calc events/s with metrics on / off ({what})\n")
    print("| metrics | runs: events/s (calc CPU us/event) | mean events/s | mean CPU us/event |")
    print("| --- | --- | ---: | ---: |")
    for flag in (True, False):
        runs = ", ".join(f"{r:,.0f} ({c:.1f})" for r, c in rates[flag])
        print(f"| {'on' if flag else 'off'} | {runs} | {rate[flag]:,.0f} | {cpu[flag]:.2f} |")
    cost = (rate[False] - rate[True]) / rate[False]
    print(
        f"\nmetrics cost: {cost:+.1%} of calc's events/s, "
        f"{(cpu[True] - cpu[False]) / cpu[False]:+.1%} CPU per event"
        + (" (negative: on was cheaper, i.e. noise)" if cost < 0 else "")
        + f"; machine speed {speed[0]:.2f} s before, {speed[1]:.2f} s after (~0.5 s at its usual speed)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer requests and events (a smoke run)")
    ap.add_argument(
        "--baseline-tree", help="a checkout of another tree: its latency rounds alternated with this one's"
    )
    ap.add_argument("--rounds", type=int, default=2, help="latency rounds per tree (default 2)")
    args = ap.parse_args()
    asyncio.run(main_async(args.quick, args.baseline_tree, args.rounds))


if __name__ == "__main__":
    main()
