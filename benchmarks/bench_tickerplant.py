"""Tickerplant throughput with journaling on: 1-row messages/s and rows/s in 100-row messages, with 1
and 10 subscribers, over real websockets (tp in its own process), beside the core alone and a naive
baseline (one DuckDB INSERT per message) measured in the same run. Prints a markdown table."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marginflow import auth, config  # noqa: E402
from schemas import wire  # noqa: E402
from tickerplant.client import Publisher, Subscriber, arrow_ipc  # noqa: E402
from tickerplant.journal_writer import JournaledCore  # noqa: E402

SYMS = ["AAPL", "MSFT", "IBM", "JPM", "XOM", "KO", "PG", "GE"]


def cols(n: int, i: int) -> dict:
    return {
        "sym": [SYMS[(i + k) % 8] for k in range(n)],
        "price": [100.0 + (i + k) % 50 for k in range(n)],
        "size": [1 + (i + k) % 9 for k in range(n)],
    }


def frames(n_msgs: int, rows: int, per_frame: int, arrow: bool = False) -> list[bytes]:
    """Pre-encoded frames of `per_frame` upd messages (msgpack lists, or Arrow IPC with arrow=True)."""
    out, msgs = [], []
    for i in range(n_msgs):
        if arrow:
            msgs.append(wire.UpdArrow(table="trade", ipc=arrow_ipc(pa.table(cols(rows, i))), id=i + 1))
        else:
            msgs.append(wire.Upd(table="trade", cols=msgspec.Raw(wire.encode(cols(rows, i))), id=i + 1))
        if len(msgs) == per_frame:
            out.append(wire.encode(msgs))
            msgs = []
    if msgs:
        out.append(wire.encode(msgs))
    return out


def tp_cfg(journal: str, **kw):
    return config.load(overrides={"tickerplant": {"port": 0, "journal_dir": journal, **kw}}).tickerplant


def bench_core(n_msgs: int, rows: int, per_frame: int, arrow: bool = False) -> float:
    """Messages/s through validate + stamp + journal + publish-frame building, no sockets."""
    data = frames(n_msgs, rows, per_frame, arrow)
    with tempfile.TemporaryDirectory() as d:
        core = JournaledCore(tp_cfg(d))  # the core and its journal writer
        core.open()
        core.core.connect(1, auth.SYSTEM)  # an authenticated publisher
        core.core.subs[99] = __import__("tickerplant.core", fromlist=["Subscription"]).Subscription(
            ("trade",), frozenset()
        )
        t0 = time.perf_counter()
        for i, f in enumerate(data):
            core.on_frame(1, f)
            if i % 4 == 3:  # a flush every few frames, as the 2 ms timer would
                core.flush()
        core.flush()
        dt = time.perf_counter() - t0
        core.close()
    return n_msgs / dt


def bench_naive(n_msgs: int, rows: int) -> float:
    """Naive baseline: one DuckDB INSERT statement per message."""
    con = duckdb.connect()
    con.execute("create table trade (time TIMESTAMP_NS, seq BIGINT, sym VARCHAR, price DOUBLE, size BIGINT)")
    data = [cols(rows, i) for i in range(n_msgs)]
    seq = 0
    t0 = time.perf_counter()
    for c in data:
        now = time.time_ns()
        values = []
        for k in range(rows):
            seq += 1
            values.append((now, seq, c["sym"][k], c["price"][k], c["size"][k]))
        con.executemany(
            "insert into trade values (make_timestamp_ns(?), ?, ?, ?, ?)", values
        ) if rows > 1 else con.execute(
            "insert into trade values (make_timestamp_ns(?), ?, ?, ?, ?)", values[0]
        )
    return n_msgs / (time.perf_counter() - t0)


def run_tp(journal: str, q: mp.Queue) -> None:
    from tickerplant.server import TickerplantServer

    async def main():
        srv = TickerplantServer(tp_cfg(journal, publish_interval_ms=2, subscriber_queue_frames=100000))
        await srv.start()
        q.put(srv.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_subscribers(url: str, n: int, expect_rows: int, q: mp.Queue) -> None:
    async def one() -> float:
        sub = Subscriber(url, tables=["trade"], reconnect=False)
        rows = 0
        async for ev in sub.events():
            if ev.kind == "batch":
                rows += ev.batch.num_rows
                if rows >= expect_rows:
                    return time.perf_counter()
        return time.perf_counter()

    async def main():
        res = await asyncio.gather(*(one() for _ in range(n)))
        q.put(max(res))

    asyncio.run(main())


async def publish(url: str, data: list[bytes], n_msgs: int) -> float:
    async with Publisher(url) as pub:
        t0 = time.perf_counter()
        for i, f in enumerate(data):
            await pub.send_raw(f)
            if i % 64 == 63:
                await pub.wait_acked(pub.acked + 1, 60) if pub.acked < n_msgs else None
        pub.next_id = n_msgs
        await pub.wait_acked(n_msgs, 120)
        return t0


def bench_wire(
    n_msgs: int, rows: int, per_frame: int, n_subs: int, arrow: bool = False
) -> tuple[float, float]:
    """Publisher -> tp process -> n subscribers (another process).
    Returns (msgs/s acked, msgs/s delivered)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        q: mp.Queue = ctx.Queue()
        tp = ctx.Process(target=run_tp, args=(d, q), daemon=True)
        tp.start()
        url = f"ws://127.0.0.1:{q.get(timeout=60)}"
        subs = None
        if n_subs:
            subs = ctx.Process(target=run_subscribers, args=(url, n_subs, n_msgs * rows, q), daemon=True)
            subs.start()
            time.sleep(1.5)
        data = frames(n_msgs, rows, per_frame, arrow)
        t0 = asyncio.run(publish(url, data, n_msgs))
        acked = time.perf_counter()
        delivered = q.get(timeout=120) if subs else acked
        tp.kill()
        if subs:
            subs.kill()
        return n_msgs / (acked - t0), n_msgs / (delivered - t0)


