"""The tickerplant core driven directly, no sockets and (but for the last tests) no disk: validation
errors naming the field, stamping from the given clock, dedupe, end of day, subscription filtering,
what the core asks the shell to append and what to send, and acks only after the journal write."""

from __future__ import annotations

import os

import msgspec
import pyarrow as pa
import pytest

from marginflow import auth
from schemas import wire
from schemas.tables import TABLES
from tests.support.rows import quotes, trades
from tests.support.servers import tp_config
from tickerplant import journal
from tickerplant.client import arrow_ipc
from tickerplant.core import Append, AppendMarks, Out, Roll, TickerplantCore
from tickerplant.journal_writer import JournaledCore, JournalInUse, JournalLayoutChanged

DECODE = msgspec.msgpack.Decoder(wire.FromTickerplant)
T0 = 1_773_144_000_000_000_000  # 2026-03-10 12:00 UTC, in ns
PUB, SUB, SUB2 = 1, 7, 8  # connection ids


class Clock:
    """The wall clock the core is given: each reading advances 1 us; `monotonic` for the uptime."""

    def __init__(self, ns: int = T0):
        self.ns = ns
        self.mono = 100.0
        self.readings = 0

    def now_ns(self) -> int:
        self.readings += 1
        self.ns += 1000
        return self.ns

    def monotonic(self) -> float:
        return self.mono


def make_core(tmp_path, clock: Clock | None = None, **kw) -> TickerplantCore:
    """A core over a journal folder that must never be created (the core does no I/O)."""
    clock = clock or Clock()
    core = TickerplantCore(tp_config(tmp_path / "journal"), clock.now_ns, clock.monotonic, **kw)
    for conn in (PUB, SUB, SUB2):
        core.connect(conn, auth.SYSTEM)
    return core


def upd(table: str, cols: dict, msg_id: int = 1, pub: str = "") -> wire.Upd:
    return wire.Upd(table=table, cols=msgspec.Raw(wire.encode(cols)), id=msg_id, pub=pub)


def frames(out: Out, conn: int | None = None) -> list[wire.Msg]:
    """The messages of `out.send` (to `conn` only, if given), decoded, in order."""
    msgs: list[wire.Msg] = []
    for c, frame in out.send:
        if conn is None or c == conn:
            m = DECODE.decode(frame)
            msgs += m if isinstance(m, list) else [m]
    return msgs


def rows(ipc: bytes, table: str) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(pa.py_buffer(ipc), TABLES[table].arrow_schema)


def test_bad_upd_is_answered_naming_the_field_counted_and_never_journaled(tmp_path):
    core = make_core(tmp_path)
    cases = [  # (message, counter, table, row, field, words in the reason)
        (upd("trade", {**trades(2), "price": [1.0, -5.0]}), "bad_value", "trade", 1, "price", "> 0.0"),
        (upd("trade", {**trades(1), "size": ["ten"]}), "bad_value", "trade", 0, "size", "int"),
        (upd("trade", {"sym": ["AAPL"], "price": [1.0]}), "bad_value", "trade", -1, "size", "size"),
        (upd("trade", {**trades(2), "size": [1]}), "bad_shape", "trade", -1, "size", "1 values"),
        (upd("trade", trades(0)), "bad_shape", "trade", -1, "", "no rows"),
        (upd("nope", trades(1)), "unknown_table", "nope", -1, "table", "unknown table"),
        (upd("fill", {"sym": ["AAPL"]}), "bad_value", "fill", -1, "account", "account"),
    ]
    for i, (msg, counter, table, row, field, words) in enumerate(cases):
        msg = msgspec.structs.replace(msg, id=10 + i)
        before = core.bad[counter]
        out = core.on_frame(PUB, wire.encode(msg))
        assert core.bad[counter] == before + 1
        assert out.writes == []
        (err,) = frames(out)
        assert isinstance(err, wire.Error), (msg, err)
        assert (err.id, err.table, err.row, err.field) == (10 + i, table, row, field), err
        assert words in err.reason and err.reason.startswith(f"table {table}" if table != "nope" else "")
    assert core.bad == {"bad_value": 4, "bad_shape": 2, "unknown_table": 1}
    arrow = wire.UpdArrow(table="trade", ipc=arrow_ipc(pa.table({**trades(3), "price": [1.0, 2.0, 0.0]})))
    (err,) = frames(core.on_frame(PUB, wire.encode(arrow)))
    assert (err.row, err.field) == (2, "price") and core.bad["bad_value"] == 5
    core.cfg = msgspec.structs.replace(core.cfg, max_rows_per_message=2)
    (err,) = frames(core.on_frame(PUB, wire.encode(upd("trade", trades(3)))))
    assert "3 rows, more than max_rows_per_message=2" in err.reason and core.bad["too_many_rows"] == 1
    flushed = core.flush()
    assert core.pending == {} and flushed.writes == [] and core.last_seq == 0
    assert not (tmp_path / "journal").exists()


