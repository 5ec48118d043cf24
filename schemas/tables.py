"""The one definition of every table: columns, types, keys and input constraints.

Arrow schemas, DuckDB DDL and the msgspec structs that validate `upd` messages are all derived here.
"""

from __future__ import annotations

import re
import sys
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

# Bounds on publishers' numbers. Market data and fills get realistic bounds, so that one absurd tick
# or fill is refused at the door instead of reaching calc: a price is > 0 and <= 1e9 (the dearest
# listed share, BRK.A, trades near 7e5 USD; prices quoted in IDR, VND or KRW, index points, or a
# hyperinflated currency stay well below 1e9), a size or quantity <= 1e12 (more shares than any
# company has issued). With both, an exposure qty * price <= 1e21 and its square (a variance term,
# ~1e42) stay far inside float range. Calc's own numbers (margin, VaR, ...) are refused only when not
# finite: a legitimate margin of a huge book in a small currency unit (1e15 JPY) must never be.
MAX_PRICE = 1e9
MAX_SIZE = 10**12
FLOAT_MAX = sys.float_info.max  # <= this and >= -this: every finite float (NaN fails every comparison)
FINITE = msgspec.Meta(ge=-FLOAT_MAX, le=FLOAT_MAX, description="a finite number (NaN and infinity refused)")
NON_NEGATIVE = msgspec.Meta(ge=0, le=FLOAT_MAX, description="a finite number >= 0")
PRICE = msgspec.Meta(gt=0, le=MAX_PRICE, description=f"a price > 0 and <= {MAX_PRICE:g}")
QUANTITY = msgspec.Meta(gt=0, le=MAX_SIZE, description=f"a quantity > 0 and <= {MAX_SIZE:g}")

