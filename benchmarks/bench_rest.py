"""calc's REST API and metrics: what-if latency p50/p99 over HTTP on a 50-position account (one keep-alive
connection, one trade per request; the engine's own what-if time from calc's /metrics beside it), requests/s
from 10 concurrent clients, and calc's events/s with metrics counting on and off (`calc.metrics`), the two
alternated in the same run. tickerplant and calc run as `marginflow tp` / `marginflow calc` processes;
the universe is synthetic (60 stocks, 700 days of history; one hvar account of 50 positions, 9 of 10).
Prints markdown tables.

    .venv/bin/python benchmarks/bench_rest.py [--quick]
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

from bench_e2e import cpu_seconds, machine_speed, start, stop  # noqa: E402  (this folder: the processes started as bench_e2e does)

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


async def main_async(quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        d = Path(tmp)
        calc_cfg = universe(d)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(config.OVERRIDES_ENV, None)
        tp, tp_port = start(
            ["tp", "--port", "0", "--journal", str(d / "journal")], r"ready wss?://[\d.]+:(\d+)", env
        )
        tp_url = f"ws://127.0.0.1:{tp_port}"
        n_events = int(os.environ.get("BENCH_REST_EVENTS", 20_000 if quick else 100_000))
        rates: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        speed = [machine_speed()]
        latency = None
        try:
            for round_, counting in enumerate([True, False] if quick else [True, False, False, True]):
                rest_port = free_port()
                overrides = {"calc": {**calc_cfg, "metrics": counting, "rest_port": rest_port}}
                calc, calc_port = start(
                    ["calc", "--port", "0", "--tp-port", str(tp_port)],
                    r"calc ready ws://[\d.]+:(\d+)",
                    dict(env, **{config.OVERRIDES_ENV: json.dumps(overrides)}),
                )
                try:
                    await events_per_second(tp_url, calc_port, calc.pid, 2_000, seed=1000 + round_)  # warm-up
                    rates[counting].append(
                        await events_per_second(tp_url, calc_port, calc.pid, n_events, seed=round_)
                    )
                    if latency is None and counting:
                        latency = await rest(
                            calc_port, rest_port, 500 if quick else 3000, 2.0 if quick else 5.0
                        )
                finally:
                    stop(calc)
        finally:
            stop(tp)
        speed.append(machine_speed())
    assert latency is not None
    print(
        "### REST what-if (POST /v1/what-if, account of 50 positions, 1 trade, one keep-alive connection)\n"
    )
    print("| requests | p50 ms | p99 ms | max ms | engine what-if mean ms | req/s, 10 concurrent clients |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    r = latency
    cells = [f"{r['n']}", f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{r['max']:.2f}", f"{r['engine_mean']:.3f}"]
    print("| " + " | ".join(cells) + f" | {r['rps']:,.0f} |")
    rate = {flag: np.mean([r for r, _ in runs]) for flag, runs in rates.items()}
    cpu = {flag: np.mean([c for _, c in runs]) for flag, runs in rates.items()}
    what = f"{n_events:,} events per run, 95% ticks, 50 rows a message; runs alternated on, off, off, on"
    print(f"\n### calc events/s with metrics on / off ({what})\n")
    print("| metrics | runs: events/s (calc CPU us/event) | mean events/s | mean CPU us/event |")
    print("| --- | --- | ---: | ---: |")
    for flag in (True, False):
        runs = ", ".join(f"{r:,.0f} ({c:.1f})" for r, c in rates[flag])
        print(f"| {'on' if flag else 'off'} | {runs} | {rate[flag]:,.0f} | {cpu[flag]:.2f} |")
    print(
        f"\nmetrics cost: {(rate[False] - rate[True]) / rate[False]:+.1%} of calc's events/s, "
        f"{(cpu[True] - cpu[False]) / cpu[False]:+.1%} CPU per event (negative: on was cheaper, i.e. noise); "
        f"machine speed {speed[0]:.2f} s before, {speed[1]:.2f} s after (~0.5 s at its usual speed)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer requests and events (a smoke run)")
    asyncio.run(main_async(ap.parse_args().quick))


if __name__ == "__main__":
    main()
