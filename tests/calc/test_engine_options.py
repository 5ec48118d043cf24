"""Full revaluation of options in the streaming engine (issue #14 item 3): an options book's HS VaR and ES
equal an independent per-scenario QuantLib revaluation; incremental == full recompute after random fills
and ticks; stock-only books give exactly the numbers of an engine without options; an option quote sets its
implied vol (a bad one is rejected); what-ifs see queued ticks and quotes as the next refresh would."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calc.engine import MarginEngine
from calc.history import InputError
from calc.inputs import AccountSpec, Positions, params_from_config
from calc.instruments import load_instruments
from calc.models import params_from_history
from tests.calc.test_engine import HISTORY, assert_matches_full, calc_cfg

ql = pytest.importorskip("QuantLib")

SYMS = ["AAPL", "MSFT", "KO", "XOM"]
AS_OF = "2022-12-28"
LOOKBACK = 250
MASTER_CSV = """sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield
AAPL,equity,,,,,1,,,,
MSFT,equity,,,,,1,,,,
KO,equity,,,,,1,,,,
XOM,equity,,,,,1,,,,
AAPL_C130,option,AAPL,2023-03-17,130,C,100,european,0.35,0.04,0.005
AAPL_P120,option,AAPL,2023-02-17,120,P,100,european,0.38,0.04,0.005
MSFT_C250,option,MSFT,2023-06-16,250,C,100,european,0.30,0.04,0.01
KO_P60,option,KO,2023-01-20,60,P,100,european,0.2,0.03,0.03
XOM_C110,option,XOM,2023-09-15,110,C,100,american,0.33,0.04,0.03
"""
OPTS = ["AAPL_C130", "AAPL_P120", "MSFT_C250", "KO_P60", "XOM_C110"]
ALL = SYMS + OPTS
ACCOUNTS = [
    AccountSpec("OH", "hvar", 1e6),  # options and stock, historical simulation: full revaluation
    AccountSpec("OV", "var", 1e6),  # options as their delta equivalents
    AccountSpec("OS", "stress", 1e6),
    AccountSpec("OM", "hvar", 1e6, "max_stress"),
    AccountSpec("H", "hvar", 1e6),  # stocks only
    AccountSpec("V", "var", 1e6),
]
POSITIONS = [
    ("OH", "AAPL_C130", -20),
    ("OH", "AAPL_P120", -20),  # short strangle
    ("OH", "MSFT_C250", 10),
    ("OH", "KO", 3000),
    ("OV", "AAPL_C130", 30),
    ("OV", "MSFT", -400),
    ("OS", "KO_P60", -50),
    ("OS", "AAPL", 500),
    ("OM", "XOM_C110", -15),
    ("OM", "XOM", 1500),  # covered call
    ("H", "AAPL", 1000),
    ("H", "KO", -2000),
    ("V", "MSFT", 700),
]
STRESS = ({"name": "tech crash", "shocks": {"tech": -0.2}, "correlation_multiplier": 1.5},)


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt") / "instruments.csv"
    path.write_text(MASTER_CSV)
    return load_instruments(path)


def params(vol_scenarios: str = "proxy"):
    return params_from_history(
        HISTORY.select(SYMS),
        confidence=0.99,
        horizon_days=1,
        lookback_days=LOOKBACK,
        param_id="opt-test",
        vol_scenarios=vol_scenarios,
    )


def make(
    master=None,
    positions=POSITIONS,
    hvar_margin: str = "var",
    vol_scenarios: str = "proxy",
    prices=None,
    **kw,
):
    pos = [p for p in positions if master is not None or p[1] in SYMS]
    return MarginEngine(
        params(vol_scenarios),
        ACCOUNTS,
        Positions([p[0] for p in pos], [p[1] for p in pos], np.array([float(p[2]) for p in pos])),
        prices={s: float(p) for s, p in HISTORY.select(SYMS).latest.items()} | (prices or {}),
        calc_config=calc_cfg(
            hvar_margin=hvar_margin,
            stress=STRESS,
            sectors={"AAPL": "tech", "MSFT": "tech"},
            price_band={"default": 0.0},
            vol_scenarios=vol_scenarios,
            **kw,
        ),
        master=master,
        as_of=AS_OF,
    )


# ---------------------------------------------------------------- an independent revaluation


def ql_price(row, spot: float, vol: float, days_on: int = 0) -> float:
    """QuantLib's European BSM price of an option row of MASTER_CSV (T = calendar days / 365), valued
    `days_on` days after the as-of date."""
    today = ql.Date(28, 12, 2022) + days_on
    ql.Settings.instance().evaluationDate = today
    y, m, d = (int(x) for x in row["expiry"].split("-"))
    dc = ql.Actual365Fixed()
    payoff = ql.PlainVanillaPayoff(
        ql.Option.Call if row["right"] == "C" else ql.Option.Put, float(row["strike"])
    )
    opt = ql.VanillaOption(payoff, ql.EuropeanExercise(ql.Date(d, m, y)))
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(spot)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, float(row["dividend_yield"]), dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, float(row["rate"]), dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), vol, dc)),
    )
    opt.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return opt.NPV()


def ewma_vol_ratio_loop(closes: np.ndarray, lam: float) -> np.ndarray:
    """sigma[t+1] / sigma[t] per day and column, RiskMetrics EWMA seeded with the mean square return,
    written as a plain loop (the test's own, not calc.history's)."""
    r = np.log(closes[1:] / closes[:-1])
    out = np.empty_like(r)
    for n in range(r.shape[1]):
        v = float(np.mean(r[:, n] ** 2))
        for t in range(r.shape[0]):
            v_next = lam * v + (1 - lam) * r[t, n] ** 2
            out[t, n] = math.sqrt(v_next / v)
            v = v_next
    return out


@pytest.mark.parametrize("theta", [False, True])
def test_options_book_hs_var_and_es_equal_a_quantlib_revaluation_per_scenario(master, theta):
    """theta = True: each scenario values the options one holding period (1 day) later."""
    head, *lines = MASTER_CSV.splitlines()
    rows = {r.split(",")[0]: dict(zip(head.split(","), r.split(","), strict=True)) for r in lines}
    book = [("AAPL_C130", -20.0), ("AAPL_P120", -20.0), ("MSFT_C250", 10.0), ("KO", 3000.0)]
    for hvar_margin in ("var", "es"):
        eng = make(master, positions=[("OH", s, q) for s, q in book], hvar_margin=hvar_margin, theta=theta)
        tick = {"AAPL": 131.0, "MSFT": 245.0}  # the underlyings move before the margin is read
        eng.apply_prices(list(tick), np.array(list(tick.values())), np.array([1, 2]))
        snap = eng.snapshot()
        a = eng.accounts.index("OH")

        w = HISTORY.select(SYMS).window(LOOKBACK)
        closes = w.closes
        ret = closes[1:] / closes[:-1] - 1.0  # simple one-day returns, one row per scenario
        vr = ewma_vol_ratio_loop(closes, 0.94)
        spot = {s: float(closes[-1, SYMS.index(s)]) for s in SYMS} | tick
        pnl = np.zeros(len(ret))
        for sym, qty in book:
            if sym in SYMS:
                pnl += qty * spot[sym] * ret[:, SYMS.index(sym)]
                continue
            row = rows[sym]
            u = SYMS.index(row["underlying"])
            s0, v0 = spot[row["underlying"]], float(row["vol"])
            base = ql_price(row, s0, v0)
            for s in range(len(ret)):
                moved = ql_price(row, s0 * (1 + ret[s, u]), v0 * vr[s, u], days_on=int(theta))
                pnl[s] += qty * 100 * (moved - base)
        losses = np.sort(-pnl)[::-1]
        tail = 0.01 * len(pnl)
        k = math.ceil(tail)
        var = losses[k - 1]
        es = (losses[: k - 1].sum() + (tail - (k - 1)) * losses[k - 1]) / tail
        assert snap["var"][a] == pytest.approx(var, rel=1e-9)
        assert snap["es"][a] == pytest.approx(es, rel=1e-9)
        assert snap["margin"][a] == pytest.approx(es if hvar_margin == "es" else var, rel=1e-9)


def test_vol_scenarios_none_keeps_implied_vols(master):
    """With vol_scenarios "none" the margin differs from the proxy's (the vol moves matter for a short
    strangle) and is what the same book gives with every vol multiplier 1."""
    proxy = make(master).snapshot()
    none = make(master, vol_scenarios="none").snapshot()
    a = ACCOUNTS.index(next(s for s in ACCOUNTS if s.account == "OH"))
    assert proxy["margin"][a] != pytest.approx(none["margin"][a], rel=1e-3)


# ---------------------------------------------------------------- incremental == full recompute

fill_ev = st.tuples(
    st.just("fill"),
    st.integers(0, len(ACCOUNTS) - 1),
    st.integers(0, len(ALL) - 1),
    st.sampled_from("BS"),
    st.integers(1, 300),
)
tick_ev = st.tuples(st.just("tick"), st.integers(0, len(SYMS) - 1), st.floats(0.8, 1.25))
batches = st.lists(st.lists(st.one_of(fill_ev, tick_ev), min_size=1, max_size=12), min_size=1, max_size=6)


def run(eng: MarginEngine, bs) -> None:
    seq = 0
    base = HISTORY.select(SYMS).latest
    for batch in bs:
        for e in batch:
            seq += 1
            if e[0] == "fill":
                eng.apply_fills(
                    [ACCOUNTS[e[1]].account],
                    [ALL[e[2]]],
                    [e[3]],
                    np.array([float(e[4])]),
                    np.array([5.0]),
                    np.array([seq]),
                )
            else:
                eng.apply_prices([SYMS[e[1]]], np.array([base[SYMS[e[1]]] * e[2]]), np.array([seq]))
        eng.changed_rows()


@pytest.fixture(scope="module")
def warm(master):
    make(master).changed_rows()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(bs=batches, hvar_margin=st.sampled_from(["var", "es"]))
def test_incremental_equals_full_recompute_with_options(master, warm, bs, hvar_margin):
    eng = make(master, hvar_margin=hvar_margin)
    run(eng, bs)
    assert_matches_full(eng)
    # and a fresh engine fed the same end positions agrees with the incremental one
    eng.full_recompute()
    assert_matches_full(eng)


def test_stock_only_books_give_exactly_the_numbers_without_options(master):
    with_opt, without = make(master), make(None)
    bs = [[("tick", 0, 1.05), ("fill", 4, 1, "B", 100)], [("tick", 2, 0.97), ("fill", 5, 0, "S", 50)]]
    for eng in (with_opt, without):
        run(eng, bs)
    a, b = with_opt.snapshot(), without.snapshot()
    for acc in ("H", "V"):
        i = with_opt.accounts.index(acc)
        for col in ("margin", "var", "es", "stress"):
            assert a[col][i] == b[col][i], (acc, col)


def test_an_option_quote_sets_its_implied_vol_and_reprices_it(master, tmp_path):
    """A quote mid for AAPL_C130 that QuantLib prices at vol 0.42 (the file says 0.35): calc takes 0.42 as
    its implied vol (Let's be rational) and the margin becomes that of a book whose file says 0.42."""
    row = dict(zip(MASTER_CSV.splitlines()[0].split(","), MASTER_CSV.splitlines()[5].split(","), strict=True))
    spot = float(HISTORY.select(SYMS).latest["AAPL"])
    mid = ql_price(row, spot, 0.42)
    eng = make(master)
    eng.apply_prices(["AAPL_C130"], np.array([mid]), np.array([1]))
    rows = eng.changed_rows()
    c = eng.options.of_inst[eng.sym_index["AAPL_C130"]]
    assert eng.options.contracts.vol[c] == pytest.approx(0.42, rel=1e-10)
    assert eng.rejected == 0 and "OH" in rows["account"]
    path = tmp_path / "instruments.csv"
    path.write_text(
        MASTER_CSV.replace(
            "AAPL_C130,option,AAPL,2023-03-17,130,C,100,european,0.35",
            "AAPL_C130,option,AAPL,2023-03-17,130,C,100,european,0.42",
        )
    )
    ref = make(load_instruments(path))
    np.testing.assert_allclose(eng.snapshot()["margin"], ref.snapshot()["margin"], rtol=1e-9)


def test_an_option_quote_no_vol_fits_is_rejected_and_changes_nothing(master):
    eng = make(master)
    before = eng.snapshot()["margin"]
    eng.apply_prices(["AAPL_C130"], np.array([999.0]), np.array([7]))  # above the call's upper bound S e^-qT
    after = eng.snapshot()["margin"]
    np.testing.assert_array_equal(before, after)
    assert eng.rejected == 1 and "quote seq 7" in eng.rejects[-1] and "AAPL_C130" in eng.rejects[-1]
    assert eng.options.contracts.vol[eng.options.of_inst[eng.sym_index["AAPL_C130"]]] == 0.35


def test_option_fills_are_refused_for_an_unknown_option_and_accepted_for_a_listed_one(master):
    eng = make(master)
    n = eng.apply_fills(
        ["OH", "OH"],
        ["AAPL_C999", "AAPL_C130"],
        ["B", "B"],
        np.array([1.0, 1.0]),
        np.array([1.0, 1.0]),
        np.array([1, 2]),
    )
    assert n == 1 and eng.rejected == 1 and "AAPL_C999" in eng.rejects[-1]


@pytest.mark.parametrize("queued_tick", [False, True])
def test_what_if_of_an_option_trade_equals_the_fill(master, queued_tick):
    """What-if of option trades (one new contract, one held) gives the margin the fills then give, also when
    an underlying tick is queued and not yet applied (the what-if reprices the options in its copy)."""
    eng, ref = make(master), make(master)
    for e in (eng, ref):
        e.changed_rows()
        if queued_tick:
            e.apply_prices(["AAPL"], np.array([118.0]), np.array([1]))
    trades = [{"sym": "AAPL_C130", "qty": 15}, {"sym": "XOM_C110", "qty": -5}]
    before = eng.margin.copy()
    out = eng.what_if("OH", trades)
    np.testing.assert_array_equal(eng.margin, before)  # the engine's own numbers untouched
    a = ref.accounts.index("OH")
    assert out["margin_before"] == pytest.approx(ref.snapshot()["margin"][a], rel=1e-9)
    ref.apply_fills(
        ["OH", "OH"],
        ["AAPL_C130", "XOM_C110"],
        ["B", "S"],
        np.array([15.0, 5.0]),
        np.ones(2),
        np.array([2, 3]),
    )
    assert out["margin_after"] == pytest.approx(ref.snapshot()["margin"][a], rel=1e-9)
    assert out["margin_after"] != pytest.approx(out["margin_before"], rel=1e-6)


def test_option_drivers_carry_the_positions_greeks_against_quantlib(master):
    """A driver that is an option position carries its delta, gamma and vega (qty x multiplier x QuantLib's
    per-unit Greeks at the underlying's price); a stock driver carries none."""
    eng = make(master)
    eng.apply_prices(["AAPL"], np.array([127.5]), np.array([1]))
    rows = eng.changed_rows()
    drivers = dict(zip(rows["account"], rows["drivers"], strict=True))
    by_sym = {d["sym"]: d for d in json.loads(drivers["OH"])}
    c = by_sym["AAPL_C130"]
    today = ql.Date(28, 12, 2022)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    opt = ql.VanillaOption(
        ql.PlainVanillaPayoff(ql.Option.Call, 130.0), ql.EuropeanExercise(ql.Date(17, 3, 2023))
    )
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(127.5)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, 0.005, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, 0.04, dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), 0.35, dc)),
    )
    opt.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    q = -20 * 100
    assert c["delta"] == pytest.approx(q * opt.delta(), rel=1e-10)
    assert c["gamma"] == pytest.approx(q * opt.gamma(), rel=1e-10)
    assert c["vega"] == pytest.approx(q * opt.vega(), rel=1e-10)
    assert c["exposure"] == pytest.approx(q * opt.delta() * 127.5, rel=1e-10)  # the delta equivalent
    assert "delta" not in by_sym["KO"]


