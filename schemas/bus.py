"""The bus's wire format (NATS JetStream, `[bus] kind = "nats"`): subjects, headers and message ids.

One message carries one run of a table's rows: consecutive in seq (no gap), all with the same key
(`TABLES[table].key`: account for fill, sym for trade/quote), as the payload the journal and the
websocket fan-out carry (an Arrow IPC record batch message of the table's stored schema; the schema
itself is `TABLES[table].arrow_schema`, known to both sides). Messages go to the stream in seq order, so
any consumer, whatever subjects it filters, receives its rows in ascending seq: the ordered merge across
tables is the stream's order.

- subject `mf.<table>.<key>`: a consumer asks for just its accounts' fills and its instruments' ticks
  by filter subjects (`mf.fill.ACC1`, `mf.quote.*`). A flush's batch with several keys is split into runs
  rather than sent once on `mf.<table>._` with the keys in a header: a header cannot be filtered on by
  the server, so every shard would receive (and pay for) every other shard's fills.
- subject `mf._day`: one marker at the start of each journal day (headers Mf-Date = the day that ended,
  "" for the first day the bridge saw, Mf-Next-Date = the day that starts): the start position of a day's
  replay (the last such message) and the subscribers' end_of_day.
- header `Nats-Msg-Id` = `<date>:<table>:<first seq>` (`<date>:day` for a marker): a resend of the same
  run within the stream's duplicate window is dropped by JetStream.
- headers Mf-Table, Mf-Date, Mf-First-Seq, Mf-Last-Seq (every row with seq <= Mf-Last-Seq is on the bus
  once this message is: the bridge's restart point).

- subject `mfrpc.whatif.<k>` (core NATS request/reply, not on the stream): the front asks shard k for a
  what-if; the request is a msgpack `schemas.calc.WhatIf`, the reply a msgpack `WhatIfAnswer`.

A key is one subject token: [A-Za-z0-9_-] stay, every other byte (UTF-8) is %XX, and the key "_" is
%5F (so `_` never collides with a key; a null key is `_`).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

PREFIX = "mf"
DAY_SUBJECT = f"{PREFIX}._day"
ALL_SUBJECTS = f"{PREFIX}.>"

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
TABLE = "Mf-Table"
DATE = "Mf-Date"
NEXT_DATE = "Mf-Next-Date"
FIRST_SEQ = "Mf-First-Seq"
LAST_SEQ = "Mf-Last-Seq"

_PLAIN = re.compile(r"[A-Za-z0-9_\-]+")


def key_token(key: str | None) -> str:
    """A key as one subject token (reversible: `key_from_token`)."""
    if key is None:
        return "_"
    if key == "_":
        return "%5F"
    if _PLAIN.fullmatch(key):
        return key
    return "".join(ch if _PLAIN.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in key)


def key_from_token(token: str) -> str | None:
    if token == "_":
        return None
    if "%" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "%":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode()


def subject(table: str, key: str | None) -> str:
    return f"{PREFIX}.{table}.{key_token(key)}"


def table_subjects(table: str, keys: frozenset[str] | None = None) -> list[str]:
    """Filter subjects for a table's rows: every key, or just `keys`."""
    if not keys:
        return [f"{PREFIX}.{table}.*"]
    return [subject(table, k) for k in sorted(keys)]


def msg_id(date: str, table: str, first_seq: int) -> str:
    return f"{date}:{table}:{first_seq}"


def day_msg_id(date: str) -> str:
    return f"{date}:day"


RPC_PREFIX = "mfrpc"  # (outside mf.>: never captured by the stream)


def whatif_subject(shard: int) -> str:
    return f"{RPC_PREFIX}.whatif.{shard}"


class WhatIfAnswer(msgspec.Struct, kw_only=True):
    """A shard's answer to a what-if request: the engine's result, or why there is none."""

    result: dict[str, Any] | None = None
    error: str = ""
