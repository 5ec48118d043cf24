"""Backtest statistics: Kupiec / Christoffersen / Basel zones against hand-written likelihoods, closed-form
tails and the BCBS table; predicted-vs-actual accuracy on a hand-made fixture; bad actual-calls files give
report lines."""

from __future__ import annotations

import datetime as dt
import gzip
import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from replay import accuracy, coverage
from schemas.tables import TABLES

T, P = 250, 0.01


# ------------------------------------------------------------------ hand-written log-likelihoods
def hand_kupiec(x: int, n: int, p: float) -> float:
    """LR_pof = -2 ln[(1-p)^(n-x) p^x] + 2 ln[(1-x/n)^(n-x) (x/n)^x], with 0 ln 0 = 0."""
    pi = x / n
    log_l0 = (n - x) * math.log(1 - p) + (x * math.log(p) if x else 0.0)
    log_l1 = ((n - x) * math.log(1 - pi) if x < n else 0.0) + (x * math.log(pi) if x else 0.0)
    return -2 * (log_l0 - log_l1)


def hand_independence(n00: int, n01: int, n10: int, n11: int) -> float:
    """LR_ind = -2 ln[(1-pi)^(n00+n10) pi^(n01+n11)]
    + 2 ln[(1-pi01)^n00 pi01^n01 (1-pi11)^n10 pi11^n11]."""

    def t(n: int, q: float) -> float:
        return n * math.log(q) if n else 0.0

    pi = (n01 + n11) / (n00 + n01 + n10 + n11)
    pi01 = n01 / (n00 + n01)
    pi11 = n11 / (n10 + n11) if n10 + n11 else 0.0
    log_l0 = t(n00 + n10, 1 - pi) + t(n01 + n11, pi)
    log_l1 = t(n00, 1 - pi01) + t(n01, pi01) + t(n10, 1 - pi11) + t(n11, pi11)
    return -2 * (log_l0 - log_l1)


def series(days: list[int], n: int = T) -> np.ndarray:
    h = np.zeros(n, dtype=bool)
    h[days] = True
    return h


# ------------------------------------------------------------------------------------- Kupiec
@pytest.mark.parametrize("x", [0, 2, 4, 5, 10])
def test_kupiec_equals_hand_likelihood_ratio(x):
    r = coverage.kupiec_pof(x, T, P)
    assert r.statistic == pytest.approx(hand_kupiec(x, T, P), rel=1e-12, abs=1e-12)
    assert r.dof == 1
    assert r.p_value == pytest.approx(stats.chi2.sf(hand_kupiec(x, T, P), 1), rel=1e-9, abs=1e-15)


def test_kupiec_zero_exceptions_closed_form_and_decisions():
    # x = 0: LR = -2 * 250 * ln(0.99), which exceeds the 5% critical value 3.841: rejected (too few)
    r0 = coverage.kupiec_pof(0, T, P)
    assert r0.statistic == pytest.approx(-500 * math.log(0.99), rel=1e-12)
    assert r0.reject(0.05)
    crit = stats.chi2.ppf(0.95, 1)
    for x in range(0, 12):
        assert coverage.kupiec_pof(x, T, P).reject(0.05) == (hand_kupiec(x, T, P) > crit)
    # the non-rejection region at 5% for T = 250, p = 1% is 1..6 exceptions
    assert [x for x in range(12) if not coverage.kupiec_pof(x, T, P).reject(0.05)] == [1, 2, 3, 4, 5, 6]


def test_kupiec_edges_finite():
    all_hit = coverage.kupiec_pof(T, T, P)
    assert all_hit.statistic == pytest.approx(-2 * T * math.log(P))
    assert all_hit.p_value == 0.0 or all_hit.p_value < 1e-300
    exact = coverage.kupiec_pof(5, 500, P)  # x / T == p: no evidence at all
    assert exact.statistic == pytest.approx(0.0, abs=1e-9) and exact.p_value == pytest.approx(1.0)
    assert coverage.kupiec_pof(0, 0, P).p_value == 1.0
    for bad in [dict(x=3, n=2, p=P), dict(x=-1, n=5, p=P), dict(x=1, n=5, p=0.0), dict(x=1, n=5, p=1.5)]:
        with pytest.raises(ValueError):
            coverage.kupiec_pof(bad["x"], bad["n"], bad["p"])