def test_an_option_nobody_held_through_ticks_is_repriced_when_first_traded(master):
    """Options nobody holds are not repriced on ticks (their rows go stale); the first fill in one, after
    its underlying moved, gives the margin of an engine that started at the new price with the position."""
    without = [p for p in POSITIONS if p[1] != "AAPL_P120"]
    eng = make(master, positions=without)
    for k, px in enumerate((121.0, 118.0, 116.5)):
        eng.apply_prices(["AAPL"], np.array([px]), np.array([k + 1]))
        eng.changed_rows()
    eng.apply_fills(["OH"], ["AAPL_P120"], ["B"], np.array([10.0]), np.array([4.0]), np.array([9]))
    fresh = make(master, positions=[*without, ("OH", "AAPL_P120", 10)], prices={"AAPL": 116.5})
    a = eng.accounts.index("OH")
    assert eng.snapshot()["margin"][a] == pytest.approx(fresh.snapshot()["margin"][a], rel=1e-9)
    wi = make(master, positions=without)  # and the what-if of the same trade after the same ticks
    for k, px in enumerate((121.0, 118.0, 116.5)):
        wi.apply_prices(["AAPL"], np.array([px]), np.array([k + 1]))
        wi.changed_rows()
    out = wi.what_if("OH", [{"sym": "AAPL_P120", "qty": 10}])
    assert out["margin_after"] == pytest.approx(fresh.snapshot()["margin"][a], rel=1e-9)


