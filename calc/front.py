"""`marginflow front`: one API for users of a sharded calc (#16 item 3), with no engine.

It follows the tickerplant's `margin`, `alert`, `forecast` and `callcheck` tables (every shard's rows:
each shard journals its own), keeps the latest margin row per account (snapshots) and the day a new
screen is sent (calc/today.py), and serves calc's websocket API unchanged (calc/api.py: tokens, desks,
subscribe, snapshot, fan-out, history from the rdb). A what-if goes to the shard that owns the account
(calc/shard.py `shard_of`) as a NATS request on `mfrpc.whatif.<k>` (schemas/bus.py); the shard answers
with its engine's what-if. It serves /health and the dashboard's files; not the REST API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any
from urllib.parse import urlparse

import msgspec
import pyarrow as pa
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from calc.api import Api
from calc.inputs import load_accounts
from calc.rdbquery import margin_history
from calc.server import CLIENT_QUEUE, Peer, gate_http, static_response
from calc.shard import from_config, shard_of
from calc.today import Today
from marginflow import auth, process
from marginflow import config as configuration
from marginflow.config import Config
from schemas import bus as buswire
from schemas import calc as api
from tickerplant.bus import connect as bus_connect
from tickerplant.client import Subscriber

log = logging.getLogger("marginflow.front")
WHATIF_TIMEOUT_S = 10.0
UPDATES = {  # the tables the front follows -> the update message their rows go out in
    "margin": api.MarginUpdate,
    "alert": api.AlertUpdate,
    "forecast": api.ForecastUpdate,
    "callcheck": api.CallcheckUpdate,
}


class _Answers:
    """What Api.handle reads from an engine: the latest rows (snapshot) and one what-if answer."""

    def __init__(self, rows: dict[str, dict], answer: buswire.WhatIfAnswer | None = None):
        self.rows, self.answer = rows, answer

    def snapshot(self) -> dict[str, list]:
        names = next(iter(self.rows.values())).keys() if self.rows else ["account"]
        return {n: [r[n] for r in self.rows.values()] for n in names}

    def what_if(self, account: str, trades: Any, compare: bool) -> dict[str, Any]:
        if self.answer is None or self.answer.result is None:
            raise ValueError(self.answer.error if self.answer else f"no shard answered for {account}")
        return self.answer.result


class FrontService:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        c = cfg.calc
        self.n = from_config(c).n if c.shard else 1  # (calc.shard "0/N" names N for the front)
        self.assigned = from_config(c).assigned if c.shard else {}
        self.buckets = cfg.bus.buckets
        self.tp_url = f"{auth.scheme(cfg.access)}://{cfg.tickerplant.host}:{cfg.tickerplant.port}"
        self.rdb_url = f"{auth.scheme(cfg.access)}://{cfg.rdb.host}:{cfg.rdb.port}"
        accounts = list(load_accounts(c.accounts_file, c.default_policy))
        self.gate = auth.Gate(cfg.access, auth.allowed_origins(cfg.access, c.host, c.port), role="subscriber")
        self.api = Api(self.gate, accounts)
        self.rows: dict[str, dict] = {}  # account -> its latest margin row
        self.today = Today()  # every shard's alerts, forecasts and call checks of the day, for new screens
        self.peers: dict[int, Peer] = {}
        self.live = False
        self.port = 0
        self.server: Any = None
        self.nc: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.cfg.calc
        auth.check_bind("front", c.host, self.cfg.access)
        self.nc = await bus_connect(self.cfg.bus, "marginflow-front")
        self.server = await serve(
            self.handle,
            c.host,
            c.port,
            process_request=self.http,
            compression=None,
            ssl=auth.server_ssl(self.cfg.access),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.gate.origins = auth.allowed_origins(self.cfg.access, c.host, self.port)
        self._task = asyncio.create_task(self.follow())

    async def stop(self) -> None:
        await process.cancel_and_wait(self._task)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.nc is not None:
            await self.nc.close()

    async def follow(self) -> None:
        """Every shard's margin, alert, forecast and call-check rows from the tickerplant, to the clients
        that follow them."""
        sub = Subscriber(self.tp_url, tables=list(UPDATES), ordered=True)
        async for ev in sub.events():
            if ev.kind == "live":
                self.live = True
            if ev.kind != "batch":
                continue
            b = ev.batch
            cols = {  # timestamps as ns since the epoch, as calc sends them
                f.name: (
                    b.column(f.name).cast("int64") if pa.types.is_timestamp(f.type) else b.column(f.name)
                ).to_pylist()
                for f in b.schema
                if f.name != "seq"
            }
            if ev.table == "margin":
                for i, a in enumerate(cols["account"]):
                    self.rows[a] = {n: v[i] for n, v in cols.items()}
            else:
                self.today.add(ev.table, cols)
            if self.live:
                for cid, frame in self.api.fan_out(UPDATES[ev.table], cols).items():
                    peer = self.peers.get(cid)
                    if peer is not None:
                        peer.send(frame)

    async def ask_shard(self, msg: api.WhatIf) -> buswire.WhatIfAnswer:
        k = shard_of(msg.account, self.n, self.assigned, self.buckets)
        try:
            reply = await self.nc.request(
                buswire.whatif_subject(k), msgspec.msgpack.encode(msg), timeout=WHATIF_TIMEOUT_S
            )
            return msgspec.msgpack.decode(reply.data, type=buswire.WhatIfAnswer)
        except Exception as e:  # no shard k, a timeout: the client is told, the front goes on
            return buswire.WhatIfAnswer(error=f"shard {k}/{self.n} did not answer: {type(e).__name__} {e}")

    def http(self, connection: ServerConnection, request: Request) -> Response | None:
        """A handshake with an Authorization header is authenticated here (else the first message must
        be `auth`); other requests: /health, or the dashboard's files (calc/static/) as calc serves them."""
        done, response = gate_http(self.gate, connection, request)
        if done:
            return response
        path = urlparse(request.path).path
        if path == "/health":
            health = {"ok": True, "live": self.live, "accounts": len(self.rows), "shards": self.n}
            return Response(
                200, "OK", Headers({"Content-Type": "application/json"}), msgspec.json.encode(health)
            )
        return static_response(connection, path)

    async def handle(self, ws: ServerConnection) -> None:
        who = self.gate.principals.get(ws)
        client, replies = self.api.connect(False, principal=who, peer=auth.peer_host(ws))
        peer = Peer(ws, client, asyncio.Queue(CLIENT_QUEUE))
        peer.writer = asyncio.create_task(peer.write())
        self.peers[client.id] = peer
        try:
            for m in replies:
                peer.send(self.api.encode(client, m))
            async for data in ws:
                client.binary = isinstance(data, bytes)
                msg = self.api.decode(client, data)
                answer = None
                if isinstance(msg, api.WhatIf) and client.may_see(msg.account):
                    answer = await self.ask_shard(msg)
                for reply in self.api.handle(client, msg, _Answers(self.rows, answer)):
                    peer.send(self.api.encode(client, reply))
                if isinstance(msg, api.Subscribe) and client.subscribed is not None:
                    for update in self.today.for_subscriber(client):  # a new screen starts with the day
                        peer.send(self.api.encode(client, update))
                if isinstance(msg, api.HistoryRequest) and client.may_see(msg.account):
                    peer.send(self.api.encode(client, await margin_history(self.rdb_url, msg)))
                if client.close_reason:
                    await asyncio.sleep(0.01)  # (the error reply first)
                    await ws.close(1008, client.close_reason)
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            self.api.disconnect(client)
            self.peers.pop(client.id, None)
            peer.writer.cancel()


async def run(cfg: Config) -> None:
    service = FrontService(cfg)
    await process.serve_until_stopped(
        service, lambda: f"front ready {auth.scheme(cfg.access)}://{cfg.calc.host}:{service.port}"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow front", description=__doc__)
    ap.add_argument("--config")
    ap.add_argument("--port", type=int, help="front port (0 = any free port)")
    ap.add_argument("--shards", type=int, required=True, help="N: the shards' count")
    args = ap.parse_args(argv)
    over: dict = {"calc": {"shard": f"0/{args.shards}"}}
    if args.port is not None:
        over["calc"]["port"] = args.port
    process.setup_logging("front")
    asyncio.run(run(configuration.load(args.config, over)))
    return 0