# ----------------------------------------------------------------------------- Christoffersen
CASES = {
    # exception days -> transition counts written out by hand (T = 250, so 249 pairs)
    "none": ([], (249, 0, 0, 0)),
    "two apart": ([100, 200], (245, 2, 2, 0)),  # 99->100, 199->200 enter; 100->101, 200->201 leave
    "four apart": ([30, 90, 150, 210], (241, 4, 4, 0)),
    # enter 9->10, 49->50, 119->120; stay 10->11, 120->121; leave 11->12, 50->51, 121->122
    "five with two clusters": ([10, 11, 50, 120, 121], (241, 3, 3, 2)),
    "ten at the end": (list(range(240, 250)), (239, 1, 0, 9)),  # no day follows the last exception
}


@pytest.mark.parametrize("name", list(CASES))
def test_christoffersen_independence_equals_hand(name):
    days, counts = CASES[name]
    h = series(days)
    assert coverage.transition_counts(h) == counts
    r = coverage.christoffersen_independence(h)
    expected = hand_independence(*counts) if days else 0.0
    assert r.statistic == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert r.p_value == pytest.approx(stats.chi2.sf(expected, 1), rel=1e-9, abs=1e-15)
    assert not math.isnan(r.statistic) and not math.isnan(r.p_value)
    # counts given directly (the pooled path) give the same answer
    assert coverage.christoffersen_independence(counts).statistic == pytest.approx(r.statistic, abs=1e-12)


def test_clustering_is_detected_and_spread_is_not():
    clustered = coverage.christoffersen_independence(series([100, 101, 102, 103, 104]))
    spread = coverage.christoffersen_independence(series([10, 60, 110, 160, 210]))
    assert clustered.reject(0.01) and not spread.reject(0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_conditional_coverage_is_sum_with_two_dof(name):
    days, counts = CASES[name]
    lr = hand_kupiec(len(days), T, P) + (hand_independence(*counts) if days else 0.0)
    r = coverage.conditional_coverage(series(days), P)
    assert r.dof == 2
    assert r.statistic == pytest.approx(lr, rel=1e-12)
    assert r.p_value == pytest.approx(stats.chi2.sf(lr, 2), rel=1e-9, abs=1e-15)


def test_christoffersen_edges_do_not_produce_nan():
    for h in ([], [True], [False], [True] * 10, [False] * 10, [True, False], [False, True]):
        for r in (
            coverage.christoffersen_independence(np.array(h, dtype=bool)),
            coverage.conditional_coverage(np.array(h, dtype=bool), P),
        ):
            assert math.isfinite(r.statistic) and 0.0 <= r.p_value <= 1.0
    assert coverage.christoffersen_independence(np.array([True])).note  # says there is no transition
    assert coverage.christoffersen_independence([True] * 10).statistic == 0.0  # pi01 undefined, pi11 = 1


# ------------------------------------------------------------------------------------------ tails
@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 6])
def test_chi2_sf_equals_closed_forms(dof):
    # independent of scipy: even dof exp(-x/2) sum_{i<k/2} (x/2)^i / i!; odd dof erfc(sqrt(x/2)) plus
    # sqrt(2x/pi) exp(-x/2) sum_{i=1}^{(k-1)/2} x^(i-1) / (1*3*...*(2i-1))
    def closed(x: float) -> float:
        if dof % 2 == 0:
            return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(dof // 2))
        odd = [math.prod(range(1, 2 * i, 2)) for i in range(1, (dof - 1) // 2 + 1)]
        tail = sum(x ** (i - 1) / d for i, d in enumerate(odd, start=1))
        return math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2) * tail

    for x in (1e-6, 0.1, 1.0, 3.841, 5.0, 12.9, 40.0, 200.0):
        assert coverage.chi2_sf(x, dof) == pytest.approx(closed(x), rel=1e-9, abs=1e-300)
    assert coverage.chi2_sf(0.0, dof) == 1.0 and coverage.chi2_sf(math.inf, dof) == 0.0
    for bad in ((1.0, 0), (1.0, 1.5), (math.nan, 1)):
        with pytest.raises(ValueError):
            coverage.chi2_sf(*bad)


def test_chi2_sf_at_published_critical_values():
    # the 5% and 1% critical values of chi-square tables, 1 and 2 dof
    for x, dof, p in ((3.841459, 1, 0.05), (6.634897, 1, 0.01), (5.991465, 2, 0.05), (9.210340, 2, 0.01)):
        assert coverage.chi2_sf(x, dof) == pytest.approx(p, rel=1e-6)


def test_binom_cdf_equals_exact_sums_and_the_bcbs_table():
    from fractions import Fraction

    for n, p in ((250, 0.01), (500, 0.01), (1000, 0.025)):
        q = Fraction(p)
        for k in (0, 1, 4, 9, int(n * p), int(n * p * 1.5)):
            exact = sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1))
            assert coverage.binom_cdf(k, n, p) == pytest.approx(float(exact), rel=1e-9)
    # BCBS (1996) table 1: cumulative probability of 0..10 exceptions in 250 days at 99%, in percent
    published = [8.11, 28.58, 54.32, 75.81, 89.22, 95.88, 98.63, 99.60, 99.89, 99.97, 99.99]
    assert [round(coverage.binom_cdf(k, 250, 0.01) * 100, 2) for k in range(11)] == published
    assert coverage.binom_cdf(-1, 10, 0.1) == 0.0 and coverage.binom_cdf(10, 10, 0.1) == 1.0
    with pytest.raises(ValueError):
        coverage.binom_cdf(1, -1, 0.1)


