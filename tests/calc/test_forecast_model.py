"""calc/forecast.py: the trained residual model calc loads. A file naming other features is refused with
the difference named; the quantile forecast's coverage on synthetic data with a known residual
distribution is within its binomial band; `params load --kind forecast` validates the file."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import fields

import numpy as np
import pytest
from scipy.stats import binom

from calc import forecast, params
from calc.history import InputError
from calc.projection import FeatureInputs
from replay import forecast_train as ft

N_TRAIN, N_TEST = 12_000, 4_000


def synthetic(n: int, rng: np.random.Generator) -> tuple[FeatureInputs, np.ndarray]:
    """Features and residuals y = 0.05 * last_break_sign + 0.02 * horizon + sigma(vol94) * N(0, 1):
    the true P95 is the mean + 1.645 sigma."""
    x = FeatureInputs.empty(n)
    x.replica[:] = rng.uniform(1e5, 1e6, n)
    for f in ("var", "es", "stress"):
        getattr(x, f)[:] = x.replica * rng.uniform(0.8, 1.2, n)
    x.horizon[:] = rng.integers(0, 3, n)
    x.to_cycle_s[:] = rng.uniform(0, 30_000, n)
    x.last_break[:] = rng.normal(0, 0.05, n)
    x.vol94[:] = rng.uniform(0.005, 0.03, n)
    x.vol97[:] = x.vol94
    x.vol99[:] = 0.015
    x.weekday[:] = rng.integers(0, 5, n)
    x.month_end[:] = 0.0
    sigma = x.vol94 * 2.0
    y = 0.05 * np.sign(x.last_break) + 0.02 * x.horizon + sigma * rng.standard_normal(n)
    return x, y


def dataset(x: FeatureInputs, y: np.ndarray) -> ft.Dataset:
    n = len(x)
    z = np.zeros(n)
    return ft.Dataset(
        forecast.matrix(x),
        z.astype(np.int64),
        np.array(["2022-01-03"] * n, dtype=object),
        np.array(["A"] * n, dtype=object),
        x.horizon,
        np.array(["c"] * n, dtype=object),
        z.astype(np.int64),
        z.astype(np.int64),
        x.replica,
        x.replica * (1 + y),
        np.full(n, math.nan),
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A model trained on synthetic data, written as calc's forecast file."""
    rng = np.random.default_rng(1)
    x, y = synthetic(N_TRAIN, rng)
    b50, b95 = ft.fit(dataset(x, y), seed=3)
    doc = {
        "format": forecast.FORMAT,
        "features": list(forecast.FEATURES),
        "models": {"p50": b50.model_to_string(), "p95": b95.model_to_string()},
        "comparison": {},
        "beats_replica": True,
        "band": {"p50": 0.0, "p95": 0.1},
    }
    p = tmp_path_factory.mktemp("fc") / "forecast.json"
    p.write_text(json.dumps(doc))
    return p


def test_matrix_is_in_features_order_and_scale_free():
    x = FeatureInputs.empty(2)
    x.replica[:] = [1000.0, 0.0]
    x.var[:] = [500.0, 5.0]
    x.margin_last_cycle[:] = [1100.0, 1.0]
    x.to_cycle_s[:] = [7200.0, 0.0]
    x.vol94[:], x.vol99[:] = [0.02, 0.01], [0.01, 0.01]
    m = forecast.matrix(x)
    col = {f: m[:, j] for j, f in enumerate(forecast.FEATURES)}
    assert m.shape == (2, len(forecast.FEATURES))
    assert col["var_rel"][0] == 0.5 and math.isnan(col["var_rel"][1])  # no replica: not known
    assert col["last_cycle_rel"][0] == pytest.approx(0.1)
    assert col["to_cycle_h"][0] == 2.0 and col["vol_ratio"][0] == 2.0
    assert math.isnan(col["last_break"][0])  # nan stays missing for LightGBM


def test_quantile_coverage_on_synthetic_data_is_within_its_binomial_band(model_file):
    model = forecast.load(model_file)
    assert model is not None and model.id.startswith("lgbm:") and len(model.id) == 15
    x, y = synthetic(N_TEST, np.random.default_rng(2))
    q50, q95 = model.quantiles(x)
    assert q50.shape == q95.shape == (N_TEST,) and (q95 >= q50).all()
    lo, hi = binom.ppf([0.0005, 0.9995], N_TEST, 0.95) / N_TEST  # a 99.9% band of the hit count
    cov95 = float(np.mean(y <= q95))
    assert lo - 0.01 <= cov95 <= hi + 0.01, (cov95, lo, hi)  # 0.01: the model's own estimation error
    lo50, hi50 = binom.ppf([0.0005, 0.9995], N_TEST, 0.5) / N_TEST
    cov50 = float(np.mean(y <= q50))
    assert lo50 - 0.02 <= cov50 <= hi50 + 0.02, (cov50, lo50, hi50)
    # calc's tree kernel is LightGBM's own prediction, bit for bit, missing values included
    x.last_break[::7] = np.nan
    x.vol94[::11] = np.nan
    m = forecast.matrix(x)
    q50, q95 = model.quantiles(x)
    r50, r95 = model.p50.predict(m, num_threads=1), model.p95.predict(m, num_threads=1)
    assert np.array_equal(q50, r50) and np.array_equal(q95, np.maximum(r95, r50))
    x, y = synthetic(N_TEST, np.random.default_rng(2))
    q50, q95 = model.quantiles(x)
    # and it learned the residual's dependence: the true P95 per entry is close
    sigma = x.vol94 * 2.0
    true95 = 0.05 * np.sign(x.last_break) + 0.02 * x.horizon + 1.645 * sigma
    assert float(np.median(np.abs(q95 - true95))) < 0.01


