"""Backtest report: the JSON holds every figure (equal to the computed results), the HTML is self-contained
(one inline <svg> per plot, no network references, escaped names) and survives empty or odd input."""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from replay import accuracy, coverage, report

DAY = accuracy.DAY_NS
H = 3_600_000_000_000
D0 = (dt.date(2024, 1, 2) - dt.date(1970, 1, 1)).days * DAY
ODD = "<b>ACC&1</b>"  # an account name that must be escaped
DATES = [(dt.date(2024, 1, 2) + dt.timedelta(days=i)).isoformat() for i in range(3)]


def fixture():
    predicted = {
        "A": (
            np.array([D0 + 9 * H, D0 + 10 * H, D0 + DAY + 9 * H, D0 + 2 * DAY + 9 * H]),
            np.array([80.0, 99.0, 120.0, 150.0]),
        ),
        ODD: [(D0 + 9 * H, 50.0), (D0 + DAY + 9 * H, 52.0), (D0 + 2 * DAY + 9 * H, 40.0)],
    }
    csv_text = "date,account,amount\n" + "\n".join(
        f"{d},{a},{v}"
        for d, a, v in [
            (DATES[0], "A", 100),
            (DATES[1], "A", 118),
            (DATES[2], "A", 160),
            (DATES[0], ODD, 50),
            (DATES[1], ODD, 50),
            (DATES[2], ODD, 50),
            (DATES[2], "NOPE", 1),
        ]
    )
    calls, issues = accuracy.parse_actual_calls(csv_text)
    acc = accuracy.compare(predicted, calls)
    cov = coverage.coverage(
        {
            "A": (DATES, [-5.0, -30.0, 1.0], [10.0, 20.0, 10.0]),
            ODD: (DATES, [0.0, float("nan"), -1.0], [1.0, 1.0, 0.5]),
        },
        p=0.01,
    )
    return predicted, acc, cov, issues


def test_json_has_every_figure_and_no_nan(tmp_path):
    predicted, acc, cov, issues = fixture()
    jp, hp = report.write_report(
        tmp_path / "out",
        accuracy=acc,
        coverage=cov,
        predicted=predicted,
        meta={"title": "t", "nan": float("nan")},
        issues=issues,
    )

    def no_constants(name):
        raise AssertionError(f"JSON contains {name}")

    doc = json.loads(jp.read_text(), parse_constant=no_constants)
    assert doc["meta"]["nan"] is None
    # accuracy: overall and per account equal the computed metrics; hand check: errors -1, 2, -10 on A
    assert doc["accuracy"]["accounts"]["A"]["mae"] == pytest.approx((1 + 2 + 10) / 3)
    assert doc["accuracy"]["accounts"]["A"]["bias"] == pytest.approx((-1 + 2 - 10) / 3)
    assert doc["accuracy"]["overall"]["mae"] == pytest.approx(acc.overall.mae)
    assert doc["accuracy"]["overall"]["worst_under"]["shortfall"] == pytest.approx(10.0)
    assert len(doc["accuracy"]["calls"]) == len(acc.calls) == 6
    assert doc["accuracy"]["tolerance"] == 0.05
    # coverage: A has one exception in 3 days (-30 < -20); the other account one in 2 usable days
    a = doc["coverage"]["accounts"]["A"]
    assert (a["days"], a["exceptions"]) == (3, 1)
    lr = -2 * (2 * math.log(0.99) + math.log(0.01)) + 2 * (2 * math.log(2 / 3) + math.log(1 / 3))
    assert a["kupiec"]["statistic"] == pytest.approx(lr)
    assert a["traffic_light"]["zone"] == cov.accounts["A"].traffic_light.zone
    assert doc["coverage"]["accounts"][ODD]["days"] == 2
    assert doc["coverage"]["pooled"]["exceptions"] == 2
    assert doc["coverage"]["daily"]["A"]["exception"] == [False, True, False]
    assert doc["predicted"]["A"] == {
        "points": 4,
        "first": "2024-01-02T09:00:00Z",
        "last": "2024-01-04T09:00:00Z",
        "min": 80.0,
        "max": 150.0,
        "last_margin": 150.0,
    }
    # issues from the caller, the comparison and coverage, in that order
    text = doc["issues"]
    assert any("'NOPE' is not in the backtest" in i for i in text)
    assert any("pnl is not a finite number" in i for i in text)
    assert hp.exists()


