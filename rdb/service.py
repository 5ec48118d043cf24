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

from marginflow import process
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
MEMO_MAX = 1024  # translations / known counts remembered; all forgotten when full (a dashboard asks a few)
READY = ("live", "standalone")  # recovery states in which a query is answered at once
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
        # text -> its translation (None: runs as SQL), for the catalog it was made against; not a text that
        # reads the clock (.z.p), nor one that failed
        self._translations: tuple[object, dict[str, qsql.Translation | None]] = (None, {})
        # `count t` answers: (sql, format, max_rows, accounts if restricted) -> ((date, t's max_seq), result)
        self._counts: dict[tuple, tuple[tuple[str, int], QueryResult]] = {}

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
        known = self.quick(msg, accounts)
        if known is not None:
            return known
        max_rows = min(msg.max_rows, self.max_rows) if msg.max_rows else self.max_rows
        sql, keys, shape, tr = msg.sql, 0, "table", None
        try:
            if msg.lang == "q":
                tr = self.translate(msg.sql)
                if tr is not None:
                    sql, keys, shape = tr.sql, tr.keys, tr.shape
            memo = self._count_key(tr, msg.format, max_rows, accounts)
            before = self._rows_state(tr) if memo is not None else None
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
        res = QueryResult(
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
        if memo is not None and before is not None and self._rows_state(tr) == before:
            if len(self._counts) >= MEMO_MAX:
                self._counts.clear()
            self._counts[memo] = (before, res)
        return res

    def quick(self, msg: Query, accounts: frozenset[str] | None = None) -> QueryResult | None:
        """The answer to `msg` when the service already knows it, without DuckDB, a lock held for long or a
        wait (so an event loop may call it); None: ask query(). Known: `count t` of one of today's tables
        whose rows have not changed since query() counted them with the same format, row limit and desk
        restriction (a kept row always raises the table's max_seq, and a new day changes the date, so
        (date, max_seq) names the rows exactly). Not while the rdb recovers."""
        if msg.lang != "q" or self.recovery.state not in READY:
            return None
        t0 = time.perf_counter()
        made_for, translations = self._translations
        cat = self._catalog
        if cat is None or cat[0] != self.store.date or made_for is not cat[1]:
            return None
        tr = translations.get(msg.sql)
        if tr is None or not tr.count_of:
            return None
        if accounts is not None and not isinstance(accounts, frozenset):
            accounts = frozenset(accounts)
        max_rows = min(msg.max_rows, self.max_rows) if msg.max_rows else self.max_rows
        memo = self._count_key(tr, msg.format, max_rows, accounts)
        hit = self._counts.get(memo) if memo is not None else None
        if hit is None or hit[0] != self._rows_state(tr):
            return None
        with self._lock:
            self.queries += 1
        elapsed = round((time.perf_counter() - t0) * 1e3, 3)
        return msgspec.structs.replace(hit[1], id=msg.id, elapsed_ms=elapsed)

    def _count_key(
        self, tr: qsql.Translation | None, fmt: str, max_rows: int, accounts: frozenset[str] | None
    ) -> tuple | None:
        if tr is None or not tr.count_of or tr.count_of not in self.store.max_seq:
            return None
        return (tr.sql, fmt, max_rows, accounts if desk.is_restricted(accounts) else None)

    def _rows_state(self, tr: qsql.Translation | None) -> tuple[str, int]:
        """What names the rows of `tr`'s counted table: (the day, its max_seq)."""
        assert tr is not None
        return (self.store.date, self.store.max_seq[tr.count_of])

    def translate(self, text: str) -> qsql.Translation | None:
        """The qSQL translation of `text`, or None when it is not qSQL but reads as SQL (run it as SQL).
        Raises QError when it is neither. Remembered per text for the day's catalog (not a text that reads
        the clock)."""
        cat = self.catalog()
        made_for, translations = self._translations
        if made_for is not cat:
            translations = {}
            self._translations = (cat, translations)
        if text in translations:
            return translations[text]
        try:
            tr: qsql.Translation | None = qsql.translate(text, cat)
        except qsql.QError as e:
            words = text.split(None, 1)
            first = words[0].lower().rstrip(";") if words else ""
            if not (first in SQL_WORDS and str(e).startswith(("parse:", "nyi:"))):
                raise
            tr = None
        if tr is None or not tr.clock:
            if len(translations) >= MEMO_MAX:
                translations.clear()
            translations[text] = tr
        return tr

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
                   "skipped_partitions": s.skipped_partitions(), "live": self.lag.snapshot(),
                   "cpu": process.cpu_priority(),
                   "repeats_dropped": {t: n for t, n in s.repeats.items() if n and t in rows}},
        )  # fmt: skip

    def _count(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1
