"""`marginflow margin` one-shot: numbers against independent calculations, every input form, SPAN
dispatch, and bad input exiting non-zero with one clear line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from calc.history import covariance, load_prices, log_returns, write_covariance
from calc.oneshot import main
from tests.support import PRICES_FILE, ROOT

PRICES = PRICES_FILE
HISTORY = load_prices(PRICES)


def run(capsys, *argv: str) -> tuple[int, dict | str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


@pytest.fixture
def pos(tmp_path):
    p = tmp_path / "pos.csv"
    p.write_text("account,sym,qty\nA,AAPL,1000\nA,XOM,-500\nA,KO,2000\nB,MSFT,300\nB,AAPL,100\nB,AAPL,-50\n")
    return p


def test_var_against_scipy_and_numpy(capsys, pos):
    code, doc, err = run(
        capsys,
        "--positions",
        str(pos),
        "--model",
        "var",
        "--history",
        str(PRICES),
        "--lookback-days",
        "252",
        "--horizon-days",
        "10",
        "--json",
    )
    assert code == 0, err
    h = HISTORY.select(["AAPL", "XOM", "KO"]).window(252)
    x = np.array([1000, -500, 2000]) * h.closes[-1]
    cov = np.cov(log_returns(h.closes).T)
    expect = norm.ppf(0.99) * math.sqrt(10) * math.sqrt(x @ cov @ x)
    a = doc["accounts"][0]
    assert a["account"] == "A" and a["model"] == "var"
    assert a["margin"] == pytest.approx(expect, rel=1e-9) and a["var"] == a["margin"]
    assert sum(d["contribution"] for d in a["drivers"]) == pytest.approx(expect, rel=1e-9)
    assert {d["sym"] for d in a["drivers"]} == {"AAPL", "XOM", "KO"}
    # B: AAPL rows add up (100 - 50)
    b = doc["accounts"][1]
    assert {d["sym"]: d["exposure"] for d in b["drivers"]}["AAPL"] == pytest.approx(50 * h.closes[-1, 0])


def test_hvar_filtered_and_ewma_against_hand(capsys, pos):
    code, doc, err = run(
        capsys,
        "--positions",
        str(pos),
        "--model",
        "hvar",
        "--history",
        str(PRICES),
        "--lookback-days",
        "500",
        "--confidence",
        "0.975",
        "--json",
    )
    assert code == 0, err
    h = HISTORY.select(["AAPL", "XOM", "KO"]).window(500)
    x = np.array([1000, -500, 2000]) * h.closes[-1]
    pnl = (h.closes[1:] / h.closes[:-1] - 1) @ x
    losses = np.sort(-pnl)[::-1]
    # tail = 0.025 * 500 = 12.5 -> VaR = 13th worst, ES = (12 worst + 0.5 * 13th) / 12.5
    assert doc["accounts"][0]["var"] == pytest.approx(losses[12], rel=1e-9)
    assert doc["accounts"][0]["es"] == pytest.approx((losses[:12].sum() + 0.5 * losses[12]) / 12.5, rel=1e-9)
    code, filt, _ = run(
        capsys,
        "--positions",
        str(pos),
        "--model",
        "hvar",
        "--history",
        str(PRICES),
        "--lookback-days",
        "500",
        "--filtered",
        "--json",
    )
    assert code == 0 and filt["accounts"][0]["var"] != doc["accounts"][0]["var"]
    code, ew, _ = run(
        capsys,
        "--positions",
        str(pos),
        "--model",
        "var",
        "--history",
        str(PRICES),
        "--lookback-days",
        "500",
        "--ewma-lambda",
        "0.94",
        "--json",
    )
    r = log_returns(h.closes)
    w = 0.06 * 0.94 ** np.arange(len(r) - 1, -1, -1)
    cov = (r * (w / w.sum())[:, None]).T @ r
    assert ew["accounts"][0]["var"] == pytest.approx(norm.ppf(0.99) * math.sqrt(x @ cov @ x), rel=1e-9)


def test_covariance_file_parquet_positions_and_prices_file(capsys, tmp_path):
    h = HISTORY.select(["AAPL", "MSFT"]).window(252)
    cov = covariance(log_returns(h.closes))
    write_covariance(tmp_path / "cov.csv", ["AAPL", "MSFT"], cov)
    pq.write_table(
        pa.table(
            {
                "account": ["A", "A"],
                "sym": ["AAPL", "MSFT"],
                "qty": [10.0, 20.0],
                "multiplier": [100.0, 100.0],
            }
        ),
        tmp_path / "pos.parquet",
    )
    (tmp_path / "px.csv").write_text("sym,price\nAAPL,150\nMSFT,250\n")
    code, doc, err = run(
        capsys,
        "--positions",
        str(tmp_path / "pos.parquet"),
        "--model",
        "var",
        "--covariance",
        str(tmp_path / "cov.csv"),
        "--prices",
        str(tmp_path / "px.csv"),
        "--json",
    )
    assert code == 0, err
    x = np.array([10 * 100 * 150, 20 * 100 * 250])
    assert doc["accounts"][0]["margin"] == pytest.approx(norm.ppf(0.99) * math.sqrt(x @ cov @ x), rel=1e-9)


def test_stress_model_uses_config_scenarios(capsys, tmp_path, pos):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[calc]\n[[calc.stress]]\nname = "drop"\ndefault_shock = -0.1\nvolatility_multiplier = 0.0\n'
    )
    code, doc, err = run(
        capsys,
        "--positions",
        str(pos),
        "--model",
        "stress",
        "--history",
        str(PRICES),
        "--config",
        str(cfg),
        "--json",
    )
    assert code == 0, err
    h = HISTORY.select(["AAPL", "XOM", "KO"])
    x = np.array([1000, -500, 2000]) * h.closes[-1]
    # zero volatility: the stress is the shock loss alone, 10% of the net exposure
    assert doc["accounts"][0]["stress"] == pytest.approx(0.1 * x.sum(), rel=1e-12)
    assert doc["accounts"][0]["margin"] == doc["accounts"][0]["stress"]


def test_table_output_and_cli_entry(pos):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "marginflow.cli",
            "margin",
            "--positions",
            str(pos),
            "--model",
            "var",
            "--history",
            str(PRICES),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["account", "model", "margin"]
    assert len(r.stdout.splitlines()) == 3


def test_span_dispatch(capsys, tmp_path):
    p = tmp_path / "span_pos.csv"
    p.write_text("account,exch,pf_code,pf_type,pe,qty,o,k\nd1,BIST,AKBNKE,FUT,201605S0,10,,\n")
    spn = ROOT / "data" / "span" / "takasbank_2016-05-17.spn"
    code, doc, err = run(capsys, "--positions", str(p), "--model", "span", "--span-file", str(spn), "--json")
    assert code == 0, err
    from calc.span.oneshot import span_accounts

    assert doc == json.loads(json.dumps(span_accounts(str(spn), str(p))))
    code, _, err = run(capsys, "--positions", str(p), "--model", "span")
    assert code == 2 and "--span-file" in err


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("marginflow margin: error:") and match in lines[0], lines[0]


def test_bad_input_exits_with_one_clear_line(capsys, tmp_path, pos):
    hist = ["--history", str(PRICES)]
    # unknown sym
    bad = tmp_path / "unknown.csv"
    bad.write_text("account,sym,qty\nA,AAPL,1\nA,NOPE,2\n")
    _one_line_error(capsys, ["--positions", str(bad), "--model", "var", *hist], "unknown sym 'NOPE'")
    # missing column
    bad = tmp_path / "nocol.csv"
    bad.write_text("account,sym\nA,AAPL\n")
    _one_line_error(capsys, ["--positions", str(bad), "--model", "var", *hist], "missing column 'qty'")
    # NaN price in the history window
    h = tmp_path / "h.csv"
    h.write_text("Date,AAPL\n2020-01-01,1\n2020-01-02,NaN\n2020-01-03,1.2\n")
    p1 = tmp_path / "p1.csv"
    p1.write_text("account,sym,qty\nA,AAPL,1\n")
    _one_line_error(
        capsys,
        ["--positions", str(p1), "--model", "hvar", "--history", str(h)],
        "NaN price for sym 'AAPL' on 2020-01-02",
    )
    # NaN in a prices file
    px = tmp_path / "px.csv"
    px.write_text("sym,price\nAAPL,\n")
    _one_line_error(
        capsys, ["--positions", str(p1), "--model", "var", *hist, "--prices", str(px)], "NaN price"
    )
    # empty history
    e = tmp_path / "empty.csv"
    e.write_text("Date,AAPL\n")
    _one_line_error(capsys, ["--positions", str(p1), "--model", "var", "--history", str(e)], "empty history")
    one = tmp_path / "one.csv"
    one.write_text("Date,AAPL\n2020-01-01,1\n")
    _one_line_error(
        capsys, ["--positions", str(p1), "--model", "var", "--history", str(one)], "empty history"
    )
    # confidence outside (0, 1)
    for c in ("0", "1", "1.5", "-0.1", "nan"):
        _one_line_error(
            capsys,
            ["--positions", str(pos), "--model", "var", *hist, "--confidence", c],
            "--confidence: must be strictly between 0 and 1",
        )
    # NaN quantity, missing file, hvar without history, bad lambda
    q = tmp_path / "q.csv"
    q.write_text("account,sym,qty\nA,AAPL,\n")
    _one_line_error(capsys, ["--positions", str(q), "--model", "var", *hist], "'qty' is NaN or missing")
    _one_line_error(
        capsys, ["--positions", str(tmp_path / "none.csv"), "--model", "var", *hist], "file not found"
    )
    _one_line_error(
        capsys, ["--positions", str(pos), "--model", "hvar", "--covariance", str(q)], "needs --history"
    )
    _one_line_error(
        capsys, ["--positions", str(pos), "--model", "var", *hist, "--ewma-lambda", "1.0"], "--ewma-lambda"
    )


# ---------------------------------------------------------------- full revaluation and CCP models (#14)

AS_OF = "2022-06-30"
INSTRUMENTS = (
    "sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield\n"
    "AAPL,equity,,,,,1,,,,\n"
    "XOM,equity,,,,,1,,,,\n"
    "AAPL_C140,option,AAPL,2022-09-16,140,C,100,european,0.32,0.03,0.006\n"
    "AAPL_P130,option,AAPL,2022-09-16,130,P,100,american,0.35,0.03,0.006\n"
)
OPTION_BOOK = "account,sym,qty\nO,AAPL,300\nO,AAPL_C140,-4\nO,AAPL_P130,6\nS,XOM,-500\nS,AAPL,200\n"


def _ql_value(spot, strike, expiry, vol, r, q, is_call, american):
    """One option's value with QuantLib at the as-of date: BSM with dividend yield, Bjerksund-Stensland for
    American exercise (an independent pricer: calc/options.py is not used)."""
    import QuantLib as ql

    today = ql.Date(30, 6, 2022)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    exp = ql.Date(int(expiry[8:]), int(expiry[5:7]), int(expiry[:4]))
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(spot)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, q, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(today, r, dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), vol, dc)),
    )
    payoff = ql.PlainVanillaPayoff(ql.Option.Call if is_call else ql.Option.Put, strike)
    if american:
        opt = ql.VanillaOption(payoff, ql.AmericanExercise(today, exp))
        opt.setPricingEngine(ql.BjerksundStenslandApproximationEngine(process))
    else:
        opt = ql.VanillaOption(payoff, ql.EuropeanExercise(exp))
        opt.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return opt.NPV()


def _ql_book_pnl(closes, spot, vol_mult):
    """Account O's scenario P&L, per scenario a QuantLib revaluation of each option (loop), the stock
    linear: 300 AAPL, -4 calls 140 (european), +6 puts 130 (american), multiplier 100."""
    ret = closes[1:] / closes[:-1] - 1.0
    c0 = _ql_value(spot, 140.0, "2022-09-16", 0.32, 0.03, 0.006, True, False)
    p0 = _ql_value(spot, 130.0, "2022-09-16", 0.35, 0.03, 0.006, False, True)
    pnl = []
    for r, m in zip(ret, vol_mult, strict=True):
        s = spot * (1.0 + r)
        c = _ql_value(s, 140.0, "2022-09-16", 0.32 * m, 0.03, 0.006, True, False)
        p = _ql_value(s, 130.0, "2022-09-16", 0.35 * m, 0.03, 0.006, False, True)
        pnl.append(300 * spot * r - 4 * 100 * (c - c0) + 6 * 100 * (p - p0))
    return np.array(pnl)


def _tail(pnl, confidence):
    """(VaR, ES) by hand: tail = (1-c) S scenarios; VaR the ceil(tail)-th worst loss, ES the mean of the
    worst `tail` losses with the last one weighted by the fraction."""
    losses = np.sort(-pnl)[::-1]
    tail = (1 - confidence) * len(pnl)
    k = math.ceil(round(tail, 9))
    frac = tail - (k - 1)
    return losses[k - 1], (losses[: k - 1].sum() + frac * losses[k - 1]) / tail


@pytest.fixture
def book(tmp_path):
    (tmp_path / "inst.csv").write_text(INSTRUMENTS)
    (tmp_path / "pos.csv").write_text(OPTION_BOOK)
    return tmp_path


def _ccp_args(book) -> list[str]:
    """The one-shot on the book with calc.american = "bs1993": the American put is then priced by the
    Bjerksund-Stensland version QuantLib implements (the default, bs2002, is held to its own references
    in tests/calc/test_options.py)."""
    (book / "bs1993.toml").write_text('[calc]\namerican = "bs1993"\n')
    inputs = {"--instruments": book / "inst.csv", "--positions": book / "pos.csv", "--history": PRICES}
    inputs["--config"] = book / "bs1993.toml"
    return [*(x for k, v in inputs.items() for x in (k, str(v))), "--as-of", AS_OF]


def _ccp_run(capsys, book, *argv):
    return run(capsys, *_ccp_args(book), "--json", *argv)


@pytest.mark.parametrize("vol_scenarios", ["none", "proxy"])
def test_hvar_full_revaluation_equals_a_quantlib_loop(capsys, book, vol_scenarios):
    code, doc, err = _ccp_run(
        capsys,
        book,
        "--model",
        "hvar",
        "--lookback-days",
        "250",
        "--confidence",
        "0.99",
        "--vol-scenarios",
        vol_scenarios,
    )
    assert code == 0, err
    h = HISTORY.select(["AAPL"])
    t = int(np.flatnonzero(h.dates == np.datetime64(AS_OF))[0])
    closes = h.closes[t - 250 : t + 1, 0]
    spot = closes[-1]  # the close on --as-of
    vol_mult = np.ones(250)
    if (
        vol_scenarios == "proxy"
    ):  # EWMA (0.94) volatility at each day's end over its start, seeded by mean r^2
        r = np.diff(np.log(closes))
        v = [np.mean(r * r)]
        for x in r:
            v.append(0.94 * v[-1] + 0.06 * x * x)
        vol_mult = np.sqrt(np.array(v[1:]) / np.array(v[:-1]))
    var, es = _tail(_ql_book_pnl(closes, spot, vol_mult), 0.99)  # 2.5 tail scenarios: the 3rd worst
    acc = {a["account"]: a for a in doc["accounts"]}
    assert doc["model"] == "hvar" and doc["as_of"] == AS_OF and doc["horizon_days"] == 1
    assert acc["O"]["var"] == pytest.approx(var, rel=1e-8)
    assert acc["O"]["es"] == pytest.approx(es, rel=1e-8)
    assert acc["O"]["margin"] == acc["O"]["var"]  # calc.hvar_margin = "var"
    assert acc["O"]["components"]["filtered"] == acc["O"]["var"]
    assert acc["O"]["components"]["option_credit"] == 0.0 and acc["O"]["param_id"].startswith("hvar:")


def test_spot_from_the_positions_price(capsys, book):
    # AAPL at 150 instead of its close: the options are revalued around 150; an option's own price is its
    # value for the add-ons only (the scenario P&L reprices from the model's value)
    (book / "pos.csv").write_text(
        "account,sym,qty,price\nO,AAPL,300,150\nO,AAPL_C140,-4,99\nO,AAPL_P130,6,99\n"
    )
    code, doc, err = _ccp_run(
        capsys, book, "--model", "hvar", "--lookback-days", "100", "--vol-scenarios", "none"
    )
    assert code == 0, err
    h = HISTORY.select(["AAPL"])
    t = int(np.flatnonzero(h.dates == np.datetime64(AS_OF))[0])
    var, es = _tail(_ql_book_pnl(h.closes[t - 100 : t + 1, 0], 150.0, np.ones(100)), 0.99)
    assert doc["accounts"][0]["var"] == pytest.approx(var, rel=1e-8)
    assert doc["accounts"][0]["es"] == pytest.approx(es, rel=1e-8)


@pytest.mark.parametrize("filtered", [[], ["--filtered", "--filter-lambda", "0.97"]])
def test_stock_book_with_instruments_gives_todays_hvar(capsys, pos, filtered):
    common = [
        "--positions",
        str(pos),
        "--history",
        str(PRICES),
        "--lookback-days",
        "500",
        "--json",
        *filtered,
    ]
    code, engine, err = run(capsys, "--model", "hvar", "--confidence", "0.975", *common)
    assert code == 0, err
    inst = str(ROOT / "data" / "demo" / "instruments.csv")
    code, full, err = run(capsys, "--model", "hvar", "--confidence", "0.975", "--instruments", inst, *common)
    assert code == 0, err
    for a, b in zip(engine["accounts"], full["accounts"], strict=True):
        assert a["account"] == b["account"]
        assert b["var"] == pytest.approx(a["var"], rel=1e-12) and b["es"] == pytest.approx(a["es"], rel=1e-12)
        assert b["margin"] == pytest.approx(a["margin"], rel=1e-12)


def _filtered_2day(closes, lam):
    """Filtered HS scenarios by hand: daily log returns rescaled by sigma_T / sigma_t (EWMA seeded with
    the mean square), summed over overlapping 2-day windows, as simple returns."""
    r = np.diff(np.log(closes), axis=0)
    v = [np.mean(r * r, axis=0)]
    for x in r:
        v.append(lam * v[-1] + (1 - lam) * x * x)
    sig = np.sqrt(np.array(v))
    f = r * sig[-1] / sig[:-1]
    return np.expm1(f[1:] + f[:-1])


def test_prisma_model_components_by_hand(capsys, tmp_path):
    (tmp_path / "pos.csv").write_text("account,sym,qty\nS,XOM,-500\nS,AAPL,200\n")
    (tmp_path / "q.csv").write_text("sym,bid,ask,adv\nXOM,109.9,110.1,1000\nAAPL,129.8,130.2,\n")
    prisma = ["--model", "prisma", "--positions", str(tmp_path / "pos.csv"), "--history", str(PRICES)]
    code, doc, err = run(
        capsys,
        *prisma,
        "--quotes",
        str(tmp_path / "q.csv"),
        "--as-of",
        "2022-12-28",
        "--json",
    )
    assert code == 0, err
    h = HISTORY.select(["XOM", "AAPL"])
    x = np.array([-500.0, 200.0]) * h.closes[-1]
    # filtered: ES 99 % of 2-day filtered scenarios (lambda 0.94) over the last 750 returns
    f_var, f_es = _tail(_filtered_2day(h.closes[-751:], 0.94) @ x, 0.99)
    # stressed: 2008-06-02 .. 2009-05-29 unfiltered 2-day returns
    on = (h.dates >= np.datetime64("2008-06-02")) & (h.dates <= np.datetime64("2009-05-29"))
    c = h.closes[on]
    _, s_es = _tail((c[2:] / c[:-2] - 1) @ x, 0.99)
    liq = 500 * 0.1 + 200 * 0.2  # half spreads 0.1 and 0.2
    conc = 0.02 * (500 - 0.1 * 1000) * h.closes[-1, 0]  # XOM above 10 % of its ADV; AAPL has no ADV
    a = doc["accounts"][0]
    comp = a["components"]
    assert doc["model"] == "prisma" and doc["horizon_days"] == 2 and a["param_id"].startswith("prisma:")
    assert (a["var"], a["es"], comp["filtered"]) == pytest.approx((f_var, f_es, f_es), rel=1e-9)
    assert comp["stressed"] == pytest.approx(s_es, rel=1e-9)
    assert comp["base"] == pytest.approx(max(f_es, s_es), rel=1e-9)
    assert (comp["liquidity"], comp["concentration"], comp["option_credit"]) == pytest.approx(
        (liq, conc, 0.0)
    )
    assert a["margin"] == pytest.approx(math.ceil((max(f_es, s_es) + liq + conc) / 0.01 - 1e-9) * 0.01)
    # a command-line value wins over the preset's (and changes the parameter set)
    code, d99, _ = run(
        capsys,
        *prisma,
        "--horizon-days",
        "1",
        "--json",
    )
    assert code == 0 and d99["horizon_days"] == 1 and d99["param_id"] != doc["param_id"]


def test_compare_every_configured_model_side_by_side(capsys, book, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[calc.ccp_models]]\nname = "eu"\npreset = "span2"\napc = "floor"\n'
        '[[calc.ccp_models]]\nname = "plain"\nconfidence = 0.975\nlookback_days = 250\n'
    )
    surface = ["--config", str(cfg), "--vol-surface", str(ROOT / "data" / "demo" / "volsurface.csv")]
    code, doc, err = _ccp_run(capsys, book, "--compare", *surface)
    assert code == 0, err
    assert doc["compare"] == ["hvar", "eu", "plain"]
    for a in doc["accounts"]:
        assert list(a["models"]) == ["hvar", "eu", "plain"]
        eu = a["models"]["eu"]
        c = eu["components"]
        # floor: never below the 10-year unfiltered measure; margin = the components' sum, rounded up to 1
        assert c["apc"] >= 0.0 and c["base"] == pytest.approx(0.75 * c["filtered"] + 0.25 * c["stressed"])
        total = c["base"] + c["apc"] + c["liquidity"] + c["concentration"] - c["option_credit"]
        assert eu["margin"] == math.ceil(max(total, 0.0) - 1e-9)
    # "plain" (no preset) is the plain HS VaR at its own confidence / lookback: the hvar of those settings
    plain = ["--model", "hvar", "--confidence", "0.975", "--lookback-days", "250"]
    code, hv, err = _ccp_run(capsys, book, *plain, *surface)
    assert code == 0, err
    for a, b in zip(doc["accounts"], hv["accounts"], strict=True):
        assert a["models"]["plain"]["margin"] == pytest.approx(b["margin"], rel=1e-12)
    # the readable table: a header, then one row per account and model
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "marginflow.cli",
            "margin",
            "--compare",
            *_ccp_args(book),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["account", "model", "margin", "var", "es"] and "option_credit" in lines[0]
    assert [ln.split()[:2] for ln in lines[1:]] == [[a, m] for a in "OS" for m in ("hvar", "prisma", "span2")]


def test_ccp_bad_input_exits_with_one_clear_line(capsys, book, tmp_path):
    base = ["--instruments", str(book / "inst.csv"), "--positions", str(book / "pos.csv")]
    hist = [*base, "--history", str(PRICES)]
    _one_line_error(capsys, [*hist, "--model", "nope"], "--model: unknown model 'nope'")
    _one_line_error(
        capsys,
        ["--positions", str(book / "pos.csv"), "--history", str(PRICES), "--model", "var", "--as-of", AS_OF],
        "--as-of: only with --instruments, --compare, hvar or a CCP model",
    )
    _one_line_error(capsys, [*hist], "--model: required")
    _one_line_error(capsys, [*base, "--model", "hvar"], "needs --history")
    _one_line_error(capsys, [*hist, "--model", "var"], "--model var: not a historical-simulation model")
    _one_line_error(
        capsys, [*hist, "--model", "hvar", "--as-of", "2022-07-02"], "--as-of: no close on 2022-07-02"
    )
    _one_line_error(capsys, [*hist, "--model", "hvar", "--as-of", "June"], "--as-of: 'June' is not a date")
    # the stressed period must lie before --as-of, within the history
    _one_line_error(capsys, [*hist, "--model", "prisma", "--as-of", "2008-12-31"], "stress_from .. stress_to")
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[calc.ccp_models]]\nname = "x"\nlong_option_credit = 2.0\n')
    _one_line_error(
        capsys,
        [*hist, "--compare", "--config", str(cfg)],
        "calc.ccp_models[0].long_option_credit: must be in [0, 1]",
    )
    q = tmp_path / "q.csv"
    q.write_text("sym,bid,ask\nAAPL,10,9\n")
    _one_line_error(capsys, [*hist, "--model", "prisma", "--quotes", str(q)], "row 1 (line 2), field ask")
    q.write_text("sym,bid,ask,adv\nAAPL,9,10,-1\n")
    _one_line_error(capsys, [*hist, "--model", "prisma", "--quotes", str(q)], "field adv: -1.0 is not > 0")
    inst = tmp_path / "i.csv"
    inst.write_text(INSTRUMENTS.replace("0.32,0.03", ",0.03"))
    _one_line_error(
        capsys,
        [
            "--instruments",
            str(inst),
            "--positions",
            str(book / "pos.csv"),
            "--history",
            str(PRICES),
            "--model",
            "hvar",
        ],
        "option 'AAPL_C140' has no vol",
    )


def test_hvar_as_of_a_past_date_without_instruments(capsys, pos):
    # --as-of takes hvar through full revaluation (every position linear here): the scenarios end on it
    argv = f"--model hvar --positions {pos} --history {PRICES} --as-of {AS_OF} --lookback-days 500"
    code, doc, err = run(capsys, *argv.split(), "--confidence", "0.975", "--json")
    assert code == 0, err
    h = HISTORY.select(["AAPL", "XOM", "KO"])
    t = int(np.flatnonzero(h.dates == np.datetime64(AS_OF))[0])
    c = h.closes[t - 500 : t + 1]
    var, es = _tail((c[1:] / c[:-1] - 1) @ (np.array([1000, -500, 2000]) * c[-1]), 0.975)
    assert doc["accounts"][0]["var"] == pytest.approx(var, rel=1e-9)
    assert doc["accounts"][0]["es"] == pytest.approx(es, rel=1e-9)