def test_load_refuses_another_features_list_naming_the_difference(model_file, tmp_path):
    doc = json.loads(model_file.read_text())
    cases = {
        "missing": ([f for f in forecast.FEATURES if f != "vol_ratio"], "missing ['vol_ratio']"),
        "extra": ([*forecast.FEATURES, "gamma"], "unknown ['gamma']"),
        "order": ([*forecast.FEATURES[1:], forecast.FEATURES[0]], "in another order"),
    }
    for name, (feats, needle) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(dict(doc, features=feats)))
        with pytest.raises(InputError, match="field features") as e:
            forecast.load(p)
        assert needle in str(e.value), name
    p = tmp_path / "worse.json"
    p.write_text(json.dumps(dict(doc, beats_replica=False)))
    assert forecast.load(p) is None  # calc then keeps the replica and its band
    assert forecast.load_any(p).beats_replica is False
    for bad, needle in (
        ("{", "not JSON"),
        (json.dumps(dict(doc, format="x")), "field format"),
        (json.dumps(dict(doc, models={"p50": "junk", "p95": "junk"})), "field models"),
        (json.dumps(dict(doc, band={"p50": "a"})), "field band.p50"),
    ):
        p.write_text(bad)
        with pytest.raises(InputError, match=needle):
            forecast.load(p)


def test_params_load_validates_a_forecast_file(model_file, tmp_path):
    data = model_file.read_bytes()
    assert params.validate(model_file, "forecast", data).startswith("lgbm:")
    row = params.store(model_file, "forecast", tmp_path / "params")
    assert row["kind"] == "forecast" and row["file_id"] == forecast.file_id(model_file)
    stored = sorted((tmp_path / "params").rglob("*"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": forecast.FORMAT, "features": ["x"]}))
    with pytest.raises(InputError, match="field features"):
        params.store(bad, "forecast", tmp_path / "params")
    assert sorted((tmp_path / "params").rglob("*")) == stored  # nothing of it stored


def test_feature_inputs_fields_all_reach_the_matrix():
    """Every FeatureInputs field moves the matrix (none silently ignored by `matrix`)."""
    base = FeatureInputs.empty(1)
    for f in fields(FeatureInputs):
        getattr(base, f.name)[:] = 1.0
    m0 = forecast.matrix(base)
    for f in fields(FeatureInputs):
        x = FeatureInputs(*(getattr(base, g.name).copy() for g in fields(FeatureInputs)))
        getattr(x, f.name)[:] = 2.0
        assert not np.array_equal(forecast.matrix(x), m0, equal_nan=True), f.name


def test_calc_uses_a_trained_model_only_if_it_beat_the_replica(model_file, tmp_path):
    """At start ([calc] forecast_file) and by a `forecast` param event: a model that beat the replica on
    held-out days gives the forecast rows their method; one that did not leaves the replica in force."""
    from calc.cycles import ns_of
    from calc.engine import MarginEngine
    from marginflow import config

    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(json.loads(model_file.read_text()) | {"beats_replica": False}))
    t = ns_of(dt.datetime(2024, 1, 3, 15, 0, tzinfo=dt.UTC))

    def method_of(forecast_file: str) -> set[str]:
        eng = MarginEngine.from_config(config.load(overrides={"calc": {"forecast_file": forecast_file}}).calc)
        eng.apply_prices(["AAPL"], np.array([130.0]), np.array([1]), np.array([t]))
        return set(eng.project(eng.changed_rows(), force=True)["method"])

    assert method_of(str(model_file)) == {"model:" + forecast.file_id(model_file)}
    assert method_of(str(worse)) == {"replica"}
    assert method_of("") == {"replica"}
    # the param event: stored, journaled, put in force (and a worse one replaces it with the replica)
    calc = config.load(overrides={"calc": {"params_dir": str(tmp_path / "params")}}).calc
    eng = MarginEngine.from_config(calc)
    for f, want in ((model_file, "model:"), (worse, "replica")):
        row = params.store(f, "forecast", calc.params_dir)
        said = params.apply_param(eng, row, calc)
        assert eng.projector.method.startswith(want), said


def test_what_if_forecast_under_a_trained_model_matches_its_forecast_row(model_file):
    from calc.cycles import ns_of
    from calc.engine import MarginEngine
    from marginflow import config

    t = ns_of(dt.datetime(2024, 1, 3, 15, 0, tzinfo=dt.UTC))
    eng = MarginEngine.from_config(config.load(overrides={"calc": {"forecast_file": str(model_file)}}).calc)
    eng.apply_prices(["AAPL"], np.array([130.0]), np.array([1]), np.array([t]))
    rows = eng.project(eng.changed_rows(), force=True)
    row = {
        h: i for i, (a, h) in enumerate(zip(rows["account"], rows["horizon"], strict=True)) if a == "TECH01"
    }
    nxt = row["next"]
    f = eng.what_if("TECH01", [{"sym": "AAPL", "qty": 0.0}])["forecast"]
    assert f["method"] == rows["method"][nxt] and f["cycle"] == rows["cycle"][nxt]
    assert f["before"]["p50"] == f["after"]["p50"] == rows["p50"][nxt]
    assert f["before"]["call_p95"] == rows["call_p95"][nxt]