# Names (syms, accounts, ids: every `symbol` column): no control characters (C0, DEL, C1), no line or
# paragraph separators, no bidi marks, embeddings, overrides or isolates (U+061C, U+200E/F,
# U+202A-E, U+2066-9), no zero-width or invisible format characters (U+00AD, U+180E, U+200B-D,
# U+2060-F, BOM U+FEFF, U+FFF9-B), and no leading or trailing whitespace (ASCII or Unicode spaces).
# One pattern for both checks: msgspec runs it with Python's `re` (re.search, so anchored with ^ and
# \Z: `$` would let a trailing newline through), the tickerplant's Arrow check with RE2
# (`re2_pattern` rewrites \uXXXX and \Z in RE2's syntax). Written in ASCII escapes so error texts
# never carry the characters themselves.
_BAD_CHARS = (
    r"\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    r"\ufeff\ufff9-\ufffb"
)
_SPACES = r"\x20\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_NAME_BODY = rf"[^{_BAD_CHARS}{_SPACES}](?:[^{_BAD_CHARS}]*[^{_BAD_CHARS}{_SPACES}])?"
NAME_PATTERN = rf"^{_NAME_BODY}\Z"
OPTIONAL_NAME_PATTERN = rf"^(?:{_NAME_BODY})?\Z"
NAME_RULE = "no control, bidi or zero-width characters and no leading or trailing whitespace"
NAME = msgspec.Meta(
    min_length=1, max_length=256, pattern=NAME_PATTERN, description=f"a non-empty name: {NAME_RULE}"
)


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of ARROW_TYPES
    check: Any = None  # the msgspec element type publishers' values must satisfy (None: stamped, not sent)
    doc: str = ""
    before: Any = None  # a column added in a later version: what rows of days journaled without it read
    # as (None: such a day cannot be read as this table; journal_reader.conform says so)

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
Price = Annotated[float, PRICE]
Quantity = Annotated[float, QUANTITY]
NonNegative = Annotated[float, NON_NEGATIVE]
Size = Annotated[int, msgspec.Meta(gt=0, le=MAX_SIZE, description=f"a size > 0 and <= {MAX_SIZE:g}")]
OptionalName = Annotated[str, msgspec.Meta(max_length=256, pattern=OPTIONAL_NAME_PATTERN)]
Long = Annotated[int, msgspec.Meta(ge=-(2**62), le=2**62)]
Side = Literal["B", "S"]
ISO_DATE_PATTERN = r"^\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\Z"
IsoDate = Annotated[str, msgspec.Meta(pattern=ISO_DATE_PATTERN, description="a date YYYY-MM-DD")]
NsTime = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description="UTC nanoseconds since 1970")]
# param kinds: files (calc/params.py stores them by hash) and events: price_accept = an operator
# accepts a held suspect price (`marginflow prices accept SYM [--price P]`: file_id = sym,
# content_hash = the price or "-" for the held one, source = who); instruments / vol_surface are stored
# and journaled but not yet used by calc's margins; forecast = a trained forecast of the call
# (calc/forecast.py)
PARAM_FILES = ("span", "history", "covariance", "instruments", "vol_surface", "forecast")  # `params load`
ParamKind = Literal[(*PARAM_FILES, "config", "positions", "price_accept")]
# calc's margin models built into its kernels (calc/kernels.py derives their integer codes from this
# order); any other model name is an external model (calc.models.register_model, e.g. "span")
BuiltinModel = Literal["var", "hvar", "stress"]
BUILTIN_MODELS: tuple[str, ...] = get_args(BuiltinModel)
Policy = Literal["model", "max_stress"]  # an account's margin: the model's number, or max(model, stress)
POLICIES: tuple[str, ...] = get_args(Policy)
# alert kinds: the rules of [[calc.alerts]] (calc/alerts.py), and "data" (market data held as suspect,
# calc/band.py, or a parameter file refused, calc/watch.py)
RuleKind = Literal["level", "utilisation", "jump", "call", "predicted_call"]
DATA_KIND = "data"
AlertKind = Literal[RuleKind, "data"]
ALERT_KINDS: tuple[str, ...] = get_args(AlertKind)
# the forecast's horizons (calc/cycles.py): the CCP's next cycle, its end-of-day cycle, the next business
# day's end of day
Horizon = Literal["next", "eod", "t+1"]
HORIZONS: tuple[str, ...] = get_args(Horizon)

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
                Column("price", "float", Price, "trade price"),
                Column("size", "long", Size, "trade size"),
            ),
        ),
        Table(
            "quote",
            key="sym",
            doc="top-of-book quotes",
            columns=(
                *_stamped(),
                Column("sym", "symbol", Sym, "instrument"),
                Column("bid", "float", Price, "best bid"),
                Column("ask", "float", Price, "best ask"),
                Column("bid_size", "long", Size, "size at the bid"),
                Column("ask_size", "long", Size, "size at the ask"),
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
                Column("qty", "float", Quantity, "quantity, always positive; side gives the sign"),
                Column("price", "float", Price, "execution price"),
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
                Column("kind", "symbol", ParamKind, "file kind"),
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
                Column(
                    "drivers",
                    "text",
                    Text,
                    "top drivers as JSON: [{sym, exposure, contribution[, delta, gamma, vega]}]",
                ),
                Column(
                    "components",
                    "text",
                    Text,
                    "a CCP model's margin parts as JSON (schemas/calc.py CcpComponents), else {}",
                ),
                Column("last_seq", "long", Long, "seq of the last event included"),
                Column("param_id", "symbol", OptionalName, "parameter file in force"),
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
                Column(
                    "kind",
                    "symbol",
                    AlertKind,
                    f"{' | '.join(ALERT_KINDS)} (data: a price held as suspect, a parameter file refused)",
                ),
                Column("state", "symbol", Literal["raised", "cleared"], "raised or cleared"),
                Column("value", "float", Finite, "the value that crossed"),
                Column("threshold", "float", Finite, "the rule's threshold"),
                Column("message", "text", Text, "human-readable text"),
                Column("last_seq", "long", Long, "seq of the event that crossed"),
            ),
        ),
        Table(
            "call",
            key="account",
            doc="margin calls the CCP made (its report file or an adapter): one row per account and cycle",
            columns=(
                *_stamped(),
                Column(
                    "business_date",
                    "symbol",
                    IsoDate,
                    "business date the call is for, YYYY-MM-DD (not `date`: the HDB's partition column)",
                ),
                Column("cycle", "symbol", Sym, "the CCP's cycle ([[calc.ccps]]: e.g. ITD1, ITD2, EOD)"),
                Column("ccp", "symbol", Sym, "clearing house"),
                Column("account", "symbol", Sym, "trading account"),
                Column("requirement", "float", NonNegative, "the CCP's initial margin requirement"),
                Column("call", "float", Finite, "called: > 0 the member pays, < 0 the CCP returns, 0 none"),
                Column("collateral", "float", Finite, "collateral the CCP held before the call"),
            ),
        ),
        Table(
            "forecast",
            key="account",
            doc="calc's projected requirement and call per account and horizon (conflated like margin)",
            columns=(
                *_stamped(),
                Column("account", "symbol", Sym, "trading account"),
                Column("ccp", "symbol", Sym, "clearing house"),
                Column("horizon", "symbol", Horizon, " | ".join(HORIZONS)),
                Column("business_date", "symbol", IsoDate, "business date of the projected cycle"),
                Column("cycle", "symbol", Sym, "the projected cycle"),
                Column("cycle_time", "timestamp", NsTime, "when the CCP runs that cycle (UTC)"),
                Column("replica", "float", NonNegative, "the replica's requirement with the CCP's rounding"),
                Column("p50", "float", NonNegative, "projected requirement, median"),
                Column("p95", "float", NonNegative, "projected requirement, 95th percentile"),
                Column("call_p50", "float", Finite, "the call p50 implies (collateral, minimum transfer)"),
                Column("call_p95", "float", Finite, "the call p95 implies"),
                Column("method", "symbol", Sym, "model:<id> (a trained forecast) | replica (its error band)"),
                Column("last_seq", "long", Long, "seq of the last event included"),
            ),
        ),
        Table(
            "callcheck",
            key="account",
            doc="the parallel run: each actual call beside calc's forecast for it at fixed lead times",
            columns=(
                *_stamped(),
                Column("account", "symbol", Sym, "trading account"),
                Column("ccp", "symbol", Sym, "clearing house"),
                Column("business_date", "symbol", IsoDate, "business date of the call"),
                Column("cycle", "symbol", Sym, "the CCP's cycle"),
                Column("lead_s", "long", Long, "seconds before the cycle the forecast was taken"),
                Column("actual", "float", NonNegative, "the CCP's requirement"),
                Column("p50", "float", NonNegative, "calc's forecast then, median"),
                Column("p95", "float", NonNegative, "calc's forecast then, 95th percentile"),
                Column("error", "float", Finite, "p50 - actual (> 0: over-predicted, the safe side)"),
                Column("covered", "long", Long, "1 if actual <= p95, else 0"),
                Column("method", "symbol", Sym, "the forecast's method then"),
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
    return pa.schema(
        [pa.field(c.name, c.arrow_type, nullable=False) for c in TABLES[table_name].input_columns]
    )


@cache
def column_rule(column: Column) -> dict[str, Any]:
    """The column's input constraint as plain data, read from its msgspec check (the one definition):
    bounds (gt/ge/lt/le), string lengths, or the allowed values of a Literal."""
    check = column.check
    if get_origin(check) is Literal:
        return {"allowed": list(get_args(check))}
    rule: dict[str, Any] = {}
    for meta in get_args(check)[1:]:
        for k in ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern"):
            if getattr(meta, k, None) is not None:
                rule[k] = getattr(meta, k)
    if "pattern" in rule:
        rule["pattern_rule"] = NAME_RULE
    return rule


NAME_RE = re.compile(NAME_PATTERN)
OPTIONAL_NAME_RE = re.compile(OPTIONAL_NAME_PATTERN)


def first_bad_name(values: list[str], pattern: str = NAME_PATTERN) -> int:
    """Index of the first value failing the pattern (the name pattern by default), -1 if none: msgspec's own
    `pattern` check costs ~1 us a value (it calls into Python's `re`), which would cut the tickerplant's
    rows/s by half or more, so its decoder checks names here a column at a time. The common case is
    decided at C speed: a column whose text is all printable ASCII (0x20-0x7e: no control character, and
    the only whitespace is the plain space) with no space at all, or none at an end of a value, passes;
    the pattern's answer on such text is the same. Anything else goes through the pattern value by
    value."""
    text = "".join(values)
    if pattern in (NAME_PATTERN, OPTIONAL_NAME_PATTERN) and text.isascii() and text.isprintable():
        if " " not in text or not any(v[:1] == " " or v[-1:] == " " for v in values):
            return -1
    search = (
        NAME_RE
        if pattern == NAME_PATTERN
        else OPTIONAL_NAME_RE
        if pattern == OPTIONAL_NAME_PATTERN
        else re.compile(pattern)
    ).search
    return next((i for i, v in enumerate(values) if search(v) is None), -1)


_BAD_CHAR = re.compile(f"[{_BAD_CHARS}]")
_EDGE_SPACE = re.compile(f"^[{_SPACES}]|[{_SPACES}]$")


def name_problem(value: str) -> str:
    """Why `value` fails the name pattern, for an error text: the first bad character by code point
    and position (never the character itself), or the padding."""
    m = _BAD_CHAR.search(value)
    if m:
        return f"character U+{ord(m.group()):04X} at position {m.start()} not allowed in a name ({NAME_RULE})"
    if not value:
        return "empty"
    if _EDGE_SPACE.search(value):
        return f"leading or trailing whitespace ({NAME_RULE})"
    return NAME_RULE


def re2_pattern(pattern: str) -> str:
    """A pattern of this module (Python `re` syntax, for msgspec) in RE2 syntax (pyarrow.compute's
    match_substring_regex): \\uXXXX -> \\x{XXXX}; \\Z -> $ (RE2's $ is the end of the text, not
    before a trailing newline)."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", r"\\x{\1}", pattern).replace(r"\Z", "$")
