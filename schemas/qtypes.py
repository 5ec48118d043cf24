"""The one mapping between marginflow's column kinds (schemas/tables.py) and kdb+'s q types.

Every q view of a table derives from this: the empty tables `.u.sub` answers, the columns `.u.upd`
takes, the tables the tickerplant pushes, and the q types of query results on the rdb's kdb+ port
(marginflow/qipc.py converts Arrow <-> q with it).

| column kind | Arrow           | q type (char, number) | q null      |
| ----------- | --------------- | --------------------- | ----------- |
| symbol      | string          | symbol `s` 11         | ` (empty)   |
| text        | string          | list of strings `C` 0 | "" (empty)  |
| float       | float64         | float `f` 9           | 0n          |
| long        | int64           | long `j` 7            | 0Nj         |
| timestamp   | timestamp[ns]   | timestamp `p` 12      | 0Np         |

A `.u.upd` column may also come in a type the tickerplant's Arrow check accepts for the kind (an int
`i` or short `h` for a long or float column, a real `e` for a float, symbols for a text column, a list
of strings for a symbol column); the check (tickerplant/validate.py) decides, with the same error text
as a websocket upd. Query results have no column kinds, only Arrow types: `ARROW_RESULT` below says
which q type each Arrow type becomes (a string column named like a `text` column of any table comes
back as a list of strings, every other string column as symbols). A kind or an Arrow type not listed
is refused with an error naming the column.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.tables import TABLES, Column, Table


@dataclass(frozen=True)
class QType:
    char: str  # q's type letter (`meta` shows it)
    num: int  # the IPC type byte of a vector of it (0: a general list, here of char vectors)
    doc: str = ""


KIND_QTYPES: dict[str, QType] = {
    "symbol": QType("s", 11, "symbol vector"),
    "text": QType("C", 0, "general list of char vectors (strings)"),
    "float": QType("f", 9, "float vector"),
    "long": QType("j", 7, "long vector"),
    "timestamp": QType("p", 12, "timestamp vector: nanoseconds since 2000.01.01"),
}

# Arrow type names (pyarrow's str(type) prefix) of query results -> q vector type numbers
ARROW_RESULT: dict[str, int] = {
    "bool": 1,
    "uint8": 4,
    "int8": 5,
    "int16": 5,
    "uint16": 6,
    "int32": 6,
    "uint32": 7,
    "int64": 7,
    "uint64": 7,
    "halffloat": 8,
    "float": 8,
    "double": 9,
    "decimal128": 9,
    "decimal256": 9,
    "string": 11,
    "large_string": 11,
    "timestamp": 12,
    "date32": 14,
    "date64": 14,
    "duration": 16,
    "time32": 19,
    "time64": 19,
    "null": 9,
}

TEXT_COLUMNS: frozenset[str] = frozenset(
    c.name for t in TABLES.values() for c in t.columns if c.kind == "text"
)


class QTypeError(ValueError):
    """A column with no q type."""


def qtype(column: Column, table: str = "") -> QType:
    """The q type of one column, or QTypeError naming it."""
    try:
        return KIND_QTYPES[column.kind]
    except KeyError:
        where = f"table {table}, " if table else ""
        raise QTypeError(f"{where}column {column.name}: kind {column.kind!r} has no q type") from None


def table_qtypes(t: Table) -> dict[str, QType]:
    """column -> q type of every column of a table (QTypeError naming the first that has none)."""
    return {c.name: qtype(c, t.name) for c in t.columns}


def kinds(t: Table) -> dict[str, str]:
    """column -> kind, for marginflow.qipc.from_arrow (a `text` column goes out as strings)."""
    return {c.name: c.kind for c in t.columns}