def test_an_option_only_parametric_or_stress_accounts_hold_moves_its_greeks_not_its_scenario_row(master):
    """KO_P60 is held by OS (stress model) alone: its ticks move its value and delta (OS's dollar delta),
    not its scenario row, which nothing reads (it goes stale, as for an option nobody holds); OS's numbers
    equal a full recompute. Once H (historical simulation) buys it, the row is repriced at the price of the
    day: H's margin is a fresh engine's, and every number still a full recompute's."""
    eng = make(master)
    eng.changed_rows()
    c = eng.options.of_inst[eng.sym_index["KO_P60"]]
    row, delta = eng.st.ov[c].copy(), eng.options.greeks[c, 1]
    for k, px in enumerate((60.5, 59.0, 58.2)):
        eng.apply_prices(["KO"], np.array([px]), np.array([k + 1]))
        eng.changed_rows()
    assert np.array_equal(eng.st.ov[c], row) and eng.options.stale[c]  # before: repriced on every tick
    assert eng.options.greeks[c, 1] != delta
    assert_matches_full(eng)
    eng.apply_prices(["KO"], np.array([58.0]), np.array([4]))  # queued: the what-if prices at it
    wi = eng.what_if("OS", [{"sym": "KO_P60", "qty": 5}])
    more = [(a, sym, q + 5 if (a, sym) == ("OS", "KO_P60") else q) for a, sym, q in POSITIONS]
    o = eng.accounts.index("OS")
    assert wi["margin_after"] == pytest.approx(make(master, more, prices={"KO": 58.0}).margin[o], rel=1e-9)
    eng.apply_prices(["KO"], np.array([58.2]), np.array([5]))
    eng.changed_rows()
    eng.apply_fills(["H"], ["KO_P60"], ["B"], np.array([40.0]), np.array([2.0]), np.array([9]))
    eng.changed_rows()
    assert not eng.options.stale[c] and not np.array_equal(eng.st.ov[c], row)
    fresh = make(master, positions=[*POSITIONS, ("H", "KO_P60", 40)], prices={"KO": 58.2})
    h = eng.accounts.index("H")
    assert eng.snapshot()["margin"][h] == pytest.approx(fresh.snapshot()["margin"][h], rel=1e-9)
    np.testing.assert_allclose(eng.st.ov[c], fresh.st.ov[c], rtol=1e-12)
    assert_matches_full(eng)


