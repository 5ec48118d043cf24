"""SPAN in the streaming engine: accounts on model `span` beside VaR accounts, fills applied incrementally,
per-contract drivers adding up to the margin, `marginflow params load` (refusal, storage, param event),
calc reloading every SPAN account, and a journal replay reproducing the same margins.

Every expected number comes from the pure-Python ReferenceSpan (calc/span/reference.py), a second
implementation that shares no code with the book and kernels, run on the positions the test tracks."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest

from calc import params as paramfiles
from calc.engine import MarginEngine
from calc.events import apply_batch
from calc.history import InputError
from calc.inputs import AccountSpec, Positions, params_from_config
from calc.span import SpanBook, SpanModel, SpanPositionError, format_key, load_span_file, param_id, parse_key
from calc.span.reference import ReferenceSpan
from marginflow import config
from tests.support import SPAN_FILE, until
from tests.support.servers import running_tp, running_tp_and_calc
from tickerplant import journal
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher

SPN = SPAN_FILE
CALC = config.load().calc
START = {  # a derivatives account: calendar spread, short puts, long calls, bank futures (inter), FX
    "BIST/XU030/FUT/201606S0": 40.0,
    "BIST/XU030/FUT/201608S0": -15.0,
    "BIST/XU030/OOP/201606S0/P/92.0": -30.0,
    "BIST/XU030/OOP/201606S0/C/100.0": 50.0,
    "BIST/GARANE/FUT/201606S0": 200.0,
    "BIST/AKBNKE/FUT/201606S0": -150.0,
    "BIST/TRYUSD/FUT/201606S0": -30.0,
}
# fills (account, sym, signed qty): more of a held contract, a contract never held, a flattened one,
# an option on another underlying, an inter-commodity leg
FILLS = [
    [("S1", "BIST/XU030/FUT/201606S0", 10.0), ("S2", "BIST/ISCTRE/FUT/201606S0", -80.0)],
    [("S1", "BIST/XU030/FUT/201610S0", -20.0), ("S1", "BIST/GARANE/FUT/201606S0", -200.0)],
    [
        ("S1", "BIST/AKBNKE/OOP/201606S0/C/6.25", -40.0),
        ("S2", "BIST/YKBNKE/FUT/201606S0", 60.0),
        ("S1", "BIST/XU030/FUT/201606S0", -5.0),
    ],
]


@pytest.fixture(scope="module")
def risk():
    return params_from_config(CALC)


def reference_total(params, positions: dict[str, float]) -> float:
    return sum(
        ReferenceSpan(params).margin({parse_key(s): q for s, q in positions.items()})["total"].values()
    )


def make_engine(risk, span_file: Path = SPN, params_dir: Path | None = None) -> MarginEngine:
    calc = (
        CALC
        if params_dir is None
        else msgspec_replace(CALC, params_dir=str(params_dir), span_file=str(span_file))
    )
    specs = [
        AccountSpec("S1", "span", 150_000.0),
        AccountSpec("S2", "span", 50_000.0),
        AccountSpec("V", "var", 1e6),
    ]
    pos = Positions(["S1"] * len(START) + ["V"], [*START, "AAPL"], np.array([*START.values(), 1000.0]))
    return MarginEngine(risk, specs, pos, prices={"AAPL": 130.0}, calc_config=calc)


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


def fill_columns(rows, seq0: int) -> tuple:
    acc, sym, dq = zip(*rows, strict=True)
    side = ["B" if q > 0 else "S" for q in dq]
    return (
        list(acc),
        list(sym),
        side,
        np.abs(np.array(dq)),
        np.full(len(rows), 1.0),
        np.arange(seq0, seq0 + len(rows)),
    )


def modified_copy(dst: Path, factor: float = 1.5) -> Path:
    """The Takasbank file with the risk array of the GARANE June 2016 future scaled by `factor`."""
    text = SPN.read_text()
    i = text.index("<name>GARAN FUTURES</name>")
    j = text.index("<pe>201606S0</pe>", i)
    k0, k1 = text.index("<ra>", j), text.index("</ra>", j)
    ra = re.sub(r"<a>(-?[0-9.]+)</a>", lambda m: f"<a>{float(m.group(1)) * factor:.6f}</a>", text[k0:k1])
    dst.write_text(text[:k0] + ra + text[k1:])
    return dst


def without_contract(dst: Path, pf_name: str, pe: str) -> Path:
    """The Takasbank file without one futures contract (its whole <fut> element)."""
    text = SPN.read_text()
    i = text.index(f"<name>{pf_name}</name>")
    j = text.index(f"<pe>{pe}</pe>", i)
    f0, f1 = text.rindex("<fut>", i, j), text.index("</fut>", j) + len("</fut>")
    dst.write_text(text[:f0] + text[f1:])
    return dst


# ---------------------------------------------------------------- the engine


def test_span_account_margin_drivers_and_param_id(params, risk):
    eng = make_engine(risk)
    rows = eng.changed_rows()
    by = {a: i for i, a in enumerate(rows["account"])}
    s1 = by["S1"]
    expected = reference_total(params, START)
    assert rows["model"][s1] == "span"
    assert rows["margin"][s1] == pytest.approx(expected, rel=1e-9)
    assert rows["var"][s1] == rows["margin"][s1] and rows["es"][s1] == 0.0
    assert rows["param_id"][s1] == f"span:TAKASBANK-20160517-final:{params.sha256[:12]}"
    assert rows["param_id"][by["V"]].startswith("history:")  # the VaR account keeps its own parameters
    assert rows["margin"][by["S2"]] == 0.0 and rows["drivers"][by["S2"]] == "[]"
    drivers = json.loads(rows["drivers"][s1])
    assert sum(d["contribution"] for d in drivers) == pytest.approx(expected, rel=1e-9)
    # exposure = qty x settlement price x contract value factor, read from the file
    top = {d["sym"]: d for d in drivers}
    fut = params.index[parse_key("BIST/XU030/FUT/201606S0")]
    assert top["BIST/XU030/FUT/201606S0"]["exposure"] == pytest.approx(
        40 * params.c_price[fut] * params.c_cvf[fut]
    )
    # a lone outright future: its contribution is the whole CC requirement = qty x its worst loss
    garan = params.index[parse_key("BIST/GARANE/FUT/201606S0")]
    assert top["BIST/GARANE/FUT/201606S0"]["contribution"] == pytest.approx(200 * params.c_ra[garan].max())


def test_fills_update_span_accounts_incrementally(params, risk):
    eng = make_engine(risk)
    eng.changed_rows()
    model: SpanModel = eng.external["span"]
    held = {"S1": dict(START), "S2": {}}
    seq = 1
    for batch in FILLS:
        assert eng.apply_fills(*fill_columns(batch, seq)) == len(batch)
        seq += len(batch)
        for a, s, q in batch:
            held[a][s] = held[a].get(s, 0.0) + q
        rows = eng.changed_rows()
        assert set(rows["account"]) == {a for a, _, _ in batch}  # the VaR account did not move
        for i, a in enumerate(rows["account"]):
            assert rows["margin"][i] == pytest.approx(reference_total(params, held[a]), rel=1e-9), (a, batch)
            drivers = json.loads(rows["drivers"][i])
            assert sum(d["contribution"] for d in drivers) == pytest.approx(rows["margin"][i], rel=1e-9)
    # the book holds exactly the engine's positions (flattened GARANE gone), nothing else
    assert {format_key(k): q for k, q in model.book.positions("S1").items()} == {
        s: q for s, q in held["S1"].items() if q != 0
    }
    # the incremental numbers equal the stateless full path (a fresh book per account)
    full = eng.compute_full()
    np.testing.assert_allclose(full["margin"], eng.margin, rtol=1e-9)
    # a tick on a held contract moves its exposure, not the SPAN margin (risk arrays come from the file)
    before = float(eng.margin[eng.acc_index["S1"]])
    eng.apply_prices(["BIST/XU030/FUT/201606S0"], np.array([99.0]), np.array([seq]))
    eng.refresh()
    assert float(eng.margin[eng.acc_index["S1"]]) == before


def test_span_fills_the_file_does_not_have_are_rejected(risk):
    eng = make_engine(risk)
    eng.changed_rows()
    bad = [
        ("S1", "AAPL", 5.0),  # an equity: not a contract of the SPAN file
        ("S1", "BIST/XU030/OOP/201606S0/P/92", -1.0),  # not the canonical spelling (92.0)
        ("S1", "BIST/XU030/FUT/202001S0", 1.0),  # no such period
        ("V", "BIST/XU030/FUT/201606S0", 1.0),
    ]  # a VaR account cannot hold a SPAN contract
    assert eng.apply_fills(*fill_columns(bad, 1)) == 0
    assert eng.rejected == 4
    reasons = list(eng.rejects)
    assert "unknown sym 'AAPL' (not an instrument of model 'span')" in reasons[0]
    assert "'BIST/XU030/OOP/201606S0/P/92' (not an instrument of model 'span')" in reasons[1]
    assert "'BIST/XU030/FUT/202001S0'" in reasons[2]
    assert "no risk parameters for sym 'BIST/XU030/FUT/201606S0' (account 'V' model var)" in reasons[3]
    assert eng.changed_rows()["account"] == []
    with pytest.raises(InputError, match="unknown sym 'AAPL'"):
        eng.what_if("S1", [{"sym": "AAPL", "qty": 1}])
    with pytest.raises(InputError, match=r"positions: account 'S1': unknown sym 'BIST/NOPE/FUT/201606S0'"):
        MarginEngine(
            risk,
            [AccountSpec("S1", "span", 1.0)],
            Positions(["S1"], ["BIST/NOPE/FUT/201606S0"], np.array([1.0])),
            calc_config=CALC,
        )


def test_what_if_on_a_span_account_leaves_it_unchanged(params, risk):
    eng = make_engine(risk)
    eng.changed_rows()
    trade = {"BIST/XU030/OOP/201606S0/C/94.0": -25.0, "BIST/XU030/FUT/201606S0": -40.0}
    r = eng.what_if("S1", [{"sym": s, "qty": q} for s, q in trade.items()])
    after = dict(START)
    for s, q in trade.items():
        after[s] = after.get(s, 0.0) + q
    assert r["margin_before"] == pytest.approx(reference_total(params, START), rel=1e-9)
    assert r["margin_after"] == pytest.approx(reference_total(params, after), rel=1e-9)
    assert sum(d["contribution"] for d in r["drivers_after"]) == pytest.approx(r["margin_after"], rel=1e-9)
    assert eng.changed_rows()["account"] == []
    assert float(eng.margin[eng.acc_index["S1"]]) == pytest.approx(reference_total(params, START), rel=1e-9)


def test_contributions_add_up_on_random_portfolios(params):
    """Random portfolios over futures and options of inter-linked CCs: per-contract contributions sum to
    the total; when SOM binds only short options carry the requirement; long options subtract their value."""
    rng = np.random.default_rng(5)
    ccs = {"AKBNKE", "GARANE", "ISCTRE", "XU030", "TRYUSD", "EREGLE"}
    universe = [k for k, key in enumerate(params.keys) if key[1] in ccs and key[2] in ("FUT", "OOP")]
    book = SpanBook(params)
    ref = ReferenceSpan(params)
    for n in range(40):
        rows = rng.choice(universe, size=int(rng.integers(1, 9)), replace=False)
        pos = {params.keys[k]: float(rng.integers(-50, 51) or 1) for k in rows}
        book.set_positions({"a": pos})
        held, amount = book.contributions("a")
        total = sum(ref.margin(pos)["total"].values())
        assert amount.sum() == pytest.approx(total, rel=1e-9, abs=1e-6), n
        assert sorted(held.tolist()) == sorted(rows.tolist())
    # short options only (far out of the money, GROSS method): SOM = rate x short contracts binds and is
    # shared in proportion to each option's SOM; each short option adds back its (negative) option value
    short = {
        ("BIST", "EREGLE", "OOP", "201605S0", "P", 3.0): -10.0,
        ("BIST", "EREGLE", "OOP", "201605S0", "C", 5.75): -30.0,
        ("BIST", "EREGLE", "OOP", "201605S0", "C", 6.0): -5.0,
    }
    book.set_positions({"a": short})
    (m,) = book.margin("a")[0].ccs
    assert m.som == 10 * 10 + 30 * 10 + 5 * 10 and m.som > m.scan  # som_rate 10 each (from the file)
    held, amount = book.contributions("a")
    got = {params.keys[k]: c for k, c in zip(held.tolist(), amount.tolist(), strict=True)}
    assert got == pytest.approx(
        {key: -q * 10 - q * params.c_value[params.index[key]] for key, q in short.items()}
    )
    # long calls with a long future: loss in the active scenario each, minus the calls' premium value
    long = {
        ("BIST", "XU030", "OOP", "201606S0", "C", 96.0): 7.0,
        ("BIST", "XU030", "OOP", "201606S0", "C", 98.0): 7.0,
        ("BIST", "XU030", "FUT", "201606S0", "", None): 3.0,
    }
    book.set_positions({"a": long})
    (m,) = book.margin("a")[0].ccs
    assert m.intra == m.inter == m.spot == m.som == 0.0 and book.margin("a")[0].total > 0
    held, amount = book.contributions("a")
    got = {params.keys[k]: c for k, c in zip(held.tolist(), amount.tolist(), strict=True)}
    ra = {key: params.c_ra[params.index[key], m.active_scenario - 1] for key in long}
    assert got == pytest.approx(
        {key: q * ra[key] - q * params.c_value[params.index[key]] for key, q in long.items()}
    )
    # long options alone: NOV exceeds the requirement, the total is floored at 0 and so is every share
    book.set_positions({"a": {key: q for key, q in long.items() if key[2] == "OOP"}})
    assert book.margin("a")[0].total == 0.0 and not book.contributions("a")[1].any()


def test_new_span_file_reloads_every_account_or_keeps_the_old_one(tmp_path, params, risk):
    store_dir = tmp_path / "params"
    eng = make_engine(risk, params_dir=store_dir)
    eng.changed_rows()
    old_pid = eng.external["span"].param_id
    # a copy with one risk array scaled: parse it to confirm the change is in the file
    row = paramfiles.store(modified_copy(tmp_path / "garan.spn"), "span", store_dir)
    new = load_span_file(paramfiles.find_stored(store_dir, row["content_hash"]))
    g = params.index[parse_key("BIST/GARANE/FUT/201606S0")]
    np.testing.assert_allclose(new.c_ra[g], 1.5 * params.c_ra[g], atol=1e-5)
    assert np.array_equal(np.delete(new.c_ra, g, 0), np.delete(params.c_ra, g, 0))
    assert row["file_id"] == params.file_id and row["content_hash"] == new.sha256 != params.sha256
    assert paramfiles.apply_param(eng, row, eng_calc(store_dir)).startswith("span file span:TAKASBANK")
    rows = eng.changed_rows()
    assert sorted(rows["account"]) == ["S1", "S2"]  # both SPAN accounts republish, the VaR one does not
    s1 = rows["account"].index("S1")
    assert rows["margin"][s1] == pytest.approx(reference_total(new, START), rel=1e-9)
    assert rows["margin"][s1] > reference_total(params, START)
    assert rows["param_id"][s1] == param_id(new) != old_pid
    # a file without a contract S1 holds is refused as a whole: the previous file stays in force
    row2 = paramfiles.store(
        without_contract(tmp_path / "nogaran.spn", "GARAN FUTURES", "201606S0"), "span", store_dir
    )
    with pytest.raises(SpanPositionError, match="GARANE/FUT/201606S0"):
        paramfiles.apply_param(eng, row2, eng_calc(store_dir))
    assert eng.external["span"].param_id == param_id(new)
    assert eng.changed_rows()["account"] == []
    # a hash nobody stored
    with pytest.raises(InputError, match="not stored in"):
        paramfiles.apply_param(eng, dict(row, content_hash="0" * 64), eng_calc(store_dir))


def eng_calc(store_dir: Path):
    return msgspec_replace(CALC, params_dir=str(store_dir))


def test_covariance_param_event_moves_the_var_accounts_only(tmp_path, risk):
    """kind covariance through the same path: the VaR account is z x |exposure| x sd under the new file,
    the SPAN accounts keep their SPAN file."""
    from scipy.stats import norm

    from calc.history import write_covariance

    store_dir = tmp_path / "params"
    eng = make_engine(risk)
    eng.changed_rows()
    syms = list(risk.syms)
    cov = np.diag(np.full(len(syms), 0.02**2))
    write_covariance(tmp_path / "ccp_cov.csv", syms, cov)
    row = paramfiles.store(tmp_path / "ccp_cov.csv", "covariance", store_dir)
    assert (store_dir / f"{row['content_hash']}.csv").is_file()
    assert paramfiles.apply_param(eng, dict(row, seq=77), eng_calc(store_dir)).startswith(
        "covariance file covariance:"
    )
    rows = eng.changed_rows()
    v = rows["account"].index("V")
    assert rows["margin"][v] == pytest.approx(norm.ppf(0.99) * 1000 * 130.0 * 0.02, rel=1e-9)
    assert rows["param_id"][v] == f"covariance:{row['file_id']}:{row['content_hash'][:12]}"
    assert rows["last_seq"][v] == 77  # the row says which event it includes
    assert rows["param_id"][rows["account"].index("S1")] == param_id(eng.external["span"].params)
    bad = tmp_path / "bad_cov.csv"
    write_covariance(bad, syms[:2], np.array([[1e-4, 2e-5], [3e-5, 1e-4]]))  # not symmetric
    with pytest.raises(InputError, match="symmetric"):
        paramfiles.store(bad, "covariance", store_dir)
    assert sorted(p.name for p in store_dir.iterdir()) == [f"{row['content_hash']}.csv"]


# ---------------------------------------------------------------- marginflow params load


def test_params_load_refuses_a_malformed_file_and_journals_nothing(tmp_path, run, capsys):
    data = SPN.read_bytes()
    bad = tmp_path / "bad.spn"
    bad.write_bytes(data.replace(b"<a>-29.999969</a>", b"<a>abc</a>", 1))
    truncated = tmp_path / "cut.spn"
    truncated.write_bytes(data[: len(data) // 2])
    store_dir = tmp_path / "params"

    async def body():
        async with running_tp(tmp_path / "journal") as (srv, url):
            codes = [
                await asyncio.to_thread(
                    paramfiles.main, ["load", str(f), "--tp", url, "--params-dir", str(store_dir)]
                )
                for f in (bad, truncated)
            ]
            return codes, srv.core.date

    codes, date = run(body())
    err = capsys.readouterr().err
    assert codes == [2, 2]
    assert "futPf[pfCode=AKBNKE]/fut[cId=10651]/ra/a[3]>: 'abc' is not a number" in err
    assert "file ends early (truncated?)" in err
    assert not store_dir.exists() or not any(store_dir.iterdir())
    assert reader.read_table(tmp_path / "journal", date, "param").num_rows == 0
    with pytest.raises(SystemExit):  # --kind is checked by argparse
        paramfiles.main(["load", str(SPN), "--kind", "positions"])


# ---------------------------------------------------------------- calc as a service, then a replay


def fill_rows(batch, start: int) -> dict[str, list]:
    return {
        "account": [a for a, _, _ in batch],
        "sym": [s for _, s, _ in batch],
        "side": ["B" if q > 0 else "S" for _, _, q in batch],
        "qty": [abs(q) for _, _, q in batch],
        "price": [1.0] * len(batch),
        "order_id": [f"O{start + i}" for i in range(len(batch))],
        "exec_id": [f"E{start + i}" for i in range(len(batch))],
    }


def test_params_load_streams_to_calc_and_the_journal_replays_the_same(tmp_path, run, params):
    accounts, positions = tmp_path / "accounts.csv", tmp_path / "positions.csv"
    accounts.write_text("account,model,collateral\nS1,span,150000\nS2,span,50000\nV,var,1000000\n")
    positions.write_text(
        "account,sym,qty\n" + "".join(f"S1,{s},{q}\n" for s, q in START.items()) + "V,AAPL,1000\n"
    )
    jdir, store_dir = tmp_path / "journal", tmp_path / "params"
    copy = modified_copy(tmp_path / "garan.spn")
    new = load_span_file(copy)
    held = {"S1": dict(START), "S2": {}}

    def add(batch):
        for a, s, q in batch:
            held[a][s] = held[a].get(s, 0.0) + q

    async def body():
        async with running_tp_and_calc(
            jdir, accounts_file=str(accounts), positions_file=str(positions), params_dir=str(store_dir)
        ) as (srv, url, calc):
            cfg = calc.cfg
            async with Publisher(url) as pub:
                await pub.upd("fill", fill_rows(FILLS[0], 0))
                seq = await pub.wait_acked()
                assert await until(lambda: calc.engine.last_seq >= seq and not calc.dirty)
                add(FILLS[0])
                before = {a: float(calc.engine.margin[calc.engine.acc_index[a]]) for a in held}
                rc = await asyncio.to_thread(
                    paramfiles.main, ["load", str(copy), "--tp", url, "--params-dir", str(store_dir)]
                )
                assert await until(
                    lambda: calc.engine.external["span"].param_id == param_id(new) and not calc.dirty
                )
                at_param = {a: float(calc.engine.margin[calc.engine.acc_index[a]]) for a in held}
                expected_at_param = {a: reference_total(new, held[a]) for a in held}
                for i, batch in enumerate(FILLS[1:]):
                    await pub.upd("fill", fill_rows(batch, 100 * (i + 1)))
                    add(batch)
                seq = await pub.wait_acked()
                assert await until(lambda: calc.engine.last_seq >= seq and not calc.dirty)
                await asyncio.sleep(0.2)
                live = calc.engine.snapshot()
            return rc, before, at_param, expected_at_param, live, srv.core.date, cfg

    rc, before, at_param, expected_at_param, live, date, cfg = run(body())
    assert rc == 0
    assert (store_dir / f"{new.sha256}.spn").read_bytes() == copy.read_bytes()  # stored by content hash
    # the param event moved the SPAN accounts to the new file's numbers
    for a in held:
        assert at_param[a] == pytest.approx(expected_at_param[a], rel=1e-9)
    assert at_param["S1"] != pytest.approx(before["S1"])
    files = journal.day_files(jdir, date)
    prm = reader.read_table(jdir, date, "param").drop_columns(["time"]).to_pylist()
    assert [(r["kind"], r["file_id"], r["content_hash"], r["source"]) for r in prm] == [
        ("span", params.file_id, new.sha256, str(copy.resolve()))
    ]
    margin = reader.read_table(jdir, date, "margin").drop_columns(["time"]).to_pylist()
    s1 = [r for r in margin if r["account"] == "S1"]
    assert s1[0]["param_id"] == param_id(params) and s1[-1]["param_id"] == param_id(new)
    assert all(r["param_id"].startswith("history:") for r in margin if r["account"] == "V")
    after_param = [r for r in s1 if r["last_seq"] >= prm[0]["seq"]]
    assert after_param[0]["margin"] == pytest.approx(at_param["S1"], rel=1e-12)
    last = {r["account"]: r for r in margin}
    for i, a in enumerate(live["account"]):
        assert last[a]["margin"] == pytest.approx(live["margin"][i], rel=1e-12)
    assert last["S1"]["margin"] == pytest.approx(reference_total(new, held["S1"]), rel=1e-9)

    # a fresh engine fed the same journal (fills and the param event, in seq order) gives the same rows
    eng = MarginEngine.from_config(cfg.calc)
    for table, batch in reader.read_files({t: files[t] for t in ("fill", "param")}):
        assert all(r.applied for r in apply_batch(eng, table, batch, cfg.calc))  # as calc applies them
    snap = eng.snapshot()
    for i, a in enumerate(snap["account"]):
        assert snap["margin"][i] == pytest.approx(last[a]["margin"], rel=1e-9), a
        assert snap["param_id"][i] == last[a]["param_id"]
        drivers, journaled = json.loads(snap["drivers"][i]), json.loads(last[a]["drivers"])
        assert [d["sym"] for d in drivers] == [d["sym"] for d in journaled]
        assert [d["contribution"] for d in drivers] == pytest.approx(
            [d["contribution"] for d in journaled], rel=1e-9
        )
