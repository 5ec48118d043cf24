"""Wire messages between marginflow processes: msgspec structs, msgpack-encoded, tagged by `type`.

A websocket frame carries one message or a list of them; table data travels as Arrow IPC bytes.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, get_args

import msgspec
import pyarrow as pa

from schemas.tables import TABLES, Table, column_rule, first_bad_name


class Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    """Base of every wire message; the tag is the class name in snake case."""


EventKind = Literal["batch", "end_of_day", "live"]
"""What a subscriber's event is (tickerplant.client.Event): a batch of one table's rows, the end of
a day, or "live" (the replay to the subscription's position is done; what follows is live)."""


# ---- publisher -> tickerplant -------------------------------------------------------------------
class Upd(Msg, tag="upd"):
    """Append rows to `table`. `cols` maps column name -> list of values (column-oriented: one list
    per input column, all the same length). `id` is the publisher's own increasing message number,
    echoed in the Ack once the rows are journaled. `pub` is the publisher's stable id (kept across its
    reconnects): the tickerplant journals each (pub, id) at most once, so a resend after a lost ack is
    acked again but not journaled twice ("" = no such check, the old publishers)."""

    table: str
    cols: msgspec.Raw
    id: int = 0
    pub: str = ""


class UpdArrow(Msg, tag="upd_arrow"):
    """Bulk form of Upd: `ipc` is an Arrow IPC stream whose columns are the table's input columns
    (schemas.tables.input_schema); checked with the same rules, column at a time. `pub` as in Upd."""

    table: str
    ipc: bytes
    id: int = 0
    pub: str = ""


class Ack(Msg, tag="ack"):
    """Every Upd with id <= `upto` on this connection is journaled (durable per the fsync policy);
    `seq` is the last seq given to them."""

    upto: int
    seq: int


class Error(Msg, tag="error"):
    """A refused request. Nothing of it was journaled. `row` and `field` are set when known."""

    reason: str
    id: int = 0
    table: str = ""
    row: int = -1
    field: str = ""


# ---- subscriber <-> tickerplant -----------------------------------------------------------------
class Sub(Msg, tag="sub"):
    """Subscribe to `tables` (empty: all), optionally only rows whose key column is in `keys`."""

    tables: list[str] = []
    keys: list[str] = []


class JournalPosition(msgspec.Struct, forbid_unknown_fields=True):
    """A consistent snapshot: every row with seq <= last_seq is in `files`, and every later row will
    be published to the subscriber that received this."""

    date: str
    directory: str
    files: dict[str, str]
    last_seq: int


class SubReply(Msg, tag="sub_reply"):
    tables: list[str]
    keys: list[str]
    schemas: dict[str, bytes]  # table -> Arrow IPC serialized schema
    position: JournalPosition


class Batch(msgspec.Struct, array_like=True):
    """One table's rows with seq first..last (not necessarily contiguous), as an Arrow IPC message."""

    table: str
    first_seq: int
    last_seq: int
    ipc: bytes


class Publish(Msg, tag="publish"):
    batches: list[Batch]


class EndOfDay(Msg, tag="end_of_day"):
    """The day `date` is closed: its journal files are complete; the next day's begin."""

    date: str
    next_date: str


class EndOfDayRequest(Msg, tag="end_of_day_request"):
    """Admin: roll the journal to the next day now instead of at the configured time."""


# ---- status --------------------------------------------------------------------------------------
class StatusRequest(Msg, tag="status_request"):
    pass


class SubscriberStatus(msgspec.Struct):
    id: int
    peer: str
    tables: list[str]
    keys: list[str]
    queue_depth: int
    queue_limit: int
    sent_batches: int


class Status(Msg, tag="status"):
    process: str
    date: str
    last_seq: int
    rows: dict[str, int]
    messages: int
    bad_messages: dict[str, int]
    subscribers: list[SubscriberStatus]
    journal: dict[str, str]
    journal_bytes: dict[str, int]
    uptime_s: float
    extra: dict[str, Any] = {}


TickerplantMessage = Upd | UpdArrow | Sub | StatusRequest | EndOfDayRequest
FromTickerplant = Ack | Error | SubReply | Publish | EndOfDay | Status


# ---- encode / decode helpers -----------------------------------------------------------------------
def _numpy_to_python(obj: Any) -> Any:
    """Publishers may hand numpy arrays and scalars: encode them as plain lists and numbers."""
    if hasattr(obj, "tolist"):  # numpy ndarray or scalar
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


encoder = msgspec.msgpack.Encoder(enc_hook=_numpy_to_python)


def encode(msg: Msg | list[Msg]) -> bytes:
    return encoder.encode(msg)


@cache
def decoder(union: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(union | list[union])


@cache
def columns_struct(table_name: str, patterns: bool = True) -> type[msgspec.Struct]:
    """The msgspec struct that validates an Upd's `cols` for a table: one list per input column,
    each element checked by the column's constraint (patterns=False: string patterns left out, for
    ColumnsDecoder, which checks them a column at a time)."""
    t: Table = TABLES[table_name]
    return msgspec.defstruct(
        f"{table_name}_cols",
        [(c.name, list[c.check if patterns else _without_pattern(c.check)]) for c in t.input_columns],
        forbid_unknown_fields=True,
    )


def _without_pattern(check: Any) -> Any:
    args = get_args(check)
    if not args or not any(getattr(m, "pattern", None) for m in args[1:]):
        return check
    metas = [
        msgspec.Meta(
            **{
                k: getattr(m, k)
                for k in ("min_length", "max_length", "description")
                if getattr(m, k, None) is not None
            }
        )
        for m in args[1:]
    ]
    return Annotated[(args[0], *metas)]


class ColumnsDecoder:
    """Decodes and validates an Upd's `cols` exactly as columns_struct(table) would, but checks the name
    pattern of each pattern column a column at a time (schemas.tables.first_bad_name: the common all-ASCII
    column at C speed) instead of msgspec's ~1 us per value. A refusal is a msgspec.ValidationError
    in msgspec's words and path (`... - at `$.sym[3]``), so callers cannot tell the difference."""

    def __init__(self, table_name: str):
        self.decoder = msgspec.msgpack.Decoder(columns_struct(table_name, patterns=False))
        self.patterns = [
            (c.name, column_rule(c)["pattern"])
            for c in TABLES[table_name].input_columns
            if "pattern" in column_rule(c)
        ]

    def decode(self, data: bytes | msgspec.Raw) -> msgspec.Struct:
        cols = self.decoder.decode(data)
        for name, pattern in self.patterns:
            row = first_bad_name(getattr(cols, name), pattern)
            if row >= 0:
                raise msgspec.ValidationError(
                    f"Expected `str` matching regex {pattern!r} - at `$.{name}[{row}]`"
                )
        return cols


@cache
def columns_decoder(table_name: str) -> ColumnsDecoder:
    return ColumnsDecoder(table_name)


def serialize_schema(schema: pa.Schema) -> bytes:
    return schema.serialize().to_pybytes()


def deserialize_schema(data: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(data))