def test_an_implied_vol_history_replaces_the_proxy_where_it_has_the_underlying(master, tmp_path):
    """vol_history_file (Date + a column per underlying): AAPL's implied vol is 0.30 until the window's 100th
    close and 0.45 from then on, so the one scenario ending on that date moves AAPL options' vol by exactly
    1.5 and every other by 1; MSFT, not in the file, keeps the EWMA proxy."""
    w = HISTORY.select(SYMS).window(LOOKBACK)
    path = tmp_path / "iv.csv"
    rows = [f"{d},{0.30 if t < 100 else 0.45}" for t, d in enumerate(w.dates)]
    path.write_text("Date,AAPL\n" + "\n".join(rows) + "\n")
    p = params_from_config(calc_cfg(vol_history_file=str(path), lookback_days=LOOKBACK), HISTORY.select(SYMS))
    aapl = p.vol_ratio[:, SYMS.index("AAPL")]
    want = np.ones(len(aapl))
    want[99] = 1.5  # scenario 99 runs from close 99 (0.30) to close 100 (0.45)
    np.testing.assert_allclose(aapl, want, rtol=1e-15)
    np.testing.assert_array_equal(
        p.vol_ratio[:, SYMS.index("MSFT")], params().vol_ratio[:, SYMS.index("MSFT")]
    )


