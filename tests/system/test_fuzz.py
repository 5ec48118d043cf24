"""Fuzzing the tickerplant's wire and calc's API with a seeded generator: thousands of bad messages
mixed with valid ones. The servers never die, every bad message gets an error, nothing of a bad
message is journaled, and a valid message right after a bad one works."""

from __future__ import annotations

import asyncio
import json
import math
import random

import msgspec
import pyarrow as pa
import pytest
from websockets.asyncio.client import connect

from schemas import wire
from schemas.tables import TABLES
from tests.support.servers import running_calc, running_tp
from tests.support.tokens import local_token, with_token
from tickerplant import journal_reader as reader
from tickerplant.client import arrow_ipc

SEED = 20261201
N_TP = 3000
N_CALC = 1500
MARK = "ZZ"  # syms and ids of constructed-bad messages carry this prefix; no valid row ever does

pytestmark = pytest.mark.timeout(600)


def _valid_trade(i: int) -> dict:
    return {
        "type": "upd",
        "table": "trade",
        "id": i,
        "cols": {"sym": ["AAPL"], "price": [100.0 + i % 50], "size": [100 + i % 7]},
    }


def _bad_messages(rng: random.Random, i: int) -> tuple[bytes, bool]:
    """One fuzz frame and whether it was constructed invalid (True) or is a mutation that may be valid."""
    mark = f"{MARK}{i}"
    bad_values = [
        float("nan"),
        float("inf"),
        -1.0,
        0.0,
        1e301,
        -1e301,
        "1.5",
        None,
        [],
        {},
        True,
        2**63,
        1e10,
    ]
    kind = rng.randrange(14)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), True
    if kind == 1:  # a valid message cut short
        data = msgspec.msgpack.encode(_valid_trade(i))
        return data[: rng.randrange(1, len(data))], True
    if kind == 2:  # unknown message type or table
        return msgspec.msgpack.encode(
            rng.choice(
                [
                    {"type": "drop_table", "id": i},
                    {"type": "upd", "table": "users", "id": i, "cols": {}},
                    {"no_type": 1},
                ]
            )
        ), True
    if kind == 3:  # a bad value in a number column
        msg = {
            "type": "upd",
            "table": "trade",
            "id": i,
            "cols": {"sym": [mark], "price": [rng.choice(bad_values)], "size": [100]},
        }
        return msgspec.msgpack.encode(msg), True
    if kind == 4:  # columns of different lengths
        msg = {
            "type": "upd",
            "table": "quote",
            "id": i,
            "cols": {
                "sym": [mark, mark],
                "bid": [1.0],
                "ask": [1.1, 1.2],
                "bid_size": [1, 1],
                "ask_size": [1, 1],
            },
        }
        return msgspec.msgpack.encode(msg), True
    if kind == 5:  # missing or extra column
        cols = (
            {"sym": [mark], "price": [10.0]}
            if rng.random() < 0.5
            else {"sym": [mark], "price": [10.0], "size": [1], "venue": ["X"]}
        )
        return msgspec.msgpack.encode({"type": "upd", "table": "trade", "id": i, "cols": cols}), True
    if kind == 6:  # a fill with a bad side, quantity or empty id
        fill = {
            "account": [mark],
            "sym": ["AAPL"],
            "side": [rng.choice(["X", "", "b", 1])],
            "qty": [10.0],
            "price": [10.0],
            "order_id": [mark],
            "exec_id": [mark],
        }
        if rng.random() < 0.5:
            fill["side"], fill["qty"] = ["B"], [rng.choice([-5.0, 0.0, float("nan")])]
        return msgspec.msgpack.encode({"type": "upd", "table": "fill", "id": i, "cols": fill}), True
    if kind == 7:  # an over-long sym
        msg = {
            "type": "upd",
            "table": "trade",
            "id": i,
            "cols": {"sym": [mark + "x" * 300], "price": [10.0], "size": [1]},
        }
        return msgspec.msgpack.encode(msg), True
    if kind == 8:  # upd_arrow with garbage bytes
        return msgspec.msgpack.encode(
            {
                "type": "upd_arrow",
                "table": "trade",
                "id": i,
                "ipc": bytes(rng.randrange(256) for _ in range(40)),
            }
        ), True
    if kind == 9:  # upd_arrow with a wrong schema (price as a string)
        t = pa.table({"sym": [mark], "price": ["10.0"], "size": [1]})
        return msgspec.msgpack.encode(
            {"type": "upd_arrow", "table": "trade", "id": i, "ipc": arrow_ipc(t)}
        ), True
    if kind == 10:  # upd_arrow with a NaN price
        t = pa.table({"sym": [mark], "price": [float("nan")], "size": pa.array([1], pa.int64())})
        return msgspec.msgpack.encode(
            {"type": "upd_arrow", "table": "trade", "id": i, "ipc": arrow_ipc(t)}
        ), True
    if kind == 11:  # zero rows
        msg = {"type": "upd", "table": "trade", "id": i, "cols": {"sym": [], "price": [], "size": []}}
        return msgspec.msgpack.encode(msg), True
    if kind == 12:  # cols of the wrong shape
        msg = {
            "type": "upd",
            "table": "trade",
            "id": i,
            "cols": rng.choice([[1, 2], "x", {"sym": "AAPL"}, 5]),
        }
        return msgspec.msgpack.encode(msg), True
    data = bytearray(msgspec.msgpack.encode(_valid_trade(i)))  # a valid message with a byte flipped
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data), False


