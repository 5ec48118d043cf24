"""Chaos run: SIGKILL a random process of `marginflow up --demo` (tickerplant, rdb, calc, feed) for N
rounds with the simulated feed on, then check that nothing was lost, doubled or left wrong.

Per round: kill, wait for `up` to restart the process, time until margin rows reach a websocket client
again (from the kill and from the restart). At the end (feed paused with SIGSTOP so the system goes
quiet): every journal file whole, every seq and every fill exec_id unique, the rdb's counts equal the
journal's, calc's margins equal a fresh replay of the journal, every row a marker publisher had acked
journaled exactly once.

    .venv/bin/python benchmarks/chaos.py --rounds 50 [--seed 1] [--var DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calc.engine import MarginEngine  # noqa: E402
from calc.events import INPUT_TABLES, apply_batch  # noqa: E402
from marginflow import auth  # noqa: E402
from marginflow import config as configuration  # noqa: E402
from schemas import rdb as rdbwire  # noqa: E402
from schemas.tables import TABLES  # noqa: E402
from tests.support.up import UpProcess  # noqa: E402
from tickerplant import journal  # noqa: E402
from tickerplant import journal_reader as reader  # noqa: E402
from tickerplant.client import Publisher  # noqa: E402

MARKER_SYM = "CHAOSMARK"  # trades of an instrument no account holds: journaled, ignored by calc


class MarginClient:
    """A dashboard-like websocket client of calc: stamps the arrival of every margin update, reconnects."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.arrivals: list[float] = []
        self.connects = 0

    async def run(self) -> None:
        while True:
            try:
                async with connect(
                    self.url + "/ws",
                    max_size=None,
                    open_timeout=2,
                    **auth.client_options(self.url, "subscriber", self.token),
                ) as ws:
                    self.connects += 1
                    await ws.send(msgspec.msgpack.encode({"type": "subscribe", "accounts": []}))
                    async for data in ws:
                        msg = msgspec.msgpack.decode(data) if isinstance(data, bytes) else json.loads(data)
                        if msg.get("type") == "margin" and msg.get("rows"):
                            self.arrivals.append(time.monotonic())
            except (OSError, TimeoutError, Exception):
                await asyncio.sleep(0.1)

    def first_after(self, t: float) -> float | None:
        for x in reversed(self.arrivals):
            if x <= t:
                break
        later = [x for x in self.arrivals if x > t]
        return later[0] if later else None

    async def snapshot(self) -> dict[str, float]:
        async with connect(
            self.url + "/ws",
            max_size=None,
            open_timeout=5,
            **auth.client_options(self.url, "subscriber", self.token),
        ) as ws:
            await ws.send(msgspec.msgpack.encode({"type": "snapshot_request", "accounts": []}))
            while True:
                data = await asyncio.wait_for(ws.recv(), 10)
                msg = msgspec.msgpack.decode(data) if isinstance(data, bytes) else json.loads(data)
                if msg.get("type") == "snapshot":
                    return {r["account"]: r["margin"] for r in msg["rows"]}


async def marker_publisher(url: str, stop: asyncio.Event, acked: dict[int, int]) -> Publisher:
    """One marker trade every 20 ms, its size a counter; `acked` maps counter -> message id once acked."""
    pub = Publisher(url, name="chaos-marker")
    await pub.connect()
    sent: dict[int, int] = {}
    n = 0
    while not stop.is_set():
        n += 1
        sent[await pub.upd("trade", {"sym": [MARKER_SYM], "price": [1.0], "size": [n]})] = n
        for mid in [m for m in sent if m <= pub.acked]:
            acked[sent.pop(mid)] = mid
        await asyncio.sleep(0.02)
    try:
        await pub.wait_acked(timeout=30)
    except (TimeoutError, ConnectionError):
        pass
    for mid in [m for m in sent if m <= pub.acked]:
        acked[sent.pop(mid)] = mid
    await pub.close()
    return pub


def rdb_counts(url: str, token: str) -> dict[str, int]:
    async def ask() -> dict[str, int]:
        out = {}
        async with connect(
            url, max_size=None, open_timeout=5, **auth.client_options(url, "query", token)
        ) as ws:
            for t in TABLES:
                await ws.send(
                    msgspec.msgpack.encode(rdbwire.Query(sql=f"select count(*) from {t}", format="json"))
                )
                reply = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 30))
                out[t] = int(reply["data"][0][0]) if reply.get("type") == "query_result" else -1
        return out

    return asyncio.run(ask())


