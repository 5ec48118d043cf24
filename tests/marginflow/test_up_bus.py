"""`marginflow up --bus nats --shards 2`: a local nats-server, the tickerplant with its bridge, the rdb,
two calc shards and the front come up; a fill's margin row reaches a websocket client of the front (and
of the account's shard); Ctrl-C (SIGINT) stops them all. `--standby`'s plan: a second calc per shard."""

from __future__ import annotations

import asyncio
import json
import re
import signal

import pytest
from websockets.asyncio.client import connect

from calc.shard import shard_of
from marginflow import config
from marginflow.up import plan
from tests.support.tokens import desk_token
from tests.support.up import UpProcess
from tickerplant.client import Publisher


def test_the_plan_of_two_shards_with_standbys(tmp_path):
    cfg = config.load(overrides={"bus": {"kind": "nats"}})
    children = plan(cfg, False, tmp_path, [[6001, 6003], [6002, 6004]])
    names = ["nats", "tp", "rdb", "calc0", "standby0", "calc1", "standby1", "front"]
    assert [c.name for c in children] == names
    assert children[4].args == ["calc", "--shard", "0/2", "--port", "6003", "--rest-port", "0"]
    assert children[-1].args[:3] == ["front", "--shards", "2"]


FILL = dict(account="TECH01", sym="AAPL", side="B", qty=100.0, price=150.0, order_id="O1", exec_id="E1")


@pytest.mark.slow
def test_up_with_the_bus_and_two_shards_serves_a_fill_s_margin_row(tmp_path):
    up = UpProcess(tmp_path / "var", "--bus", "nats", "--shards", "2")
    try:
        shards = dict(re.findall(r"shard (\d)/2\s+(ws://\S+)", "".join(up.output)))
        names = {"nats", "tp", "rdb", "calc0", "calc1", "front"}
        assert set(shards) == {"0", "1"} and names <= set(up.pids)
        k = shard_of("TECH01", 2)

        async def fill_reaches_client(url: str, n: int) -> dict:
            async with connect(url, open_timeout=5, **desk_token("risk")) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "auth_reply"
                await ws.send(json.dumps({"type": "subscribe", "accounts": ["TECH01"]}))
                async with Publisher(up.tickerplant) as pub:
                    await pub.upd("fill", [{**FILL, "exec_id": f"E{n}"}])
                    seq = await pub.wait_acked(timeout=10)
                async with asyncio.timeout(30):
                    while True:
                        msg = json.loads(await ws.recv())
                        rows = [r for r in msg.get("rows", []) if msg["type"] == "margin"]
                        if any(r["account"] == "TECH01" and r["last_seq"] >= seq for r in rows):
                            return msg

        for n, url in enumerate([up.calc_ws, f"{shards[str(k)]}/ws"]):  # the front, then the shard
            msg = asyncio.run(fill_reaches_client(url, n))
            assert {r["account"] for r in msg["rows"]} == {"TECH01"}
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        up.stop()
    out = "".join(up.output)
    for name in ("nats", "tp", "rdb", "calc0", "calc1", "front"):
        assert re.search(rf"\s{name}\s+stopped", out), out