def test_tickerplant_wire_fuzz(tmp_path, run):
    rng = random.Random(SEED)

    async def body():
        async with running_tp(tmp_path, publish_interval_ms=0) as (srv, url):
            acked_valid = errors = 0
            async with connect(url, max_size=None, **with_token("publisher")) as ws:
                for i in range(1, N_TP + 1):
                    frame, constructed_bad = _bad_messages(rng, 10 * i)
                    await ws.send(frame)
                    probe = 10 * i + 1
                    await ws.send(msgspec.msgpack.encode(_valid_trade(probe)))
                    replies = []
                    while True:  # every reply up to the probe's ack belongs to the fuzz frame
                        msg = msgspec.msgpack.decode(await ws.recv())
                        got = msg if isinstance(msg, list) else [msg]
                        replies += got
                        if any(m.get("type") == "ack" and m.get("upto") == probe for m in got):
                            break
                    before = [m for m in replies if not (m.get("type") == "ack" and m.get("upto") == probe)]
                    kinds = {m.get("type") for m in before}
                    if constructed_bad:
                        assert "error" in kinds, (i, frame[:80], replies)
                        assert all(m.get("reason") for m in before if m.get("type") == "error")
                    else:  # a mutation: refused, or acked as valid
                        assert kinds & {"error", "ack"} or any(m.get("upto") == 10 * i for m in replies), (
                            replies
                        )
                    errors += sum(1 for m in before if m.get("type") == "error")
                    acked_valid += 1
                await ws.send(wire.encode(wire.StatusRequest()))
                status = msgspec.msgpack.decode(await ws.recv())
            assert status["type"] == "status"
            assert sum(status["bad_messages"].values()) == errors  # every error counted
            date = srv.core.date
        journaled = reader.read_table(tmp_path, date, "trade")
        assert journaled.num_rows >= acked_valid  # every probe journaled
        for table in TABLES:  # nothing of a constructed-bad message reached the journal
            t = reader.read_table(tmp_path, date, table)
            for c in TABLES[table].columns:
                if c.kind == "symbol" and t.num_rows:
                    assert not any(str(v).startswith(MARK) for v in t.column(c.name).to_pylist()), (
                        table,
                        c.name,
                    )
                if c.kind == "float" and t.num_rows:
                    assert all(math.isfinite(v) for v in t.column(c.name).to_pylist())
        ids = journaled.column("size").to_pylist()
        assert len(ids) == journaled.num_rows and all(v > 0 for v in ids)

    run(body(), timeout=600)


