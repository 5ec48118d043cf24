"""CCP models in the streaming engine (issue #14 item 4): the demo's options account on the `prisma` model
gives the margin and components the one-shot (`marginflow margin --model prisma --instruments ...`)
computes for the same book at the same prices, after ticks too; live quotes feed its liquidity add-on;
margin rows carry the model, its parameter set and the components; a what-if compares the models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calc import oneshot
from calc.engine import MarginEngine
from calc.history import load_prices
from calc.inputs import load_positions
from marginflow import config
from tests.support import PRICES_FILE, ROOT

DEMO = ROOT / "data" / "demo"
ACCOUNT = "OPT08"
HISTORY = load_prices(PRICES_FILE)


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> str:
    """The demo's instrument master with every option's `vol` filled in (the demo surface's vol at the
    start prices): engine and one-shot then price with the same vols whatever the spot (the engine's vols
    are sticky by strike after load; the one-shot reads a surface at its own spot)."""
    demo = MarginEngine.from_config(config.load().calc)
    vol = dict(zip(demo.options.contracts.syms, demo.options.contracts.vol.tolist(), strict=True))
    head, *rows = (DEMO / "instruments.csv").read_text().splitlines()
    cols = head.split(",")
    out = [head]
    for r in rows:
        f = r.split(",")
        if f[0] in vol:
            f[cols.index("vol")] = repr(vol[f[0]])
        out.append(",".join(f))
    path = tmp_path_factory.mktemp("ccp") / "instruments.csv"
    path.write_text("\n".join(out) + "\n")
    return str(path)


@pytest.fixture
def eng(master) -> MarginEngine:
    return MarginEngine.from_config(config.calc_defaults(instruments_file=master, vol_surface_file=""))


def one_shot(capsys, tmp_path, eng: MarginEngine, prices=None, quotes: str = "") -> dict:
    """The one-shot's prisma numbers for OPT08's demo positions; with `prices`, the positions file's price
    column: those prices, the history's close for the other stocks and, for an option, its value per unit
    in `eng` (the one-shot takes a given option price as its value for the add-ons only)."""
    pos = load_positions(config.load().calc.positions_file)
    lines = ["account,sym,qty" + (",price" if prices else "")]
    for a, s, q in zip(pos.account, pos.sym, pos.qty.tolist(), strict=True):
        if a != ACCOUNT:
            continue
        if not prices:
            lines.append(f"{a},{s},{q}")
            continue
        j = eng.sym_index[s]
        c = eng.st.orow[j]
        px = prices.get(s, HISTORY.latest.get(s)) if c < 0 else eng.options.greeks[c, 0]
        lines.append(f"{a},{s},{q},{float(px)!r}")
    for s in set(prices or {}) - set(pos.sym[i] for i in range(len(pos.sym)) if pos.account[i] == ACCOUNT):
        lines.append(f"{ACCOUNT},{s},0,{prices[s]!r}")  # an underlying it holds only options on: its price
    path = tmp_path / "opt.csv"
    path.write_text("\n".join(lines) + "\n")
    args = ["--model", "prisma", "--instruments", eng.settings.instruments_file, "--positions", str(path)]
    args += ["--history", str(PRICES_FILE), "--as-of", "2022-12-28"]
    if eng.settings.vol_surface_file:
        args += ["--vol-surface", eng.settings.vol_surface_file]
    if quotes:
        (tmp_path / "quotes.csv").write_text(quotes)
        args += ["--quotes", str(tmp_path / "quotes.csv")]
    capsys.readouterr()
    assert oneshot.main([*args, "--json"]) == 0
    (out,) = json.loads(capsys.readouterr().out)["accounts"]
    return out


def numbers(eng: MarginEngine) -> tuple[dict, dict]:
    snap = eng.snapshot()
    a = snap["account"].index(ACCOUNT)
    return {k: snap[k][a] for k in ("model", "margin", "var", "es", "param_id")}, json.loads(
        snap["components"][a]
    )


def test_the_options_account_on_prisma_equals_the_one_shot(eng, capsys, tmp_path):
    row, comp = numbers(eng)
    ref = one_shot(capsys, tmp_path, eng)
    ref_comp = ref["components"]
    assert row["model"] == "prisma" and row["param_id"].startswith("prisma:") and comp["model"] == "prisma"
    assert row["margin"] == pytest.approx(ref["margin"], rel=1e-9)
    assert row["var"] == pytest.approx(ref["var"], rel=1e-9)
    assert row["es"] == pytest.approx(ref["es"], rel=1e-9)
    for k in ("filtered", "stressed", "base", "apc", "option_credit"):
        assert comp[k] == pytest.approx(ref_comp[k], rel=1e-9, abs=1e-9), k
    assert comp["stressed"] > 0 and comp["filtered"] > 0  # the two sets both measured


def test_after_ticks_it_equals_the_one_shot_at_the_new_prices(eng, capsys, tmp_path):
    moves = {"AAPL": 121.5, "MSFT": 243.0, "XOM": 108.0}
    eng.apply_prices(list(moves), np.array(list(moves.values())), np.array([1, 2, 3]))
    eng.changed_rows()
    row, comp = numbers(eng)
    ref = one_shot(capsys, tmp_path, eng, prices=moves)
    assert row["margin"] == pytest.approx(ref["margin"], rel=1e-9)
    assert row["es"] == pytest.approx(ref["es"], rel=1e-9)


def test_live_quote_spreads_feed_the_liquidity_add_on(eng, capsys, tmp_path):
    """A quote's half spread x |qty| x multiplier: XOM 3,000 shares at a 0.10 spread = 150, PFE 4,000 at
    0.04 = 80; the same book with those quotes in the one-shot gives the same liquidity and margin."""
    eng.apply_quotes(["XOM", "PFE"], np.array([108.40, 49.00]), np.array([108.50, 49.04]), np.array([1, 2]))
    eng.changed_rows()
    row, comp = numbers(eng)
    assert comp["liquidity"] == pytest.approx(3000 * 0.05 + 4000 * 0.02, rel=1e-12)
    quotes = "sym,bid,ask\nXOM,108.40,108.50\nPFE,49.00,49.04\n"
    ref = one_shot(capsys, tmp_path, eng, prices={"XOM": 108.45, "PFE": 49.02}, quotes=quotes)
    assert row["margin"] == pytest.approx(ref["margin"], rel=1e-9)


def test_the_drivers_of_a_ccp_account_add_up_to_its_margin(eng):
    snap = eng.snapshot()
    a = snap["account"].index(ACCOUNT)
    drivers = json.loads(snap["drivers"][a])
    assert sum(d["contribution"] for d in drivers) == pytest.approx(snap["margin"][a], rel=1e-9)
    assert any("vega" in d for d in drivers)  # its options carry their Greeks


def test_what_if_compares_every_model_and_hvar_agrees_with_the_hvar_kernel(eng, master, tmp_path):
    """A what-if with compare=True gives the trade's effect under hvar, prisma and span2 side by side:
    prisma's "before" is the account's own margin, and the plain historical simulation computed this way
    (full revaluation over the scenario set) equals what the incremental hvar kernel gives an account on
    hvar holding the same book, before and after the trade."""
    trades = [{"sym": "AAPL230127C125", "qty": 10}, {"sym": "XOM", "qty": -500}]
    out = eng.what_if(ACCOUNT, trades, compare=True)
    assert set(out["compare"]) == {"hvar", "prisma", "span2"}
    assert out["compare"]["prisma"]["margin_before"] == pytest.approx(out["margin_before"], rel=1e-12)
    assert out["compare"]["prisma"]["margin_after"] == pytest.approx(out["margin_after"], rel=1e-12)
    assert out["compare"]["span2"]["components_after"]["model"] == "span2"
    accounts = tmp_path / "accounts.csv"
    accounts.write_text((DEMO / "accounts.csv").read_text().replace(f"{ACCOUNT},prisma,", f"{ACCOUNT},hvar,"))
    on_hvar = MarginEngine.from_config(
        config.calc_defaults(instruments_file=master, vol_surface_file="", accounts_file=str(accounts))
    )
    ref = on_hvar.what_if(ACCOUNT, trades)
    assert out["compare"]["hvar"]["margin_before"] == pytest.approx(ref["margin_before"], rel=1e-9)
    assert out["compare"]["hvar"]["margin_after"] == pytest.approx(ref["margin_after"], rel=1e-9)
    assert "compare" not in eng.what_if(ACCOUNT, trades)  # only when asked: it costs a full revaluation


def test_a_spread_alone_moves_the_margin_and_a_bad_quote_keeps_no_spread(eng):
    """A quote whose mid is the price already in force but whose spread widens re-evaluates the account at
    once (liquidity + 4,000 PFE x 0.50); a quote calc rejects (bid <= 0) leaves no spread behind; nor does
    one held as suspect by the price band."""
    a = eng.accounts.index(ACCOUNT)
    pfe = float(eng.st.price[eng.sym_index["PFE"]])
    eng.changed_rows()
    before = json.loads(eng.snapshot()["components"][a])["liquidity"]
    eng.apply_quotes(["PFE"], np.array([pfe - 0.5]), np.array([pfe + 0.5]), np.array([1]))
    rows = eng.changed_rows()
    assert ACCOUNT in rows["account"]
    after = json.loads(rows["components"][rows["account"].index(ACCOUNT)])["liquidity"]
    assert after - before == pytest.approx(4000 * 0.5, rel=1e-12)
    xom = float(eng.st.price[eng.sym_index["XOM"]])
    eng.apply_quotes(["XOM", "XOM"], np.array([-xom, xom * 3]), np.array([xom, xom * 3.2]), np.array([2, 3]))
    eng.changed_rows()
    assert eng.half_spread[eng.sym_index["XOM"]] == 0.0  # the first rejected, the second a suspect jump
    assert eng.rejected == 2 and eng.price_band.suspects  # (a suspect tick is counted too)


def test_a_ccp_what_if_prices_queued_ticks_like_the_next_refresh(eng, master):
    """XOM +8% and AAPL -10% queued, not yet applied: the what-if's "before" is what the account's margin
    becomes at the next refresh (its options revalued at the queued prices); buying an option nobody held
    (its value stale since AAPL moved) gives after the trade what the fill then gives."""
    moves = {s: float(eng.st.price[eng.sym_index[s]]) * f for s, f in (("XOM", 1.08), ("AAPL", 0.9))}
    eng.apply_prices(list(moves), np.array(list(moves.values())), np.array([1, 2]))
    out = eng.what_if(ACCOUNT, [{"sym": "AAPL230317C135", "qty": 10}])
    ref = MarginEngine.from_config(config.calc_defaults(instruments_file=master, vol_surface_file=""))
    ref.apply_prices(list(moves), np.array(list(moves.values())), np.array([1, 2]))
    a = ref.accounts.index(ACCOUNT)
    assert out["margin_before"] == pytest.approx(ref.snapshot()["margin"][a], rel=1e-9)
    ref.apply_fills([ACCOUNT], ["AAPL230317C135"], ["B"], np.array([10.0]), np.array([1.0]), np.array([3]))
    assert out["margin_after"] == pytest.approx(ref.snapshot()["margin"][a], rel=1e-9)


def test_compare_names_a_model_that_cannot_margin_the_book(eng):
    """DERIV07 holds Takasbank SPAN contracts, outside the CCP models' price history: compare says so per
    model instead of failing the what-if."""
    out = eng.what_if("DERIV07", [], compare=True)
    assert (
        "error" in out["compare"]["prisma"]
        and "not in its price history" in out["compare"]["prisma"]["error"]
    )


def test_a_history_param_event_moves_the_ccp_models_scenario_sets(eng, tmp_path):
    """A new price history (the demo's, its last 20 days cut off) in force by a `history` param event: the
    prisma account's param_id carries the new last date and its filtered set is the new window's."""
    from calc import params as paramfiles

    h = HISTORY
    path = tmp_path / "history.csv"
    keep = slice(0, len(h.dates) - 20)
    lines = ["Date," + ",".join(h.syms)]
    lines += [
        f"{d}," + ",".join(repr(float(v)) for v in row)
        for d, row in zip(h.dates[keep], h.closes[keep], strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    calc = config.calc_defaults(params_dir=str(tmp_path / "params"))
    row = paramfiles.store(path, "history", calc.params_dir)
    before, comp0 = numbers(eng)
    paramfiles.apply_param(eng, {**row, "seq": 5}, calc)
    after, comp = numbers(eng)
    last = str(h.dates[len(h.dates) - 21])
    assert after["param_id"].endswith(last) and not before["param_id"].endswith(last)
    assert comp["param_id"] == after["param_id"]
    assert comp["filtered"] != pytest.approx(comp0["filtered"], rel=1e-6)  # its window moved 20 days back
    # [calc] as_of = "": the options are now valued at the new history's last date (20 days longer to expiry)
    assert eng.as_of == np.datetime64(last) and eng.options.contracts.as_of == np.datetime64(last)


def test_the_masters_adv_feeds_the_concentration_add_on(tmp_path, capsys):
    """An `adv` column in the instrument master: XOM's 5,000 a day, so OPT08's 3,000 shares exceed prisma's
    10% (500) by 2,500: concentration = 2% x 2,500 x 1 x XOM's price; the one-shot gives the same."""
    head, *rows = (DEMO / "instruments.csv").read_text().splitlines()
    lines = [head + ",adv"] + [r + (",5000" if r.startswith("XOM,") else ",") for r in rows]
    path = tmp_path / "instruments.csv"
    path.write_text("\n".join(lines) + "\n")
    eng = MarginEngine.from_config(config.calc_defaults(instruments_file=str(path)))
    a = eng.accounts.index(ACCOUNT)
    comp = json.loads(eng.snapshot()["components"][a])
    xom = float(eng.st.price[eng.sym_index["XOM"]])
    assert comp["concentration"] == pytest.approx(0.02 * (3000 - 0.1 * 5000) * xom, rel=1e-12)
    ref = one_shot(capsys, tmp_path, eng)
    assert ref["components"]["concentration"] == pytest.approx(comp["concentration"], rel=1e-12)


@pytest.mark.parametrize("layout", ["first", "two"])
def test_a_spread_change_reaches_every_spread_model_account_wherever_it_sits(master, tmp_path, layout):
    """The spread-model accounts are found by index: OPT08 as account 0 ("first"), or OPT08 and PHRM04
    both on prisma ("two"); a widened PFE spread re-evaluates each of them (liquidity + |qty| x 0.50)."""
    head, *rows = (DEMO / "accounts.csv").read_text().splitlines()
    opt = next(r for r in rows if r.startswith(f"{ACCOUNT},"))
    rows = [opt, *[r for r in rows if r != opt]]
    if layout == "two":
        rows = [r.replace("PHRM04,var,420000,max_stress", "PHRM04,prisma,420000,model") for r in rows]
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("\n".join([head, *rows]) + "\n")
    e = MarginEngine.from_config(
        config.calc_defaults(instruments_file=master, vol_surface_file="", accounts_file=str(accounts))
    )
    e.changed_rows()
    on = [ACCOUNT] + (["PHRM04"] if layout == "two" else [])
    before = {a: json.loads(e.snapshot()["components"][e.accounts.index(a)])["liquidity"] for a in on}
    pfe = float(e.st.price[e.sym_index["PFE"]])
    e.apply_quotes(["PFE"], np.array([pfe - 0.5]), np.array([pfe + 0.5]), np.array([1]))
    rows_out = e.changed_rows()
    qty = {ACCOUNT: 4000, "PHRM04": 12000}
    for a in on:
        assert a in rows_out["account"]
        after = json.loads(rows_out["components"][rows_out["account"].index(a)])["liquidity"]
        assert after - before[a] == pytest.approx(qty[a] * 0.5, rel=1e-12)