# ------------------------------------------------------------------------------ traffic light
@pytest.mark.parametrize(
    "x,zone", [(0, "green"), (4, "green"), (5, "yellow"), (9, "yellow"), (10, "red"), (25, "red")]
)
def test_traffic_light_basel_boundaries(x, zone):
    tl = coverage.traffic_light(x, 250, 0.01)
    assert tl.zone == zone
    assert (tl.green_max, tl.yellow_max) == (4, 9)
    assert tl.cumulative_probability == pytest.approx(stats.binom.cdf(x, 250, 0.01), rel=1e-9)


def test_traffic_light_plus_factors_from_bcbs_table():
    table = {0: 0.0, 4: 0.0, 5: 0.40, 6: 0.50, 7: 0.65, 8: 0.75, 9: 0.85, 10: 1.0}
    for x, plus in table.items():
        assert coverage.traffic_light(x, 250, 0.01).plus_factor == plus
    assert coverage.traffic_light(3, 500, 0.01).plus_factor is None


@pytest.mark.parametrize("n", [100, 500, 750, 1000])
def test_traffic_light_scales_by_binomial(n):
    # boundaries derived with scipy: yellow starts where P(X <= x) >= 95%, red where >= 99.99%
    cdf = stats.binom.cdf(np.arange(n + 1), n, 0.01)
    yellow_start = int(np.argmax(cdf >= 0.95))
    red_start = int(np.argmax(cdf >= 0.9999))
    assert coverage.zone_boundaries(n, 0.01) == (yellow_start - 1, red_start - 1)
    assert coverage.traffic_light(yellow_start - 1, n).zone == "green"
    assert coverage.traffic_light(yellow_start, n).zone == "yellow"
    assert coverage.traffic_light(red_start - 1, n).zone == "yellow"
    assert coverage.traffic_light(red_start, n).zone == "red"


def test_traffic_light_short_sample_zero_is_green_with_note():
    tl = coverage.traffic_light(0, 10, 0.01)
    assert tl.zone == "green" and "indicative" in tl.note
    assert coverage.traffic_light(0, 0, 0.01).zone == "green"


