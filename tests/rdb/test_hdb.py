"""The rdb starts over an HDB with bad partitions (a column of another type, a column missing, a corrupt or
truncated file, a directory that is not a date, an unreadable file): each is skipped with a warning naming the
file and the reason, listed in status, and queries over the good days answer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdb import hdb, query
from rdb.service import Service
from rdb.store import Store
from schemas.rdb import Status, StatusRequest
from tests.support.rows import T0, trade_table


def build_hdb(root: Path) -> None:
    """Two good days of trades (2024-01-15: 100 rows, 2024-01-16: 50 rows) and quotes, written by end
    of day."""
    s = Store(root, date="2024-01-15", memory_limit="512MB", threads=1)
    try:
        rng = np.random.default_rng(1)
        s.append("trade", trade_table(1, 100, rng))
        hdb.end_of_day(s, next_date="2024-01-16")
        s.append("trade", trade_table(1, 50, rng, t0=T0 + 86_400_000_000_000))
        hdb.end_of_day(s, next_date="2024-01-17")
    finally:
        s.close()


def write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_bad_partitions_are_skipped_named_and_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "hdb"
    build_hdb(root)
    good = pq.read_table(root / "trade" / "date=2024-01-15" / "part-0.parquet")
    bad: dict[str, str] = {}
    wrong_type = good.set_column(
        good.schema.get_field_index("price"),
        "price",
        pa.array([str(x) for x in good.column("price").to_pylist()]),
    )
    bad[str(write(root / "trade" / "date=2024-01-17" / "part-0.parquet", wrong_type))] = (
        "column 'price' is string, the table's is double"
    )
    missing = good.drop_columns(["size"])
    bad[str(write(root / "trade" / "date=2024-01-18" / "part-0.parquet", missing))] = "column 'size' missing"
    corrupt = root / "trade" / "date=2024-01-19" / "part-0.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PAR1" + os.urandom(2000))
    bad[str(corrupt)] = "unreadable:"
    truncated = root / "trade" / "date=2024-01-20" / "part-0.parquet"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes((root / "trade" / "date=2024-01-15" / "part-0.parquet").read_bytes()[:-100])
    bad[str(truncated)] = "unreadable:"
    bad[str(write(root / "trade" / "date=2024-13-45" / "part-0.parquet", good))] = "is not a date"
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = write(root / "trade" / "date=2024-01-21" / "part-0.parquet", good)
        locked.chmod(0)
        bad[str(locked)] = "unreadable:"

    with caplog.at_level(logging.WARNING, logger="marginflow.rdb"):
        s = Store(root, date="2024-02-01", memory_limit="512MB", threads=1)
    try:
        skipped = s.skipped_partitions()["trade"]
        assert set(skipped) == set(bad)
        for f, why in bad.items():
            assert why in skipped[f], (f, skipped[f])
            assert any(f in r.getMessage() and why in r.getMessage() for r in caplog.records), f
        got = query.run(s, "SELECT date, count(*) AS n FROM days.trade GROUP BY date ORDER BY date").table
        assert got is not None and got.column("n").to_pylist() == [100, 50]
        assert query.run(s, "SELECT count(*) AS n FROM days.quote").table.column("n").to_pylist() == [0]
        status = msgspec.msgpack.decode(
            Service(s).handle(msgspec.msgpack.encode(StatusRequest())), type=Status
        )
        assert status.extra["skipped_partitions"] == {"trade": skipped}
        # end of day still rebuilds the views (and still skips the bad files)
        s.append("trade", trade_table(1, 7, np.random.default_rng(2), t0=T0 + 17 * 86_400_000_000_000))
        hdb.end_of_day(s, next_date="2024-02-02")
        got = query.run(s, "SELECT count(*) AS n FROM days.trade").table
        assert got is not None and got.column("n").to_pylist() == [157]
        assert set(s.skipped_partitions()["trade"]) == set(bad)
    finally:
        s.close()


def test_a_fixed_partition_is_used_again(tmp_path: Path) -> None:
    root = tmp_path / "hdb"
    build_hdb(root)
    path = root / "trade" / "date=2024-01-17" / "part-0.parquet"
    good = pq.read_table(root / "trade" / "date=2024-01-16" / "part-0.parquet")
    write(path, good.drop_columns(["price"]))
    s = Store(root, date="2024-02-01", memory_limit="512MB", threads=1)
    try:
        assert list(s.skipped_partitions()["trade"]) == [str(path)]
        write(path, good)  # repaired: a new version of the file
        s.refresh_views()
        assert s.skipped_partitions() == {}
        got = query.run(s, "SELECT count(*) AS n FROM days.trade").table
        assert got is not None and got.column("n").to_pylist() == [200]
    finally:
        s.close()


def test_a_day_with_one_bad_file_is_left_out_whole(tmp_path: Path) -> None:
    root = tmp_path / "hdb"
    build_hdb(root)
    day = root / "trade" / "date=2024-01-16"
    (day / "part-1.parquet").write_bytes(b"not parquet at all")
    s = Store(root, date="2024-02-01", memory_limit="512MB", threads=1)
    try:
        skipped = s.skipped_partitions()["trade"]
        assert skipped[str(day / "part-1.parquet")].startswith("unreadable:")
        assert skipped[str(day / "part-0.parquet")] == f"same partition as {day / 'part-1.parquet'}"
        got = query.run(s, "SELECT date, count(*) AS n FROM days.trade GROUP BY date").table
        assert got is not None and got.column("n").to_pylist() == [
            100
        ]  # 2024-01-15 only, not half of the 16th
    finally:
        s.close()