def fresh_replay(cfg: configuration.Config, root: Path) -> dict[str, float]:
    """calc's margins recomputed from nothing: the engine from config, then every journaled event."""
    eng = MarginEngine.from_config(cfg.calc)
    for table, batch in reader.read_days(root, tables=list(INPUT_TABLES)):
        apply_batch(eng, table, batch, cfg.calc)  # as calc does (calc/events.py)
    snap = eng.snapshot()
    return dict(zip(snap["account"], snap["margin"], strict=True))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=2000, help="simulated feed events per second")
    ap.add_argument("--var", help="folder for the run (default: a new temporary folder)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    var = Path(args.var or tempfile.mkdtemp(prefix="marginflow-chaos-")).resolve()
    rng = random.Random(args.seed)
    try:
        up = UpProcess(var, "--demo", "--rate", str(args.rate), ready_timeout=300)
    except AssertionError as e:
        raise SystemExit(str(e)) from None
    failures: list[str] = []
    rounds: list[dict] = []
    try:
        cfg = configuration.load(
            None, {"tickerplant": {"journal_dir": str(var / "journal")}, "rdb": {"hdb_dir": str(var / "hdb")}}
        )
        tokens = {r: auth.local_token(r, cfg.access) for r in ("subscriber", "query")}
        tokens["desk"] = auth.local_token("desk:risk", cfg.access)
        print(f"chaos: {args.rounds} rounds, var {var}, pids {up.pids}", flush=True)
        figures = asyncio.run(_rounds(up, args.rounds, rng, tokens, rounds, failures))
        os.kill(up.pids["feed"], signal.SIGSTOP)  # quiet: no new events while the invariants are checked
        try:
            time.sleep(3.0)
            figures.update(_check(up, cfg, var, tokens, figures.pop("acked"), failures))
        finally:
            os.kill(up.pids["feed"], signal.SIGCONT)
    finally:
        code = up.stop(timeout=90)
    kills = Counter(r["process"] for r in rounds)
    from_kill = [r["kill_to_row_s"] for r in rounds if r["kill_to_row_s"] is not None]
    from_restart = [r["restart_to_row_s"] for r in rounds if r["restart_to_row_s"] is not None]
    summary = {
        "rounds": len(rounds),
        "kills": dict(kills),
        "restarts_seen": sum(1 for r in rounds if r["restarted"]),
        "kill_to_first_row_s": {"p50": pct(from_kill, 50), "max": max(from_kill, default=float("nan"))},
        "restart_to_first_row_s": {
            "p50": pct(from_restart, 50),
            "max": max(from_restart, default=float("nan")),
        },
        "per_process_restart_to_row_p50_s": {
            p: statistics.median(
                [
                    r["restart_to_row_s"]
                    for r in rounds
                    if r["process"] == p and r["restart_to_row_s"] is not None
                ]
                or [float("nan")]
            )
            for p in kills
        },
        **figures,
        "up_exit": code,
        "failures": failures,
    }
    summary["up_lines"] = [x.rstrip() for x in up.output if re.search(r"died|unhealthy|restarted|did not", x)]
    print(json.dumps(summary, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2, default=str))
    return 1 if failures else 0


async def _rounds(
    up: UpProcess, n: int, rng: random.Random, tokens: dict[str, str], rounds: list[dict], failures: list[str]
) -> dict:
    client = MarginClient(up.urls["calc"], tokens["desk"])
    reading = asyncio.create_task(client.run())
    stop = asyncio.Event()
    acked: dict[int, int] = {}
    marking = asyncio.create_task(marker_publisher(up.urls["tickerplant"], stop, acked))
    await asyncio.sleep(3)
    t_run = time.monotonic()
    for i in range(n):
        name = rng.choice(["tp", "rdb", "calc", "feed"])
        pid = up.pids[name]
        t_kill = time.monotonic()
        r = {
            "round": i + 1,
            "process": name,
            "restarted": False,
            "kill_to_row_s": None,
            "restart_to_row_s": None,
        }
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # gone already: `up` is restarting it (it died, or stayed unhealthy)
            r["already_gone"] = True
            failures.append(
                f"round {i + 1}: {name} (pid {pid}) had already exited before the kill; see up's lines"
            )
        deadline = t_kill + 120
        while time.monotonic() < deadline and up.restarted.get(name, 0) <= t_kill:
            await asyncio.sleep(0.05)
        t_up = up.restarted.get(name, 0)
        if t_up > t_kill:
            r["restarted"] = True
            r["restart_s"] = round(t_up - t_kill, 3)
            while time.monotonic() < t_up + 30 and client.first_after(t_up) is None:
                await asyncio.sleep(0.02)
            first = client.first_after(t_up)
            if first is not None:
                r["kill_to_row_s"] = round(first - t_kill, 3)
                r["restart_to_row_s"] = round(first - t_up, 3)
            if first is None or first - t_up > 5.0:
                failures.append(
                    f"round {i + 1}: no margin row within 5 s of {name}'s restart "
                    f"({'none in 30 s' if first is None else f'{first - t_up:.2f} s'})"
                )
        else:
            failures.append(f"round {i + 1}: {name} (pid {pid}) was not restarted within 120 s")
        rounds.append(r)
        print(
            f"round {i + 1:3d} {name:<5} restart {r.get('restart_s', '-')} s, first row "
            f"{r['restart_to_row_s']} s after it",
            flush=True,
        )
        await asyncio.sleep(rng.uniform(1.0, 3.0))
    stop.set()
    pub = await marking
    reading.cancel()
    return {
        "seconds": round(time.monotonic() - t_run, 1),
        "client_connects": client.connects,
        "marker_reconnects": getattr(pub, "reconnects", 0),
        "acked": acked,
    }


def _check(
    up: UpProcess,
    cfg: configuration.Config,
    var: Path,
    tokens: dict[str, str],
    acked: dict[int, int],
    failures: list[str],
) -> dict:
    root = var / "journal"
    out: dict = {}
    # the journal: whole files, unique seq, unique exec_id
    for date in journal.journal_dates(root):
        for path in journal.day_files(root, date).values():
            s = journal.scan(path)
            if s.error or s.torn:
                failures.append(f"journal {path}: {s.error or 'torn tail'}")
    counts = {t: 0 for t in TABLES}
    seqs: list[np.ndarray] = []
    exec_ids: list[str] = []
    markers: list[int] = []
    for table, batch in reader.read_days(root):
        counts[table] += batch.num_rows
        seqs.append(batch.column("seq").to_numpy())
        if table == "fill":
            exec_ids += batch.column("exec_id").to_pylist()
        if table == "trade":
            sym = batch.column("sym").to_numpy(zero_copy_only=False)
            markers += batch.column("size").to_numpy()[sym == MARKER_SYM].tolist()
    date = max(journal.journal_dates(root))
    margin_last = reader.read_table(root, date, "margin").column("last_seq").to_numpy()
    out["margin_rows_back_in_time"] = int((np.diff(margin_last) < 0).sum())  # a row of a half-replayed state
    if out["margin_rows_back_in_time"]:
        failures.append(f"{out['margin_rows_back_in_time']} margin rows older than the row before them")
    state: dict[tuple[str, str], str] = {}
    repeats = 0
    alerts = reader.read_table(root, date, "alert")
    for key in zip(
        alerts.column("account").to_pylist(),
        alerts.column("rule").to_pylist(),
        alerts.column("state").to_pylist(),
        strict=True,
    ):
        repeats += state.get(key[:2]) == key[2]
        state[key[:2]] = key[2]
    out["alert_repeats"] = (
        repeats  # the same state twice in a row for an (account, rule): a restart's re-raise
    )
    if repeats:
        failures.append(f"{repeats} alert rows repeat the state before them")
    allseq = np.concatenate(seqs) if seqs else np.array([], dtype=np.int64)
    out["journal_rows"] = counts
    out["duplicate_seqs"] = int(len(allseq) - len(np.unique(allseq)))
    out["duplicate_exec_ids"] = len(exec_ids) - len(set(exec_ids))
    if out["duplicate_seqs"]:
        failures.append(f"{out['duplicate_seqs']} seq values journaled twice")
    if out["duplicate_exec_ids"]:
        failures.append(f"{out['duplicate_exec_ids']} fill exec_ids journaled twice")
    # acked marker rows: each exactly once
    seen = Counter(markers)
    lost = [n for n in acked if seen[n] == 0]
    doubled = [n for n, k in seen.items() if k > 1]
    out.update(marker_acked=len(acked), marker_lost=len(lost), marker_doubled=len(doubled))
    if lost:
        failures.append(f"{len(lost)} acked marker rows missing from the journal (e.g. {lost[:5]})")
    if doubled:
        failures.append(f"{len(doubled)} marker rows journaled more than once (e.g. {doubled[:5]})")
    # the rdb holds what the journal holds
    rdb = rdb_counts(up.urls["rdb"], tokens["query"])
    out["rdb_rows"] = rdb
    for t in TABLES:
        if rdb.get(t) != counts[t]:
            failures.append(f"rdb {t}: {rdb.get(t)} rows, journal {counts[t]}")
    # calc's margins equal a fresh replay of the journal
    live = asyncio.run(MarginClient(up.urls["calc"], tokens["desk"]).snapshot())
    fresh = fresh_replay(cfg, root)
    worst = 0.0
    for account, m in fresh.items():
        diff = abs(live.get(account, float("nan")) - m) / max(abs(m), 1.0)
        worst = max(worst, diff if diff == diff else float("inf"))
    out["margin_max_rel_diff_vs_replay"] = worst
    if not worst <= 1e-9:
        failures.append(f"calc's margins differ from a fresh replay by {worst:.3g} (relative)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