# ---------------------------------------------------------------------------- exceptions + series
def test_hypothetical_pnl_by_hand():
    q = np.array([[10.0, -5.0], [0.0, 2.0]])  # start-of-day positions, 2 days x 2 instruments
    px = np.array(
        [[100.0, 50.0], [98.0, 51.0], [99.0, 49.0]]
    )  # 3 price rows: start, after day 1, after day 2
    # day 1: 10 * (98 - 100) * 1 + (-5) * (51 - 50) * 100 = -20 - 500; day 2: 0 + 2 * (49 - 51) * 100 = -400
    assert coverage.hypothetical_pnl(q, px, np.array([1.0, 100.0])).tolist() == [-520.0, -400.0]
    with pytest.raises(ValueError, match="prices must have shape"):
        coverage.hypothetical_pnl(q, px[:2])
    with pytest.raises(ValueError, match=r"prices\[1, 0\] is nan"):
        coverage.hypothetical_pnl(q, np.where(px == 98.0, np.nan, px))


def test_exceptions_strictly_beyond_var():
    pnl = np.array([-5.0, -10.0, -10.000001, 3.0, -0.5])
    var = np.array([10.0, 10.0, 10.0, 0.0, 0.0])
    assert coverage.exceptions(pnl, var).tolist() == [False, False, True, False, True]


