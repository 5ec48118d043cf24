"""calc models and inputs against independent calculations: scipy's normal quantile, hand-computed
HS VaR/ES, explicit loops for covariances and filtering, price ratios for h-day scenarios."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from calc.history import (
    InputError,
    covariance,
    filter_returns,
    load_covariance,
    load_prices,
    log_returns,
    scenario_returns,
    write_covariance,
)
from calc.models import (
    OTHER,
    build_stress,
    historical,
    norm_ppf,
    parametric,
    params_from_history,
    stress,
    stressed_cov,
    tail_count,
    tail_weights,
)
from marginflow import config
from marginflow.config import StressScenarioConfig
from tests.support import PRICES_FILE
from tests.support.drivers import top_drivers

PRICES = PRICES_FILE


# ---------------------------------------------------------------- normal quantile


def test_norm_ppf_matches_scipy_across_the_range():
    ps = np.concatenate(
        [np.linspace(1e-10, 1 - 1e-10, 20001), [1e-300, 1e-50, 1e-15, 0.5, 0.975, 0.99, 0.999]]
    )
    ours = np.array([norm_ppf(float(p)) for p in ps])
    ref = norm.ppf(ps)
    assert np.max(np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))) < 1e-14


def test_norm_ppf_99_is_exact_not_2_33():
    assert norm_ppf(0.99) == pytest.approx(2.3263478740408408, rel=1e-15)
    assert abs(norm_ppf(0.99) - 2.33) > 3e-3


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_norm_ppf_refuses_outside_0_1(bad):
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        norm_ppf(bad)


# ---------------------------------------------------------------- historical simulation


def test_tail_count_and_weights_by_hand():
    # (1 - 0.99) * 500 is 5.000000000000004 in floating point: k must be 5, not 6
    assert (1 - 0.99) * 500 > 5
    assert tail_count(0.99, 500) == 5
    assert np.allclose(tail_weights(0.99, 500), [0.2] * 5)
    # 250 scenarios at 99%: tail 2.5 -> k = 3, weights 1/2.5, 1/2.5, 0.5/2.5
    assert tail_count(0.99, 250) == 3
    assert np.allclose(tail_weights(0.99, 250), [0.4, 0.4, 0.2])
    # fewer scenarios than 1/(1-c): the worst loss
    assert tail_count(0.99, 50) == 1 and np.allclose(tail_weights(0.99, 50), [1.0])


def test_hs_var_es_hand_example():
    # one position of exposure 1000 over 10 scenarios; c = 0.75 -> tail 2.5, k = 3
    r = np.array([0.01, -0.05, 0.02, -0.03, 0.00, -0.01, 0.04, -0.02, 0.03, -0.04])
    res = historical(np.array([[1000.0]]), r[:, None], 0.75)
    # losses: 50, 40, 30, 20, 10, ... -> VaR = 3rd worst = 30; ES = (50 + 40 + 0.5*30) / 2.5 = 42
    assert res.var[0] == pytest.approx(30.0)
    assert res.es[0] == pytest.approx(42.0)
    assert res.extra["var_scenario"][0] == 3  # the -3% day
    assert res.contrib[0, 0] == pytest.approx(30.0)
    es_drv = historical(np.array([[1000.0]]), r[:, None], 0.75, margin_on="es")
    assert es_drv.contrib[0, 0] == pytest.approx(42.0)


def test_hs_against_numpy_sort_on_real_history():
    h = load_prices(PRICES).window(504).validate()
    scen = scenario_returns(h.closes, 1, False, 0.94)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1e6, (7, 20))
    res = historical(x, scen, 0.99)
    for a in range(7):
        losses = np.sort(-(scen @ x[a]))[::-1]  # worst first
        t = len(scen)
        tail = (1 - 0.99) * t  # 5.04 for 504 scenarios
        k = math.ceil(tail)
        assert k == 6 and t == 504
        assert res.var[a] == pytest.approx(losses[k - 1], rel=1e-12)
        es = (losses[: k - 1].sum() + (tail - (k - 1)) * losses[k - 1]) / tail
        assert res.es[a] == pytest.approx(es, rel=1e-12)
        assert res.contrib[a].sum() == pytest.approx(res.var[a], rel=1e-12)


def test_overlapping_h_day_scenarios_are_price_ratios():
    h = load_prices(PRICES).window(300).validate()
    s5 = scenario_returns(h.closes, 5, False, 0.94)
    assert s5.shape == (300 - 5 + 1, 20)
    ratio = h.closes[5:] / h.closes[:-5] - 1.0
    assert np.allclose(s5, ratio, rtol=1e-10, atol=1e-13)


def test_filtered_returns_against_an_explicit_ewma_loop():
    h = load_prices(PRICES).window(120).validate()
    r = log_returns(h.closes)
    lam = 0.94
    out = filter_returns(r, lam)
    for i in (0, 7, 19):
        col = r[:, i]
        var = [float(np.mean(col**2))]
        for t in range(len(col)):
            var.append(lam * var[-1] + (1 - lam) * col[t] ** 2)
        sig = np.sqrt(var)
        expect = [col[t] * sig[-1] / sig[t] for t in range(len(col))]
        assert np.allclose(out[:, i], expect, rtol=1e-12)
    # filtering rescales to today's volatility: the filtered EWMA variance ends near today's
    assert not np.allclose(out, r)


# ---------------------------------------------------------------- parametric


def test_covariances_equal_weight_and_ewma():
    h = load_prices(PRICES).window(252).validate()
    r = log_returns(h.closes)
    assert np.allclose(covariance(r), np.cov(r.T), rtol=1e-12, atol=0)
    lam = 0.94
    t_len = len(r)
    weights = [(1 - lam) * lam ** (t_len - 1 - t) for t in range(t_len)]
    total = sum(weights)
    expect = sum(w / total * np.outer(r[t], r[t]) for t, w in enumerate(weights))
    assert np.allclose(covariance(r, lam), expect, rtol=1e-12, atol=0)


def test_parametric_var_by_hand_two_assets():
    # sigma 2% and 3%, correlation 0.5, exposures +1m and -0.5m, 10-day horizon, 99%
    s1, s2, rho = 0.02, 0.03, 0.5
    cov = np.array([[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]])
    x = np.array([[1e6, -5e5]])
    var_sd = math.sqrt((1e6 * s1) ** 2 + (5e5 * s2) ** 2 - 2 * rho * 1e6 * s1 * 5e5 * s2)  # 17,320.508...
    expect = norm.ppf(0.99) * math.sqrt(10) * var_sd
    res = parametric(x, cov, norm_ppf(0.99) * math.sqrt(10))
    assert res.var[0] == pytest.approx(expect, rel=1e-13)
    assert res.contrib[0].sum() == pytest.approx(expect, rel=1e-13)
    # component VaR of asset 1: x1 (Cx)_1 / sd * scale
    c1 = 1e6 * (s1 * s1 * 1e6 - rho * s1 * s2 * 5e5) / var_sd * norm.ppf(0.99) * math.sqrt(10)
    assert res.contrib[0, 0] == pytest.approx(c1, rel=1e-12)


def test_params_from_history_uses_the_lookback_window():
    h = load_prices(PRICES)
    p = params_from_history(h, confidence=0.99, horizon_days=1, lookback_days=504)
    r = log_returns(h.closes[-505:])
    assert p.scenarios.shape == (504, 20)
    assert np.allclose(p.cov, np.cov(r.T), rtol=1e-12)
    assert p.scale == pytest.approx(norm.ppf(0.99))
    p10 = params_from_history(h, confidence=0.975, horizon_days=10, lookback_days=252)
    assert p10.scenarios.shape == (243, 20) and p10.scale == pytest.approx(norm.ppf(0.975) * math.sqrt(10))


# ---------------------------------------------------------------- stress


def test_stressed_covariance_and_stress_loss_by_hand():
    s = np.array([0.02, 0.01, 0.03])
    rho = np.array([[1.0, 0.6, -0.2], [0.6, 1.0, 0.8], [-0.2, 0.8, 1.0]])
    cov = rho * np.outer(s, s)
    scen = build_stress(
        [
            StressScenarioConfig(
                name="crash",
                shocks={"tech": -0.2, "C": 0.1},
                correlation_multiplier=1.5,
                volatility_multiplier=2,
            )
        ],
        {"A": "tech", "B": "tech", "C": "tech"},
        ["A", "B", "C"],
    )
    assert scen.shocks.tolist() == [[-0.2, -0.2, 0.1]]  # C's own shock beats its sector's
    ck = stressed_cov(cov, scen.shocks[0], 1.5, 2.0)
    # by hand: correlation 0.6 * 1.5 = 0.9; 0.8 * 1.5 = 1.2 -> clipped to 1; vols doubled, times (1 + shock)
    f = 2 * s * np.array([0.8, 0.8, 1.1])
    assert ck[0, 1] == pytest.approx(0.9 * f[0] * f[1])
    assert ck[1, 2] == pytest.approx(1.0 * f[1] * f[2])
    assert ck[0, 2] == pytest.approx(-0.3 * f[0] * f[2])
    assert ck[2, 2] == pytest.approx(f[2] ** 2)
    x = np.array([[1e6, 2e6, -1e6]])
    z = norm.ppf(0.99)
    shock_loss = -(1e6 * -0.2 + 2e6 * -0.2 + -1e6 * 0.1)  # 700,000
    xs = x[0] * np.array([0.8, 0.8, 1.1])  # post-shock exposures
    rho_s = np.clip(rho * 1.5, -1, 1)
    np.fill_diagonal(rho_s, 1)
    sd_s = 2 * s
    v = sum(xs[i] * xs[j] * rho_s[i, j] * sd_s[i] * sd_s[j] for i in range(3) for j in range(3))
    res = stress(x, cov, scen, z)
    assert res.var[0] == pytest.approx(shock_loss + z * math.sqrt(v), rel=1e-12)
    assert res.contrib[0].sum() == pytest.approx(res.var[0], rel=1e-12)


@pytest.mark.parametrize(
    "bad", [{"shocks": {"A": -1.0}}, {"shocks": {"A": float("nan")}}, {"correlation_multiplier": -1}]
)
def test_stress_config_refused(bad):
    with pytest.raises(SystemExit, match="calc.stress"):  # when the config is loaded
        config.load(overrides={"calc": {"stress": [{"name": "x", **bad}]}})


def test_top_drivers_sum_with_other_bucket():
    syms = ["A", "B", "C", "D"]
    d = top_drivers(syms, np.array([1.0, 2.0, 3.0, 0.0]), np.array([5.0, -1.0, 3.0, 0.0]), 2)
    assert [x["sym"] for x in d] == ["A", "C", OTHER]  # D holds nothing and is left out
    assert sum(x["contribution"] for x in d) == pytest.approx(7.0)


# ---------------------------------------------------------------- loading inputs


def test_wide_long_csv_gz_parquet_load_the_same(tmp_path):
    wide = load_prices(PRICES)
    t = 40
    dates = np.repeat(wide.dates[-t:], 3)
    syms = ["AAPL", "MSFT", "XOM"] * t
    sub = wide.select(["AAPL", "MSFT", "XOM"])
    close = sub.closes[-t:].ravel()
    long = pa.table({"date": dates.astype(str), "sym": syms, "close": close})
    pq.write_table(long, tmp_path / "long.parquet")
    csv_text = "date,sym,close\n" + "".join(
        f"{d},{s},{float(c)!r}\n" for d, s, c in zip(dates.astype(str), syms, close, strict=True)
    )
    with gzip.open(tmp_path / "long.csv.gz", "wt") as f:
        f.write(csv_text)
    for p in (tmp_path / "long.parquet", tmp_path / "long.csv.gz"):
        h = load_prices(p)
        assert h.syms == ["AAPL", "MSFT", "XOM"]
        assert (h.dates == wide.dates[-t:]).all()
        assert np.array_equal(h.closes, sub.closes[-t:])


@pytest.mark.parametrize(
    "text, match",
    [
        ("Date,AAPL\n", "empty history"),
        ("date,sym,price\n2020-01-01,A,1\n", "missing column 'close'"),
        ("Date,AAPL\n2020-01-01,1\n2020-01-01,2\n", "repeated date"),
        ("Date,AAPL\n2020-01-01,abc\n", "expected numbers"),
    ],
)
def test_bad_price_files(tmp_path, text, match):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        load_prices(p)


def test_nan_price_named_with_sym_and_date(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("Date,AAPL,MSFT\n2020-01-01,1,2\n2020-01-02,1.1,\n2020-01-03,1.2,2.1\n2020-01-04,1.3,2.2\n")
    with pytest.raises(InputError, match="NaN price for sym 'MSFT' on 2020-01-02"):
        load_prices(p).validate()
    # outside the lookback window it does not matter
    assert load_prices(p).window(1).validate().closes.shape == (2, 2)


def test_covariance_file_roundtrip_and_errors(tmp_path):
    h = load_prices(PRICES).window(100)
    cov = covariance(log_returns(h.closes))
    write_covariance(tmp_path / "c.csv", h.syms, cov)
    syms, back = load_covariance(tmp_path / "c.csv")
    assert syms == h.syms and np.array_equal(back, cov)
    # an unlabelled square file works too
    (tmp_path / "u.csv").write_text("A,B\n0.0004,0.0001\n0.0001,0.0009\n")
    syms, c = load_covariance(tmp_path / "u.csv")
    assert syms == ["A", "B"] and c[1, 1] == 0.0009
    (tmp_path / "bad.csv").write_text("A,B\n0.0004,0.0002\n0.0001,0.0009\n")
    with pytest.raises(InputError, match="not symmetric"):
        load_covariance(tmp_path / "bad.csv")
    (tmp_path / "rect.csv").write_text("A,B\n0.0004,0.0002\n")
    with pytest.raises(InputError, match="square"):
        load_covariance(tmp_path / "rect.csv")


def test_norm_ppf_matches_a_table_of_known_quantiles():
    """Without scipy: Phi^-1 at tabulated points (15+ significant digits)."""
    table = {
        0.5: 0.0,
        0.8413447460685429: 1.0,
        0.975: 1.959963984540054,
        0.99: 2.3263478740408408,
        0.999: 3.090232306167813,
        0.025: -1.959963984540054,
        1e-10: -6.361340902404056,
    }
    for p, z in table.items():
        assert norm_ppf(p) == pytest.approx(z, rel=1e-14, abs=1e-15), p