def test_a_frame_with_a_bad_message_still_takes_the_good_ones(tmp_path):
    core = make_core(tmp_path)
    frame = wire.encode(
        [upd("trade", trades(1), 1), upd("trade", {"sym": [""]}, 2), upd("quote", quotes(2), 3)]
    )
    (err,) = frames(core.on_frame(PUB, frame))
    assert err.id == 2 and err.field == "sym"
    out = core.flush()
    assert [(w.table, rows(w.ipc, w.table).num_rows) for w in out.writes] == [("trade", 1), ("quote", 2)]
    assert [(a.upto, a.seq) for a in frames(out, PUB)] == [(3, 3)]


def test_rows_are_stamped_from_the_given_clock_with_seq_monotonic_across_tables(tmp_path):
    clock = Clock()
    core = make_core(tmp_path, clock)
    readings = clock.readings
    core.on_frame(PUB, wire.encode([upd("trade", trades(2), 1), upd("quote", quotes(3), 2)]))
    core.on_frame(PUB, wire.encode(upd("trade", trades(1, 2), 3)))
    stamps = [T0 + 1000 * (readings + k) for k in (1, 2, 3)]  # one reading per message
    out = core.flush()
    got = {w.table: rows(w.ipc, w.table) for w in out.writes}
    assert got["trade"].column("seq").to_pylist() == [1, 2, 6]
    assert got["quote"].column("seq").to_pylist() == [3, 4, 5]
    as_ns = {t: b.column("time").cast(pa.int64()).to_pylist() for t, b in got.items()}
    assert as_ns == {"trade": [stamps[0]] * 2 + [stamps[2]], "quote": [stamps[1]] * 3}
    assert got["trade"].column("price").to_pylist() == trades(3)["price"]
    core.on_frame(PUB, wire.encode(upd("quote", quotes(1), 4)))
    (later,) = core.flush().writes
    assert rows(later.ipc, "quote").column("seq").to_pylist() == [7] and core.last_seq == 7


def test_the_core_asks_to_append_the_bytes_it_publishes_and_acks_after_them(tmp_path):
    core = make_core(tmp_path)
    first = core.on_frame(SUB, wire.encode(wire.Sub(tables=["trade"])))
    assert first.writes == [] and [type(m) for m in frames(first)] == [wire.SubReply]
    got = core.on_frame(PUB, wire.encode(upd("trade", trades(4), 5, pub="calc-1")))
    assert got.writes == [] and got.send == []  # nothing is acked before it is journaled
    out = core.flush()
    marks, append = out.writes
    assert isinstance(marks, AppendMarks) and isinstance(append, Append)
    assert [(m.pub, m.id, m.first_seq, m.last_seq, m.tables) for m in marks.marks] == [
        ("calc-1", 5, 1, 4, {"trade": 4})
    ]  # written ahead of the rows it marks
    (published,) = frames(out, SUB)
    (batch,) = published.batches
    assert (batch.table, batch.first_seq, batch.last_seq) == ("trade", 1, 4) and batch.ipc == append.ipc
    assert [c for c, _ in out.send] == [SUB, PUB]  # the subscriber's publish, then the ack
    assert frames(out, PUB) == [wire.Ack(upto=5, seq=4)]
    assert core.rows["trade"] == 4 and core.flush() == Out()