@pytest.mark.parametrize(
    "pnl,var,msg",
    [
        ([1.0, float("nan")], [1.0, 1.0], "pnl[1]"),
        ([1.0, 2.0], [1.0, float("inf")], "var[1]"),
        ([1.0, 2.0], [1.0, -3.0], "var[1]"),
        ([1.0], [1.0, 2.0], "1 days but var has 2"),
    ],
)
def test_exceptions_bad_input_names_the_field(pnl, var, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        coverage.exceptions(pnl, var)


def test_coverage_per_account_pooled_and_issues():
    days = [f"d{i}" for i in range(T)]
    var = np.full(T, 10.0)
    pnl_a = np.zeros(T)
    pnl_a[[10, 11, 50, 120, 121]] = -11.0
    pnl_a[249] = -50.0  # A ends on an exception ...
    pnl_b = np.zeros(T)
    pnl_b[0] = -20.0  # ... and B starts on one: pooling must not join them
    pnl_b[7] = float("nan")
    res = coverage.coverage(
        {"A": (days, pnl_a, var), "B": (days, pnl_b, var), "C": (days[:3], [0.0, 1.0], [1.0, 1.0, 1.0])}, p=P
    )
    a, b = res.accounts["A"], res.accounts["B"]
    assert (a.days, a.exceptions) == (T, 6)
    assert a.exception_dates == ["d10", "d11", "d50", "d120", "d121", "d249"]
    assert (b.days, b.exceptions) == (T - 1, 1)
    assert "C" not in res.accounts
    assert any("'B' d7" in i and "pnl is not a finite number" in i for i in res.issues)
    assert any("'C' skipped" in i and "different lengths" in i for i in res.issues)
    pooled = res.pooled
    assert (pooled.days, pooled.exceptions) == (2 * T - 1, 7)
    assert pooled.transitions == tuple(x + y for x, y in zip(a.transitions, b.transitions, strict=True))
    assert pooled.transitions[3] == 2  # only A's two in-account repeats
    assert pooled.kupiec.statistic == pytest.approx(hand_kupiec(7, 2 * T - 1, P))
    assert pooled.independence.statistic == pytest.approx(hand_independence(*pooled.transitions))
    assert a.traffic_light.zone == "yellow" and b.traffic_light.zone == "green"
    d = res.to_dict()
    assert d["accounts"]["A"]["kupiec"]["statistic"] == pytest.approx(hand_kupiec(6, T, P))
    assert d["daily"]["B"]["exception"][0] is True and len(d["daily"]["B"]["date"]) == T - 1


# ----------------------------------------------------------------------------------- accuracy
D0 = (dt.date(2024, 1, 2) - dt.date(1970, 1, 1)).days * accuracy.DAY_NS
H = 3_600_000_000_000
DAY = accuracy.DAY_NS
PREDICTED = {
    "A": [
        (D0 + 9 * H, 80.0),
        (D0 + 10 * H, 97.0),
        (D0 + 15 * H, 103.0),
        (D0 + DAY + 9 * H, 150.0),
        (D0 + DAY + 12 * H, 196.0),
    ],
    "B": (np.array([D0 + 9 * H, D0 + DAY + 9 * H]), np.array([50.0, 40.0])),
}
CALLS_CSV = """date,account,amount,ccp,time
2024-01-02,A,100,LCH,
2024-01-03,A,200,LCH,2024-01-04T07:30:00Z
2024-01-02,B,50,LCH,12:00
20240103,B,50.0,LCH,
"""


def test_accuracy_metrics_on_hand_fixture():
    calls, issues = accuracy.parse_actual_calls(CALLS_CSV)
    assert issues == [] and len(calls) == 4
    res = accuracy.compare(PREDICTED, calls)
    assert res.issues == []
    by = {(c.account, c.date): c for c in res.calls}
    # A 01-02 at end of day: standing prediction 103 (in band 95..105 since 10:00, 80 before was out)
    a1 = by[("A", "2024-01-02")]
    assert (a1.predicted, a1.error, a1.within, a1.censored) == (103.0, 3.0, True, False)
    assert a1.lead_time_s == pytest.approx(14 * 3600 - 1e-9, abs=1e-6)
    # A 01-03 issued 07:30 next day: 196 in band 190..210 since 12:00 on 01-03 -> 19.5 h
    assert by[("A", "2024-01-03")].lead_time_s == pytest.approx(19.5 * 3600)
    # B 01-02 at 12:00: in band from the path's first point (09:00): 3 h, censored
    b1 = by[("B", "2024-01-02")]
    assert b1.lead_time_s == pytest.approx(3 * 3600) and b1.censored
    # B 01-03: 40 vs 50 is out of the 5% band: a miss, no lead time
    b2 = by[("B", "2024-01-03")]
    assert (b2.within, b2.lead_time_s, b2.error) == (False, None, -10.0)

    o = res.overall  # errors 3, -4, 0, -10 on actuals 100, 200, 50, 50
    assert o.calls == 4
    assert o.mae == pytest.approx((3 + 4 + 0 + 10) / 4)
    assert o.bias == pytest.approx((3 - 4 + 0 - 10) / 4)
    assert o.mape_pct == pytest.approx((3 / 100 + 4 / 200 + 0 / 50 + 10 / 50) / 4 * 100)
    assert o.rmse == pytest.approx(math.sqrt((9 + 16 + 0 + 100) / 4))
    assert o.worst_under == {
        "account": "B",
        "date": "2024-01-03",
        "actual": 50.0,
        "predicted": 40.0,
        "shortfall": 10.0,
        "shortfall_pct": 20.0,
    }
    assert o.hit_rate == 0.75 and o.misses == 1
    leads = [14 * 3600 - 1e-9, 19.5 * 3600, 3 * 3600]
    assert o.lead_time_median_s == pytest.approx(14 * 3600, abs=1e-6)
    assert o.lead_time_mean_s == pytest.approx(sum(leads) / 3)
    assert o.lead_time_min_s == pytest.approx(3 * 3600)

    a, b = res.accounts["A"], res.accounts["B"]
    assert (a.mae, a.bias, a.mape_pct) == (pytest.approx(3.5), pytest.approx(-0.5), pytest.approx(2.5))
    assert a.worst_under["shortfall"] == 4.0 and a.hit_rate == 1.0
    assert (b.mae, b.bias, b.mape_pct, b.hit_rate) == (5.0, -5.0, pytest.approx(10.0), 0.5)


def test_lead_time_stays_within_band_until_call():
    # in band, leaves, comes back: the lead time counts only the final stretch
    path = [(0, 100.0), (10 * 10**9, 120.0), (20 * 10**9, 101.0), (30 * 10**9, 99.0)]
    call = accuracy.ActualCall(dt.date(1970, 1, 1), "A", 100.0, time_ns=40 * 10**9)
    r = accuracy.compare({"A": path}, [call])
    assert r.calls[0].lead_time_s == pytest.approx(20.0) and not r.calls[0].censored
    # a long path (longer than the backward search's first chunk) in band from a late point
    n = 5000
    ts = np.arange(n, dtype=np.int64) * 10**9
    vs = np.full(n, 200.0)
    vs[1234:] = 100.0
    r = accuracy.compare(
        {"A": (ts, vs)}, [accuracy.ActualCall(dt.date(1970, 1, 1), "A", 100.0, time_ns=int(ts[-1]))]
    )
    assert r.calls[0].lead_time_s == pytest.approx(n - 1 - 1234)


BAD_CSV = """date,account,amount,ccp,time,comment
2024-01-02,A,100,LCH,,ok
2024-01-02,ZZZ,100,LCH,,unknown account
2024-01-09,A,100,LCH,,outside the backtest
,B,50,LCH,,missing date
2024-13-02,B,50,LCH,,impossible date
2024-01-03,B,abc,LCH,,bad number
2024-01-03,B,nan,LCH,,not finite
2024-01-03,B,-5,LCH,,negative
2024-01-03,B,50,LCH,25:00,bad time
2024-01-03,,50,LCH,,missing account
2024-01-03,B,50,LCH
2024-01-02,A,101,LCH,,duplicate
"""


def test_bad_actual_calls_give_report_lines_not_crashes(tmp_path):
    calls, issues = accuracy.parse_actual_calls(BAD_CSV, "calls.csv")
    text = "\n".join(issues)
    assert "calls.csv line 1: column(s) comment are not used" in text
    assert "calls.csv line 5: row skipped: date is missing" in text
    assert "calls.csv line 6: row skipped: date '2024-13-02' is not a valid date" in text
    assert "calls.csv line 7: row skipped: amount 'abc' is not a number" in text
    assert "calls.csv line 8: row skipped: amount 'nan' is not a finite number" in text
    assert "calls.csv line 9: row skipped: amount '-5' is negative" in text
    assert "calls.csv line 10: row skipped: time '25:00' is not a" in text
    assert "calls.csv line 11: row skipped: account is missing" in text
    assert "calls.csv line 12: row skipped, it has 4 fields but the header has 6" in text
    assert "calls.csv line 13: row skipped, duplicate call for account 'A' on 2024-01-02" in text
    assert len(issues) == 10
    assert [(c.account, c.date.isoformat(), c.line) for c in calls] == [
        ("A", "2024-01-02", 2),
        ("ZZZ", "2024-01-02", 3),
        ("A", "2024-01-09", 4),
    ]
    res = accuracy.compare(PREDICTED, calls)
    assert "account 'ZZZ' is not in the backtest: 1 call(s) skipped (line 3)" in res.issues
    assert (
        "date 2024-01-09 is not in the backtest (2024-01-02..2024-01-03): 1 call(s) skipped (line 4)"
        in res.issues
    )
    assert any(i.startswith("account 'B': no actual call on 2 backtest date(s)") for i in res.issues)
    assert any(
        i.startswith("account 'A': no actual call on 1 backtest date(s) with predictions: 2024-01-03")
        for i in res.issues
    )
    assert [c.date for c in res.calls] == ["2024-01-02"] and res.overall.calls == 1


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"account,amount\nA,1\n", "missing required column(s) date"),
        (b"date;account;amount\n2024-01-02;A;1\n", "missing required column(s) date, account, amount"),
        (b"", "the file is empty"),
        (b"date,account,amount\n", "no calls (the file has a header only)"),
        (b"date,account,amount\n2024-01-02,\xff\xfe,1\n", "not UTF-8 text"),
    ],
)
def test_bad_actual_calls_files(tmp_path, content, expected):
    f = tmp_path / "calls.csv"
    f.write_bytes(content)
    calls, issues = accuracy.read_actual_calls(f)
    assert calls == [] and any(expected in i for i in issues), issues


