"""calc's REST API against a real tickerplant, rdb and calc on ephemeral ports (one system for the module):
the OpenAPI document validates and every endpoint's real answers match it; a desk token reaches only its
accounts through every endpoint; bad bodies get problem+json naming the field; the REST what-if equals the
websocket what-if for the same trades."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time

import jsonschema
import msgspec
import pytest
from openapi_spec_validator import validate as validate_openapi
from websockets.asyncio.client import connect

from calc import rest
from schemas.rest import WhatIfResult
from tests.support import until
from tests.support.http import Http
from tests.support.rows import fills
from tests.support.servers import Background, recv_type, running_system
from tests.support.tokens import desk_token, local_token
from tickerplant.client import Publisher

# every account's utilisation crosses 1%: an alert per account at the first publish
RULES = [{"name": "util-1pct", "kind": "utilisation", "threshold": 0.01, "min_hold_s": 0}]
TECH = {"account": "TECH01", "trades": [{"sym": "AAPL", "qty": 100}, {"sym": "MSFT", "side": "S", "qty": 50}]}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """(tickerplant, rdb, calc) with fills for the demo accounts applied, journaled and in the rdb."""
    bg = Background(running_system(tmp_path_factory.mktemp("rest"), alerts=RULES))
    srv, rdb, calc = bg.value

    async def feed() -> None:
        assert await until(lambda: calc.live and rdb.recovery.state == "live")
        async with Publisher(f"ws://127.0.0.1:{srv.port}") as pub:
            await pub.upd("fill", fills(24, 0))
            await pub.wait_acked()
        assert await until(lambda: "TECH01" in set(rdb.store.fetch("margin").column("account").to_pylist()))

    try:
        bg.call(feed())
        yield srv, rdb, calc
    finally:
        bg.close()


def request(calc, method: str, path: str, body=None, token: str | None = "desk:risk", **kw):
    """(status, content type, decoded JSON) of one request to calc's REST port."""

    async def go():
        async with Http("127.0.0.1", calc.rest.port, local_token(token) if token else None) as h:
            status, headers, payload = await h.request(method, path, body, **kw)
            return status, headers.get("content-type", ""), json.loads(payload) if payload else None

    return asyncio.run(go())


def check(method: str, template: str, status: int, ctype: str, body) -> None:
    """The answer matches the schema the OpenAPI document declares for it (that status, that media type)."""
    doc = rest.openapi()
    content = doc["paths"][template][method.lower()]["responses"][str(status)]["content"]
    assert ctype in content, f"{method} {template} {status}: {ctype} not declared"
    schema = dict(content[ctype]["schema"], components=doc["components"])
    jsonschema.Draft202012Validator(schema).validate(body)


def test_the_openapi_document_validates(system):
    _, _, calc = system
    status, ctype, doc = request(calc, "GET", "/openapi.json", token=None)
    assert status == 200 and ctype == "application/json"
    validate_openapi(doc)
    accounts = ["/v1/accounts", "/v1/accounts/{account}", "/v1/accounts/{account}/history"]
    assert set(doc["paths"]) == {"/v1/what-if", *accounts, "/v1/alerts"}
    assert "WhatIfRequest" in doc["components"]["schemas"] and "Problem" in doc["components"]["schemas"]


def test_every_endpoint_answers_as_its_schema_says(system):
    _, _, calc = system
    opt, tech = {"account": "OPT08", "sym": "AAPL", "qty": 10}, {**TECH["trades"][0], "account": "TECH01"}
    both = {"compare": True, "trades": [opt, tech]}
    cases = [
        ("GET", "/v1/accounts", "/v1/accounts", None, 200),
        ("GET", "/v1/accounts/TECH01", "/v1/accounts/{account}", None, 200),
        ("GET", "/v1/accounts/OPT08", "/v1/accounts/{account}", None, 200),
        ("GET", "/v1/accounts/NOPE", "/v1/accounts/{account}", None, 404),
        ("GET", "/v1/accounts/TECH01/history", "/v1/accounts/{account}/history", None, 200),
        ("GET", "/v1/accounts/TECH01/history?from=yesterday", "/v1/accounts/{account}/history", None, 422),
        ("GET", "/v1/alerts", "/v1/alerts", None, 200),
        ("POST", "/v1/what-if", "/v1/what-if", TECH, 200),
        ("POST", "/v1/what-if", "/v1/what-if", both, 200),
        ("POST", "/v1/what-if", "/v1/what-if", {"account": "TECH01", "trades": []}, 422),
        ("POST", "/v1/what-if", "/v1/what-if", b"{not json", 400),
    ]
    seen = {}
    for method, path, template, body, want in cases:
        status, ctype, answer = request(calc, method, path, body)
        assert status == want, (path, answer)
        check(method, template, status, ctype, answer)
        seen[path, json.dumps(body, default=str)] = answer
    for method, path, template in [
        ("GET", "/v1/accounts", "/v1/accounts"),
        ("POST", "/v1/what-if", "/v1/what-if"),
    ]:
        status, ctype, answer = request(calc, method, path, TECH if method == "POST" else None, token=None)
        assert status == 401 and ctype == "application/problem+json"
        check(method, template, status, ctype, answer)
    accounts = seen["/v1/accounts", "null"]["accounts"]
    assert {a["account"] for a in accounts} >= {"TECH01", "DIV02", "OPT08"}
    assert seen["/v1/accounts/OPT08", "null"]["components"]["model"] == "prisma"
    assert seen["/v1/accounts/TECH01/history", "null"]["margin"], "no history from the rdb"
    assert {a["account"] for a in seen["/v1/alerts", "null"]["alerts"]} >= {"TECH01", "DIV02"}
    results = seen["/v1/what-if", json.dumps(both)]["results"]
    assert [r["account"] for r in results] == ["OPT08", "TECH01"]
    assert {"hvar", "prisma", "span2"} <= set(results[0]["compare"])