def test_html_is_self_contained_with_one_svg_per_plot(tmp_path):
    predicted, acc, cov, issues = fixture()
    _, hp = report.write_report(tmp_path, accuracy=acc, coverage=cov, predicted=predicted, issues=issues)
    page = hp.read_text()
    assert page.startswith("<!DOCTYPE html>")
    figures = re.findall(r'<figure class="plot">.*?</figure>', page, re.S)
    # predicted vs actual for 2 accounts, error histogram, cumulative exceptions, P&L vs VaR for 2 accounts
    assert len(figures) == 6
    assert all(f.count("<svg") == 1 for f in figures)
    assert page.count("<svg") == 6
    low = page.lower()
    for ref in ("http://", "https://", "<script", "<link", "<img", "src=", "@import", "url("):
        assert ref not in low, ref
    # names are escaped everywhere (tables, captions, svg labels)
    assert ODD not in page and html.escape(ODD) in page
    # every svg is well-formed XML with drawn content
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        root = ET.fromstring(svg)
        assert root.tag == "svg"
        assert root.findall(".//polyline") or root.findall(".//title")  # a data line or marked points/bars
    # the exception of account A on 2024-01-03 is drawn as a marker with its tooltip
    assert "2024-01-03: P&amp;L -30.00 beyond VaR 20.00" in page
    # tables show the figures of the JSON
    assert f"{acc.accounts['A'].mae:,.2f}" in page


def test_long_path_is_downsampled_and_keeps_spikes():
    n = 200_000
    ts = D0 + np.arange(n, dtype=np.int64) * 1_000_000_000
    vs = np.full(n, 100.0)
    vs[123_457] = 1000.0  # one spike
    calls = [{"call_time_ns": int(ts[-1]), "actual": 100.0, "predicted": 100.0, "date": "2024-01-04"}]
    svg = report.svg_predicted_vs_actual("A", calls, 0.05, (ts, vs), max_points=1500)
    (points,) = re.findall(r'<polyline points="([^"]+)"', svg)
    xy = [tuple(map(float, p.split(","))) for p in points.split()]
    assert len(xy) <= 1500 + 1
    root = ET.fromstring(svg)
    labels = [t.text for t in root.iter("text")]
    assert "1000" in labels  # the y axis reaches the spike
    spike_y = min(y for _, y in xy)
    assert spike_y < 30  # drawn near the top of the plot area, not averaged away


def test_reports_with_partial_or_empty_input(tmp_path):
    empty_acc = accuracy.compare({}, [])
    empty_cov = coverage.coverage({})
    for kw in (
        {"accuracy": empty_acc},
        {"coverage": empty_cov},
        {"accuracy": empty_acc, "coverage": empty_cov},
        {},
    ):
        jp, hp = report.write_report(tmp_path / str(len(kw)) / str(sorted(kw)), **kw)
        doc = json.loads(jp.read_text())
        page = hp.read_text()
        assert "Input issues" in page
        assert page.count("<svg") == len(re.findall(r'<figure class="plot">', page))
        assert ("accuracy" in kw) == (doc["accuracy"] is not None)
    # a single call, a single day, a zero amount: still a page, no crash
    one = accuracy.compare({"A": [(D0, 0.0)]}, [accuracy.ActualCall(dt.date(2024, 1, 2), "A", 0.0)])
    assert one.calls[0].within and one.overall.mape_pct is None
    cov1 = coverage.coverage({"A": (["2024-01-02"], [-2.0], [1.0])})
    _, hp = report.write_report(tmp_path / "one", accuracy=one, coverage=cov1, predicted={"A": [(D0, 0.0)]})
    page = hp.read_text()
    assert page.count("<svg") == 4
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)
        assert "nan" not in svg.lower()