def test_american_options_take_the_configured_bjerksund_stensland_version(master):
    """calc.american = "bs1993": XOM_C110 (an American call on a 3% dividend yield) is valued as QuantLib's
    BjerksundStenslandApproximationEngine values it; the default bs2002 (the two-step boundary) gives
    another value."""
    today = ql.Date(28, 12, 2022)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    spot = float(HISTORY.select(SYMS).latest["XOM"])
    opt = ql.VanillaOption(
        ql.PlainVanillaPayoff(ql.Option.Call, 110.0), ql.AmericanExercise(today, ql.Date(15, 9, 2023))
    )
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(spot)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, 0.03, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, 0.04, dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), 0.33, dc)),
    )
    opt.setPricingEngine(ql.BjerksundStenslandApproximationEngine(process))
    values = {}
    for method in ("bs1993", "bs2002"):
        eng = make(master, american=method)
        values[method] = eng.options.greeks[eng.options.of_inst[eng.sym_index["XOM_C110"]], 0]
    assert values["bs1993"] == pytest.approx(opt.NPV(), rel=1e-8)
    assert values["bs2002"] != pytest.approx(values["bs1993"], rel=1e-6)


def test_a_what_if_sees_an_option_quote_not_yet_applied(master):
    """A quote of AAPL_C130 at QuantLib's price for vol 0.60, queued: the what-if's "before" already uses
    that vol, as the next refresh does."""
    row = dict(zip(MASTER_CSV.splitlines()[0].split(","), MASTER_CSV.splitlines()[5].split(","), strict=True))
    mid = ql_price(row, float(HISTORY.select(SYMS).latest["AAPL"]), 0.60)
    eng, ref = make(master), make(master)
    for e in (eng, ref):
        e.changed_rows()
        e.apply_prices(["AAPL_C130"], np.array([mid]), np.array([1]))
    out = eng.what_if("OH", [{"sym": "KO", "qty": 100}])
    a = ref.accounts.index("OH")
    assert out["margin_before"] == pytest.approx(ref.snapshot()["margin"][a], rel=1e-9)
    assert out["margin_before"] != pytest.approx(make(master).snapshot()["margin"][a], rel=1e-3)


