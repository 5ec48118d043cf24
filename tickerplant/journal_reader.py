"""Read one day or a date range of journals as Arrow record batches, per table or merged in seq order;
a day journaled by an older version in other columns is read as this version's tables (`conform`).

Subscribers use `read_position` to catch up to the tickerplant's position before applying live batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import wire
from schemas.tables import TABLES
from tickerplant import journal

Item = tuple[str, pa.RecordBatch]


def filter_batch(
    table: str,
    batch: pa.RecordBatch,
    after_seq: int = 0,
    upto_seq: int | None = None,
    keys: frozenset[str] | pa.Array | None = None,
) -> pa.RecordBatch:
    """Rows with after_seq < seq <= upto_seq and, when keys are given, key column in keys (a set, or an
    Arrow array of them built once by a caller that filters many batches by the same keys)."""
    seq = batch.column("seq")
    if batch.num_rows == 0:
        return batch
    if (
        seq[-1].as_py() <= after_seq
    ):  # wholly applied already (a resubscribe skips most of the day): no kernel call
        return batch.slice(0, 0)
    if seq[0].as_py() <= after_seq or (upto_seq is not None and seq[-1].as_py() > upto_seq):
        mask = pc.greater(seq, after_seq)
        if upto_seq is not None:
            mask = pc.and_(mask, pc.less_equal(seq, upto_seq))
        batch = batch.filter(mask)
    key = TABLES[table].key if table in TABLES else None
    if keys is not None and len(keys) and key and batch.num_rows:
        value_set = keys if isinstance(keys, pa.Array) else pa.array(sorted(keys))
        batch = batch.filter(pc.is_in(batch.column(key), value_set=value_set))
    return batch


def merge_by_seq(streams: dict[str, Iterable[pa.RecordBatch]]) -> Iterator[Item]:
    """Merge per-table batch streams (each ascending in seq) into one stream ascending in seq,
    slicing batches where tables interleave. Contiguous runs stay whole batches."""
    iters = {t: iter(s) for t, s in streams.items()}
    heap: list[
        tuple[int, str, pa.RecordBatch, np.ndarray, int]
    ] = []  # (next seq, table, batch, seqs, offset)

    def push(table: str) -> None:
        for b in iters[table]:
            if b.num_rows:
                seqs = b.column("seq").to_numpy()
                heapq.heappush(heap, (int(seqs[0]), table, b, seqs, 0))
                return

    for t in iters:
        push(t)
    while heap:
        _, table, batch, seqs, offset = heapq.heappop(heap)
        end = max(int(np.searchsorted(seqs, heap[0][0], side="left")), offset + 1) if heap else batch.num_rows
        yield table, (batch if offset == 0 and end == batch.num_rows else batch.slice(offset, end - offset))
        if end < batch.num_rows:
            heapq.heappush(heap, (int(seqs[end]), table, batch, seqs, end))
        else:
            push(table)


class LayoutError(ValueError):
    """A journal file's rows cannot be read as this version's table (a column missing with no value for
    older days, or a type that does not convert)."""


def conform(table: str, batch: pa.RecordBatch, path: str | Path = "") -> pa.RecordBatch:
    """A batch of a day journaled in another layout, as this version's table: columns taken by name (cast
    where the type changed and converts), a column added since filled with its `Column.before`, columns
    this version dropped left out. LayoutError naming the file and the column when it cannot be."""
    t = TABLES[table]
    cols = []
    for c in t.columns:
        if c.name in batch.schema.names:
            col = batch.column(c.name)
            if col.type != c.arrow_type:
                try:
                    col = col.cast(c.arrow_type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise LayoutError(
                        f"journal {path}: {table}.{c.name} is {col.type} there, {c.arrow_type} here: {e}"
                    ) from None
        elif c.before is None:
            raise LayoutError(
                f"journal {path}: {table} has no column {c.name} (the day was journaled before it "
                "existed) and the column gives no value for older days (schemas.tables Column.before)"
            )
        else:
            col = pa.array([c.before] * batch.num_rows, c.arrow_type)
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=t.arrow_schema)


def file_batches(table: str, path: str | Path, upto_seq: int | None = None) -> Iterator[pa.RecordBatch]:
    """A table's journal file (`journal.iter_file`) as this version's table: a file in another layout
    (a day journaled by an older version) conformed batch by batch."""
    want = TABLES[table].arrow_schema if table in TABLES else None
    same: bool | None = None
    for b in journal.iter_file(path, upto_seq):
        if same is None:
            same = want is None or b.schema.equals(want)
        yield b if same else conform(table, b, path)


def read_files(
    files: dict[str, str | Path],
    upto_seq: int | None = None,
    after: dict[str, int] | None = None,
    keys: frozenset[str] | None = None,
    ordered: bool = True,
) -> Iterator[Item]:
    """Batches from journal files (table -> path), rows after `after[table]` up to `upto_seq`."""
    after = after or {}

    def stream(table: str, path: str | Path) -> Iterator[pa.RecordBatch]:
        for b in file_batches(table, path, upto_seq):
            b = filter_batch(table, b, after.get(table, 0), upto_seq, keys)
            if b.num_rows:
                yield b

    streams = {t: stream(t, p) for t, p in files.items()}
    if ordered:
        yield from merge_by_seq(streams)
    else:
        for t, s in streams.items():
            for b in s:
                yield t, b


def read_position(
    position: wire.JournalPosition,
    tables: Iterable[str],
    after: dict[str, int] | None = None,
    keys: frozenset[str] | None = None,
    ordered: bool = True,
) -> Iterator[Item]:
    """What a new subscriber must replay: the day's journal up to the position's last_seq."""
    files = {t: p for t, p in position.files.items() if t in set(tables)}
    yield from read_files(files, position.last_seq, after, keys, ordered)


def read_days(
    root: str | Path,
    start: str | None = None,
    end: str | None = None,
    tables: Iterable[str] | None = None,
    ordered: bool = True,
) -> Iterator[Item]:
    """All journaled rows of the dates start..end (inclusive; default all), day by day in seq order."""
    wanted = set(tables) if tables else None
    for date in journal.journal_dates(root):
        if (start and date < start) or (end and date > end):
            continue
        files = {t: p for t, p in journal.day_files(root, date).items() if wanted is None or t in wanted}
        yield from read_files(files, ordered=ordered)


def read_table(root: str | Path, date: str, table: str) -> pa.Table:
    """One table of one day as an Arrow table (what any Arrow tool would read)."""
    schema = TABLES[table].arrow_schema
    return pa.Table.from_batches(
        list(file_batches(table, journal.table_path(root, date, table))), schema=schema
    )