def test_a_sub_flushes_first_so_its_position_is_consistent(tmp_path):
    core = make_core(tmp_path)
    core.on_frame(PUB, wire.encode(upd("trade", trades(3), 1)))
    out = core.on_frame(SUB, wire.encode(wire.Sub(tables=["trade", "quote"], keys=["IBM"])))
    (append,) = out.writes  # the pending rows are journaled before the reply gives the position
    assert isinstance(append, Append) and rows(append.ipc, "trade").num_rows == 3
    assert frames(out, PUB) == [wire.Ack(upto=1, seq=3)]
    (reply,) = frames(out, SUB)
    assert reply.position.last_seq == 3 and reply.position.date == core.date == "2026-03-10"
    assert reply.position.files["trade"] == str(journal.table_path(tmp_path / "journal", core.date, "trade"))


def test_subscriptions_get_only_their_tables_and_keys(tmp_path):
    core = make_core(tmp_path)
    core.connect(SUB2, auth.Principal("desk", frozenset({"subscriber"}), "tech", frozenset({"TECH01"})))
    core.on_frame(SUB, wire.encode(wire.Sub(tables=["trade"], keys=["MSFT", "JPM"])))
    core.on_frame(SUB2, wire.encode(wire.Sub(tables=["fill", "quote"])))
    fills = {
        "account": ["TECH01", "FIN02"],
        "sym": ["AAPL"] * 2,
        "side": ["B"] * 2,
        "qty": [1.0] * 2,
        "price": [2.0] * 2,
        "order_id": ["O1", "O2"],
        "exec_id": ["E1", "E2"],
    }
    core.on_frame(PUB, wire.encode([upd("trade", trades(4), 1), upd("fill", fills, 2)]))
    out = core.flush()
    (to_sub,) = frames(out, SUB)
    (trade,) = to_sub.batches
    assert rows(trade.ipc, "trade").column("sym").to_pylist() == ["MSFT", "JPM"]
    assert (trade.first_seq, trade.last_seq) == (2, 4)
    (to_desk,) = frames(out, SUB2)
    (fill,) = to_desk.batches  # its own account's fills only, no trade
    assert rows(fill.ipc, "fill").column("account").to_pylist() == ["TECH01"] and fill.first_seq == 5
    core.on_frame(PUB, wire.encode(upd("trade", {"sym": ["IBM"], "price": [1.0], "size": [1]}, 3)))
    assert [c for c, _ in core.flush().send] == [PUB]  # no subscriber wants an IBM trade
    status = core.status()
    assert {s.id: s.sent_batches for s in status.subscribers} == {SUB: 1, SUB2: 1}


def test_resent_message_and_duplicate_exec_id_are_not_journaled_again(tmp_path):
    core = make_core(tmp_path)
    core.connect(PUB + 1, auth.SYSTEM)
    core.on_frame(PUB, wire.encode([upd("trade", trades(2), 1, "p-1"), upd("trade", trades(1), 2, "p-1")]))
    core.flush()
    again = core.on_frame(PUB + 1, wire.encode(upd("trade", trades(1), 2, "p-1")))  # the ack was lost
    assert again == Out() and core.bad["duplicate_resend"] == 1
    out = core.flush()
    assert out.writes == [] and frames(out) == [wire.Ack(upto=2, seq=3)]
    fill = {
        "account": ["A1"],
        "sym": ["AAPL"],
        "side": ["S"],
        "qty": [1.0],
        "price": [2.0],
        "order_id": ["O1"],
        "exec_id": ["X1"],
    }
    core.on_frame(PUB, wire.encode(upd("fill", fill, 3)))
    (err,) = frames(core.on_frame(PUB, wire.encode(upd("fill", fill, 4, "drop-copy"))))
    assert (err.id, err.row, err.field) == (4, 0, "exec_id") and "pending at seq 4" in err.reason
    (append,) = core.flush().writes
    assert append.table == "fill" and rows(append.ipc, "fill").num_rows == 1
    (err,) = frames(core.on_frame(PUB, wire.encode(upd("fill", fill, 5))))
    assert "journaled at seq 4" in err.reason and core.bad["duplicate_exec_id"] == 2


