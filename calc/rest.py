"""calc's REST API (`[calc] rest_port`, same host, same process and event loop as the websocket API, so it
calls the live MarginEngine): pre-trade what-if, accounts, margin history, alerts, with an OpenAPI 3.1
document generated from the msgspec types in schemas/rest.py.

    POST /v1/what-if                          hypothetical trades -> margin before / after per account
    GET  /v1/accounts                         the accounts the token may see, latest numbers
    GET  /v1/accounts/{account}               latest margin row and drivers
    GET  /v1/accounts/{account}/history?from=&to=   published margin from the rdb (today and the HDB)
    GET  /v1/alerts                           today's alerts
    GET  /openapi.json

Authentication and desk restriction are the websocket's own (calc/api.py): the bearer token goes through
calc's `auth.Gate` (Origin, throttling, role subscriber) and `Api.admit`, and every account passes
`Api.check_accounts` / `Client.may_see`. Errors are RFC 9457 problem documents naming the field.

`Rest` holds the endpoints as plain functions (caller, request -> a schemas.rest type, or RestError);
`app` is the thin ASGI layer (Starlette's routes; the what-if in plain ASGI), `RestServer` runs it under
uvicorn (httptools) on calc's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from calc.alerts import ALL_ACCOUNTS
from calc.api import Client
from calc.history import InputError
from marginflow import auth
from marginflow.sql import sql_str
from schemas import calc as api
from schemas import rest as types
from schemas.rdb import QueryResult

if TYPE_CHECKING:
    from calc.server import CalcService

log = logging.getLogger("marginflow.calc.rest")
MAX_BODY = 1 << 20  # bytes of a request body
JSON = "application/json"
PROBLEM = "application/problem+json"
_TRADE = re.compile(r"^what_if: trade (\d+): (.*)$", re.S)
_PATH = re.compile(r" - at `(\$[^`]*)`$")
_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Content Too Large", 422: "Unprocessable Content",
           429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable"}  # fmt: skip


class RestError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None):
        super().__init__(detail)
        self.problem = types.Problem(
            title=_TITLES.get(status, "Error"), status=status, detail=detail, field=field
        )


def decode_body(body: bytes, kind: type[Any]) -> Any:
    """The request body as `kind`; a 422 problem naming the field ($.trades[0].qty) when it is not."""
    if len(body) > MAX_BODY:
        raise RestError(413, f"request body of {len(body)} bytes, over {MAX_BODY}")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        raise RestError(422, f"invalid request: {e}", m.group(1) if m else "$") from None
    except msgspec.DecodeError as e:
        raise RestError(400, f"malformed JSON: {e}", "$") from None


def parse_time(text: str | None, name: str, default: int) -> int:
    """A query parameter as UTC ns: ISO 8601 (a time without an offset is UTC) or integer ns."""
    if text is None or text == "":
        return default
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise RestError(422, f"{name}: not an ISO 8601 time or UTC nanoseconds: {text!r}", name) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def _margin_row(row: Mapping[str, Any]) -> types.MarginRow:
    """A margin row as the engine gives it (drivers and components as JSON text) -> the API's type."""
    components = row["components"]
    decoded = dict(
        row,
        drivers=msgspec.json.decode(row["drivers"]),
        components=None if components in ("", "{}") else msgspec.json.decode(components),
    )
    return msgspec.convert(decoded, types.MarginRow)


