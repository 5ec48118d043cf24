"""kdb+ IPC: a small query's round trip from PyKX to the rdb's kdb+ port (p50 / p99; target <= 0.5 ms
p50), rows/s of a 1,000,000-row result (PyKX `select from trade`), and the `.u.upd` ingest rate of a PyKX
publisher into the tickerplant's kdb+ port beside the native websocket upd_arrow of the same frames, in the
same run. Each client runs in its own process (PyKX blocks in C holding the GIL); the servers run here.
Prints a markdown table.
Usage: python benchmarks/bench_kdb.py [--rows 1000000] [--queries 2000] [--upd-rows 1000] [--upds 500]"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marginflow import auth, config  # noqa: E402
from rdb.query import to_ipc  # noqa: E402
from rdb.server import Rdb  # noqa: E402
from schemas import wire  # noqa: E402
from schemas.tables import TABLES  # noqa: E402
from tests.support.qclient import PyKX  # noqa: E402
from tests.support.servers import InThread  # noqa: E402
from tickerplant.server import TickerplantServer  # noqa: E402

T0 = 1_705_311_000_000_000_000


def trades(n: int) -> pa.Table:
    rng = np.random.default_rng(7)
    syms = np.array([f"S{i:03d}" for i in range(100)])
    return pa.table({
        "time": pa.array(T0 + np.arange(n) * 1000, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(np.arange(1, n + 1)), "sym": pa.array(syms[rng.integers(0, 100, n)]),
        "price": pa.array(100 + rng.random(n)), "size": pa.array(rng.integers(1, 1000, n)),
    }, schema=TABLES["trade"].arrow_schema)  # fmt: skip


def native_publisher(url: str, token: str, ipc: bytes, n: int, out) -> None:  # a child process
    from websockets.sync.client import connect

    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws:
        t0 = time.perf_counter()
        for i in range(1, n + 2):
            ws.send(wire.encode(wire.UpdArrow(table="trade", ipc=ipc, id=i)))
        while True:
            msg = wire.decoder(wire.FromTickerplant).decode(ws.recv(60))
            if isinstance(msg, wire.Ack) and msg.upto >= n + 1:
                break
        out.put(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--upd-rows", type=int, default=1000)
    ap.add_argument("--upds", type=int, default=500)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kdb-"))
    overrides = {"access": {"credentials_file": str(tmp / "creds.json"),
                            "client_credentials_file": str(tmp / "client.json")}}  # fmt: skip
    access = config.load(None, overrides).access
    query_token, pub_token = auth.local_token("query", access), auth.local_token("publisher", access)
    px = PyKX()
    lines = ["| measure | figure |", "| --- | --- |"]

    rdb_keys = {"port": 0, "kdb_port": -1, "hdb_dir": str(tmp / "hdb"), "max_result_rows": args.rows,
                "max_result_bytes": 1 << 31, "query_timeout_s": 120}  # fmt: skip
    cfg = config.load(None, {**overrides, "rdb": rdb_keys})
    rdb = Rdb(cfg.rdb, date="2024-01-15", access=cfg.access)
    rdb.apply_batch("trade", trades(args.rows))
    rdb.store.flush()
    running = InThread(rdb)
    try:
        h = px.connect(rdb.kdb.port.port, query_token)
        # count trade: known by the rdb after the first (rdb.service.Service.quick, no DuckDB, no thread hop);
        # count select from trade: the same number through DuckDB every time (the general query path)
        for text in ("count trade", "count select from trade", "select from trade where i<10"):
            px.time_query(h, text, 100)  # warm
            times, _ = px.time_query(h, text, args.queries)
            p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
            lines.append(f"| PyKX `{text}` round trip p50 / p99 | {p50:.3f} ms / {p99:.3f} ms |")
        times, n = px.time_query(h, "select from trade", 3)
        best = min(times)
        lines.append(
            f"| PyKX `select from trade` ({n:,} rows) | {best:.2f} s, {n / best / 1e6:.2f} M rows/s |"
        )
    finally:
        running.stop()

    tp_keys = {"port": 0, "kdb_port": -1, "journal_dir": str(tmp / "journal"), "max_rows_per_message": 10**6}
    tp_cfg = config.load(None, {**overrides, "tickerplant": tp_keys})
    tp = TickerplantServer(tp_cfg.tickerplant, access=tp_cfg.access)
    running = InThread(tp)
    try:
        n, k = args.upd_rows, args.upds
        data = trades(n).drop_columns(["time", "seq"])
        cols = {c: (t, data.column(c).to_pylist()) for c, t in (("sym", "s"), ("price", "f"), ("size", "j"))}
        h = px.connect(tp.kdb.port.port, pub_token)
        px.upd_many(h, "trade", cols, 10)  # warm
        secs = px.upd_many(h, "trade", cols, k)
        lines.append(
            f"| PyKX `.u.upd` ({k + 1} x {n} rows, async then one sync) | "
            f"{(k + 1) * n / secs / 1e6:.2f} M rows/s |"
        )
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        p = ctx.Process(
            target=native_publisher, args=(f"ws://127.0.0.1:{tp.port}", pub_token, to_ipc(data), k, out)
        )
        p.start()
        secs = out.get(timeout=600)
        p.join(30)
        lines.append(
            f"| native websocket `upd_arrow` (same frames) | {(k + 1) * n / secs / 1e6:.2f} M rows/s |"
        )
    finally:
        running.stop()
        px.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