def test_prices_accept_refuses_an_option(master):
    eng = make(master)
    with pytest.raises(InputError, match="AAPL_C130.*is an option"):
        eng.accept_price("AAPL_C130", 5.0)


def test_a_quote_that_needs_a_vol_above_the_cap_is_rejected(master):
    """A European call quoted at 60 on a 126 stock (strike 130, 2.7 months) needs a vol near 2.8 and is
    taken; at 120 it needs ~8.5, above calc/impliedvol.py's VOL_MAX (5): rejected, the vol stays."""
    eng = make(master)
    c = eng.options.of_inst[eng.sym_index["AAPL_C130"]]
    eng.apply_prices(["AAPL_C130"], np.array([120.0]), np.array([1]))
    eng.snapshot()
    assert eng.rejected == 1 and "above 5" in eng.rejects[-1] and eng.options.contracts.vol[c] == 0.35


def test_small_ticks_of_an_underlying_keep_the_options_holders_lazy_tails(master):
    """Options repriced by small ticks of their underlying move the holders' stored P&L and candidates
    (obound) instead of forcing a new selection: over 200 ticks of 0.05% the options holders flush a
    few times, not on every tick, and every number still equals a full recompute."""
    eng = make(master)
    eng.changed_rows()
    base = float(HISTORY.select(SYMS).latest["AAPL"])
    before = eng.scenario_work()["flushes"]
    rng = np.random.default_rng(5)
    px = base
    for seq in range(1, 201):
        px *= 1.0 + 0.0005 * rng.choice([-1.0, 1.0])
        eng.apply_prices(["AAPL"], np.array([px]), np.array([seq]))
        eng.changed_rows()
        if seq % 50 == 0:
            assert_matches_full(eng)
    hs = {s.account for s in ACCOUNTS if s.model == "hvar"}
    holders = {a for a, sym, _ in POSITIONS if a in hs and sym.startswith("AAPL_")}
    assert holders == {"OH"}
    flushes = eng.scenario_work()["flushes"] - before
    assert flushes < 50, flushes  # before: every tick flushed its holder (200)


