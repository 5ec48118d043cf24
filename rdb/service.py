"""The rdb's query service as plain code: `Service.handle(request) -> reply`, bytes (msgpack) or text (JSON),
over a Store. No sockets here; rdb/server.py is the websocket shell around it.

A Query in lang "q" is translated by rdb.qsql against the live catalog; text that is not qSQL but starts
like SQL (select * from t, with ..., describe ...) runs as SQL, as the kdb+ console does after `s)`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import msgspec

from rdb import desk, qsql, query, sandbox
from rdb.recovery import LiveLag, Recovery
from rdb.store import DAYS, LATEST, Store
from schemas.rdb import Query, QueryResult, RdbRequest
from schemas.wire import Error, Status, StatusRequest

SQL_WORDS = {
    "select",
    "with",
    "describe",
    "show",
    "explain",
    "summarize",
    "from",
    "values",
    "pivot",
    "unpivot",
    "table",
}

log = logging.getLogger("marginflow.rdb")
MAX_REQUEST_BYTES = 1 << 20  # a request frame larger than this gets an Error (Query.sql: <= 1,000,000 chars)
_mp_decoder = msgspec.msgpack.Decoder(RdbRequest)
_js_decoder = msgspec.json.Decoder(RdbRequest)
_mp_encoder = msgspec.msgpack.Encoder()
_js_encoder = msgspec.json.Encoder()


class Service:
    """Answers Query and StatusRequest messages against `store`, each query in the sandbox with the time limit
    `timeout_s`, at most `max_rows` rows and `max_bytes` bytes (0: no byte cap). While `recovery` says the rdb
    is replaying the journal a query waits up to `recovery_wait_s` (at most timeout_s) for it, then answers
    an Error saying so: never rows of a partial day. Thread-safe: the server runs each request in a worker
    thread.

    Desk restriction: `handle(frame, accounts)` with `accounts` the caller's accounts (a frozenset; None or
    one containing "*" = every account) answers only those accounts' rows of fill, margin and alert
    (rdb.desk)."""

    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float = 10.0,
        max_rows: int = 100_000,
        max_bytes: int = 0,
        recovery: Recovery | None = None,
        recovery_wait_s: float = 5.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        lag: LiveLag | None = None,
    ) -> None:
        self.store = store
        self.max_request_bytes = max_request_bytes
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.recovery = recovery if recovery is not None else Recovery()
        self.recovery_wait_s = recovery_wait_s
        self.lag = lag if lag is not None else LiveLag()
        self.started = time.monotonic()
        self.queries = 0
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._catalog: tuple[str, dict[str, dict[str, str]]] | None = None

    # ---- entry point ---------------------------------------------------------------------------------------
    def handle(self, request: bytes | str, accounts: frozenset[str] | None = None) -> bytes | str:
        """One request frame -> one reply frame: bytes are msgpack both ways, text is JSON both ways. Bad
        input never raises; it gets an Error reply naming the problem. `accounts`: the authenticated caller's
        accounts (None or containing "*": all), applied to every query of the frame."""
        text = isinstance(request, str)
        msg_id = 0
        try:
            try:
                if len(request) > self.max_request_bytes:
                    raise msgspec.ValidationError(
                        f"{len(request)} bytes, over the limit of {self.max_request_bytes} bytes per request"
                    )
                msg = _js_decoder.decode(request) if text else _mp_decoder.decode(request)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
                reply: Any = Error(reason=f"bad request: {e}")
                self._count("bad request")
            else:
                msg_id = getattr(msg, "id", 0)
                reply = self.status(accounts) if isinstance(msg, StatusRequest) else self.query(msg, accounts)
            out = _js_encoder.encode(reply).decode() if text else _mp_encoder.encode(reply)
        except (
            Exception
        ) as e:  # a bug or an exhausted resource: one Error, logged once, never a dead connection
            log.exception("rdb request failed")
            self._count("internal")
            reply = Error(reason=f"internal: {type(e).__name__}: {' '.join(str(e).split())[:300]}", id=msg_id)
            out = _js_encoder.encode(reply).decode() if text else _mp_encoder.encode(reply)
        return out

    # ---- queries -------------------------------------------------------------------------------------------
    def query(self, msg: Query, accounts: frozenset[str] | None = None) -> QueryResult | Error:
        """Answer one Query for a caller allowed `accounts` (None or containing "*": every account)."""
        if accounts is not None and not isinstance(accounts, frozenset):
            accounts = frozenset(accounts)
        if not self.recovery.wait(min(self.recovery_wait_s, self.timeout_s)):
            self._count("recovering")
            return Error(reason=self.recovery.describe(), id=msg.id)
        max_rows = min(msg.max_rows, self.max_rows) if msg.max_rows else self.max_rows
        sql, keys, shape = msg.sql, 0, "table"
        try:
            if msg.lang == "q":
                tr = self.translate(msg.sql)
                if tr is not None:
                    sql, keys, shape = tr.sql, tr.keys, tr.shape
            ans = query.run(
                self.store,
                sql,
                fmt=msg.format,
                timeout_s=self.timeout_s,
                max_rows=max_rows,
                max_bytes=self.max_bytes,
                accounts=accounts,
            )
        except (sandbox.QueryError, qsql.QError) as e:
            self._count(e.kind if isinstance(e, sandbox.QueryError) else "q")
            return Error(reason=str(e), id=msg.id)
        with self._lock:
            self.queries += 1
        return QueryResult(
            id=msg.id,
            columns=ans.columns,
            types=ans.types,
            rows=ans.rows,
            elapsed_ms=round(ans.elapsed_ms, 3),
            truncated=ans.truncated,
            arrow=ans.arrow,
            data=ans.data,
            keys=keys,
            shape=shape,
            sql=sql,
            note=ans.note,
        )

    def translate(self, text: str) -> qsql.Translation | None:
        """The qSQL translation of `text`, or None when it is not qSQL but reads as SQL (run it as SQL).
        Raises QError when it is neither."""
        try:
            return qsql.translate(text, self.catalog())
        except qsql.QError as e:
            words = text.split(None, 1)
            first = words[0].lower().rstrip(";") if words else ""
            if first in SQL_WORDS and str(e).startswith(("parse:", "nyi:")):
                return None
            raise

    def catalog(self) -> dict[str, dict[str, str]]:
        """table (and days.table, latest.table) -> {column: DuckDB type}, read from the database
        (cached per day)."""
        cached = self._catalog
        if cached is not None and cached[0] == self.store.date:
            return cached[1]
        cur = self.store.cursor()
        try:
            rows = cur.execute(
                "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema IN ('main', ?, ?) ORDER BY table_schema, table_name, ordinal_position",
                [DAYS, LATEST],
            ).fetchall()
        finally:
            cur.close()
        cat: dict[str, dict[str, str]] = {}
        for schema, table, column, typ in rows:
            cat.setdefault(table if schema == "main" else f"{schema}.{table}", {})[column] = typ
        self._catalog = (self.store.date, cat)
        return cat

    # ---- status --------------------------------------------------------------------------------------------
    def status(self, accounts: frozenset[str] | None = None) -> Status:
        """The rdb's status; a desk-restricted caller gets no row counts of the account-keyed tables."""
        s = self.store
        rows = s.rows()
        if desk.is_restricted(accounts):
            rows = {t: n for t, n in rows.items() if t not in desk.RESTRICTED}
        return Status(
            process="rdb",
            date=s.date,
            last_seq=max(s.max_seq.values(), default=-1),
            rows=rows,
            messages=self.queries,
            bad_messages=dict(self.errors),
            subscribers=[],
            journal={},
            journal_bytes={},
            uptime_s=round(time.monotonic() - self.started, 3),
            extra={"hdb_dir": str(s.hdb_dir), "max_seq": {t: n for t, n in s.max_seq.items() if t in rows},
                   "timeout_s": self.timeout_s, "max_rows": self.max_rows, "max_bytes": self.max_bytes,
                   "state": self.recovery.state, "recovery": self.recovery.snapshot(),
                   "skipped_partitions": s.skipped_partitions(), "live": self.lag.snapshot()},
        )  # fmt: skip

    def _count(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1
