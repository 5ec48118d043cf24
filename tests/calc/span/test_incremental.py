"""SPAN incremental path == full recompute == pure-Python reference, over random fills on the real file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calc.span import SpanBook, SpanPositionError
from calc.span import kernels as K
from calc.span.reference import ReferenceSpan
from tests.support import SPAN_FILE

SPN = SPAN_FILE
# CCs linked by inter-commodity spreads (and with options), so fills exercise intra, inter, SOM and NOV
CCS = (
    "AKBNKE",
    "GARANE",
    "ISCTRE",
    "YKBNKE",
    "VAKBNE",
    "HALKBE",
    "XU030",
    "XU030X",
    "EREGLE",
    "TRYUSD",
    "TRYUSDK",
)


@pytest.fixture(scope="module")
def universe(params) -> np.ndarray:
    """Contract rows of the CCs above: every future, and options near the money (a few per series)."""
    rows = []
    for k, key in enumerate(params.keys):
        if key[1] not in CCS:
            continue
        if key[2] == "FUT" or (key[2] == "OOP" and k % 7 == 0):
            rows.append(k)
    return np.array(rows)


RES_COLS = [
    K.R_SCAN,
    K.R_TIME,
    K.R_VOL,
    K.R_PRICE,
    K.R_DELTA,
    K.R_INTRA,
    K.R_SPOT,
    K.R_INTER,
    K.R_SOM,
    K.R_NOV,
    K.R_REQ,
]
REF_NAMES = [
    "scan",
    "time_risk",
    "vol_risk",
    "price_risk",
    "net_delta",
    "intra",
    "spot",
    "inter",
    "som",
    "nov",
]


def assert_same(a: SpanBook, b: SpanBook) -> None:
    np.testing.assert_allclose(a.totals(), b.totals(), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(
        a.cc_results()[..., RES_COLS], b.cc_results()[..., RES_COLS], rtol=1e-9, atol=1e-6
    )
    np.testing.assert_allclose(a.loss_vectors(), b.loss_vectors(), rtol=1e-9, atol=1e-6)


def assert_matches_reference(book: SpanBook, ref: ReferenceSpan) -> None:
    p = book.params
    for acct in book.accounts:
        want = ref.margin(book.positions(acct))
        got = {m.currency: m for m in book.margin(acct)}
        assert set(got) == set(want["total"]) or (not got and not want["total"])
        for cur, total in want["total"].items():
            assert got[cur].total == pytest.approx(total, rel=1e-9, abs=1e-6)
        a = book.account_index[acct]
        for cc, r in want["ccs"].items():
            row = book.cc_results()[a, p.cc_index[cc]]
            for col, name in zip(RES_COLS, [*REF_NAMES, "requirement"], strict=True):
                assert row[col] == pytest.approx(r[name], rel=1e-9, abs=1e-6), (acct, cc, name)


def random_fills(rng: np.random.Generator, universe: np.ndarray, n_acct: int, n: int):
    acct = rng.integers(0, n_acct, n)
    con = universe[rng.integers(0, universe.size, n)]
    dq = rng.integers(-5, 6, n).astype(float)
    dq[dq == 0] = 1.0
    return acct, con, dq


def test_incremental_equals_full_and_reference(params, universe):
    rng = np.random.default_rng(7)
    n_acct = 12
    inc = SpanBook(params, [f"a{i}" for i in range(n_acct)])
    ref = ReferenceSpan(params)
    for _ in range(5):  # five batches, comparing after each
        acct, con, dq = random_fills(rng, universe, n_acct, 400)
        inc.apply_fills(acct, con, dq)
        full = SpanBook(params, inc.accounts)
        full.set_positions([(a, k, q) for a in inc.accounts for k, q in inc.positions(a).items()])
        assert_same(inc, full)
        assert_matches_reference(inc, ref)
    assert (inc.totals() > 0).sum() >= n_acct // 2
    # the random book really exercised every component somewhere
    res = inc.cc_results()
    for col in (K.R_INTRA, K.R_INTER, K.R_SOM, K.R_NOV):
        assert np.abs(res[..., col]).max() > 0, col


def test_each_fill_reports_the_account_total_after_it(params, universe):
    rng = np.random.default_rng(11)
    book = SpanBook(params, ["x", "y"])
    ref = ReferenceSpan(params)
    acct, con, dq = random_fills(rng, universe, 2, 150)
    held: list[dict] = [{}, {}]
    out = book.apply_fills(acct, con, dq)
    for i in range(acct.size):
        pos = held[acct[i]]
        key = params.keys[con[i]]
        pos[key] = pos.get(key, 0.0) + dq[i]
        want = ref.margin(pos)["total"].get("TRY", 0.0)
        assert out[i] == pytest.approx(want, rel=1e-9, abs=1e-6), i


def test_closing_every_position_returns_to_exact_zero(params, universe):
    rng = np.random.default_rng(3)
    book = SpanBook(params, ["z"])
    acct, con, dq = random_fills(rng, universe, 1, 300)
    book.apply_fills(acct, con, dq)
    pos = book.positions("z")
    assert len(pos) > 20 and book.loss_vectors().any() and book.cc_results()[..., K.R_REQ].max() > 0
    closing = np.array([params.index[k] for k in pos])
    book.apply_fills(np.zeros(closing.size, np.int64), closing, -np.array(list(pos.values())))
    assert book.positions("z") == {}
    assert book.totals()[0, 0] == 0.0
    assert not book.loss_vectors().any() and not book.cc_results().any()
    assert book.margin("z") == []


def test_single_fill_api_and_bad_fills(params):
    book = SpanBook(params)
    assert book.fill("acct", ("BIST", "AKBNKE", "FUT", "201605S0"), 13) == pytest.approx(1170.0)
    assert book.fill("acct", ("BIST", "XU030", "FUT", "201606S0"), -1) == pytest.approx(863.5)
    with pytest.raises(KeyError, match="BIST/AKBNKE/FUT/209901S0"):
        book.fill("acct", ("BIST", "AKBNKE", "FUT", "209901S0"), 1)
    with pytest.raises(ValueError, match="finite"):
        book.apply_fills(np.array([0]), np.array([0]), np.array([np.nan]))
    with pytest.raises(ValueError, match="account row"):
        book.apply_fills(np.array([5]), np.array([0]), np.array([1.0]))
    assert book.totals()[0, 0] == pytest.approx(863.5)  # refused fills changed nothing
    with pytest.raises(KeyError):
        book.fill("ghost", ("BIST", "NOSUCH", "FUT", "201605S0"), 1)
    assert book.accounts == ["acct"]
    with pytest.raises(SpanPositionError, match="NOSUCH"):
        book.set_positions({"acct": {("BIST", "NOSUCH", "FUT", "201605S0"): 1}, "b": {}})
    assert book.accounts == ["acct"] and book.totals()[0, 0] == pytest.approx(863.5)


def test_accounts_grow_past_capacity(params):
    book = SpanBook(params, capacity=2)
    for i in range(9):
        book.fill(f"acct{i}", ("BIST", "AKBNKE", "FUT", "201605S0"), i + 1)
    assert book.totals()[:, 0] == pytest.approx([90.0 * (i + 1) for i in range(9)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_full_path_matches_reference_property(params, universe, data):
    picks = data.draw(st.lists(st.integers(0, universe.size - 1), min_size=1, max_size=12))
    qtys = data.draw(st.lists(st.integers(-20, 20), min_size=len(picks), max_size=len(picks)))
    pos: dict = {}
    for i, q in zip(picks, qtys, strict=True):
        key = params.keys[universe[i]]
        pos[key] = pos.get(key, 0.0) + q
    book = SpanBook(params)
    book.set_positions({"p": pos})
    assert_matches_reference(book, ReferenceSpan(params))


def test_what_if_leaves_the_book_unchanged(params):
    book = SpanBook(params)
    book.fill("acct", ("BIST", "AKBNKE", "FUT", "201605S0"), 13)
    before = book.totals().copy()
    (m,) = book.what_if("acct", [(("BIST", "XU030", "FUT", "201606S0"), -1)])
    assert m.total == pytest.approx(863.5)  # the inter-commodity credit the trade would bring
    assert np.array_equal(book.totals(), before) and "XU030" not in {c.cc for c in book.margin("acct")[0].ccs}
    (new,) = book.what_if("newcomer", [(("BIST", "AKBNKE", "FUT", "201605S0"), -2)])
    assert new.total == pytest.approx(180.0) and "newcomer" not in book.account_index