def test_reprice_writes_no_holders_row_and_moves_each_bound_as_a_contract_by_contract_pass(master):
    """kernels.reprice (60 holders of the five options) writes no holder's P&L row nor its candidates'
    stored P&L (options are never in them: the tail adds hq x ovT where it reads a scenario); each
    contract's distance from its reference row (odist) and, on its REBASE-th reprice or a NaN distance,
    the re-base (the rows become the references, each holder's bound so far committed to its obound,
    hqf then hq) are what the plain contract-by-contract pass over the holders computes, bit for bit; the
    holders are marked dirty in that pass's order; ov and its scenario-major copy ovT take the rows; a NaN
    in a new row makes its holders' obound NaN (their tails are then selected again)."""
    from calc import kernels

    rng = np.random.default_rng(11)
    accounts = [AccountSpec(f"A{a:02d}", "hvar", 1e6) for a in range(60)]
    pos = [
        (f"A{a:02d}", o, float(rng.integers(-30, 30) or 1))
        for a in range(60)
        for o in OPTS
        if rng.random() < 0.6
    ]
    eng = MarginEngine(
        params(),
        accounts,
        Positions([p[0] for p in pos], [p[1] for p in pos], np.array([p[2] for p in pos])),
        prices={s: float(p) for s, p in HISTORY.select(SYMS).latest.items()},
        calc_config=calc_cfg(price_band={"default": 0.0}, vol_scenarios="proxy"),
        master=master,
        as_of=AS_OF,
    )
    eng.changed_rows()
    st = eng.st
    for _ in range(2):  # two rounds: distances measured, then re-bases (an age at REBASE - 1, a NaN)
        cs = rng.permutation(len(OPTS)).astype(np.int64)
        rows = st.ov[cs] * rng.uniform(0.9, 1.1, (len(cs), st.ov.shape[1]))
        if _:
            st.oage[cs[:2]] = kernels.REBASE - 1
            rows[list(cs).index(eng.options.of_inst[eng.sym_index["KO_P60"]]), 7] = np.nan
        hq = st.hq.copy()
        for a, slot in zip(*np.nonzero(st.orow[st.inst] >= 0), strict=True):  # fills since the flush
            if rng.random() < 0.3:
                hq[a, slot] = float(rng.integers(-30, 30))
        st.hq[...] = hq
        pnl, cval = st.pnl.copy(), st.cval.copy()
        want = {k: getattr(st, k).copy() for k in ("obound", "hqf", "fdist", "oref", "odist", "oage")}
        order = []
        for i, c in enumerate(cs.tolist()):  # the plain pass
            j = st.oinst[c]
            d = np.abs(rows[i] - want["oref"][c])
            dist = np.nan if np.isnan(d).any() else d.max()
            rebase = want["oage"][c] + 1 >= kernels.REBASE or np.isnan(dist)
            for h in range(st.nhold[j]):
                a, slot = st.hold_acc[j, h], st.hold_slot[j, h]
                q, qf = hq[a, slot], want["hqf"][a, slot]
                if not st.f_hs[a] or (q == 0.0 and qf == 0.0):
                    continue
                if rebase:
                    omax = np.nan if np.isnan(rows[i]).any() else np.abs(rows[i]).max()
                    want["obound"][a] += abs(qf) * (dist + want["fdist"][a, slot]) + abs(q - qf) * omax
                    want["hqf"][a, slot], want["fdist"][a, slot] = q, 0.0
                order += [a] if q != 0.0 and a not in order and not st.dirty[a] else []
            if rebase:
                want["oref"][c], want["odist"][c], want["oage"][c] = rows[i], 0.0, 0
            else:
                want["odist"][c], want["oage"][c] = dist, want["oage"][c] + 1
        dirty_before = int(st.counts[kernels.N_DIRTY])
        kernels.reprice(st, cs, rows)
        assert len(order) > 40  # (most of the 60 hold one of them)
        assert np.array_equal(st.pnl, pnl, equal_nan=True)
        assert np.array_equal(st.cval, cval, equal_nan=True)
        for k, v in want.items():
            assert np.array_equal(getattr(st, k), v, equal_nan=True), k
        assert st.dirty_list[dirty_before : st.counts[kernels.N_DIRTY]].tolist() == order
        assert np.array_equal(st.ov[cs], rows, equal_nan=True)
        assert np.array_equal(st.ovT, st.ov.T, equal_nan=True)
        st.dirty[:] = False
        st.counts[kernels.N_DIRTY] = 0
    assert (st.oage[cs[:2]] == 0).all() and np.isnan(st.obound[order]).any()
    assert not np.isnan(st.obound[order]).all()