def main() -> None:
    small = int(os.environ.get("BENCH_MSGS", "200000"))
    big = small // 10
    print("| case | messages/s | rows/s | vs naive |")
    print("| --- | ---: | ---: | ---: |")
    naive1 = bench_naive(5000, 1)
    naive100 = bench_naive(200, 100)
    print(f"| naive: one DuckDB INSERT per 1-row message | {naive1:,.0f} | {naive1:,.0f} | 1.0x |")
    print(
        f"| naive: one DuckDB INSERT per 100-row message | {naive100:,.0f} | {naive100 * 100:,.0f} | 1.0x |"
    )
    c1 = bench_core(small, 1, 100)
    c100 = bench_core(big, 100, 10)
    print(f"| core only (no sockets), 1-row messages | {c1:,.0f} | {c1:,.0f} | {c1 / naive1:.0f}x |")
    print(
        f"| core only (no sockets), 100-row messages | {c100:,.0f} | {c100 * 100:,.0f} "
        f"| {c100 / naive100:.0f}x |"
    )
    for n_subs in (0, 1, 10):
        a, d = bench_wire(small, 1, 100, n_subs)
        print(
            f"| websocket, 1-row messages (100 per frame), {n_subs} subscribers: acked / delivered | "
            f"{a:,.0f} / {d:,.0f} | {d:,.0f} | {d / naive1:.0f}x |"
        )
        a, d = bench_wire(big, 100, 10, n_subs)
        print(
            f"| websocket, 100-row messages (10 per frame), {n_subs} subscribers: acked / delivered | "
            f"{a:,.0f} / {d:,.0f} | {d * 100:,.0f} | {d / naive100:.0f}x |"
        )
    c100a = bench_core(big, 100, 10, arrow=True)
    print(
        f"| core only (no sockets), 100-row messages as Arrow (upd_arrow) | {c100a:,.0f} "
        f"| {c100a * 100:,.0f} | {c100a / naive100:.0f}x |"
    )
    c1000a = bench_core(big // 10, 1000, 10, arrow=True)
    print(
        f"| core only (no sockets), 1000-row messages as Arrow (upd_arrow) | {c1000a:,.0f} "
        f"| {c1000a * 1000:,.0f} | {c1000a * 10 / naive100:.0f}x |"
    )
    for n_subs in (0, 1, 10):
        a, d = bench_wire(big // 10, 1000, 10, n_subs, arrow=True)
        print(
            f"| websocket, 1000-row messages as Arrow (10 per frame), {n_subs} subscribers: "
            f"acked / delivered | {a:,.0f} / {d:,.0f} | {d * 1000:,.0f} | {d * 10 / naive100:.0f}x |"
        )
    a, d = bench_wire(small // 10, 1, 1, 1)
    print(
        f"| websocket, 1-row messages, one per frame, 1 subscriber | {a:,.0f} / {d:,.0f} | {d:,.0f} | "
        f"{d / naive1:.0f}x |"
    )


if __name__ == "__main__":
    main()
