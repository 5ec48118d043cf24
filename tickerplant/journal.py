"""The journal: one Arrow IPC stream file per table per day, `<root>/<YYYY-MM-DD>/<table>.arrows`.

Writing (append whole IPC messages), scanning (valid messages, bytes, last seq), and repair of a torn
tail (kdb+'s `-11!(-2;log)` and `-11!(-4;log)`). Any Arrow tool reads these files as plain streams.

`encode_batch` writes the record batch message for rows given as Python lists, the bytes pyarrow's
`RecordBatch.serialize()` would write, without building Arrow arrays: a 1-row fill costs ~20 us instead
of ~75 us (one pyarrow call, 4-9 us, per column, then serialize). Only the numbers in the message's
metadata depend on the rows (the flatbuffer's shape depends on the schema alone), so the metadata is
taken once per schema from pyarrow and patched.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

SUFFIX = ".arrows"
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def day_dir(root: str | Path, date: str) -> Path:
    return Path(root) / date


def table_path(root: str | Path, date: str, table: str) -> Path:
    return day_dir(root, date) / f"{table}{SUFFIX}"


def journal_dates(root: str | Path) -> list[str]:
    """Dates (YYYY-MM-DD) that have a journal folder, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and len(p.name) == 10 and p.name[4] == "-")


def day_files(root: str | Path, date: str) -> dict[str, Path]:
    d = day_dir(root, date)
    return {p.name[: -len(SUFFIX)]: p for p in sorted(d.glob(f"*{SUFFIX}"))} if d.is_dir() else {}


@dataclass
class Scan:
    """What a journal file holds: complete messages and where the valid bytes end."""

    path: Path
    total_bytes: int = 0
    valid_bytes: int = 0
    batches: int = 0
    rows: int = 0
    first_seq: int = 0
    last_seq: int = 0
    closed: bool = False  # ends with the end-of-stream marker
    error: str = ""  # why the bytes after valid_bytes are not a complete message
    repaired: str = ""  # what `repair` cut and where it kept it ("" if nothing was cut)
    schema: pa.Schema | None = field(default=None, repr=False)

    @property
    def torn(self) -> bool:
        return self.valid_bytes < self.total_bytes and not self.closed


def _messages(path: Path) -> Iterator[tuple[int, int, pa.ipc.Message | None, str]]:
    """Yield (start, end, message, error) for each message; the last item may carry an error
    (message None) when the tail is torn. The end-of-stream marker yields (start, end, None, "")."""
    size = path.stat().st_size
    if size == 0:
        return
    with pa.memory_map(str(path)) as source:
        while True:
            start = source.tell()
            if start >= size:
                return
            try:
                message = pa.ipc.read_message(source)
            except EOFError as e:
                rest = size - start
                if rest == len(END_OF_STREAM):
                    source.seek(start)
                    if source.read(rest) == END_OF_STREAM:
                        yield start, size, None, ""
                        return
                yield start, start, None, f"torn message at byte {start}: {e}"
                return
            except (pa.ArrowInvalid, OSError) as e:
                yield start, start, None, f"torn message at byte {start}: {e}"
                return
            yield start, source.tell(), message, ""


def file_schema(path: str | Path) -> pa.Schema | None:
    """The schema a journal file's stream begins with (None: empty, or its first message torn)."""
    for _, _, message, _ in _messages(Path(path)):
        return pa.ipc.read_schema(message) if message is not None and message.type == "schema" else None
    return None