def test_an_instruments_reload_after_the_engine_dropped_its_arrays_equals_a_fresh_engine(master, tmp_path):
    """An instruments param event rebuilds the options from the risk parameters in force, which the engine
    reads back from its state (scenarios, covariance) and its vol ratios (issue #19: no copy kept beside
    the state): the numbers equal bit for bit those of a fresh engine built on the new file."""
    path = tmp_path / "instruments2.csv"
    path.write_text(
        MASTER_CSV.replace("european,0.35", "european,0.45").replace("american,0.33", "american,0.3")
    )
    master2 = load_instruments(path)
    eng = make(master, hvar_margin="es")
    assert eng.params.scenarios is None and eng.params.cov is None
    assert eng.set_options(master=master2) == len(OPTS)
    fresh = make(master2, hvar_margin="es")
    for k in ("margin", "var", "es", "stress"):
        assert np.array_equal(getattr(eng, k), getattr(fresh, k)), k
    assert not np.array_equal(eng.margin, make(master, hvar_margin="es").margin)  # the file moved them
    assert_matches_full(eng)


def test_small_option_fills_keep_the_holders_lazy_tail(master):
    """An option fill moves every scenario's P&L by dq x the contract's row: the holder's tail limit widens
    by |dq| x its largest |value| (kernels.State.omax) instead of selecting its tail again. OH trades one
    AAPL call at a time (against its short 20) 40 times: it flushes a few times, not on every fill, and
    every number equals a full recompute."""
    eng = make(master)
    eng.changed_rows()
    before = eng.scenario_work()["flushes"]
    for seq in range(1, 41):
        eng.apply_fills(
            ["OH"],
            ["AAPL_C130"],
            ["B" if seq % 3 else "S"],
            np.array([1.0]),
            np.array([5.0]),
            np.array([seq]),
        )
        eng.changed_rows()
        if seq % 10 == 0:
            assert_matches_full(eng)
    flushes = eng.scenario_work()["flushes"] - before
    assert flushes < 10, flushes  # before: every fill flushed its holder (40)