def test_missing_and_gzip_files(tmp_path):
    calls, issues = accuracy.read_actual_calls(tmp_path / "nope.csv")
    assert calls == [] and "file not found" in issues[0]
    gz = tmp_path / "calls.csv.gz"
    gz.write_bytes(gzip.compress(CALLS_CSV.encode()))
    calls, issues = accuracy.read_actual_calls(gz)
    assert len(calls) == 4 and issues == []
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip")
    assert "cannot read" in accuracy.read_actual_calls(tmp_path / "broken.csv.gz")[1][0]


def test_call_time_formats():
    d = dt.date(2024, 1, 3)
    base = (d - dt.date(1970, 1, 1)).days * DAY
    assert accuracy.parse_call_time("07:30", d) == base + 7 * H + 30 * 60 * 10**9
    assert accuracy.parse_call_time("07:30:01.5", d) == base + 7 * H + (30 * 60 + 1) * 10**9 + 5 * 10**8
    assert accuracy.parse_call_time("2024-01-04T09:30:00+02:00", d) == base + DAY + 7 * H + 30 * 60 * 10**9
    assert accuracy.parse_call_time("2024-01-04 07:30Z", d) == base + DAY + 7 * H + 30 * 60 * 10**9
    assert accuracy.parse_date("2024.01.03") == accuracy.parse_date("20240103") == d