def test_a_desk_token_reaches_only_its_own_accounts(system):
    _, _, calc = system
    tech = "desk:equity-tech"
    status, _, listed = request(calc, "GET", "/v1/accounts", token=tech)
    assert status == 200 and listed["desk"] == "equity-tech"
    assert [a["account"] for a in listed["accounts"]] == ["TECH01"]
    assert request(calc, "GET", "/v1/accounts/TECH01", token=tech)[0] == 200
    other = {"account": "DIV02", "trades": [{"sym": "KO", "qty": 100}]}
    mixed = {
        "account": "TECH01",
        "trades": [{"sym": "AAPL", "qty": 1}, {"account": "DIV02", "sym": "KO", "qty": 1}],
    }
    refused = [
        request(calc, "GET", "/v1/accounts/DIV02", token=tech),
        request(calc, "GET", "/v1/accounts/DIV02/history", token=tech),
        request(calc, "POST", "/v1/what-if", other, token=tech),
        request(calc, "POST", "/v1/what-if", mixed, token=tech),
        request(calc, "GET", "/v1/accounts/NO-SUCH", token=tech),  # (unknown or not its own: the same answer)
    ]
    for status, ctype, problem in refused:
        assert status == 403 and ctype == "application/problem+json", problem
        assert "not permitted for desk 'equity-tech'" in problem["detail"]
    status, _, alerts = request(calc, "GET", "/v1/alerts", token=tech)
    assert status == 200 and alerts["alerts"]
    assert {a["account"] for a in alerts["alerts"]} <= {"TECH01", "*"}
    # the publisher's token has no subscriber role: refused before any account is looked at
    status, _, problem = request(calc, "GET", "/v1/accounts", token="publisher")
    assert status == 403 and "subscriber" in problem["detail"]


T = {"account": "TECH01"}
BAD_BODIES = [
    (dict(T, trades=[{"sym": "AAPL", "qty": "ten"}]), 422, "$.trades[0].qty", "Expected `float`"),
    (
        dict(T, trades=[{"sym": "AAPL", "qty": 1}, {"sym": "KO", "qty": 2e13}]),
        422,
        "$.trades[1].qty",
        "<= 1000000000000",
    ),
    (dict(T, trades=[{"sym": "AAPL", "qty": 1, "price": 3}]), 422, "$.trades[0]", "unknown field"),
    (T, 422, "$", "missing required field `trades`"),
    ({"trades": [{"sym": "AAPL", "qty": 1}]}, 422, "$.trades[0].account", "no account"),
    (
        dict(T, trades=[{"sym": "AAPL", "qty": 1}, {"sym": "NOPE", "qty": 1}]),
        422,
        "$.trades[1]",
        "unknown sym 'NOPE'",
    ),
    (dict(T, trades=[{"sym": "AAPL", "side": "B", "qty": -5}]), 422, "$.trades[0]", "side"),
    ({"account": "NOPE", "trades": [{"sym": "AAPL", "qty": 1}]}, 404, "account", "unknown account"),
    (b'{"account": "TECH01", "trades": [', 400, "$", "malformed JSON"),
]


@pytest.mark.parametrize("body, status, field, says", BAD_BODIES)
def test_a_bad_body_gets_a_problem_naming_the_field(system, body, status, field, says):
    _, _, calc = system
    got, ctype, problem = request(calc, "POST", "/v1/what-if", body)
    assert (got, ctype) == (status, "application/problem+json"), problem
    assert problem["status"] == status and problem["field"] == field
    assert says in problem["detail"]
    check("POST", "/v1/what-if", status, ctype, problem)