def _calc_bad(rng: random.Random, i: int) -> bytes | str:
    kind = rng.randrange(10)
    if kind == 0:
        return "".join(rng.choice('{}[]":,abc0123 ') for _ in range(rng.randrange(1, 40)))
    if kind == 1:
        return json.dumps({"type": rng.choice(["drop", "upd", "", 5]), "id": i})
    if kind == 2:
        return json.dumps(
            {
                "type": "what_if",
                "account": "TECH01",
                "id": i,
                "trades": [{"sym": "AAPL", "qty": rng.choice(["x", None, [], {}])}],
            }
        )
    if kind == 3:
        return json.dumps(
            {
                "type": "what_if",
                "account": rng.choice(["NOPE", "", "x" * 500]),
                "id": i,
                "trades": [{"sym": "AAPL", "qty": 10}],
            }
        )
    if kind == 4:
        return json.dumps(
            {
                "type": "what_if",
                "account": "TECH01",
                "id": i,
                "trades": [{"sym": rng.choice(["NOPE", "", "\u202eLPAA"]), "qty": 10}],
            }
        )
    if kind == 5:
        return json.dumps(
            {
                "type": "what_if",
                "account": "TECH01",
                "id": i,
                "trades": [{"sym": "AAPL", "qty": rng.choice([1e308, -1e308, 1e13, 1e300])}],
            }
        )
    if kind == 6:
        return json.dumps(
            {
                "type": "what_if",
                "account": "TECH01",
                "id": i,
                "trades": [{"sym": "AAPL", "qty": 1, "side": rng.choice(["X", "", "b"])}],
            }
        )
    if kind == 7:
        return msgspec.msgpack.encode({"type": "subscribe", "accounts": rng.choice([5, "TECH01", [1, 2]])})
    if kind == 8:
        return json.dumps({"type": "history_request", "account": ["x"], "id": i})
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))


def test_calc_api_fuzz(tmp_path, run):
    rng = random.Random(SEED + 1)

    async def body():
        async with (
            running_tp(tmp_path, publish_interval_ms=0) as (_, url),
            running_calc(int(url.rsplit(":", 1)[1]), tmp_path) as calc,
        ):
            calc_url = f"ws://127.0.0.1:{calc.port}/ws"
            before = calc.engine.snapshot()
            async with connect(calc_url, max_size=None) as ws:
                await ws.send(json.dumps({"type": "auth", "token": local_token("desk:risk")}))
                assert json.loads(await ws.recv())["type"] == "auth_reply"
                for i in range(1, N_CALC + 1):
                    await ws.send(_calc_bad(rng, 10 * i))
                    probe = 10 * i + 1
                    await ws.send(
                        json.dumps(
                            {
                                "type": "what_if",
                                "account": "TECH01",
                                "id": probe,
                                "trades": [{"sym": "AAPL", "qty": 10}],
                            }
                        )
                    )
                    replies = []
                    while True:
                        raw = await ws.recv()
                        msg = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else json.loads(raw)
                        replies.append(msg)
                        if msg.get("type") == "what_if_reply" and msg.get("id") == probe:
                            break
                    before_probe = [m for m in replies[:-1] if m.get("type") != "margin"]
                    assert any(m.get("type") == "error" and m.get("reason") for m in before_probe), (
                        i,
                        replies,
                    )
                    assert replies[-1]["result"]["account"] == "TECH01"
            after = calc.engine.snapshot()
            assert after["margin"] == before["margin"]  # what-ifs and bad requests never change state
            for _ in range(100):  # the connection is cleaned up once the close is seen
                if not calc.api.clients:
                    break
                await asyncio.sleep(0.02)
            assert calc.api.clients == {}

    run(body(), timeout=600)
