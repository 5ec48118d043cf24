"""Reading journals of days an older version wrote in other columns: read as this version's tables
(columns by name, cast where the type changed, a later column filled with its `before`), or refused with
the file and the column named; a day in today's layout is read as it is."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from schemas.tables import TABLES
from tickerplant import journal
from tickerplant.journal_reader import LayoutError, read_days, read_table

DAY = "2024-01-15"


def old_trade_day(root) -> None:
    """trade as an older version journaled it: price as an int, no size column, a venue column."""
    old = pa.schema(
        [("time", pa.timestamp("ns")), ("seq", pa.int64()), ("sym", pa.string()), ("price", pa.int64()),
         ("venue", pa.string())]
    )  # fmt: skip
    path = journal.table_path(root, DAY, "trade")
    path.parent.mkdir(parents=True)
    with pa.ipc.new_stream(path, old) as w:
        for seqs in ([1, 2], [4]):
            w.write_batch(
                pa.RecordBatch.from_pydict(
                    {"time": [s * 10 for s in seqs], "seq": seqs, "sym": ["AAPL"] * len(seqs),
                     "price": [100 + s for s in seqs], "venue": ["X"] * len(seqs)},
                    schema=old,
                )
            )  # fmt: skip


def test_a_column_added_since_without_a_value_for_older_days_is_refused_naming_file_and_column(tmp_path):
    old_trade_day(tmp_path)
    path = journal.table_path(tmp_path, DAY, "trade")
    with pytest.raises(LayoutError, match=rf"journal {path}: trade has no column size"):
        list(read_days(tmp_path))
    with pytest.raises(LayoutError, match="no column size"):
        read_table(tmp_path, DAY, "trade")


def test_an_older_day_reads_as_this_version_s_table_when_its_columns_say_how(tmp_path, monkeypatch):
    t = TABLES["trade"]
    cols = tuple(dataclasses.replace(c, before=0) if c.name == "size" else c for c in t.columns)
    monkeypatch.setitem(TABLES, "trade", dataclasses.replace(t, columns=cols))
    old_trade_day(tmp_path)
    quote = journal.table_path(tmp_path, DAY, "quote")  # a table in today's layout beside it, seq 3
    q = TABLES["quote"].arrow_schema
    row = {f.name: [3] if f.name == "seq" else ["AAPL"] if pa.types.is_string(f.type) else [1] for f in q}
    with pa.ipc.new_stream(quote, q) as w:
        w.write_batch(pa.RecordBatch.from_pydict(row, schema=q))
    got = list(read_days(tmp_path))
    assert [(name, b.schema.equals(TABLES[name].arrow_schema)) for name, b in got] == [
        ("trade", True), ("quote", True), ("trade", True)
    ]  # fmt: skip
    trades = [r for name, b in got if name == "trade" for r in b.to_pylist()]
    assert [(r["seq"], r["price"], r["size"]) for r in trades] == [
        (1, 101.0, 0),
        (2, 102.0, 0),
        (4, 104.0, 0),
    ]
    assert "venue" not in trades[0]
    assert read_table(tmp_path, DAY, "trade").column("price").to_pylist() == [101.0, 102.0, 104.0]


def test_a_type_that_does_not_convert_is_refused(tmp_path):
    s = pa.schema(
        [(f.name, pa.string() if f.name == "price" else f.type) for f in TABLES["trade"].arrow_schema]
    )
    path = journal.table_path(tmp_path, DAY, "trade")
    path.parent.mkdir(parents=True)
    with pa.ipc.new_stream(path, s) as w:
        w.write_batch(pa.RecordBatch.from_pydict(
            {"time": [1], "seq": [1], "sym": ["AAPL"], "price": ["n/a"], "size": [5]}, schema=s
        ))  # fmt: skip
    with pytest.raises(LayoutError, match=r"trade.price is string there, double here"):
        list(read_days(tmp_path))


def test_the_commands_that_read_such_a_day_say_why_in_one_line(tmp_path, capsys):
    from marginflow import cli

    old_trade_day(tmp_path)
    assert cli.main(["replay", "--journal", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginflow replay: journal ") and "no column size" in err
    assert "Traceback" not in err
