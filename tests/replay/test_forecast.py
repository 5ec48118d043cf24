"""`marginflow forecast train` (replay/forecast_train.py) and the demo CCP's rules (replay/demo_ccp.py):
the same data and seed give the same model file byte for byte; the walk-forward keeps a gap; the
dataset's targets are the journal's calls; the APC floor, concentration add-on and recalibrations each
equal a hand calculation on a tiny fixture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calc import forecast
from calc.inputs import AccountSpec
from marginflow import config
from replay import accuracy, demo_ccp, forecast_train
from tickerplant import journal
from tickerplant import journal_reader as reader


# ------------------------------------------------------------------------------ the demo CCP by hand
def tiny_ccp(**rules) -> demo_ccp.DemoCcp:
    """One parametric-VaR account over two syms, 99% one day, a 4-return window, an 8-return floor."""
    specs = {"A": AccountSpec("A", "var", 1.0)}
    ccp = demo_ccp.Ccp(["X", "Y"], specs, 0.99, 1, 4)
    kw = {"lookback": 4, "apc_floor_days": 8, "round_to": 1000.0, **rules}
    return demo_ccp.DemoCcp(ccp, demo_ccp.CcpRules(**kw))


# closes before the business date: a calm last 4 days after a stormy start, so the floor binds
CLOSES = np.array(
    [[100, 50], [110, 45], [95, 52], [108, 47], [100, 50], [101, 50.5], [100.5, 50.2], [101.5, 50.6]],
    dtype=np.float64,
)
CYCLE_PX = np.array([101.0, 50.4])


def _z() -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.99)


def _pvar(closes: np.ndarray, x: np.ndarray) -> float:
    """z sqrt(x'Cx), C the sample covariance of the log returns, written out by hand."""
    r = np.log(closes[1:] / closes[:-1])
    d = r - r.mean(axis=0)
    c = d.T @ d / (len(r) - 1)
    return _z() * math.sqrt(float(x @ c @ x))


def test_apc_floor_binds_and_equals_the_ten_year_var_by_hand():
    dccp = tiny_ccp(concentration_rate=0.0)
    x = np.array([[1e6, -4e5]])
    parts = dccp.parts(CLOSES, CYCLE_PX, x, 1.0)
    window = np.vstack([CLOSES[-4:], CYCLE_PX])
    long = np.vstack([CLOSES[-8:], CYCLE_PX])
    assert parts["base"][0] == pytest.approx(_pvar(window, x[0]), rel=1e-12)
    assert parts["floor"][0] == pytest.approx(_pvar(long, x[0]), rel=1e-12)
    assert parts["floor"][0] > 2 * parts["base"][0]  # the stormy days are in the floor's window only
    assert parts["requirement"][0] == math.ceil(parts["floor"][0] / 1000) * 1000
    off = tiny_ccp(concentration_rate=0.0, apc_floor_days=0).parts(CLOSES, CYCLE_PX, x, 1.0)
    assert off["requirement"][0] == math.ceil(off["base"][0] / 1000) * 1000


def test_concentration_add_on_by_hand():
    dccp = tiny_ccp(apc_floor_days=0, concentration_threshold=2e6, concentration_rate=0.03)
    x = np.array([[3.5e6, -2.5e6], [1e6, -1e6]])
    dccp.ccp.specs = {"A": AccountSpec("A", "var", 1.0), "B": AccountSpec("B", "var", 1.0)}
    parts = dccp.parts(CLOSES, CYCLE_PX, x, 1.0)
    assert parts["addon"].tolist() == [0.03 * (1.5e6 + 0.5e6), 0.0]  # 60,000: |exposure| above $2m a sym
    assert parts["requirement"][0] == math.ceil((parts["base"][0] + 60_000) / 1000) * 1000


def test_recalibrations_step_the_margin_rate_on_known_dates():
    rules = demo_ccp.CcpRules(recalibrations=((0.3, 1.12), (0.55, 0.9), (0.8, 1.15)))
    # 11 days: steps on day int(0.3 * 10) = 3, int(0.55 * 10) = 5, int(0.8 * 10) = 8
    rates = [rules.rate_on(i, 11) for i in range(11)]
    assert rates[:3] == [1.0] * 3
    assert rates[3] == rates[4] == 1.12
    assert rates[5] == rates[7] == pytest.approx(1.12 * 0.9)
    assert rates[8] == rates[10] == pytest.approx(1.12 * 0.9 * 1.15)
    dccp = tiny_ccp(apc_floor_days=0, concentration_rate=0.0)
    x = np.array([[1e6, -4e5]])
    base = dccp.parts(CLOSES, CYCLE_PX, x, 1.0)["base"][0]
    assert dccp.requirement(CLOSES, CYCLE_PX, x, 1.12)[0] == math.ceil(1.12 * base / 1000) * 1000
    # the floor is not scaled: a cut in rates cannot take the margin below it
    floored = tiny_ccp(concentration_rate=0.0).parts(CLOSES, CYCLE_PX, x, 0.5)
    assert floored["requirement"][0] == math.ceil(floored["floor"][0] / 1000) * 1000


def test_cycle_times_follow_new_york_across_daylight_saving():
    rules = demo_ccp.CcpRules()
    winter, summer = rules.cycle_times("2022-12-28"), rules.cycle_times("2022-07-01")
    hours = [(t // 10**9 % 86_400) / 3600 for _, t in winter]
    assert [n for n, _ in winter] == ["ITD1", "ITD2", "EOD"] and hours == [16.0, 19.0, 23.0]
    assert [(t // 10**9 % 86_400) / 3600 for _, t in summer] == [15.0, 18.0, 22.0]
    assert demo_ccp.call_of(105_000, 100_000, 10_000) == 0.0
    assert demo_ccp.call_of(125_000, 100_000, 10_000) == 25_000
    assert demo_ccp.call_of(60_000, 100_000, 10_000) == -40_000


# ------------------------------------------------------------------------------ training on the demo
@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """The forecast trained by the command line, and again in process on a second replay's dataset:
    (file, its bytes retrained, the dataset, the calls)."""
    f = tmp_path_factory.mktemp("fc") / "a.json"
    code = forecast_train.main(["train", "--journal", str(demo / "journal"), "--out", str(f), "--seed", "5"])
    assert code == 0
    calls, issues = accuracy.read_calls(demo / "journal", None)
    assert not issues
    ds, rp, col_issues = forecast_train.collect(demo / "journal", config.load().calc, calls)
    assert not col_issues and not rp.issues
    doc, _ = forecast_train.train(ds, 5)
    return f, forecast_train.dumps(doc), ds, calls


@pytest.mark.slow  # the module's demo history, a command-line training and a second replay: ~40 s
def test_trained_twice_on_the_same_data_the_model_is_identical(trained):
    f, again, _, _ = trained
    a = f.read_bytes()
    assert a == again
    doc = json.loads(a)
    assert doc["features"] == list(forecast.FEATURES) and doc["trained"]["seed"] == 5
    cmp = doc["comparison"]
    for h, rows in cmp["horizons"].items():
        assert h in ("next", "eod", "t+1") and set(rows) == set(forecast_train.METHODS)
        for m in rows.values():
            assert m["n"] > 0 and m["mae"] >= 0 and 0 <= m["coverage95"] <= 1
    assert doc["beats_replica"] == all(cmp["beats_replica_by_horizon"].values())
    assert forecast.load_any(f).id.startswith("lgbm:")
    other, _ = forecast_train.train(trained[2], 6)
    assert forecast_train.dumps(other) != a  # the seed is in it (and nothing else varies)


@pytest.mark.slow
def test_dataset_targets_are_the_journals_calls_and_the_walk_forward_keeps_its_gap(demo, trained):
    root = demo / "journal"
    _, _, ds, calls = trained
    assert len(calls) == len(journal.journal_dates(root)) * 6 * 3
    assert len(ds) > 0
    want = {}
    for d in journal.journal_dates(root):
        t = reader.read_table(root, d, "call").to_pydict()
        for i, a in enumerate(t["account"]):
            want[(f"{t['business_date'][i]}/{t['cycle'][i]}", a)] = t["requirement"][i]
    got = {(c, a): v for c, a, v in zip(ds.cycle, ds.account, ds.actual, strict=True)}
    assert got and all(want[k] == v for k, v in got.items())
    assert (ds.t < ds.cycle_t).all() and (ds.known_t > ds.cycle_t).all()  # forecast before, known after
    leads = set(((ds.cycle_t - ds.t) // 10**9).tolist())
    assert {900, 3600, 7200} <= leads  # the fixed lead points before each cycle
    folds = forecast_train.fold_indices(ds)
    assert len(folds) >= 1
    for train_ix, test_ix in folds:
        assert len(train_ix) and len(test_ix)
        assert ds.known_t[train_ix].max() < ds.t[test_ix].min()  # no call known after the block starts
    _, test_days = forecast_train.split(ds)
    assert sorted(set(ds.day[np.concatenate([f[1] for f in folds])])) == test_days
    # the backtest's section for a stored model: that model on the same held-out entries
    sec = forecast_train.backtest_forecast(ds, 5, trained[0])
    assert sec["model"] == forecast.load_any(trained[0]).id
    assert sec["comparison"]["entries"] == sum(len(f[1]) for f in folds)
    for a, ser in sec["series"].items():
        assert a in ds.account and len(ser["t"]) == len(ser["actual"]) > 0
        assert all(p95 >= p50 for p50, p95 in zip(ser["p50"], ser["p95"], strict=True))


def test_calls_from_an_hdb_partition(tmp_path):
    """`forecast train --hdb`: the `call` partitions rdb's end of day writes (rdb/store.py's layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rdb.store import partition_dir
    from schemas.tables import TABLES

    t = pa.table(
        {
            "time": pa.array([1_672_269_600_000_000_000] * 2, pa.timestamp("ns")),
            "seq": [7, 8],
            "business_date": ["2022-12-28"] * 2,
            "cycle": ["EOD", "EOD"],
            "ccp": ["DEMO-CCP"] * 2,
            "account": ["TECH01", "DIV02"],
            "requirement": [250_000.0, 150_000.0],
            "call": [0.0, -20_000.0],
            "collateral": [250_000.0, 170_000.0],
        },
        schema=TABLES["call"].arrow_schema,
    )
    part = partition_dir(tmp_path, "call", "2022-12-28")
    part.mkdir(parents=True)
    pq.write_table(t, part / "part-0.parquet")
    calls, issues = forecast_train.calls_from_hdb(tmp_path)
    assert not issues
    assert [(c.account, c.amount, c.cycle, c.ccp, c.line) for c in calls] == [
        ("TECH01", 250_000.0, "EOD", "DEMO-CCP", 7),
        ("DIV02", 150_000.0, "EOD", "DEMO-CCP", 8),
    ]
    assert calls[0].date.isoformat() == "2022-12-28" and calls[0].call_time_ns() == 1_672_269_600_000_000_000
