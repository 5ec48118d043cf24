"""calc's queries to the rdb: one SQL query over its websocket (as calc's local query credential or a
caller's token), and an account's margin history for the dashboard's chart (calc and the front)."""

from __future__ import annotations

import asyncio

import msgspec
import websockets
from websockets.asyncio.client import connect

from marginflow import auth
from marginflow.sql import sql_str
from schemas import calc as api
from schemas import rdb as rdbwire


async def query_rdb(
    rdb_url: str, sql: str, id: int = 0, token: str | None = None
) -> rdbwire.QueryResult | str:
    """One query to the rdb at `rdb_url` (JSON rows), as calc's local query credential or as `token` (the
    rdb then applies that token's desk restriction): the result, or why there is none."""
    options = auth.client_options(rdb_url, "query", token=token or None)
    try:
        async with connect(rdb_url, max_size=None, open_timeout=2, **options) as ws:
            await ws.send(msgspec.msgpack.encode(rdbwire.Query(sql=sql, format="json", id=id)))
            reply = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 10), type=rdbwire.RdbReply)
    except (OSError, TimeoutError, websockets.WebSocketException) as e:
        return f"unavailable: rdb at {rdb_url}: {e}"
    return reply if isinstance(reply, rdbwire.QueryResult) else str(getattr(reply, "reason", reply))


async def margin_history(rdb_url: str, msg: api.HistoryRequest) -> api.ApiMsg:
    """Today's margin rows of one account from the rdb (the journaled, queryable history): one point per
    second (the last row of each second), so a whole day stays a small reply; or an error naming why."""
    sql = (
        f"select epoch_ns(max(time)) as t, arg_max(margin, seq), arg_max(collateral, seq) from margin "
        f"where account = {sql_str(msg.account)} group by date_trunc('second', time) order by t"
    )
    reply = await query_rdb(rdb_url, sql, msg.id)
    if not isinstance(reply, rdbwire.QueryResult):
        sep = "" if reply.startswith("unavailable") else ":"  # ("history unavailable: rdb at ...")
        return api.ApiError(reason=f"history{sep} {reply}", id=msg.id)
    cols = list(zip(*reply.data, strict=True)) if reply.data else [[], [], []]
    return api.History(
        account=msg.account,
        time=[int(x) for x in cols[0]],
        margin=list(cols[1]),
        collateral=list(cols[2]),
        id=msg.id,
    )