def test_end_of_day_flushes_then_rolls_and_tells_subscribers(tmp_path):
    clock = Clock()
    core = make_core(tmp_path, clock)
    core.on_frame(SUB, wire.encode(wire.Sub(tables=["quote"])))
    core.on_frame(PUB, wire.encode(upd("trade", trades(2), 1, "p-1")))
    out = core.on_frame(PUB, wire.encode(wire.EndOfDayRequest()))
    assert [type(w) for w in out.writes] == [AppendMarks, Append, Roll]  # today's rows, then the roll
    roll = out.writes[-1]
    assert roll.date == "2026-03-11" and [(m.pub, m.id, m.tables) for m in roll.marks] == [("p-1", 1, {})]
    assert frames(out, SUB) == [wire.EndOfDay(date="2026-03-10", next_date="2026-03-11")]
    assert frames(out, PUB) == [wire.Ack(upto=1, seq=2)]
    assert core.date == "2026-03-11" and core.rows["trade"] == 0
    (err,) = frames(core.on_frame(PUB, wire.encode(wire.EndOfDayRequest())))  # not two days ahead
    assert "end of day refused" in err.reason and core.bad["end_of_day_refused"] == 1
    core.on_frame(PUB, wire.encode(upd("trade", trades(1), 2)))
    (append,) = core.flush().writes
    assert rows(append.ipc, "trade").column("seq").to_pylist() == [3]  # seq never restarts
    assert core.maybe_roll() == Out()
    clock.ns += 2 * 86_400 * 10**9  # the clock passes the next roll time
    rolled = core.maybe_roll()
    assert [w.date for w in rolled.writes] == ["2026-03-12"] and core.date == "2026-03-12"


def test_status_asks_the_shell_for_queues_and_file_sizes_and_counts_oversized(tmp_path):
    clock = Clock()
    core = make_core(
        tmp_path, clock, queue_depth=lambda conn: (conn * 10, 99), journal_bytes=lambda: {"t": 5}
    )
    core.on_frame(SUB, wire.encode(wire.Sub(tables=["trade"])))
    core.oversized()
    clock.mono += 2.5
    (status,) = frames(core.on_frame(PUB, wire.encode(wire.StatusRequest())))
    assert [(s.id, s.queue_depth, s.queue_limit) for s in status.subscribers] == [(SUB, 70, 99)]
    assert status.journal_bytes == {"t": 5} and status.uptime_s == 2.5
    assert status.bad_messages == {"oversized": 1} and set(status.journal) == set(TABLES)
    assert not (tmp_path / "journal").exists()


# ---- the core with its journal writer (tickerplant/journal_writer.py) --------------------------------
def test_journaled_core_writes_before_it_returns_the_acks(tmp_path):
    tp = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    tp.open()
    tp.core.connect(PUB, auth.SYSTEM)
    path = journal.table_path(tmp_path, tp.core.date, "trade")
    assert tp.on_frame(PUB, wire.encode(upd("trade", trades(3), 1))) == []
    before = path.stat().st_size
    (ack,) = tp.flush()
    assert DECODE.decode(ack[1]) == wire.Ack(upto=1, seq=3)
    assert path.stat().st_size > before and journal.scan(path).last_seq == 3  # already in the file
    tp.on_frame(PUB, wire.encode(upd("trade", trades(1), 2)))
    os.close(tp.journal.files["trade"].fd)  # the write fails (as on a full disk): no ack goes out
    with pytest.raises(OSError):
        tp.flush()
    tp.journal.files["trade"].fd = -1
    tp.close()
    assert journal.scan(path).last_seq == 3