class Rest:
    """The endpoints as plain functions over the running CalcService, or the front of a sharded calc
    (calc/front.py: the same attributes, its what-ifs sent to the owning shard)."""

    def __init__(self, service: CalcService):
        self.service = service

    # ---- who is asking ----------------------------------------------------------------------------------
    def caller(self, host: str, headers: Any, path: str) -> Client:
        """The websocket's checks: the gate (Origin, no token in the URL, throttling, a valid bearer token
        with role subscriber), then Api.admit: desk and accounts."""
        svc = self.service
        outcome = svc.gate.handshake(host, headers, path, required=True)
        if isinstance(outcome, auth.Refusal):
            raise RestError(outcome.status, outcome.reason)
        assert outcome is not None
        client = Client(0, binary=False, peer=host)
        reply = svc.api.admit(client, outcome)[0]
        if isinstance(reply, api.ApiError):
            raise RestError(403, reply.reason)
        return client

    def permitted(self, client: Client, accounts: list[str]) -> None:
        err = self.service.api.check_accounts(client, accounts)
        if err is not None:
            raise RestError(403, err.reason, "account")

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def what_if(self, client: Client, body: bytes) -> types.WhatIfResponse:
        req: types.WhatIfRequest = decode_body(body, types.WhatIfRequest)
        by_account: dict[str, list[int]] = {}
        for i, t in enumerate(req.trades):
            account = t.account or req.account
            if not account:
                why = f"trade {i}: no account (give `account` in the trade or the request)"
                raise RestError(422, why, f"$.trades[{i}].account")
            by_account.setdefault(account, []).append(i)
        self.permitted(client, list(by_account))
        results = []
        svc, m = self.service, self.service.metrics
        for account, idx in by_account.items():
            if not svc.has_account(account):
                raise RestError(404, f"unknown account {account!r}", "account")
            t0 = time.perf_counter()
            try:
                out = await svc.what_if_of(account, [req.trades[i] for i in idx], req.compare)
            except InputError as e:  # the engine names the trade (its index among this account's) and why
                found = _TRADE.match(str(e))
                if found is None:
                    raise RestError(422, str(e), "$.trades") from None
                j = idx[int(found.group(1))]
                raise RestError(422, f"trade {j}: {found.group(2)}", f"$.trades[{j}]") from None
            if self.service.counting:
                m.what_if_seconds.labels("rest").observe(time.perf_counter() - t0)
            results.append(msgspec.convert(out, types.WhatIfResult))
        return types.WhatIfResponse(results=results)

    def accounts(self, client: Client) -> types.AccountList:
        rows = api_rows(self.service.engine.snapshot())
        mine = [msgspec.convert(r, types.AccountSummary) for r in rows if client.may_see(r["account"])]
        return types.AccountList(desk=client.desk, accounts=mine)

    def account(self, client: Client, account: str) -> types.MarginRow:
        self.permitted(client, [account])
        now = time.time_ns()
        for r in api_rows(self.service.engine.snapshot()):
            if r["account"] == account:
                return _margin_row(dict(r, time=now))
        raise RestError(404, f"unknown account {account!r} (or no finite margin yet)", "account")

    async def history(
        self, client: Client, account: str, start: str | None, end: str | None, token: str
    ) -> types.AccountHistory:
        """From the rdb's query path with the caller's own token: the rdb applies the caller's desk
        restriction too (and needs its role query)."""
        self.permitted(client, [account])
        now = time.time_ns()
        day = now - now % 86_400_000_000_000
        lo, hi = parse_time(start, "from", day), parse_time(end, "to", now + 1)
        if hi <= lo:
            raise RestError(422, "to: must be after from", "to")
        sql = (
            "select epoch_ns(max(time)) as t, arg_max(margin, seq), arg_max(collateral, seq) "
            f"from days.margin where account = {sql_str(account)} and time >= make_timestamp_ns({lo}) "
            f"and time < make_timestamp_ns({hi}) group by date_trunc('second', time) order by t"
        )
        reply = await self.service.query_rdb(sql, token=token)
        if not isinstance(reply, QueryResult):
            status = 403 if "not permitted" in reply else 503 if "recovering" in reply else 502
            raise RestError(status, f"history: {reply}")
        cols = list(zip(*reply.data, strict=True)) if reply.data else [[], [], []]
        return types.AccountHistory(
            account=account,
            start=lo,
            end=hi,
            time=[int(x) for x in cols[0]],
            margin=list(cols[1]),
            collateral=list(cols[2]),
        )

    def alerts(self, client: Client) -> types.AlertList:
        rows = [
            r
            for r in self.service.today.alerts
            if r["account"] == ALL_ACCOUNTS or client.may_see(r["account"])
        ]
        return types.AlertList(alerts=msgspec.convert(rows, list[types.AlertRow]))


def api_rows(cols: Mapping[str, list]) -> list[dict[str, Any]]:
    names = list(cols)
    return [dict(zip(names, values, strict=True)) for values in zip(*cols.values(), strict=True)]


