"""The bus's wire format (NATS JetStream, `[bus] kind = "nats"`): subjects, headers and message ids.

A journal write's rows (one flush: a batch, seq `Mf-Batch` .. its last, no gap) go to the stream as one
message per (table, bucket): the rows of that table whose key (`TABLES[table].key`: account for fill,
sym for trade/quote) falls in bucket b = blake2b(key) mod B (`bucket`; B = `[bus] buckets`, fixed per
stream: the stream's description says it, `stream_description`), in seq order, as the payload the journal
and the websocket fan-out carry (an Arrow IPC record batch message of the table's stored schema, known to
both sides). A batch's messages go to the stream one after another, ordered by their first seq; a
consumer of some buckets receives a batch's rows out of seq order across its buckets (bucket A's 1, 3,
5 before bucket B's 2, 4) and joins the messages of one batch back into seq order (`Mf-Parts` says which
messages the batch has, so it knows when it has all of its own).

- subject `mf.<table>.<b>` (b = 0..B-1): a consumer asks for just its accounts' and instruments' buckets
  (`bucket_subjects`: at most B filter subjects per table, `mf.<table>.*` for all of them). A key's rows
  are all in one bucket, so a consumer gets every row of its keys, and the other keys of its buckets
  (dropped by key before use).
- subject `mf._day`: one marker at the start of each journal day (headers Mf-Date = the day that ended,
  "" for the first day the bridge saw, Mf-Next-Date = the day that starts, Mf-Last-Seq): the start
  position of a day's replay (the last such message) and the subscribers' end_of_day.
- header `Nats-Msg-Id` = `<date>:<table>:<b>:<first seq>` (`<date>:day` for a marker): a resend of the
  same message within the stream's duplicate window is dropped by JetStream.
- headers Mf-Table, Mf-Date, Mf-Batch (the batch's first seq: the same on all its messages),
  Mf-First-Seq / Mf-Max-Seq (this message's first and last row's seq: a subscriber's duplicate check is
  per (table, bucket)), Mf-Parts (`parts_header`: per table of the batch, a hex bit mask of its buckets
  with a message), Mf-Index (this message's place in its batch, 0..: the bridge's order check).
- header Mf-Last-Seq, on the batch's last message only (and on a day marker): every row with seq <= it is
  on the bus once this message is (the bridge's restart point).

- subject `mfrpc.whatif.<k>` (core NATS request/reply, not on the stream): the front asks shard k for a
  what-if; the request is a msgpack `schemas.calc.WhatIf`, the reply a msgpack `WhatIfAnswer`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
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
BATCH = "Mf-Batch"
FIRST_SEQ = "Mf-First-Seq"
MAX_SEQ = "Mf-Max-Seq"
PARTS = "Mf-Parts"
INDEX = "Mf-Index"
LAST_SEQ = "Mf-Last-Seq"


@functools.lru_cache(maxsize=1 << 16)  # (keys repeat: the bridge asks for every row's)
def bucket(key: str | None, n: int) -> int:
    """The bucket of `key` of `n`: blake2b of its UTF-8 bytes mod n (a null key: of ""), stable in every
    process, machine and Python version (never `hash()`, salted per process)."""
    digest = hashlib.blake2b((key or "").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def subject(table: str, b: int) -> str:
    return f"{PREFIX}.{table}.{b}"


def subject_bucket(subj: str) -> int:
    """The bucket of a table's subject (ValueError if it is not one)."""
    return int(subj.rsplit(".", 1)[1])


def bucket_subjects(table: str, buckets: Iterable[int] | None, n: int) -> list[str]:
    """Filter subjects for a table's rows: every bucket (None, or all n), or just `buckets`."""
    wanted = None if buckets is None else set(buckets)
    if wanted is None or len(wanted) >= n:
        return [f"{PREFIX}.{table}.*"]
    return [subject(table, b) for b in sorted(wanted)]


def key_buckets(keys: Iterable[str], n: int) -> set[int]:
    return {bucket(k, n) for k in keys}


def parts_header(parts: Mapping[str, int]) -> str:
    """{table: bit mask of the batch's buckets with a message} -> `trade=5f,fill=2`."""
    return ",".join(f"{t}={m:x}" for t, m in parts.items())


def parse_parts(text: str) -> dict[str, int]:
    return {t: int(m, 16) for t, _, m in (p.partition("=") for p in text.split(",") if p)}


def mask(buckets: Iterable[int]) -> int:
    out = 0
    for b in buckets:
        out |= 1 << b
    return out


def msg_id(date: str, table: str, b: int, first_seq: int) -> str:
    return f"{date}:{table}:{b}:{first_seq}"


def day_msg_id(date: str) -> str:
    return f"{date}:day"


def stream_description(buckets: int) -> str:
    """The stream's description: its bucket count (fixed per stream)."""
    return f"marginflow bus, buckets={buckets}"


def described_buckets(description: str | None) -> int | None:
    """The bucket count a stream's description names (None: not one of ours, or from before buckets)."""
    _, sep, n = (description or "").partition("buckets=")
    return int(n) if sep and n.isdigit() else None


RPC_PREFIX = "mfrpc"  # (outside mf.>: never captured by the stream)


def whatif_subject(shard: int) -> str:
    return f"{RPC_PREFIX}.whatif.{shard}"


class WhatIfAnswer(msgspec.Struct, kw_only=True):
    """A shard's answer to a what-if request: the engine's result, or why there is none."""

    result: dict[str, Any] | None = None
    error: str = ""
