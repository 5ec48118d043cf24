"""Requests and responses of calc's REST API (calc/rest.py, `[calc] rest_port`), declared once: the
server decodes and encodes with these, and the OpenAPI document (`GET /openapi.json`) is generated from
them (`msgspec.json.schema_components`). Errors are RFC 9457 problem documents (`Problem`).

A what-if trade is the websocket's `schemas.calc.Trade` with an optional `account`; margin and alert rows
are the `margin` and `alert` tables' columns (schemas/tables.py), their JSON text columns (drivers,
components) decoded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.calc import CcpComponents, Trade
from schemas.tables import TABLES

_PY = {"symbol": str, "text": str, "float": float, "long": int}
_DECODED: dict[str, Any] = {}  # text columns given as JSON structures (filled below)


class Driver(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One of the positions that drive an account's margin (the rest summed as sym "*other*")."""

    sym: str
    exposure: float  # qty x multiplier x price (an option: its delta equivalent)
    contribution: float  # its part of the margin number; the list adds up to it
    delta: float | None = None  # options only: qty x multiplier x per-unit Greeks
    gamma: float | None = None
    vega: float | None = None


_DECODED.update(drivers=list[Driver], components=CcpComponents | None)


def _row(table: str, name: str, doc: str, text_as: dict[str, Any]) -> type[msgspec.Struct]:
    """A row of `table` as the API returns it: `time` (UTC ns), then the table's input columns with their
    documentation; the columns named in `text_as` are JSON in the table and structures here."""
    fields: list[tuple[str, Any]] = [("time", Annotated[int, msgspec.Meta(description="UTC nanoseconds")])]
    for c in TABLES[table].input_columns:
        kind = text_as.get(c.name, _PY[c.kind])
        fields.append((c.name, Annotated[kind, msgspec.Meta(description=c.doc)]))
    cls = msgspec.defstruct(name, fields, kw_only=True, module=__name__)
    cls.__doc__ = doc
    return cls


MarginRow = _row("margin", "MarginRow", "An account's latest margin row and its drivers.", _DECODED)
AlertRow = _row("alert", "AlertRow", "An alert raised or cleared by one of calc's rules.", {})


class RestTrade(Trade, kw_only=True):
    """A hypothetical trade: qty signed (+ buy, - sell), or side B/S with qty > 0; for `account` (default:
    the request's)."""

    account: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


class WhatIfRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One or more hypothetical trades; each account's margin before and after all of its trades."""

    trades: Annotated[list[RestTrade], msgspec.Meta(min_length=1, max_length=10_000)]
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    compare: bool = (
        False  # also before / after under hvar and every configured CCP model ([[calc.ccp_models]])
    )


class ModelComparison(msgspec.Struct, kw_only=True):
    """The same portfolio under one model of the comparison, or why it could not be evaluated."""

    margin_before: float | None = None
    margin_after: float | None = None
    change: float | None = None
    components_after: CcpComponents | None = None
    error: str | None = None


class CallNumbers(msgspec.Struct, kw_only=True):
    """A projected requirement (P50, P95) and the calls they imply at a CCP cycle."""

    p50: float
    p95: float
    call_p50: float
    call_p95: float


class CallForecast(msgspec.Struct, kw_only=True):
    """The call at the account's CCP's next cycle before and after the trades (calc/projection.py)."""

    ccp: str
    cycle: str
    business_date: str
    cycle_time: int  # UTC nanoseconds
    method: str  # "replica" or "model:<id>"
    before: CallNumbers
    after: CallNumbers


class WhatIfResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One account's margin before and after the hypothetical trades (MarginEngine.what_if)."""

    account: str
    model: str
    margin_before: float
    margin_after: float
    change: float
    var_before: float
    var_after: float
    es_before: float
    es_after: float
    stress_before: float
    stress_after: float
    drivers_before: list[Driver]
    drivers_after: list[Driver]
    collateral: float
    utilisation_after: float
    compare: dict[str, ModelComparison] | None = None  # only with compare = true and CCP models configured
    forecast: CallForecast | None = None  # with [[calc.ccps]], once the event clock runs


class WhatIfResponse(msgspec.Struct, kw_only=True):
    results: list[WhatIfResult]  # one per account, in the order the trades first name them


class AccountSummary(msgspec.Struct, kw_only=True):
    account: str
    model: str
    margin: float
    collateral: float
    utilisation: float
    last_seq: int


class AccountList(msgspec.Struct, kw_only=True):
    desk: str  # the token's desk ("" for a credential without one)
    accounts: list[AccountSummary]  # every account the token may see


class AccountHistory(msgspec.Struct, kw_only=True):
    """An account's published margin between `start` and `end` (the rdb's margin rows, today's and the
    HDB's), one point per second (the last row of each second)."""

    account: str
    start: int  # UTC ns, inclusive
    end: int  # UTC ns, exclusive
    time: list[int]  # UTC ns
    margin: list[float]
    collateral: list[float]


class AlertList(msgspec.Struct, kw_only=True):
    alerts: list[AlertRow]  # today's, oldest first, of the accounts the token may see (and instrument alerts)


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = (
        None  # the offending field: a JSON path into the body ($.trades[0].qty) or a parameter
    )


class Health(msgspec.Struct, kw_only=True):
    """/healthz (the process is alive) and /readyz (it is ready to serve), Kubernetes' meaning."""

    status: Literal["ok", "not ready"]
    reason: str = ""


RESPONSES: tuple[type, ...] = (WhatIfResponse, AccountList, MarginRow, AccountHistory, AlertList, Problem)
REQUESTS: tuple[type, ...] = (WhatIfRequest,)