# ---- OpenAPI ------------------------------------------------------------------------
def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, its schemas generated from schemas/rest.py."""
    _, components = msgspec.json.schema_components(
        (*types.REQUESTS, *types.RESPONSES), ref_template="#/components/schemas/{name}"
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(name: str, *errors: int) -> dict[str, Any]:
        out: dict[str, Any] = {"200": {"description": "OK", "content": {JSON: {"schema": ref(name)}}}}
        for s in (401, 403, 429, *errors):
            out[str(s)] = {"description": _TITLES[s], "content": {PROBLEM: {"schema": ref("Problem")}}}
        return out

    account = {"name": "account", "in": "path", "required": True, "schema": {"type": "string"}}
    when = "ISO 8601 time (UTC without an offset) or UTC nanoseconds"
    history_params = [
        account,
        {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
         "description": f"{when}; default: 00:00 UTC today"},
        {"name": "to", "in": "query", "required": False, "schema": {"type": "string"},
         "description": f"{when}, exclusive; default: now"},
    ]  # fmt: skip
    paths = {
        "/v1/what-if": {
            "post": {
                "summary": "Margin before and after hypothetical trades, per account (per model: compare)",
                "operationId": "whatIf",
                "requestBody": {"required": True, "content": {JSON: {"schema": ref("WhatIfRequest")}}},
                "responses": answer("WhatIfResponse", 400, 404, 413, 422),
            }
        },
        "/v1/accounts": {
            "get": {
                "summary": "The accounts the token may see",
                "operationId": "accounts",
                "responses": answer("AccountList"),
            }
        },
        "/v1/accounts/{account}": {
            "get": {
                "summary": "An account's latest margin row and drivers",
                "operationId": "account",
                "parameters": [account],
                "responses": answer("MarginRow", 404),
            }
        },
        "/v1/accounts/{account}/history": {
            "get": {
                "summary": "An account's published margin (one point per second) from the rdb",
                "operationId": "history",
                "parameters": history_params,
                "responses": answer("AccountHistory", 422, 502, 503),
            }
        },
        "/v1/alerts": {
            "get": {
                "summary": "Today's alerts of the accounts the token may see",
                "operationId": "alerts",
                "responses": answer("AlertList"),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "marginflow calc REST API",
            "version": "1",
            "description": "Pre-trade what-if and margin of the accounts a desk token may see.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


# ---- the ASGI layer ------------------------------------------------------------------------
Answer = tuple[int, bytes, str, list[tuple[bytes, bytes]]]  # status, body, media type, extra headers


def _problem_answer(p: types.Problem) -> Answer:
    extra = [(b"www-authenticate", b"Bearer")] if p.status == 401 else []
    return p.status, msgspec.json.encode(p), PROBLEM, extra


def _problem(p: types.Problem) -> Response:
    return _response(_problem_answer(p))


def _response(a: Answer) -> Response:
    status, body, media, extra = a
    return Response(body, status, {k.decode(): v.decode() for k, v in extra} or None, media_type=media)


async def _answer(
    rest: Rest, name: str, host: str, headers: Any, path: str, call: Callable[[Client], Awaitable[Any] | Any]
) -> Answer:
    """One endpoint's answer: authenticate, call, encode; a RestError becomes its problem document, a bug
    a 500 problem (logged). Counted in calc's metrics by endpoint and status."""
    try:
        out = call(rest.caller(host, headers, path))
        if asyncio.iscoroutine(out):
            out = await out
        a: Answer = (200, msgspec.json.encode(out), JSON, [])
    except RestError as e:
        a = _problem_answer(e.problem)
    except Exception as e:  # a bug: one problem answer, logged, never a dead server
        log.exception("REST %s failed", name)
        a = _problem_answer(types.Problem(title="Internal Server Error", status=500, detail=repr(e)[:300]))
    rest.service.metrics.rest_requests.labels(name, str(a[0])).inc()
    return a


async def _body(receive: Callable[[], Awaitable[dict]]) -> bytes | None:
    """The request body from ASGI `receive` (None: the client went away)."""
    parts = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        parts.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(parts)


