"""The one definition of every table: columns, types, keys and input constraints.

Arrow schemas, DuckDB DDL and the msgspec structs that validate `upd` messages are all derived here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import pyarrow as pa

# Column kinds. `stamp` columns (time, seq) are written by the tickerplant, never by publishers.
ARROW_TYPES: dict[str, pa.DataType] = {
    "symbol": pa.string(),
    "text": pa.string(),
    "float": pa.float64(),
    "long": pa.int64(),
    "timestamp": pa.timestamp("ns"),
}
DUCKDB_TYPES: dict[str, str] = {
    "symbol": "VARCHAR",
    "text": "VARCHAR",
    "float": "DOUBLE",
    "long": "BIGINT",
    "timestamp": "TIMESTAMP_NS",
}

FINITE = msgspec.Meta(ge=-1e300, le=1e300, description="a finite number (NaN and infinity refused)")
POSITIVE = msgspec.Meta(gt=0, le=1e300, description="a finite number > 0")
NON_NEGATIVE = msgspec.Meta(ge=0, le=1e300, description="a finite number >= 0")
NAME = msgspec.Meta(min_length=1, max_length=256, description="a non-empty name")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of ARROW_TYPES
    check: Any = None  # the msgspec element type publishers' values must satisfy (None: stamped, not sent)
    doc: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return ARROW_TYPES[self.kind]


@dataclass(frozen=True)
class Table:
    name: str
    key: str | None  # the column that `sub(tables, keys)` filters on
    columns: tuple[Column, ...]
    doc: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def input_columns(self) -> list[Column]:
        return [c for c in self.columns if c.check is not None]

    @property
    def sort_by(self) -> tuple[str, ...]:
        """HDB sort order: key then time (then seq, which breaks ties in arrival order)."""
        return (self.key, "time", "seq") if self.key else ("time", "seq")

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in self.columns])

    def ddl(self, name: str | None = None) -> str:
        cols = ", ".join(f'"{c.name}" {DUCKDB_TYPES[c.kind]}' for c in self.columns)
        return f'CREATE TABLE "{name or self.name}" ({cols})'


def _stamped() -> tuple[Column, ...]:
    return (
        Column("time", "timestamp", doc="UTC time the tickerplant stamped the message, nanoseconds"),
        Column("seq", "long", doc="global sequence number, one per row, across all tables"),
    )


Sym = Annotated[str, NAME]
Text = Annotated[str, msgspec.Meta(max_length=65536)]
Finite = Annotated[float, FINITE]
Positive = Annotated[float, POSITIVE]
NonNegative = Annotated[float, NON_NEGATIVE]
PositiveLong = Annotated[int, msgspec.Meta(gt=0, le=2**62)]
Long = Annotated[int, msgspec.Meta(ge=-(2**62), le=2**62)]
Side = Literal["B", "S"]

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "trade",
            key="sym",
            doc="market trades (ticks that move the price)",
            columns=(
                *_stamped(),
                Column("sym", "symbol", Sym, "instrument"),
                Column("price", "float", Positive, "trade price"),
                Column("size", "long", PositiveLong, "trade size"),
            ),
        ),
        Table(
            "quote",
            key="sym",
            doc="top-of-book quotes",
            columns=(
                *_stamped(),
                Column("sym", "symbol", Sym, "instrument"),
                Column("bid", "float", Positive, "best bid"),
                Column("ask", "float", Positive, "best ask"),
                Column("bid_size", "long", PositiveLong, "size at the bid"),
                Column("ask_size", "long", PositiveLong, "size at the ask"),
            ),
        ),
        Table(
            "fill",
            key="account",
            doc="executions from the OMS / drop copy: each changes an account's position",
            columns=(
                *_stamped(),
                Column("account", "symbol", Sym, "trading account"),
                Column("sym", "symbol", Sym, "instrument"),
                Column("side", "symbol", Side, "B (buy) or S (sell)"),
                Column("qty", "float", Positive, "quantity, always positive; side gives the sign"),
                Column("price", "float", Positive, "execution price"),
                Column("order_id", "symbol", Sym, "order identifier"),
                Column("exec_id", "symbol", Sym, "execution identifier, unique per fill"),
            ),
        ),
        Table(
            "param",
            key="kind",
            doc="risk parameter files loaded (SPAN files, price history, covariance, config)",
            columns=(
                *_stamped(),
                Column("kind", "symbol", Literal["span", "history", "covariance", "config", "positions"], "file kind"),
                Column("file_id", "symbol", Sym, "identifier of the file (name and business date)"),
                Column("content_hash", "symbol", Sym, "sha256 of the file's bytes; the file is stored by it"),
                Column("source", "text", Text, "where the file came from (path or URL)"),
            ),
        ),
        Table(
            "margin",
            key="account",
            doc="each account's margin as calc publishes it (conflated per publish interval)",
            columns=(
                *_stamped(),
                Column("account", "symbol", Sym, "trading account"),
                Column("model", "symbol", Sym, "var | hvar | stress | span"),
                Column("margin", "float", NonNegative, "margin requirement under the account's policy"),
                Column("var", "float", NonNegative, "model VaR (parametric or historical) or SPAN total"),
                Column("es", "float", NonNegative, "expected shortfall (historical simulation), else 0"),
                Column("stress", "float", NonNegative, "worst configured stress loss"),
                Column("collateral", "float", Finite, "collateral posted"),
                Column("utilisation", "float", Finite, "margin / collateral"),
                Column("change", "float", Finite, "margin minus the account's previous published margin"),
                Column("drivers", "text", Text, "top drivers as JSON: [{sym, exposure, contribution}]"),
                Column("last_seq", "long", Long, "seq of the last event included"),
                Column("param_id", "symbol", Annotated[str, msgspec.Meta(max_length=256)], "parameter file in force"),
            ),
        ),
        Table(
            "alert",
            key="account",
            doc="alerts raised and cleared by calc's rules (once per crossing)",
            columns=(
                *_stamped(),
                Column("account", "symbol", Sym, "trading account"),
                Column("rule", "symbol", Sym, "name of the rule in config"),
                Column("kind", "symbol", Sym, "level | utilisation | jump | call"),
                Column("state", "symbol", Literal["raised", "cleared"], "raised or cleared"),
                Column("value", "float", Finite, "the value that crossed"),
                Column("threshold", "float", Finite, "the rule's threshold"),
                Column("message", "text", Text, "human-readable text"),
                Column("last_seq", "long", Long, "seq of the event that crossed"),
            ),
        ),
    )
}

STAMP_COLUMNS = ("time", "seq")


def table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; tables are {sorted(TABLES)}") from None


@cache
def input_schema(table_name: str) -> pa.Schema:
    """The Arrow schema a publisher's rows must have (the table's input columns, no time/seq)."""
    return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in TABLES[table_name].input_columns])


@cache
def column_rule(column: Column) -> dict[str, Any]:
    """The column's input constraint as plain data, read from its msgspec check (the one definition):
    bounds (gt/ge/lt/le), string lengths, or the allowed values of a Literal."""
    check = column.check
    if get_origin(check) is Literal:
        return {"allowed": list(get_args(check))}
    rule: dict[str, Any] = {}
    for meta in get_args(check)[1:]:
        for k in ("gt", "ge", "lt", "le", "min_length", "max_length"):
            if getattr(meta, k, None) is not None:
                rule[k] = getattr(meta, k)
    return rule
