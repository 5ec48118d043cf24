"""Idempotent input: a resend after a lost ack (same publisher id and message id) is journaled once,
also across a tickerplant restart; a fill's exec_id is journaled once a day (refused with an error
naming exec_id otherwise, rebuilt from the journal on restart); end of day only to the real next date."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import msgspec
import pyarrow as pa
import pytest

from schemas import wire
from tests.support.rows import trades
from tests.support.servers import TpProcess, running_tp, system_core
from tests.support.tokens import with_token
from tickerplant import dedupe, journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher, arrow_ipc, upd_message
from tickerplant.core import trading_date
from tickerplant.journal_writer import JournaledCore

DECODE = msgspec.msgpack.Decoder(wire.FromTickerplant)


def fill(exec_ids: list[str], account: str = "TECH01") -> dict[str, list]:
    n = len(exec_ids)
    return {
        "account": [account] * n,
        "sym": ["AAPL"] * n,
        "side": ["B"] * n,
        "qty": [10.0] * n,
        "price": [150.0] * n,
        "order_id": [f"O-{e}" for e in exec_ids],
        "exec_id": exec_ids,
    }


def replies(out) -> list:
    msgs = []
    for _, frame in out:
        m = DECODE.decode(frame)
        msgs += m if isinstance(m, list) else [m]
    return msgs


def send(tp: JournaledCore, msgs: list[wire.Msg], conn: int = 1) -> list:
    return replies(tp.on_frame(conn, wire.encode(msgs)) + tp.flush())


def journaled(root, table: str = "trade") -> pa.Table:
    date = journal.journal_dates(root)[-1]
    return reader.read_table(root, date, table)


def test_resend_after_lost_ack_is_journaled_once_across_core_restart(tmp_path, tp_cfg):
    tp = system_core(tp_cfg)
    m1 = upd_message("trade", trades(3), 1, "calc-abc")
    m2 = upd_message("trade", trades(2, 3), 2, "calc-abc")
    first = send(tp, [m1, m2])
    assert [type(r) for r in first] == [wire.Ack] and first[0].upto == 2 and first[0].seq == 5
    again = send(tp, [m1, m2], conn=2)  # the ack was lost: the same messages on a new connection
    assert [(type(r), r.upto, r.seq) for r in again] == [(wire.Ack, 2, 5)]  # acked, so the publisher moves on
    assert tp.core.bad["duplicate_resend"] == 2
    tp.close()

    tp = system_core(tp_cfg)  # restart: the marks come back from _publishers.jsonl
    assert tp.core.marks["calc-abc"].id == 2
    after = send(tp, [m2, upd_message("trade", trades(1, 5), 3, "calc-abc")], conn=3)
    assert [(type(r), r.upto, r.seq) for r in after] == [(wire.Ack, 3, 6)]
    assert tp.core.bad["duplicate_resend"] == 1
    other = send(tp, [upd_message("trade", trades(1), 1, "feed-xyz")])  # another publisher's own ids
    assert other[0].upto == 1 and other[0].seq == 7
    tp.close()
    assert journaled(tmp_path).column("seq").to_pylist() == list(range(1, 8))


def test_mark_written_ahead_of_lost_data_is_forgotten(tmp_path, tp_cfg):
    """kill -9 between the mark and the table data: the rows are not in the journal, so the resend
    must be journaled (the mark does not count), and stays forgotten once later rows pass its seq."""
    tp = system_core(tp_cfg)
    send(tp, [upd_message("trade", trades(2), 1, "p-1")])
    date = tp.core.date
    path = journal.table_path(tmp_path, date, "trade")
    size = path.stat().st_size
    send(tp, [upd_message("trade", trades(3, 2), 2, "p-1")])
    tp.close()
    os.truncate(path, size + 10)  # the second batch torn: as if the process died while writing it
    lines = dedupe.marks_path(tmp_path, date).read_bytes().splitlines()
    assert len(lines) == 2 and b'"id":2' in lines[1]

    tp = system_core(tp_cfg)
    assert tp.core.marks["p-1"].id == 1 and tp.core.last_seq == 2
    r = send(tp, [upd_message("trade", trades(3, 2), 2, "p-1"), upd_message("trade", trades(4), 3, "other")])
    assert r[0].upto == 3 and r[0].seq == 9 and not tp.core.bad
    tp.close()
    tp = system_core(tp_cfg)
    assert tp.core.marks["p-1"].id == 2 and tp.core.marks["p-1"].last_seq == 5
    tp.close()
    assert journaled(tmp_path).column("seq").to_pylist() == list(range(1, 10))


def test_duplicate_exec_id_refused_in_core(tmp_path, tp_cfg):
    tp = system_core(tp_cfg)
    r = send(
        tp,
        [
            wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X1", "X2"]))), id=1),
            wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X3", "X2"]))), id=2),  # pending
            wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X4", "X4"]))), id=3),  # repeated
            wire.UpdArrow(table="fill", ipc=arrow_ipc(pa.table(fill(["X5", "X1"]))), id=4),
            wire.UpdArrow(table="fill", ipc=arrow_ipc(pa.table(fill(["X6"]))), id=5),
        ],
    )
    errors = [e for e in r if isinstance(e, wire.Error)]
    assert [(e.id, e.row, e.field) for e in errors] == [
        (2, 1, "exec_id"),
        (3, 1, "exec_id"),
        (4, 1, "exec_id"),
    ]
    assert errors[0].reason == "table fill, row 1, field exec_id: duplicate exec_id 'X2' (pending at seq 2)"
    assert "repeated in this message" in errors[1].reason
    assert (
        errors[2].reason == "table fill, row 1, field exec_id: duplicate exec_id 'X1' (journaled at seq 1)"
        or "(pending at seq 1)" in errors[2].reason
    )
    assert tp.core.bad["duplicate_exec_id"] == 3
    r = send(tp, [wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X6"]))), id=6)])
    assert r[0].reason.endswith("duplicate exec_id 'X6' (journaled at seq 3)")
    tp.close()
    assert journaled(tmp_path, "fill").column("exec_id").to_pylist() == ["X1", "X2", "X6"]
    tp = system_core(tp_cfg)  # exec_ids rebuilt from the fill journal
    r = send(tp, [wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X2"]))), id=1)])
    assert isinstance(r[0], wire.Error) and "duplicate exec_id 'X2' (journaled at seq 2)" in r[0].reason
    tp.end_of_day()  # a new day: exec_ids are unique per day
    r = send(tp, [wire.Upd(table="fill", cols=msgspec.Raw(wire.encode(fill(["X2"]))), id=2)])
    assert isinstance(r[0], wire.Ack)
    tp.close()


def test_end_of_day_request_only_rolls_to_the_real_next_date(tmp_path, tp_cfg):
    now = dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC).timestamp() * 1e9
    tp = system_core(tp_cfg, now_ns=lambda: int(now))
    assert tp.core.date == "2026-03-10"
    out = replies(tp.on_frame(1, wire.encode(wire.EndOfDayRequest())))
    assert tp.core.date == "2026-03-11" and out == []
    for _ in range(2):
        out = replies(tp.on_frame(1, wire.encode(wire.EndOfDayRequest())))
        assert [type(m) for m in out] == [wire.Error] and "end of day refused" in out[0].reason
        assert "2026-03-11" in out[0].reason and "2026-03-10" in out[0].reason
    assert tp.core.date == "2026-03-11" and tp.core.bad["end_of_day_refused"] == 2
    tp.close()
    tp = system_core(tp_cfg, now_ns=lambda: int(now))  # the date stays after a restart, still cannot move
    assert tp.core.date == "2026-03-11"
    out = replies(tp.on_frame(1, wire.encode(wire.EndOfDayRequest())))
    assert isinstance(out[0], wire.Error) and tp.core.date == "2026-03-11"
    assert trading_date(int(now), "00:00") == "2026-03-10"
    tp.close()


@pytest.mark.slow
def test_same_fill_three_times_over_the_wire_and_after_restart(tmp_path):
    """The drop-copy case: the same fill sent 3 times (a new process each time, so no publisher id
    helps): journaled once, two errors naming exec_id; after a tp restart a resend is still refused."""
    tp = TpProcess(tmp_path)
    try:

        async def three_times():
            errors = []
            for _ in range(3):
                async with Publisher(tp.url, name="dropcopy") as pub:
                    await pub.upd("fill", fill(["EX-1"]))
                    await pub.wait_acked()
                    errors += pub.errors
            return errors

        errors = asyncio.run(three_times())
        assert len(errors) == 2 and all(
            e.field == "exec_id" and "duplicate exec_id 'EX-1'" in e.reason for e in errors
        )
        tp.kill(9)
        tp = TpProcess(tmp_path)

        async def once_more():
            async with Publisher(tp.url, name="dropcopy") as pub:
                await pub.upd("fill", fill(["EX-1"]))
                await pub.upd("fill", fill(["EX-2"]))
                await pub.wait_acked()
                status = await pub.status()
                return pub.errors, status

        errors, status = asyncio.run(once_more())
        assert len(errors) == 1 and "duplicate exec_id 'EX-1' (journaled at seq 1)" in errors[0].reason
        assert status.bad_messages.get("duplicate_exec_id") == 1
    finally:
        tp.stop()
    assert journaled(tmp_path, "fill").column("exec_id").to_pylist() == ["EX-1", "EX-2"]


def test_old_publishers_without_pub_still_work(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            from websockets.asyncio.client import connect

            async with connect(url, **with_token("publisher")) as ws:
                m = wire.Upd(table="trade", cols=msgspec.Raw(wire.encode(trades(2))), id=1)
                await ws.send(wire.encode([m, m]))
                got = DECODE.decode(await asyncio.wait_for(ws.recv(), 5))
            return got, srv.core.rows["trade"]

    got, rows = run(body())
    assert isinstance(got, wire.Ack) and got.seq == 4 and rows == 4  # no pub: no resend check