def test_journaled_core_restarts_from_the_repaired_journal(tmp_path):
    tp = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    tp.open()
    tp.core.connect(PUB, auth.SYSTEM)
    tp.on_frame(PUB, wire.encode(upd("trade", trades(2), 1, "p-1")))
    tp.flush()
    tp.end_of_day()
    tp.on_frame(PUB, wire.encode(upd("trade", trades(3), 2, "p-1")))
    tp.close()
    day2 = journal.table_path(tmp_path, "2026-03-11", "trade")
    with open(day2, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00")  # a torn message at the end
    again = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    state = again.open()
    assert (state.date, state.last_seq, state.rows["trade"]) == ("2026-03-11", 5, 3)
    assert [p.name for p in day2.parent.glob("trade.arrows.torn-*")] != []  # the cut tail, kept
    assert again.core.date == "2026-03-11" and again.core.last_seq == 5
    assert again.core.marks["p-1"].id == 2
    again.core.connect(PUB, auth.SYSTEM)
    assert again.on_frame(PUB, wire.encode(upd("trade", trades(3), 2, "p-1"))) == []
    assert DECODE.decode(again.flush()[0][1]) == wire.Ack(upto=2, seq=5)  # the resend: acked, not journaled
    again.close()
    assert journal.scan(day2).last_seq == 5 and not journal.scan(day2).error


def test_a_second_writer_of_a_journal_is_refused_before_it_touches_a_file(tmp_path):
    """Two tickerplants on one journal folder would cut each other's tails and interleave seqs: the
    second open is refused (naming the folder and the holder) and the first one's files are untouched;
    once the first closes, the folder can be opened again."""
    tp = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    tp.open()
    tp.core.connect(PUB, auth.SYSTEM)
    tp.on_frame(PUB, wire.encode(upd("trade", trades(3), 1)))
    tp.flush()
    path = journal.table_path(tmp_path, tp.core.date, "trade")
    with open(path, "ab") as f:  # a tail the first writer is still writing: a second open would cut it
        f.write(b"\xff\xff\xff\xff")
    before = path.read_bytes()
    second = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    with pytest.raises(
        JournalInUse, match=rf"journal {tmp_path} is being written by another tickerplant \(pid {os.getpid()}"
    ):
        second.open()
    assert path.read_bytes() == before
    tp.close()
    third = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    assert third.open().last_seq == 3  # (the torn tail cut now, by the one writer)
    third.close()


def test_a_day_journaled_in_another_layout_is_refused_before_anything_is_appended(tmp_path):
    """An upgrade that changed a table's columns, restarted mid-day: appending the new layout's batches
    to a stream that begins with the old schema would leave a file no reader can read (or one read
    wrong). The open is refused naming the table, the file and the columns that differ; nothing is
    written, and the writer lock is let go."""
    tp = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    tp.open()
    tp.core.connect(PUB, auth.SYSTEM)
    tp.on_frame(PUB, wire.encode(upd("trade", trades(3), 1)))
    tp.flush()
    tp.close()
    path = journal.table_path(tmp_path, tp.core.date, "trade")
    now = TABLES["trade"].arrow_schema
    old = pa.schema([*now][:-1] + [pa.field("venue", pa.string())])  # one column less, one other
    rows = pa.RecordBatch.from_pylist([r for b in journal.iter_file(path) for r in b.to_pylist()], schema=now)
    with pa.ipc.new_stream(path, old) as w:  # the day as the older version journaled it
        w.write_batch(
            pa.RecordBatch.from_arrays([*rows.columns[:-1], pa.array(["X"] * rows.num_rows)], schema=old)
        )
    before = path.read_bytes()
    again = JournaledCore(tp_config(tmp_path), Clock().now_ns)
    with pytest.raises(JournalLayoutChanged) as e:
        again.open()
    msg = str(e.value)
    assert str(path) in msg and "trade" in msg
    assert f"missing {now[-1].name}" in msg and "unknown venue" in msg
    assert path.read_bytes() == before
    with pytest.raises(JournalLayoutChanged):  # (not JournalInUse: the refused open let the lock go)
        JournaledCore(tp_config(tmp_path), Clock().now_ns).open()
