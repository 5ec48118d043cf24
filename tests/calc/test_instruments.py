"""The instrument master (calc/instruments.py): every refusal names the file, the row and the field; the
typed result (kinds, models, underlyings, flags); time_to_expiry by hand; the demo file; and
`marginflow params load --kind instruments|vol_surface` through a real tickerplant and calc, which
journals and logs the event without changing any margin."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from calc import params as paramfiles
from calc.history import InputError, load_prices
from calc.instruments import COLUMNS, KINDS, MODELS, load_instruments, time_to_expiry
from marginflow import config
from tests.support import ROOT, until
from tests.support.servers import running_tp, running_tp_and_calc
from tickerplant import journal_reader as reader
from tickerplant.client import Publisher

DEMO = ROOT / "data" / "demo" / "instruments.csv"
DEMO_SURFACE = ROOT / "data" / "demo" / "volsurface.csv"
HEADER = "sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield"
GOOD = [
    "AAPL,equity,,,,,1,,,,",
    "ES,future,SPX,2023-03-17,,,50,,,,",
    "C1,option,AAPL,2023-03-17,130,C,100,american,0.3,0.04,0.01",
    "P1,option,ES,2023-06-16,4000,P,50,european,,0.04,",
]


def write(tmp_path: Path, rows: list[str], header: str = HEADER, name: str = "inst.csv") -> Path:
    path = tmp_path / name
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_a_good_file_gives_typed_arrays_and_the_pricing_model(tmp_path):
    inst = load_instruments(write(tmp_path, GOOD))
    assert inst.syms == ["AAPL", "ES", "C1", "P1"] and inst.index == {"AAPL": 0, "ES": 1, "C1": 2, "P1": 3}
    assert [KINDS[k] for k in inst.kind] == ["equity", "future", "option", "option"]
    assert inst.options.tolist() == [2, 3]
    assert inst.underlying.tolist() == [0, 1, 0, 1]  # own index for equities and futures
    assert [MODELS[m] for m in inst.model] == ["linear", "linear", "bsm", "black76"]
    assert inst.is_call.tolist() == [False, False, True, False]
    assert inst.american.tolist() == [False, False, True, False]
    assert inst.multiplier.tolist() == [1.0, 50.0, 100.0, 50.0]
    assert np.isnan(inst.strike[:2]).all() and inst.strike[2:].tolist() == [130.0, 4000.0]
    assert np.isnat(inst.expiry[0]) and str(inst.expiry[3]) == "2023-06-16"
    assert inst.vol[2] == 0.3 and math.isnan(inst.vol[3]) and inst.rate[3] == 0.04
    assert math.isnan(inst.dividend_yield[3]) and inst.dividend_yield[2] == 0.01
    # the optional columns may be left out altogether; an empty multiplier is 1
    short = write(
        tmp_path, ["AAPL,equity,,,,,,", "C1,option,AAPL,2023-03-17,130,C,100,european"], ",".join(COLUMNS)
    )
    inst = load_instruments(short)
    assert inst.multiplier[0] == 1.0 and np.isnan(inst.vol).all()


# (a row replacing GOOD's option C1, row 3; the row and field named; the reason)
BAD = [
    (
        "C1,swap,AAPL,2023-03-17,130,C,100,american,,,",
        3,
        "kind",
        "'swap' is not one of equity | future | option",
    ),
    ("C1,option,,2023-03-17,130,C,100,american,,,", 3, "underlying", "empty (a name is required)"),
    ("C1,option,AAPL,2023-03-17,,C,100,american,,,", 3, "strike", "empty (an option needs a strike > 0)"),
    ("C1,option,AAPL,2023-03-17,0,C,100,american,,,", 3, "strike", "0.0 is not > 0"),
    ("C1,option,AAPL,2023-03-17,-5,C,100,american,,,", 3, "strike", "-5.0 is not > 0"),
    ("C1,option,AAPL,2023-03-17,130,,100,american,,,", 3, "right", "empty is not one of C | P"),
    ("C1,option,AAPL,2023-03-17,130,X,100,american,,,", 3, "right", "'X' is not one of C | P"),
    ("C1,option,AAPL,2023-03-17,130,C,100,bermudan,,,", 3, "exercise", "'bermudan' is not one of european"),
    ("C1,option,AAPL,,130,C,100,american,,,", 3, "expiry", "empty (an ISO date YYYY-MM-DD is required)"),
    ("C1,option,AAPL,2023-02-30,130,C,100,american,,,", 3, "expiry", "'2023-02-30' is not an ISO date"),
    ("C1,option,AAPL,17/03/2023,130,C,100,american,,,", 3, "expiry", "'17/03/2023' is not an ISO date"),
    ("C1,option,MSFT,2023-03-17,130,C,100,american,,,", 3, "underlying", "'MSFT' is not in the file"),
    ("C1,option,P1,2023-03-17,130,C,100,american,,,", 3, "underlying", "'P1' is an option"),
    ("AAPL,equity,,,,,1,,,,", 3, "sym", "duplicate sym 'AAPL' (first in row 1)"),
    ("C1,option,AAPL,2023-03-17,130,C,0,american,,,", 3, "multiplier", "0.0 is not > 0"),
    ("C1,option,AAPL,2023-03-17,130,C,-100,american,,,", 3, "multiplier", "-100.0 is not > 0"),
    ("C1,option,AAPL,2023-03-17,130,C,abc,american,,,", 3, "multiplier", "'abc' is not a number"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,0,,", 3, "vol", "0.0 is not in (0, 5]"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,5.5,,", 3, "vol", "5.5 is not in (0, 5]"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,-0.2,,", 3, "vol", "-0.2 is not in (0, 5]"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,nan,,", 3, "vol", "'nan' is not a finite number"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,,inf,", 3, "rate", "'inf' is not a finite number"),
    ("C1,option,AAPL,2023-03-17,130,C,100,american,,,x", 3, "dividend_yield", "'x' is not a number"),
    (" C1,option,AAPL,2023-03-17,130,C,100,american,,,", 3, "sym", "leading or trailing whitespace"),
    ("C\u200b1,option,AAPL,2023-03-17,130,C,100,american,,,", 3, "sym", "character U+200B at position 1"),
    ("C1,option,AAPL\x07,2023-03-17,130,C,100,american,,,", 3, "underlying", "character U+0007"),
    ("X" * 257 + ",equity,,,,,1,,,,", 3, "sym", "longer than 256 characters"),
    ("KO,equity,,,130,,1,,,,", 3, "strike", "an equity has no strike (only options do)"),
    ("KO,equity,,,,C,1,,,,", 3, "right", "an equity has no right"),
    ("KO,equity,,2023-03-17,,,1,,,,", 3, "expiry", "an equity has no expiry"),
    ("KO,equity,KO2,,,,1,,,,", 3, "underlying", "an equity has no underlying"),
    ("NQ,future,NDX,,,,20,,,,", 3, "expiry", "empty (an ISO date YYYY-MM-DD is required)"),
    ("NQ,future,NDX,2023-03-17,,,20,american,,,", 3, "exercise", "a future has no exercise"),
]


@pytest.mark.parametrize(
    ("line", "row", "field", "reason"), BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)]
)
def test_every_refusal_names_the_file_row_and_field(tmp_path, line, row, field, reason):
    path = write(tmp_path, [*GOOD[:2], line, GOOD[3]])
    with pytest.raises(InputError) as e:
        load_instruments(path)
    assert str(e.value).startswith(f"{path}: row {row} (line {row + 1}), field {field}: "), str(e.value)
    assert reason in str(e.value)


def test_header_and_shape_refusals(tmp_path):
    cases = [
        (HEADER.replace(",exercise", ""), GOOD[:1], "header: column exercise is missing"),
        (HEADER + ",strik", [r + "," for r in GOOD[:1]], "header: unknown column 'strik'"),
        (HEADER + ",vol", [r + "," for r in GOOD[:1]], "header: column 'vol' appears twice"),
        (HEADER, [GOOD[0], "ES,future"], "row 2 (line 3): 2 fields, the header has 11"),
        (HEADER, [], "no data rows"),
    ]
    for header, rows, reason in cases:
        path = write(tmp_path, rows, header)
        with pytest.raises(InputError, match=f"^{path}: ") as e:
            load_instruments(path)
        assert reason in str(e.value)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty file"):
        load_instruments(tmp_path / "empty.csv")
    with pytest.raises(InputError, match="cannot read"):
        load_instruments(tmp_path / "absent.csv")


def test_time_to_expiry_is_calendar_days_over_365_and_zero_after_expiry():
    assert time_to_expiry("2023-03-17", "2022-12-28") == 79 / 365  # 3 + 31 + 28 + 17 days
    assert time_to_expiry("2023-12-28", "2022-12-28") == 1.0
    assert time_to_expiry("2024-12-28", "2023-12-28") == 366 / 365  # a leap year: calendar days
    assert time_to_expiry("2022-12-28", "2022-12-28") == 0.0
    assert time_to_expiry("2022-12-01", "2022-12-28") == 0.0
    years = time_to_expiry(np.array(["2023-01-27", "NaT", "2022-01-01"], dtype="datetime64[D]"), "2022-12-28")
    assert years[0] == 30 / 365 and math.isnan(years[1]) and years[2] == 0.0


def test_the_demo_file_covers_the_20_stocks_and_options_around_the_last_close():
    inst = load_instruments(DEMO)
    history = load_prices(config.load().calc.history_file)
    last_date, last = history.dates[-1], history.latest
    assert sorted(inst.of_kind("equity")) == sorted(history.syms)
    opts = inst.options
    assert len(opts) >= 20 and inst.is_call[opts].any() and (~inst.is_call[opts]).any()
    assert inst.american[opts].any() and (~inst.american[opts]).any()
    days = (inst.expiry[opts] - last_date).astype(int)
    assert days.min() >= 28 and days.max() <= 366  # 1 to 12 months after the history's last date
    spot = np.array([last[inst.syms[u]] for u in inst.underlying[opts]])
    assert (np.abs(inst.strike[opts] / spot - 1) < 0.25).all()
    assert len({inst.syms[u] for u in inst.underlying[opts]}) >= 4


# ---------------------------------------------------------------- params load, calc and the journal


def test_params_load_refuses_a_bad_instruments_or_surface_file_and_journals_nothing(tmp_path, run, capsys):
    bad_inst = write(tmp_path, [*GOOD[:2], "C1,option,AAPL,2023-03-17,130,C,100,american,9,,"])
    bad_surface = tmp_path / "surface.csv"
    bad_surface.write_text(
        "underlying,expiry,moneyness,vol\nAAPL,2023-03-17,1.0,0.3\nAAPL,2023-03-17,-1,0.3\n"
    )
    store_dir = tmp_path / "params"

    async def body():
        async with running_tp(tmp_path / "journal") as (srv, url):
            codes = [
                await asyncio.to_thread(
                    paramfiles.main,
                    ["load", str(f), "--kind", k, "--tp", url, "--params-dir", str(store_dir)],
                )
                for f, k in ((bad_inst, "instruments"), (bad_surface, "vol_surface"), (DEMO, "vol_surface"))
            ]
            return codes, srv.core.date

    codes, date = run(body())
    err = capsys.readouterr().err
    assert codes == [2, 2, 2]
    assert f"{bad_inst}: row 3 (line 4), field vol: 9.0 is not in (0, 5]" in err
    assert f"{bad_surface}: row 2 (line 3), field moneyness: -1.0 is not > 0" in err
    assert f"{DEMO}: header: unknown column 'sym'" in err  # the instrument master is not a surface
    assert not store_dir.exists() or not any(store_dir.iterdir())
    assert reader.read_table(tmp_path / "journal", date, "param").num_rows == 0


def test_params_load_puts_instruments_and_vol_surface_in_force_in_a_running_calc(tmp_path, run, caplog):
    """calc starts with no instrument master: a fill in an option is refused. `params load --kind
    instruments` (journaled) puts the demo's options in force: the same fill is then applied and moves the
    account's margin; a vol surface with AAPL's vols 10% higher moves it again (the option reprices)."""
    accounts, positions = tmp_path / "accounts.csv", tmp_path / "positions.csv"
    accounts.write_text("account,model,collateral\nV,var,1000000\nH,hvar,500000\n")
    positions.write_text("account,sym,qty\nV,AAPL,1000\nV,MSFT,-300\nH,JPM,2000\n")
    surface = tmp_path / "surface.csv"
    lines = DEMO_SURFACE.read_text().splitlines()
    surface.write_text(
        "\n".join(
            [lines[0]]
            + [
                ",".join([*r.split(",")[:3], f"{float(r.split(',')[3]) * 1.1:.4f}"])
                if r.startswith("AAPL")
                else r
                for r in lines[1:]
            ]
        )
        + "\n"
    )
    jdir, store_dir = tmp_path / "journal", tmp_path / "params"
    caplog.set_level(logging.INFO, logger="marginflow.calc")

    def fill(k: int) -> dict:
        return {
            "account": ["H"],
            "sym": ["AAPL230127C125"],
            "side": ["S"],
            "qty": [20.0],
            "price": [5.0],
            "order_id": [f"O{k}"],
            "exec_id": [f"E{k}"],
        }

    async def body():
        async with running_tp_and_calc(
            jdir,
            accounts_file=str(accounts),
            positions_file=str(positions),
            params_dir=str(store_dir),
            instruments_file="",
        ) as (srv, url, calc):
            eng = lambda: calc.engine  # noqa: E731 (a param event may not replace it, but read it late)
            async with Publisher(url) as pub:
                await pub.upd("fill", fill(1))
                seq = await pub.wait_acked()
            assert seq > 0 and await until(lambda: eng().last_seq >= seq and not calc.dirty)
            refused = eng().rejected
            margins = [eng().margin.copy()]
            for f, k in ((DEMO, "instruments"), (surface, "vol_surface")):
                args = ["load", str(f), "--kind", k, "--tp", url, "--params-dir", str(store_dir)]
                assert await asyncio.to_thread(paramfiles.main, args) == 0
                seq += 1
                if k == "instruments":
                    async with Publisher(url) as pub:
                        await pub.upd("fill", fill(2))
                        seq = await pub.wait_acked()
                assert await until(lambda s=seq: eng().last_seq >= s and not calc.dirty)
                margins.append(eng().margin.copy())
            return refused, margins, srv.core.date

    refused, margins, date = run(body())
    assert refused == 1  # the option fill before the master: unknown sym
    h = 1  # account H
    assert margins[1][0] == pytest.approx(margins[0][0], rel=1e-12)  # V holds no options: unchanged
    assert margins[1][h] != pytest.approx(margins[0][h], rel=1e-3)  # the short call is in H's margin
    assert margins[2][h] != pytest.approx(margins[1][h], rel=1e-4)  # higher AAPL vols reprice it
    prm = reader.read_table(jdir, date, "param").drop_columns(["time"]).to_pylist()
    assert [(r["kind"], r["file_id"]) for r in prm] == [
        ("instruments", "instruments.csv:68 instruments, 48 options"),
        ("vol_surface", "surface.csv:4 underlyings"),
    ]
    assert (store_dir / f"{prm[0]['content_hash']}.csv").read_bytes() == DEMO.read_bytes()  # by content hash
    logged = [
        m for m in caplog.messages if "in force" in m and ("instruments file" in m or "vol surface" in m)
    ]
    assert len(logged) == 2 and "48 option contracts" in logged[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_apply_param_validates_the_stored_file_and_leaves_the_engine_as_it_was(tmp_path, demo_engine):
    calc = config.load(overrides={"calc": {"params_dir": str(tmp_path)}}).calc
    row = paramfiles.store(DEMO, "instruments", tmp_path)
    before = demo_engine.margin.copy()
    message = paramfiles.apply_param(demo_engine, {**row, "seq": 7}, calc)
    assert message.endswith("in force: 48 option contracts")
    np.testing.assert_allclose(demo_engine.margin, before, rtol=1e-12)  # the same file: the same margins
    assert demo_engine.last_seq >= 7
    stored = tmp_path / f"{row['content_hash']}.csv"
    stored.write_bytes(DEMO.read_bytes().replace(b"AAPL,equity", b"AAPL,future", 1))
    with pytest.raises(InputError, match="content does not match its hash"):
        paramfiles.apply_param(demo_engine, row, calc)
    np.testing.assert_allclose(demo_engine.margin, before, rtol=1e-12)


def test_a_master_without_a_held_option_is_refused_and_the_old_one_stays(tmp_path, demo_engine):
    """The demo's OPT08 holds AAPL230127C125: a master without it is refused naming the option and the
    account; the options in force and every margin stay as they were."""
    smaller = tmp_path / "instruments.csv"
    smaller.write_text(
        "".join(r for r in DEMO.read_text().splitlines(True) if not r.startswith("AAPL230127C125"))
    )
    before = demo_engine.snapshot()["margin"]
    with pytest.raises(InputError, match="AAPL230127C125.*OPT08"):
        demo_engine.set_options(master=load_instruments(smaller))
    assert demo_engine.snapshot()["margin"] == before
    assert len(demo_engine.options.contracts) == 48
