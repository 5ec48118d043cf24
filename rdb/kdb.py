"""The rdb's kdb+ IPC port: `h"select from trade"` from q, `conn('select ...')` from PyKX.

A sync char-vector message is a query: qSQL through the console's translator (rdb.service.Service,
the same path as a websocket Query in lang "q": sandbox, row/byte limits, timeout, recovery wait and
desk restriction all apply), or plain SQL after `s)`. The answer is a q table (keyed when the query
has a `by`), an atom, a list or a dict as the translation's shape says; an Error comes back as a q
error with its text; a result the row or byte limit cut is a q error (`limit`), never a partial table
passed off as whole. An async message is evaluated the same way, with no reply. Anything but a
string is refused (`nyi`). Column types: schemas/qtypes.py.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from marginflow import kdbserver, qipc
from rdb.query import from_ipc
from schemas.rdb import Query, QueryResult

if TYPE_CHECKING:
    from rdb.server import Rdb


def query_of(obj: Any) -> Query | qipc.QError:
    """The Query a q message asks for: its text, `s)` for SQL (a leading `q)` is dropped)."""
    text = qipc.text_of(obj)
    if text is None or not isinstance(obj, qipc.Vector):
        what = (
            type(obj).__name__ if not isinstance(obj, qipc.Atom | qipc.Vector) else qipc.NAMES.get(abs(obj.t))
        )
        return qipc.QError(f"nyi: the rdb answers a query as a string (char vector), not a {what}")
    text = text.strip()
    if text.startswith("s)"):
        return Query(sql=text[2:].strip(), lang="sql", format="arrow")
    if text.startswith("q)"):
        text = text[2:].strip()
    return Query(sql=text, lang="q", format="arrow")


def reply_of(res: QueryResult) -> Any:
    """The q reply of a QueryResult: its rows as q, or a q error when the row or byte limit cut it (q has
    no way to say "these are the first N rows": a partial answer is never sent as if it were whole)."""
    if res.truncated:
        return qipc.QError(
            f"limit: {res.note or 'the result was cut'}; narrow the query (select[n] ...) or raise "
            "rdb.max_result_rows / rdb.max_result_bytes"
        )
    try:
        return result_to_q(res)
    except qipc.QIPCError as e:
        return qipc.QError(f"type: {e}")


def result_to_q(res: QueryResult) -> Any:
    """A QueryResult as the q object q would return: table (keyed if `keys`), atom, list or dict."""
    table = from_ipc(res.arrow)
    if res.shape == "atom" and table.num_rows == 1 and table.num_columns == 1:
        col = qipc.arrow_column_to_q(table.column_names[0], table.column(0))
        if isinstance(col, qipc.QList):
            return col.items[0]
        if col.t == 11:
            return qipc.sym(col.data[0].as_py() or "")
        return qipc.Atom(-col.t, col.data[0].item())
    if res.shape == "list" and table.num_columns == 1:
        return qipc.arrow_column_to_q(table.column_names[0], table.column(0))
    if res.shape == "dict" and res.keys == 1 and table.num_columns == 2:  # exec c by k: k!c
        k, v = (qipc.arrow_column_to_q(n, c) for n, c in zip(table.column_names, table.columns, strict=True))
        return qipc.Dict(k, v)
    if res.shape == "dict":
        cols = [qipc.arrow_column_to_q(n, c) for n, c in zip(table.column_names, table.columns, strict=True)]
        return qipc.Dict(qipc.symbols(table.column_names), qipc.QList(cols))
    return qipc.from_arrow(table, res.keys)


SMALL_RESULT_BYTES = 4096  # a result of at most this many Arrow IPC bytes has its q reply remembered
REPLIES_MAX = 256  # q replies remembered; all forgotten when full


class RdbKdb:
    """The kdb+ port of an Rdb: the same Gate (role query), Service and worker threads as its
    websocket port. The q reply of a small result is remembered by the result's bytes (a client asking
    `count trade` again and again gets the same few bytes back, converted once)."""

    def __init__(self, rdb: Rdb, port: int, max_bytes: int):
        self.rdb = rdb
        self._replies: dict[tuple, Any] = {}
        self.port = kdbserver.KdbPort(
            "rdb", rdb.cfg.host, port, rdb.gate, self.on_message, max_bytes=max_bytes
        )

    async def on_message(self, conn: kdbserver.KdbConn, msgtype: int, obj: Any) -> Any:
        q = query_of(obj)
        if isinstance(q, qipc.QError):
            return q
        p = conn.principal
        accounts = None if p is None or p.accounts is None else frozenset(p.accounts)
        res = self.rdb.service.quick(q, accounts)  # known without DuckDB: answered here, no thread hop
        if res is None:
            loop = asyncio.get_running_loop()
            res = await loop.run_in_executor(
                self.rdb._pool, functools.partial(self.rdb.service.query, q, accounts)
            )
        if not isinstance(res, QueryResult):
            return qipc.QError(qipc.error_text(res.reason))
        if len(res.arrow) > SMALL_RESULT_BYTES:
            return reply_of(res)
        key = (res.arrow, res.shape, res.keys, res.truncated, res.note)  # all reply_of reads
        reply = self._replies.get(key)
        if reply is None:
            if len(self._replies) >= REPLIES_MAX:
                self._replies.clear()
            reply = self._replies[key] = reply_of(res)
        return reply
