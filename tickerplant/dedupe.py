"""What keeps a resent message or a resent fill from being journaled twice: the rules (used by
tickerplant.core) and the marks file (written by tickerplant.journal_writer).

Two rules, each where it applies:
- **publisher message ids, every table**: a publisher that reconnects (tickerplant.client.Publisher)
  resends what was not acked with the same `pub` and `id`. Per publisher the tickerplant keeps the
  highest message id it journaled (its "mark"); an upd with `pub` set and `id <= mark` is acked and
  not journaled (counted as "duplicate_resend"). This catches the resend after a lost ack, of any
  table, for a publisher that lives on (the same process).
- **exec_id, fills from any source**: a fill whose exec_id was journaled that day (or is repeated
  within its message, or is pending in the same flush) is refused with an Error naming exec_id
  ("duplicate_exec_id"), nothing of its message journaled. This catches what the message ids cannot:
  a drop copy that reconnects as a new process (a new `pub`) and resends fills (FIX PossDup), or a
  feed restarted with reused ids. The set is rebuilt from the day's fill journal on start and cleared
  at end of day.

The marks are written ahead: `<journal_dir>/<date>/_publishers.jsonl`, one JSON line per publisher
per flush, {"pub", "id", "first_seq", "last_seq", "tables": {table: last seq of that flush's batch}},
appended BEFORE the flush's table data. On start a line counts only if every table it names holds
its batch (the file's last seq >= the line's), so a crash between the mark and the data (the data
torn or never written) forgets the mark and the resend is journaled; the file is then rewritten with
the valid marks only. Journal readers take `*.arrows` files only (journal.day_files, replay.check),
so this file is invisible to them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from marginflow.files import write_atomic
from schemas import wire
from tickerplant import journal

MARKS_FILE = "_publishers.jsonl"


class Mark(msgspec.Struct):
    pub: str
    id: int
    first_seq: int
    last_seq: int
    tables: dict[str, int] = {}


_decode_mark = msgspec.json.Decoder(Mark).decode
_encode = msgspec.json.Encoder().encode


def marks_path(root: str | Path, date: str) -> Path:
    return journal.day_dir(root, date) / MARKS_FILE


def load_marks(path: Path, table_last_seq: Mapping[str, int]) -> dict[str, Mark]:
    """The valid marks of a marks file, highest id per publisher: a line whose tables do not all hold
    its rows (torn, or never written after the mark) is dropped, as is an undecodable (torn) line."""
    marks: dict[str, Mark] = {}
    if not path.exists():
        return marks
    for line in path.read_bytes().splitlines():
        try:
            m = _decode_mark(line)
        except msgspec.DecodeError:
            continue
        if any(table_last_seq.get(t, 0) < s for t, s in m.tables.items()):
            continue
        if m.pub not in marks or m.id > marks[m.pub].id:
            marks[m.pub] = m
    return marks


class MarksFile:
    """Append-only writer of a day's marks; `rewrite` replaces it with a given set (atomically)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.dirty = False

    @staticmethod
    def rewrite(path: Path, marks: Iterable[Mark]) -> None:
        write_atomic(path, b"".join(_encode(m) + b"\n" for m in marks), 0o644)

    def append(self, marks: Iterable[Mark]) -> None:
        data = b"".join(_encode(m) + b"\n" for m in marks)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def exec_ids_from_journal(root: str | Path, date: str) -> dict[str, int]:
    """exec_id -> seq of every fill journaled on `date` (the set survives restarts)."""
    seen: dict[str, int] = {}
    for batch in journal.iter_file(journal.table_path(root, date, "fill")):
        for e, s in zip(batch.column("exec_id").to_pylist(), batch.column("seq").to_pylist(), strict=True):
            seen.setdefault(e, s)
    return seen


def duplicate_exec_id(
    exec_ids: list[str], known: Mapping[str, int], journaled_seq: int, msg_id: int = 0
) -> wire.Error | None:
    """The Error for the first fill of a message whose exec_id is known (journaled, or pending in
    this flush) or repeated within the message; None if every exec_id is new."""
    first_row: dict[str, int] = {}
    for row, e in enumerate(exec_ids):
        if e in known:
            seq = known[e]
            where = f"journaled at seq {seq}" if seq <= journaled_seq else f"pending at seq {seq}"
            why = f"duplicate exec_id {e!r} ({where})"
        elif e in first_row:
            why = f"duplicate exec_id {e!r} (repeated in this message, first at row {first_row[e]})"
        else:
            first_row[e] = row
            continue
        return wire.Error(
            reason=f"table fill, row {row}, field exec_id: {why}",
            id=msg_id,
            table="fill",
            row=row,
            field="exec_id",
        )
    return None
