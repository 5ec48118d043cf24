"""`marginflow backtest` and `marginflow demo-history`: a backtest of a journal equals the live calc
service's margin rows for it; demo journals and CCP calls checked against independent numbers (scipy,
the price file read directly); the end-to-end report; bad inputs become report lines, not crashes."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from scipy.stats import norm

from marginflow import config
from replay import backtest, demo_history
from schemas.tables import TABLES
from tests.replay.conftest import DEMO_DAYS, DEMO_TICKS
from tests.support import PRICES_FILE, ROOT
from tests.support.servers import running_calc, running_tp
from tickerplant import journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher

ACCOUNTS = ("TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06")
SYMS = ("AAPL", "KO", "XOM", "JNJ", "MSFT", "JPM", "HD", "LLY")
BASE = {
    "AAPL": 129.0,
    "KO": 62.0,
    "XOM": 108.0,
    "JNJ": 175.0,
    "MSFT": 236.0,
    "JPM": 130.0,
    "HD": 312.0,
    "LLY": 363.0,
}
DAYS, TICKS = DEMO_DAYS, DEMO_TICKS  # the demo fixture's size (tests/replay/conftest.py)


def cfg():
    return config.load()


def prices_csv() -> tuple[list[str], np.ndarray, list[str]]:
    """The price file read directly with pyarrow (not through calc.history): dates, closes, syms."""
    t = pacsv.read_csv(PRICES_FILE)
    syms = t.column_names[1:]
    dates = [str(d) for d in t.column(0).to_pylist()]
    return dates, np.column_stack([t.column(s).to_numpy() for s in syms]), syms


# ---------------------------------------------------------------------- backtest == live service
def _fills(n: int, k: int) -> dict:
    acc = [ACCOUNTS[(k + i) % 6] if (k + i) % 17 else "NOPE" for i in range(n)]  # every 17th: unknown account
    return {
        "account": acc,
        "sym": [SYMS[(k + 3 * i) % 8] for i in range(n)],
        "side": ["B" if (k + i) % 3 else "S" for i in range(n)],
        "qty": [50.0 * (1 + (k + i) % 4) for i in range(n)],
        "price": [BASE[SYMS[(k + 3 * i) % 8]] for i in range(n)],
        "order_id": [f"O{k}-{i}" for i in range(n)],
        "exec_id": [f"E{k}-{i}" for i in range(n)],
    }


def _trades(n: int, k: int) -> dict:
    s = [SYMS[(k + i) % 8] for i in range(n)]
    return {
        "sym": s,
        "price": [BASE[x] * (1 + 0.02 * math.sin(k + i)) for i, x in enumerate(s)],
        "size": [100] * n,
    }


def _quotes(n: int, k: int) -> dict:
    s = [SYMS[(k + 2 * i) % 8] for i in range(n)]
    mid = [BASE[x] * (1 + 0.015 * math.cos(k * 7 + i)) for i, x in enumerate(s)]
    return {
        "sym": s,
        "bid": [m - 0.05 for m in mid],
        "ask": [m + 0.05 for m in mid],
        "bid_size": [100] * n,
        "ask_size": [100] * n,
    }


def test_backtest_equals_the_live_services_margin_rows(tmp_path, run):
    """calc (publish_interval_ms = 0) publishes margin rows into the tickerplant's journal; the backtest
    of the same journal gives the same margin for each account at each row's last_seq, and the same
    final margins."""

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            async with running_calc(srv.port, tmp_path) as calc:
                async with asyncio.timeout(20):
                    while not calc.live:  # subscribed: every row from here on is a live batch
                        await asyncio.sleep(0.01)
                async with Publisher(url) as pub:
                    for k in range(16):
                        items = [("trade", _trades(5, k)), ("fill", _fills(3, k))]
                        if k % 3 == 0:
                            items.append(("quote", _quotes(4, k)))
                        await pub.upd_many(items)
                        if k % 4 == 0:
                            await asyncio.sleep(0.01)  # some flushes hold several messages, some one
                    last = await pub.wait_acked()
                async with asyncio.timeout(20):
                    while calc.engine.last_seq < last or calc.dirty:
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # the last margin rows reach the journal
            return srv.core.date, last

    date, last = run(body())
    live = reader.read_table(tmp_path, date, "margin").drop_columns(["time"]).to_pylist()
    assert len(live) > 6 * 3, "calc published too few rows for the test to mean anything"
    rp = backtest.replay(tmp_path, cfg().calc)
    assert rp.dates == [date] and rp.params == ["history:sp500_20_daily_1990_2022.csv.gz:2022-12-28"]
    # each live row against the backtest's margin standing for that account at the row's last_seq
    path: dict[str, list[tuple[int, float]]] = {}
    for a, q, m in zip(rp.rows["account"], rp.rows["last_seq"], rp.rows["margin"], strict=True):
        path.setdefault(a, []).append((q, m))
    for r in live:
        steps = path[r["account"]]
        k = int(np.searchsorted([q for q, _ in steps], r["last_seq"], side="right")) - 1
        assert k >= 0 and steps[k][1] == pytest.approx(r["margin"], rel=1e-9, abs=1e-9), r
    # calc publishes once the batches it has received are applied (several at once when it lags), so
    # every live row stands at the end of a journal batch; both end on the same margins at the last row
    files = journal.day_files(tmp_path, date)
    batch_ends = {
        b.column("seq")[-1].as_py()
        for _, b in reader.read_files({t: files[t] for t in ("trade", "fill", "quote")})
    }
    assert {r["last_seq"] for r in live} <= batch_ends | {0}  # 0: the rows calc publishes on going live
    final_live = {r["account"]: r["margin"] for r in live}
    final_backtest = dict(zip(rp.rows["account"], rp.rows["margin"], strict=True))
    assert final_live == pytest.approx(final_backtest, rel=1e-9)
    assert max(batch_ends) == last == max(r["last_seq"] for r in live)
    assert rp.rejected == sum(1 for k in range(16) for i in range(3) if (k + i) % 17 == 0)
    assert any("rejected by the engine" in i and "unknown account 'NOPE'" in i for i in rp.issues)


# ---------------------------------------------------------------------------------- demo history
def _journal_rows(root: Path, table: str) -> list[dict]:
    rows = []
    for d in journal.journal_dates(root):
        t = reader.read_table(root, d, table).drop_columns(["time"])
        rows += [dict(r, date=d) for r in t.to_pylist()]
    return rows


def test_demo_history_journals_are_real_journals_on_real_closes(demo):
    root = demo / "journal"
    dates, closes, syms = prices_csv()
    days = journal.journal_dates(root)
    assert days == dates[-DAYS:]  # the file's last N trading days
    seqs = []
    for d in days:
        files = journal.day_files(root, d)
        assert set(files) == {"trade", "fill", "call"}
        for p in files.values():
            s = journal.scan(p)
            assert s.closed and not s.error
        for _table, batch in reader.read_files(files):
            seqs += batch.column("seq").to_pylist()
            day = batch.column("time").cast("int64").to_numpy() // 86_400_000_000_000
            assert (day == np.datetime64(d, "D").astype(np.int64)).all()
    assert seqs == list(range(1, len(seqs) + 1))  # one global seq, in order, no gaps
    trades = _journal_rows(root, "trade")
    assert len(trades) == DAYS * TICKS * len(syms)
    for d in days:
        t = dates.index(d)
        last = {}
        for r in trades:
            if r["date"] == d:
                last[r["sym"]] = r["price"]
        assert last == dict(zip(syms, closes[t].tolist(), strict=True)), d  # each day ends on the real close
    fills = _journal_rows(root, "fill")
    assert len(fills) == DAYS * 4 * len(ACCOUNTS) and {f["account"] for f in fills} == set(ACCOUNTS)
    assert len({f["exec_id"] for f in fills}) == len(fills)


def _positions_at_end_of(root: Path, upto: str) -> dict[tuple[str, str], float]:
    pos: dict[tuple[str, str], float] = {}
    with open(ROOT / "data/demo/positions.csv") as f:
        for r in csv.DictReader(f):
            pos[(r["account"], r["sym"])] = pos.get((r["account"], r["sym"]), 0.0) + float(r["qty"])
    for r in _journal_rows(root, "fill"):
        if r["date"] <= upto:
            k = (r["account"], r["sym"])
            pos[k] = pos.get(k, 0.0) + (r["qty"] if r["side"] == "B" else -r["qty"])
    return pos


def test_demo_ccp_calls_match_an_independent_calculation(demo):
    """TECH01 (parametric VaR) and DIV02 (historical VaR) at the last day's end-of-day cycle, from
    positions.csv plus the journaled fills, the price file read directly, scipy's normal quantile, 500
    returns to the date; then the demo CCP's rules by hand (replay/demo_ccp.py): the margin-rate steps in
    force, the ten-year APC floor, the concentration add-on above $2m a sym, rounded up to 1,000."""
    root = demo / "journal"
    dates, closes, syms = prices_csv()
    d = journal.journal_dates(root)[-1]
    t = dates.index(d)
    pos = _positions_at_end_of(root, d)
    r = np.diff(np.log(closes[t - 500 : t + 1]), axis=0)
    r10 = np.diff(np.log(closes[t - 2520 : t + 1]), axis=0)
    with open(demo / "actual_calls.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == DAYS * len(ACCOUNTS) * 3  # ITD1, ITD2, EOD
    calls = {(row["date"], row["account"]): row for row in rows if row["cycle"] == "EOD"}
    assert len(calls) == DAYS * len(ACCOUNTS)
    assert {row["ccp"] for row in rows} == {"DEMO-CCP"}
    assert {(row["cycle"], row["time"]) for row in rows if row["date"] == d} == {
        ("ITD1", "16:20:00"),  # 11:00 New York (EST) + the 20 min report delay, UTC
        ("ITD2", "19:20:00"),
        ("EOD", "23:20:00"),
    }
    rate = 1.12 * 0.90 * 1.15  # every step is in force on the last day
    x = {
        a: np.array([pos.get((a, s), 0.0) * closes[t, j] for j, s in enumerate(syms)])
        for a in ("TECH01", "DIV02")
    }

    def rules(a, base):
        floor = norm.ppf(0.99) * math.sqrt(x[a] @ np.cov(r10.T) @ x[a])
        addon = 0.03 * sum(max(abs(v) - 2e6, 0.0) for v in x[a])
        return math.ceil((max(rate * base, floor) + addon) / 1000) * 1000

    var = norm.ppf(0.99) * math.sqrt(x["TECH01"] @ np.cov(r.T) @ x["TECH01"])
    assert float(calls[(d, "TECH01")]["amount"]) == rules("TECH01", var)
    losses = np.sort(-(np.expm1(r) @ x["DIV02"]))
    h = 0.99 * (len(losses) - 1)  # the interpolated 99% quantile, by hand
    q = losses[int(h)] + (h - int(h)) * (losses[int(h) + 1] - losses[int(h)])
    assert float(calls[(d, "DIV02")]["amount"]) == rules("DIV02", q)
    for row in rows:  # the call: requirement - collateral held, none below the 10,000 minimum transfer
        diff = float(row["requirement"]) - float(row["collateral"])
        assert float(row["call"]) == (0.0 if abs(diff) < 10_000 else diff)
    jrows = _journal_rows(root, "call")
    assert [(r_["business_date"], r_["cycle"], r_["account"], r_["requirement"]) for r_ in jrows] == [
        (row["date"], row["cycle"], row["account"], float(row["requirement"])) for row in rows
    ]


def test_end_to_end_report(demo, tmp_path, capsys):
    out = tmp_path / "report"
    code = backtest.main(
        [
            "--journal",
            str(demo / "journal"),
            "--actual",
            str(demo / "actual_calls.csv"),
            "--out",
            str(out),
            "--progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "events/s" in captured.err  # the progress line
    assert "TECH01" in captured.out and any(z in captured.out for z in ("green", "yellow", "red"))
    rep = json.loads((out / "backtest.json").read_text())
    html = (out / "backtest.html").read_text()
    assert html.count("<svg") >= 3 and "<script" not in html
    acc = rep["accuracy"]
    assert acc["overall"]["calls"] == DAYS * len(ACCOUNTS)
    for k in ("mae", "mape_pct", "bias", "rmse", "hit_rate", "lead_time_median_s"):
        assert acc["overall"][k] is not None, k
    # the demo CCP is not the replica (its floor, add-on and rate steps): the end-of-day error is real
    assert 1 < acc["overall"]["mape_pct"] < 40
    fc = rep["forecast"]
    for h in ("next", "eod"):
        assert set(fc["comparison"]["horizons"][h]) == {"forecast", "replica", "replica_band", "persistence"}
    assert ("did NOT beat" in html) != fc["comparison"]["beats_replica"]
    assert html.index("<h2>Headline</h2>") < html.index("<h2>Forecast of the call") < html.index("<details")
    assert "Error by lead time" in html and "Forecast band vs actual calls" in html
    cov = rep["coverage"]
    assert cov["p"] == pytest.approx(0.01)
    for a in ACCOUNTS:
        s = cov["accounts"][a]
        assert s["days"] == DAYS
        assert s["traffic_light"]["zone"] in ("green", "yellow", "red")
        for test in ("kupiec", "independence", "conditional_coverage"):
            assert 0 <= s[test]["p_value"] <= 1
    assert cov["pooled"]["days"] == DAYS * len(ACCOUNTS)
    # trade ticks, fills, and the demo CCP's call rows (3 cycles a day per account) the engine replays too
    assert (
        rep["meta"]["events"] == DAYS * (TICKS * 20 + 24 + 3 * len(ACCOUNTS))
        and rep["meta"]["events_per_s"] > 0
    )
    assert (out / "predicted_margin.parquet").exists()

    # coverage inputs against an independent calculation: day 2 of TECH01
    dates, closes, syms = prices_csv()
    days = journal.journal_dates(demo / "journal")
    t = dates.index(days[1])
    pos = _positions_at_end_of(demo / "journal", days[0])  # the start-of-day portfolio of day 2
    q = np.array([pos.get(("TECH01", s), 0.0) for s in syms])
    daily = cov["daily"]["TECH01"]
    assert daily["date"][1] == days[1]
    assert daily["pnl"][1] == pytest.approx(float(q @ (closes[t] - closes[t - 1])), rel=1e-9)
    r = np.diff(
        np.log(closes[t - 505 : t]), axis=0
    )  # the parameters in force: 504 returns to the previous close
    x = q * closes[t - 1]
    assert daily["var"][1] == pytest.approx(norm.ppf(0.99) * math.sqrt(x @ np.cov(r.T) @ x), rel=1e-9)


def test_conflated_replay_publishes_less_and_ends_each_day_on_the_same_margins(demo):
    calc = cfg().calc
    every = backtest.replay(demo / "journal", calc)
    hourly = backtest.replay(demo / "journal", calc, publish_ms=3_600_000)
    assert 0 < len(hourly.rows["account"]) < len(every.rows["account"]) / 3
    assert hourly.events == every.events and hourly.batches == every.batches

    def last(rp):
        return {
            (d, a): (t, m)
            for d, a, t, m in zip(
                rp.rows["date"], rp.rows["account"], rp.rows["time"], rp.rows["margin"], strict=True
            )
        }

    e, h = last(every), last(hourly)
    assert e.keys() == h.keys()
    for k, (t, m) in e.items():
        assert h[k][0] == t and h[k][1] == pytest.approx(m, rel=1e-9), k
    windows = [
        (d, a, t // 3_600_000_000_000)
        for d, a, t in zip(hourly.rows["date"], hourly.rows["account"], hourly.rows["time"], strict=True)
    ]
    assert len(windows) == len(set(windows))  # at most one row per account per hour of journal time
    assert set(hourly.rows["time"]) <= set(every.rows["time"])  # stamped with the window's last event


def test_param_events_and_config_params(demo, tmp_path):
    """A journaled param event is replayed as calc does (calc.params.apply_param: a file that is not in
    the store is reported and the old parameters stay in force, noted in the report);
    --params config uses the configured history for every day, as the live service loads it."""
    root = tmp_path / "journal"
    shutil.copytree(demo / "journal", root)
    days = journal.journal_dates(root)
    last_seq = journal.scan(journal.table_path(root, days[-1], "trade")).last_seq
    schema = TABLES["param"].arrow_schema
    row = pa.record_batch(
        {
            "time": pa.array([np.datetime64(f"{days[-1]}T21:30", "ns")], pa.timestamp("ns")),
            "seq": [last_seq + 1],
            "kind": ["history"],
            "file_id": ["prices-2022-12-28"],
            "content_hash": ["ab" * 32],
            "source": ["data/prices"],
        },
        schema=schema,
    )
    f = journal.JournalFile(journal.table_path(root, days[-1], "param"), schema)
    f.append(row.serialize())
    f.close()
    rp = backtest.replay(root, cfg().calc)
    assert rp.param_events == [f"{days[-1]} history prices-2022-12-28"]
    assert rp.rows["last_seq"][-1] <= last_seq + 1
    assert len(rp.issues) == 1 and "not applied" in rp.issues[0] and "not stored" in rp.issues[0]
    assert len(rp.params) == DAYS  # asof: a new history window each date
    conf = backtest.replay(root, cfg().calc, params="config")
    assert conf.params == ["history:sp500_20_daily_1990_2022.csv.gz:2022-12-28"]


# ------------------------------------------------------------------------------------ bad input
def test_bad_actual_calls_lines_are_reported(demo, tmp_path, capsys):
    days = journal.journal_dates(demo / "journal")
    bad = tmp_path / "calls.csv"
    bad.write_text(
        "date,account,amount\n"
        f"{days[0]},TECH01,230000\n"
        f"{days[0]},GHOST,1000\n"
        f"1999-01-04,TECH01,1000\n"
        f"{days[1]},DIV02,lots\n"
        f",DIV02,1000\n"
        f"{days[1]},MN05,-5\n"
    )
    out = tmp_path / "r"
    code = backtest.main(["--journal", str(demo / "journal"), "--actual", str(bad), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    issues = json.loads((out / "backtest.json").read_text())["issues"]
    for needle in (
        "account 'GHOST' is not in the backtest: 1 call(s) skipped (line 3)",
        "date 1999-01-04 is not in the backtest",
        "line 5: row skipped: amount",
        "line 6: row skipped: date is missing",
        "line 7: row skipped: amount",
    ):
        assert any(needle in i for i in issues), needle
        assert needle in text, needle
    assert json.loads((out / "backtest.json").read_text())["accuracy"]["overall"]["calls"] == 1
    missing = backtest.main(
        [
            "--journal",
            str(demo / "journal"),
            "--actual",
            str(tmp_path / "nope.csv"),
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert missing == 0 and "file not found" in capsys.readouterr().out


def test_torn_journal_and_foreign_table_are_report_lines(demo, tmp_path, capsys):
    root = tmp_path / "journal"
    shutil.copytree(demo / "journal", root)
    last = journal.journal_dates(root)[-1]
    p = journal.table_path(root, last, "trade")
    p.write_bytes(p.read_bytes()[:-300])  # a crash mid-write
    (journal.day_dir(root, last) / "orders.arrows").write_bytes(b"")
    code = backtest.main(["--journal", str(root), "--out", str(tmp_path / "r")])
    text = capsys.readouterr().out
    assert code == 0
    assert f"{last}: trade.arrows: torn message" in text
    assert "table 'orders' is not an input of calc" in text


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--journal", "/nonexistent/journal"], "is not a folder"),
        (["--from", "2022-13-01"], "--from: '2022-13-01' is not a date"),
        (["--from", "2022-12-28", "--to", "2022-12-01"], "is after --to"),
        (["--from", "2030-01-01"], "no journal dates in 2030-01-01"),
        (["--tolerance", "2"], "--tolerance"),
        (["--publish-ms", "-1"], "--publish-ms: must be a number >= 0"),
    ],
)
def test_bad_backtest_arguments(demo, tmp_path, capsys, args, needle):
    if "--journal" not in args:
        args = ["--journal", str(demo / "journal"), *args]
    assert backtest.main([*args, "--out", str(tmp_path / "r")]) == 2
    assert needle in capsys.readouterr().err


def test_bad_demo_history_arguments(demo, tmp_path, capsys):
    assert demo_history.main(["--days", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--days: must be >= 1" in capsys.readouterr().err
    assert demo_history.main(["--days", "3", "--end-date", "1991-06-01", "--out", str(tmp_path / "b")]) == 2
    assert "earlier days of history" in capsys.readouterr().err
    assert demo_history.main(["--days", "3", "--end-date", "2022-02-30", "--out", str(tmp_path / "c")]) == 2
    assert "--end-date: '2022-02-30' is not a date" in capsys.readouterr().err
    assert (
        demo_history.main(["--days", "2", "--ticks", "2", "--out", str(demo)]) == 2
    )  # journals already there
    assert "pass --force" in capsys.readouterr().err
