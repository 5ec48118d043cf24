"""Wire messages of the rdb's query service: Query -> QueryResult (or wire.Error), and
StatusRequest -> Status.

Same envelope as schemas.wire (msgspec structs tagged by `type`): msgpack in binary frames, JSON in
text frames (browsers); the reply comes back in the kind of frame the request came in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.wire import Error, Msg, Status, StatusRequest

Format = Literal["arrow", "json"]
Lang = Literal["sql", "q"]
Shape = Literal["table", "list", "atom", "dict"]


class Query(Msg, tag="query"):
    """Run `sql` read-only: DuckDB SQL (lang "sql") or the console's qSQL subset (lang "q"; text that is not
    qSQL but starts like SQL runs as SQL). Rows come back as one Arrow IPC stream (format "arrow") or as JSON
    rows (format "json"). `max_rows` 0 means the server's limit (rdb.max_result_rows); a smaller number
    cuts further. `id` is echoed in the reply."""

    sql: Annotated[str, msgspec.Meta(max_length=1_000_000)]
    format: Format = "arrow"
    lang: Lang = "sql"
    max_rows: Annotated[int, msgspec.Meta(ge=0)] = 0
    id: int = 0


class QueryResult(Msg, tag="query_result"):
    """A query's answer. `types` are DuckDB type names. `truncated`: more rows existed than were sent.
    `keys` > 0: the first `keys` columns are a key (a q keyed table, e.g. the result of `by`); `shape` is how
    q would show it (table, list, atom, dict). `sql` is what ran (the translation, for lang "q"); `note` says
    why the rows were cut when `truncated`."""

    id: int
    columns: list[str]
    types: list[str]
    rows: int
    elapsed_ms: float
    truncated: bool
    arrow: bytes = b""
    data: list[list[Any]] = []
    keys: int = 0
    shape: Shape = "table"
    sql: str = ""
    note: str = (
        ""  # why `truncated`: "cut at N rows (the row limit)" or "cut by bytes: ..." (rdb.max_result_bytes)
    )


RdbRequest = Query | StatusRequest
RdbReply = QueryResult | Error | Status

__all__ = [
    "Error",
    "Format",
    "Lang",
    "Query",
    "QueryResult",
    "RdbReply",
    "RdbRequest",
    "Shape",
    "Status",
    "StatusRequest",
]