def test_a_bad_history_window_names_the_parameter(system):
    _, _, calc = system
    status, _, problem = request(calc, "GET", "/v1/accounts/TECH01/history?from=2024-13-45")
    assert status == 422 and problem["field"] == "from"
    status, _, problem = request(calc, "GET", "/v1/accounts/TECH01/history?from=2024-01-02&to=2024-01-01")
    assert status == 422 and problem["field"] == "to"
    status, _, past = request(
        calc, "GET", "/v1/accounts/TECH01/history?from=2001-01-01T00:00:00Z&to=2001-01-02"
    )
    assert status == 200 and past["time"] == [] and past["start"] == 978307200 * 10**9


def test_the_rest_what_if_equals_the_websocket_what_if(system, run):
    srv, _, calc = system
    opt = {"account": "OPT08", "compare": True, "trades": [{"sym": "AAPL", "qty": -20}]}

    async def tick() -> None:  # an event: the clock the call forecast runs on
        async with Publisher(f"ws://127.0.0.1:{srv.port}") as pub:
            await pub.upd("trade", {"sym": ["AAPL"], "price": [129.5], "size": [100]})
            await pub.wait_acked()

    run(tick())
    deadline = time.monotonic() + 10
    while calc.engine.now <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    async def websocket() -> list[dict]:
        out = []
        async with connect(f"ws://127.0.0.1:{calc.port}/ws", **desk_token()) as ws:
            await recv_type(ws, "auth_reply")
            for i, body in enumerate((TECH, opt)):
                await ws.send(json.dumps({"type": "what_if", "id": i + 1, **body}))
                out.append((await recv_type(ws, "what_if_reply"))["result"])
        return out

    by_ws = run(websocket())
    by_rest = [request(calc, "POST", "/v1/what-if", body)[2]["results"][0] for body in (TECH, opt)]
    for ws_result, rest_result in zip(by_ws, by_rest, strict=True):  # every number the same, as the one type
        assert msgspec.to_builtins(msgspec.convert(ws_result, WhatIfResult)) == rest_result
        assert ws_result["margin_after"] == rest_result["margin_after"] != rest_result["margin_before"]
    assert by_rest[1]["compare"]["prisma"]["margin_after"] > 0
    assert {r["forecast"]["ccp"] for r in by_rest} == {"DEMO-CCP"}  # the call at the next cycle, both ways


def test_the_plain_asgi_what_if_answers_as_the_routes_do(system):
    """POST /v1/what-if skips Starlette (calc/rest.py app): the same headers, refusals and counting as a
    routed endpoint; other methods still get Starlette's 405 problem."""
    _, _, calc = system

    async def go(method, path, body=None, token="desk:risk"):
        async with Http("127.0.0.1", calc.rest.port, local_token(token) if token else None) as h:
            return await h.request(method, path, body)

    def count(endpoint, status):
        return calc.metrics.rest_requests.labels(endpoint, status)._value.get()

    before = count("what-if", "200"), count("what-if", "401")
    status, headers, body = asyncio.run(go("POST", "/v1/what-if", TECH))
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and json.loads(body)["results"]
    for path in ("/v1/what-if", "/v1/accounts"):  # no token: the same 401 problem and header from both
        method, payload = ("POST", TECH) if path == "/v1/what-if" else ("GET", None)
        status, headers, body = asyncio.run(go(method, path, payload, token=None))
        assert (status, headers["content-type"], headers["www-authenticate"]) == (
            401,
            "application/problem+json",
            "Bearer",
        )
        assert json.loads(body)["status"] == 401
    assert (count("what-if", "200"), count("what-if", "401")) == (before[0] + 1, before[1] + 1)
    status, headers, body = asyncio.run(go("GET", "/v1/what-if"))
    assert status == 405 and headers["content-type"] == "application/problem+json"


def data_segments_in(sock: socket.socket) -> int:
    """TCP segments with data this socket has received (Linux tcp_info.tcpi_data_segs_in)."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


@pytest.mark.parametrize("method, path", [("POST", "/v1/what-if"), ("GET", "/v1/accounts")])
def test_an_answer_arrives_in_one_tcp_segment(system, method, path):
    """uvicorn writes a response's head and body apart: two segments, the client woken twice (calc/rest.py
    OneWrite joins them)."""
    _, _, calc = system
    body = json.dumps(TECH).encode() if method == "POST" else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {local_token('desk:risk')}\r\n"
    )
    with socket.create_connection(("127.0.0.1", calc.rest.port), timeout=5) as s:
        for _ in range(3):
            before = data_segments_in(s)
            s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", answer).group(1)
            ):
                answer += s.recv(65536)
            time.sleep(0.05)  # (a second segment, if any, has arrived by now)
            assert answer.startswith(b"HTTP/1.1 200 ") and data_segments_in(s) - before == 1