def test_several_ccps_are_summed_and_no_prediction_before_call():
    calls, _ = accuracy.parse_actual_calls(
        "date,account,amount,ccp,time\n"
        "2024-01-02,A,60,LCH,\n2024-01-02,A,43,EUREX,\n"
        "2024-01-02,B,50,LCH,08:00\n"
    )
    res = accuracy.compare(PREDICTED, calls)
    (a,) = [c for c in res.calls if c.account == "A"]
    assert a.actual == 103.0 and a.ccp == "LCH+EUREX" and a.error == 0.0
    assert any("calls from 2 CCPs (LCH, EUREX) summed" in i for i in res.issues)
    assert any("'B' on 2024-01-02: no prediction at or before the call time" in i for i in res.issues)


def test_predicted_path_bad_points_and_unsorted():
    path = [(D0 + 15 * H, 103.0), (D0 + 9 * H, float("nan")), (D0 + 10 * H, 97.0)]
    calls = [accuracy.ActualCall(dt.date(2024, 1, 2), "A", 100.0)]
    res = accuracy.compare({"A": path, "B": "garbage"}, calls)
    assert any("'A': 1 point(s) with a non-finite margin dropped" in i for i in res.issues)
    assert any("'B' skipped" in i for i in res.issues)
    assert res.calls[0].predicted == 103.0
    assert res.calls[0].within_since_ns == D0 + 10 * H  # sorted: 97 at 10:00 then 103 at 15:00


def test_paths_from_margin_batches():
    schema = TABLES["margin"].arrow_schema

    def batch(rows):
        cols = {f.name: [] for f in schema}
        for acc, t, m in rows:
            for f in schema:
                cols[f.name].append(
                    {"account": acc, "time": t, "margin": m}.get(
                        f.name,
                        0
                        if f.type in (pa.int64(), pa.float64())
                        else (0 if pa.types.is_timestamp(f.type) else "x"),
                    )
                )
        return pa.RecordBatch.from_pydict(cols, schema=schema)

    b1 = batch([("A", 1, 10.0), ("B", 2, 20.0), ("A", 3, 11.0)])
    b2 = batch([("B", 4, 21.0), ("A", 5, 12.0)])
    other = pa.RecordBatch.from_pydict({"x": [1]})
    paths = accuracy.paths_from_margin_batches([("margin", b1), ("fill", other), ("margin", b2)])
    assert paths["A"][0].tolist() == [1, 3, 5] and paths["A"][1].tolist() == [10.0, 11.0, 12.0]
    assert paths["B"][0].tolist() == [2, 4] and paths["B"][1].tolist() == [20.0, 21.0]