def iter_file(path: str | Path, upto_seq: int | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one journal file, stopping quietly at a torn tail (a file still being
    written may end mid-message) or after the batch holding `upto_seq`."""
    path = Path(path)
    if not path.exists():
        return
    schema = None
    for _, _, message, _error in _messages(path):
        if message is None:
            return
        if message.type == "schema":
            schema = pa.ipc.read_schema(message)
            continue
        if schema is None or message.type != "record batch":
            return
        batch = pa.ipc.read_record_batch(message, schema)
        if batch.num_rows == 0:
            continue
        if upto_seq is not None:
            seq = batch.column("seq")
            if seq[0].as_py() > upto_seq:
                return
            if seq[-1].as_py() > upto_seq:
                yield batch.filter(pc.less_equal(seq, upto_seq))
                return
        yield batch


def scan(path: str | Path) -> Scan:
    """Count complete messages and rows, find the last seq and where valid bytes end."""
    path = Path(path)
    result = Scan(path=path, total_bytes=path.stat().st_size)
    for start, end, message, error in _messages(path):
        if error:
            result.error = error
            break
        if message is None:  # end-of-stream marker
            result.closed = True
            result.valid_bytes = end
            break
        if message.type == "schema":
            if result.schema is not None:
                result.error = f"second schema message at byte {start}"
                break
            result.schema = pa.ipc.read_schema(message)
        elif message.type == "record batch" and result.schema is not None:
            batch = pa.ipc.read_record_batch(message, result.schema)
            result.batches += 1
            result.rows += batch.num_rows
            if batch.num_rows and "seq" in batch.schema.names:
                seq = batch.column("seq")
                if not result.first_seq:
                    result.first_seq = seq[0].as_py()
                result.last_seq = seq[-1].as_py()
        else:
            result.error = f"unexpected {message.type} message at byte {start}"
            break
        result.valid_bytes = end
    return result


def repair(path: str | Path) -> Scan:
    """Truncate a torn tail, keeping the cut bytes in `<file>.torn-<unix ns>` beside it."""
    path = Path(path)
    result = scan(path)
    if result.torn:
        with open(path, "rb") as f:
            f.seek(result.valid_bytes)
            tail = f.read()
        side = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        side.write_bytes(tail)
        os.truncate(path, result.valid_bytes)
        why = f"{result.error}; {len(tail):,} bytes cut, kept in {side.name}"
        result = scan(path)
        result.repaired = why
    return result


# ---- record batch messages from Python lists ------------------------------------------------------
_PADDING = tuple(bytes(k) for k in range(8))
_CODES = {
    pa.int64(): "q",
    pa.timestamp("ns"): "q",
    pa.float64(): "d",
    pa.string(): "s",
}  # array typecode; s: utf8


@dataclass(frozen=True)
class BatchLayout:
    """Where a schema's record batch message keeps its numbers: `meta` is the message prefix and
    metadata of a one-row batch; the offsets point at the row count, the (length, null count) of each
    column, the (offset, length) of each body buffer, and the body length."""

    codes: tuple[str, ...]
    meta: bytes
    length_at: int
    nodes_at: int
    buffers_at: int
    body_length_at: int


def _field(fb: bytes, table: int, index: int) -> int:
    """Position of field `index` of the flatbuffer table at `table` (0 if absent)."""
    vtable = table - struct.unpack_from("<i", fb, table)[0]
    size = struct.unpack_from("<H", fb, vtable)[0]
    offset = struct.unpack_from("<H", fb, vtable + 4 + 2 * index)[0] if 4 + 2 * index < size else 0
    return table + offset if offset else 0


def _target(fb: bytes, at: int) -> int:
    return at + struct.unpack_from("<I", fb, at)[0]


def batch_layout(schema: pa.Schema) -> BatchLayout:
    """(Keep it per table: hashing a pa.Schema costs ~12 us.) Read the layout off pyarrow's message
    for a one-row batch (Message: header = field 2, bodyLength = field 3; RecordBatch: length = 0,
    nodes = 1, buffers = 2; vectors: a count, then the structs)."""
    codes = tuple(_CODES[f.type] for f in schema)
    sample = {"q": 1, "d": 1.0, "s": "x"}
    meta = (
        pa.RecordBatch.from_pylist(
            [{f.name: sample[c] for f, c in zip(schema, codes, strict=True)}], schema=schema
        )
        .serialize()
        .to_pybytes()
    )
    start = 8  # continuation marker and metadata size
    meta = meta[: start + struct.unpack_from("<i", meta, 4)[0]]
    fb = meta[start:]
    message = struct.unpack_from("<I", fb, 0)[0]
    header = _target(fb, _field(fb, message, 2))
    return BatchLayout(
        codes=codes,
        meta=meta,
        length_at=start + _field(fb, header, 0),
        nodes_at=start + _target(fb, _field(fb, header, 1)) + 4,
        buffers_at=start + _target(fb, _field(fb, header, 2)) + 4,
        body_length_at=start + _field(fb, message, 3),
    )


def encode_batch(layout: BatchLayout, columns: Sequence[Sequence]) -> bytes:
    """The record batch message (as RecordBatch.serialize() writes it) of `columns`, one list of
    values per schema field, no nulls: int64/timestamp as ints, float64 as numbers, utf8 as str."""
    n = len(columns[0])
    body = bytearray()
    buffers: list[int] = []
    for code, values in zip(layout.codes, columns, strict=True):
        buffers += (len(body), 0)  # validity bitmap: none (no nulls)
        if code == "s":
            data = [v.encode() for v in values]
            parts: tuple = (array("i", accumulate(map(len, data), initial=0)), b"".join(data))
        else:
            parts = (array(code, values),)
        for part in parts:
            at = len(body)
            body += part
            buffers += (at, len(body) - at)
            body += _PADDING[-len(body) % 8]
    meta = bytearray(layout.meta)
    struct.pack_into("<q", meta, layout.length_at, n)
    struct.pack_into(f"<{len(layout.codes) * 2}q", meta, layout.nodes_at, *(n, 0) * len(layout.codes))
    struct.pack_into(f"<{len(buffers)}q", meta, layout.buffers_at, *buffers)
    struct.pack_into("<q", meta, layout.body_length_at, len(body))
    return bytes(meta + body)


class JournalFile:
    """Append-only writer of one table's stream. Each write is one os.write of whole IPC messages,
    so a crash leaves at most one torn message at the end (which `repair` cuts)."""

    def __init__(self, path: Path, schema: pa.Schema):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.schema = schema
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.bytes = os.fstat(self.fd).st_size
        self.dirty = False
        if self.bytes == 0:
            self._write(schema.serialize().to_pybytes())

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.bytes += len(data)
        self.dirty = True

    def append(self, message: bytes | pa.Buffer) -> None:
        """Append one serialized record batch (RecordBatch.serialize())."""
        self._write(memoryview(message))

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self, end_of_stream: bool = True) -> None:
        if self.fd < 0:
            return
        if end_of_stream:
            self._write(END_OF_STREAM)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