def app(rest: Rest) -> Callable[..., Awaitable[None]]:
    """The ASGI app: `POST /v1/what-if`, the pre-trade hot path, answered directly in ASGI (Starlette's
    Request, Response and middleware were ~0.25 ms of a ~1 ms answer); every other path through Starlette's
    routes. Same checks, same answers and problems either way (`_answer`)."""
    doc = msgspec.json.encode(openapi())

    def endpoint(name: str, call: Callable[[Client, Request], Awaitable[Any] | Any]) -> Callable:
        async def handle(request: Request) -> Response:
            host = request.client.host if request.client else ""
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return _response(
                await _answer(rest, name, host, request.headers, path, lambda c: call(c, request))
            )

        return handle

    async def what_if(client: Client, request: Request) -> Any:
        return await rest.what_if(client, await request.body())

    def history(client: Client, request: Request) -> Any:
        q, token = request.query_params, auth.bearer(request.headers) or ""
        return rest.history(client, request.path_params["account"], q.get("from"), q.get("to"), token)

    async def openapi_json(request: Request) -> Response:
        return Response(doc, media_type=JSON)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        title = _TITLES.get(status, "Error")
        return _problem(
            types.Problem(title=title, status=status, detail=f"{request.method} {request.url.path}: {title}")
        )

    routes = [  # (POST /v1/what-if is answered before these; its route stays for 405 and the same answer)
        Route("/v1/what-if", endpoint("what-if", what_if), methods=["POST"]),
        Route("/v1/accounts", endpoint("accounts", lambda c, r: rest.accounts(c)), methods=["GET"]),
        Route(
            "/v1/accounts/{account}",
            endpoint("account", lambda c, r: rest.account(c, r.path_params["account"])),
            methods=["GET"],
        ),
        Route("/v1/accounts/{account}/history", endpoint("history", history), methods=["GET"]),
        Route("/v1/alerts", endpoint("alerts", lambda c, r: rest.alerts(c)), methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    routed = Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def asgi(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/what-if" or scope["method"] != "POST":
            return await routed(scope, receive, send)
        host = scope["client"][0] if scope.get("client") else ""
        query = scope.get("query_string", b"")
        path = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        gone = False

        async def call(client: Client) -> Any:
            nonlocal gone
            body = await _body(receive)
            if body is None:
                gone = True
                raise RestError(400, "the client went away before its request body arrived")
            return await rest.what_if(client, body)

        status, body, media, extra = await _answer(rest, "what-if", host, Headers(scope=scope), path, call)
        if gone:
            return
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", media.encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return asgi


class OneWrite:
    """A transport that sends a response's head and body in one write: uvicorn writes the status line and
    headers (at `http.response.start`) and the body in two `send()`s, so the client is woken for the head and
    again for the body, and calc pays a second loopback send (~0.1 ms mean, ~1 ms at p99 of a ~1 ms
    what-if when the two cores are busy). A head whose Content-Length promises a body is held until the
    next write (the body, in the same turn of the loop) or, at the latest, the loop's next turn."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.held:
            data, self.held = self.held + bytes(data), b""
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n" and b"content-length: 0\r\n" not in data:
            if b"content-length: " in data:
                self.held = bytes(data)
                asyncio.get_running_loop().call_soon(self.flush)
                return
        self.transport.write(data)

    def flush(self) -> None:
        if self.held:
            data, self.held = self.held, b""
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading ...: the transport's
        return getattr(self.transport, name)


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each answer at once (OneWrite)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = OneWrite(transport)  # type: ignore[assignment]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # calc's process owns SIGINT / SIGTERM (marginflow.process)
        yield


class RestServer:
    """uvicorn serving `app` on calc's own event loop (startup, main loop as a task, shutdown)."""

    def __init__(self, service: CalcService, host: str, port: int, access: Any):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else Nagle: ~40 ms per answer)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app(Rest(service)),
            lifespan="off",
            log_level="warning",
            access_log=False,
            http=_Protocol,  # httptools, the C parser (h11, pure Python, was ~0.15 ms a request), one write
            ws="none",
            timeout_graceful_shutdown=2,  # calc stops even while a client keeps a connection open
            ssl_certfile=access.tls_cert or None,
            ssl_keyfile=access.tls_key or None,
        )
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.server.config
        config.load()
        self.server.lifespan = config.lifespan_class(config)  # (what uvicorn's own serve() sets up)
        await self.server.startup(sockets=[self.sock])
        self.task = asyncio.create_task(self.server.main_loop(), name="calc rest")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        await self.server.shutdown(sockets=[self.sock])
