"""`marginflow front`: one API for users of a sharded calc (#16 item 3), with no engine.

It follows the tickerplant's `margin`, `alert`, `forecast` and `callcheck` tables (every shard's rows:
each shard journals its own), keeps the latest margin row per account (snapshots) and the day a new
screen is sent (calc/today.py), and serves calc's websocket API unchanged (calc/api.py: tokens, desks,
subscribe, snapshot, fan-out, history from the rdb). A what-if goes to the shard that owns the account
(calc/shard.py `shard_of`) as a NATS request on `mfrpc.whatif.<k>` (schemas/bus.py); the shard answers
with its engine's what-if. It serves /health, /metrics, /healthz, /readyz, the dashboard's files and, on
`calc.rest_port`, calc's REST API (calc/rest.py) for every shard's accounts.
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
from calc.history import InputError
from calc.inputs import load_accounts
from calc.rdbquery import margin_history, query_rdb
from calc.rest import RestError, RestServer
from calc.server import CLIENT_QUEUE, Peer, gate_http, static_response
from calc.shard import from_config, shard_of
from calc.today import Today
from marginflow import auth, metrics, process
from marginflow import config as configuration
from marginflow.config import Config
from schemas import bus as buswire
from schemas import calc as api
from schemas import rdb as rdbwire
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
        self.accounts = frozenset(accounts)
        self.gate = auth.Gate(cfg.access, auth.allowed_origins(cfg.access, c.host, c.port), role="subscriber")
        self.api = Api(self.gate, accounts)
        self.metrics = metrics.CalcMetrics(())  # /metrics: REST requests (the front applies no events)
        self.counting = False  # (what the REST API reads: no engine what-if to time here)
        self.rest: RestServer | None = None
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
        if c.rest_port:  # calc's REST API for every shard's accounts (what-ifs to the owning shard)
            self.rest = RestServer(self, c.host, c.rest_port, self.cfg.access)  # type: ignore[arg-type]
            await self.rest.start()

    async def stop(self) -> None:
        if self.rest is not None:
            await self.rest.stop()
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

    async def _request(self, msg: api.WhatIf) -> buswire.WhatIfAnswer:
        """The owning shard's answer to a what-if (NATS request/reply); raises if no shard answers."""
        k = shard_of(msg.account, self.n, self.assigned, self.buckets)
        reply = await self.nc.request(
            buswire.whatif_subject(k), msgspec.msgpack.encode(msg), timeout=WHATIF_TIMEOUT_S
        )
        return msgspec.msgpack.decode(reply.data, type=buswire.WhatIfAnswer)

    def _unanswered(self, account: str, e: Exception) -> str:
        k = shard_of(account, self.n, self.assigned, self.buckets)
        return f"shard {k}/{self.n} did not answer: {type(e).__name__} {e}"

    async def ask_shard(self, msg: api.WhatIf) -> buswire.WhatIfAnswer:
        try:
            return await self._request(msg)
        except Exception as e:  # no shard k, a timeout: the client is told, the front goes on
            return buswire.WhatIfAnswer(error=self._unanswered(msg.account, e))

    # ---- what the REST API (calc/rest.py) reads of its service -------------------------------------------
    @property
    def engine(self) -> _Answers:
        return _Answers(self.rows)  # (snapshot(): the latest row of every account)

    def has_account(self, account: str) -> bool:
        return account in self.accounts

    async def what_if_of(self, account: str, trades: list, compare: bool) -> dict:
        """The owning shard's what-if: its engine's answer, InputError with its reason (naming the trade),
        or RestError 503 when no shard answers."""
        msg = api.WhatIf(
            account=account,
            trades=[api.Trade(sym=t.sym, qty=t.qty, side=t.side) for t in trades],
            compare=compare,
        )
        try:
            answer = await self._request(msg)
        except Exception as e:
            raise RestError(503, self._unanswered(account, e)) from None
        if answer.result is None:
            raise InputError(answer.error)
        return answer.result

    async def query_rdb(self, sql: str, id: int = 0, token: str | None = None) -> rdbwire.QueryResult | str:
        return await query_rdb(self.rdb_url, sql, id, token)

    def http(self, connection: ServerConnection, request: Request) -> Response | None:
        """A handshake with an Authorization header is authenticated here (else the first message must
        be `auth`); other requests: /health, or the dashboard's files (calc/static/) as calc serves them."""
        done, response = gate_http(self.gate, connection, request)
        if done:
            return response
        path = urlparse(request.path).path
        served = metrics.http_response(connection, request, self.gate, self.metrics, self.readiness)
        if served is not None:  # /metrics, /healthz, /readyz
            return served
        if path == "/health":
            health = {"ok": True, "live": self.live, "accounts": len(self.rows), "shards": self.n}
            return Response(
                200, "OK", Headers({"Content-Type": "application/json"}), msgspec.json.encode(health)
            )
        return static_response(connection, path)

    def readiness(self) -> str:
        """ "" once the front follows the tickerplant live (its snapshots: the shards' rows), else why."""
        return "" if self.live else "replaying the tickerplant's margin rows"

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
