"""Messages of calc's websocket API (port 5012): desks subscribe to margin rows and alerts, ask for
snapshots, history and what-ifs. JSON text frames for browsers, msgpack binary frames for programs.

Every request needs a token first (the handshake's Authorization: Bearer header, or a first `auth`
message; never in the URL); a token sees only its desk's accounts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict

import msgspec

from schemas.tables import TABLES

_PY = {"symbol": str, "text": str, "float": float, "long": int, "timestamp": int}


def _columns(table: str) -> Any:
    """The shape of a table's rows as calc builds them, columns of lists (Arrow's layout), derived
    from the table: a TypedDict of its input columns, in order."""
    cols = {c.name: list[_PY[c.kind]] for c in TABLES[table].input_columns}
    return TypedDict(f"{table.title()}Columns", cols)


# what MarginEngine.changed_rows / snapshot and take_alerts return (no time/seq: the tickerplant stamps)
MarginColumns = _columns("margin")
AlertColumns = _columns("alert")
ForecastColumns = _columns("forecast")
CallcheckColumns = _columns("callcheck")


class ApiMsg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    pass


# ---- client -> calc -------------------------------------------------------------------------------
class Auth(ApiMsg, tag="auth"):
    token: str


class Subscribe(ApiMsg, tag="subscribe"):
    """Margin rows and alerts of these accounts (empty: every account the token may see)."""

    accounts: list[str] = []


class SnapshotRequest(ApiMsg, tag="snapshot_request"):
    accounts: list[str] = []


class Trade(msgspec.Struct, forbid_unknown_fields=True):
    """A hypothetical trade: qty signed (+ buy, - sell), or side B/S with qty > 0."""

    sym: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    qty: Annotated[float, msgspec.Meta(ge=-1e12, le=1e12, description="finite, |qty| <= 1e12")]
    side: Literal["B", "S"] | None = None


class WhatIf(ApiMsg, tag="what_if"):
    account: str
    trades: list[Trade]
    id: int = 0
    compare: bool = False  # also the margin before / after under every configured CCP model and hvar


class HistoryRequest(ApiMsg, tag="history_request"):
    """Today's published margin rows of one account (from the rdb's margin table)."""

    account: str
    id: int = 0


# ---- calc -> client -------------------------------------------------------------------------------
class AuthReply(ApiMsg, tag="auth_reply"):
    desk: str
    accounts: list[str]


class Snapshot(ApiMsg, tag="snapshot"):
    rows: list[dict[str, Any]]


class MarginUpdate(ApiMsg, tag="margin"):
    rows: list[dict[str, Any]]


class AlertUpdate(ApiMsg, tag="alert"):
    rows: list[dict[str, Any]]


class ForecastUpdate(ApiMsg, tag="forecast"):
    """`forecast` rows: each account's projected requirement and call per horizon (calc/projection.py)."""

    rows: list[dict[str, Any]]


class CallcheckUpdate(ApiMsg, tag="callcheck"):
    """`callcheck` rows: actual calls beside the forecasts that stood for them (the parallel run)."""

    rows: list[dict[str, Any]]


class WhatIfReply(ApiMsg, tag="what_if_reply"):
    result: dict[str, Any]
    id: int = 0


class History(ApiMsg, tag="history"):
    account: str
    time: list[int]  # UTC nanoseconds
    margin: list[float]
    collateral: list[float]
    id: int = 0


class ApiError(ApiMsg, tag="error"):
    reason: str
    id: int = 0


class CcpComponents(msgspec.Struct, forbid_unknown_fields=True):
    """A portfolio's margin under a CCP model (calc/ccp/margin.py evaluate) with its components, in the
    currency of the prices. margin = round_up(max(0, base + apc + liquidity + concentration - option_credit)).
    """

    model: str  # the [[calc.ccp_models]] name
    param_id: str  # name:hash of the resolved spec:last date of the history (calc/ccp/presets.py)
    var: float  # VaR of the filtered set (loss > 0, floored at 0)
    es: float  # expected shortfall of the filtered set
    filtered: float  # the spec's measure (var or es) of the filtered set
    stressed: float  # the measure of the stressed set (0 without a stressed period)
    base: float  # filtered and stressed combined: max, or x*filtered + (1-x)*stressed
    apc: float  # anti-procyclicality add-on (buffer, stress weight or 10-year floor), >= 0
    liquidity: float  # half spread x |qty| x multiplier, summed over positions
    concentration: float  # rate x (|qty| - fraction x ADV)+ x multiplier x price, summed
    option_credit: float  # long options' value credited (at most the cap), subtracted
    margin: float


Request = Auth | Subscribe | SnapshotRequest | WhatIf | HistoryRequest
Reply = (
    AuthReply
    | Snapshot
    | MarginUpdate
    | AlertUpdate
    | ForecastUpdate
    | CallcheckUpdate
    | WhatIfReply
    | History
    | ApiError
)
