"""The engine's drivers kernel against the plain-numpy reference ranking, and by hand."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from calc import kernels
from calc.drivers import _one_json, drivers_json, json_names
from tests.support.drivers import top_drivers


def test_kernel_drivers_equal_the_reference_ranking(demo_engine):
    """The engine's one-call drivers kernel ranks and sums like the plain-numpy top_drivers (tests/support) on
    the full per-slot contributions, for every account, over fills that create ties and sign changes."""
    eng = demo_engine
    eng.changed_rows()
    rng = np.random.default_rng(3)
    accounts = [a for a, s in zip(eng.accounts, eng.specs, strict=True) if s.model != "span"]
    for i in range(40):  # move positions so ties and sign changes occur
        eng.apply_fills(
            [accounts[i % len(accounts)]],
            ["AAPL" if i % 3 else "KO"],
            ["B" if i % 2 else "S"],
            np.array([float(rng.integers(1, 500))]),
            np.array([100.0]),
            np.array([i + 1]),
        )
    eng.changed_rows()
    everyone = np.arange(len(eng.accounts))
    got = [msgspec.json.decode(d) for d in eng._drivers_json(everyone)]
    contrib = eng._contrib(everyone)
    for a in everyone:
        n = int(eng.st.nslot[a])
        syms = [eng.syms[j] for j in eng.st.inst[a, :n]]
        want = (
            top_drivers(syms, eng.st.xa[a, :n], contrib[a, :n], eng.settings.top_drivers)
            if eng.margin[a] > 0
            else []
        )
        assert [d["sym"] for d in got[a]] == [d["sym"] for d in want]
        for x, y in zip(got[a], want, strict=True):
            assert x["contribution"] == pytest.approx(y["contribution"], rel=1e-12, abs=1e-9)
            assert x["exposure"] == pytest.approx(y["exposure"], rel=1e-12, abs=1e-9)
        if got[a]:
            assert sum(d["contribution"] for d in got[a]) == pytest.approx(eng.margin[a], rel=1e-9)


def test_top_slots_ties_and_other_bucket():
    """By hand: |contributions| 5, 3, 3, 1 (two tied at 3: the lower slot first), a flat slot with
    no contribution left out, top 2 -> slots 0 and 1, then *other* = 3 + 1 over 2 positions."""
    contrib = np.array([5.0, -3.0, 3.0, 0.0, 1.0])
    expo = np.array([10.0, 20.0, 30.0, 0.0, 50.0])
    slot, c, x = np.zeros(2, np.int64), np.zeros(2), np.zeros(2)
    cnt, rest = np.zeros(2, np.int64), np.zeros(2)
    kernels.top_slots(contrib, expo, 5, slot, c, x, cnt, rest)
    assert slot.tolist() == [0, 1] and c.tolist() == [5.0, -3.0] and x.tolist() == [10.0, 20.0]
    assert cnt.tolist() == [2, 4]  # written, held
    assert rest.tolist() == [4.0, 80.0]


def test_drivers_json_written_in_bulk_equal_entry_by_entry(demo_engine):
    """The rows written one %-format per shape (drivers_json) decode to exactly the numbers the
    entry-by-entry writer (msgspec on dicts, the options' path) gives from the same kernel output."""
    eng = demo_engine
    eng.changed_rows()
    everyone = np.arange(len(eng.accounts))
    top = eng.settings.top_drivers
    k = len(everyone)
    j_top, cnt = np.zeros((k, top), np.int64), np.zeros((k, 2), np.int64)
    c_top, x_top, rest = np.zeros((k, top)), np.zeros((k, top)), np.zeros((k, 2))
    kernels.drivers(eng.st, everyone, j_top, c_top, x_top, cnt, rest)
    # the engine's names, and names that are not ASCII (byte offsets differ from character offsets)
    for names in (eng._names, json_names([f'{s}\u00e9"' for s in eng.syms], None)):
        got = drivers_json(eng.st, everyone, top, names, eng.ext.contrib, eng._position_greeks)
        bulk = 0
        for i in range(k):
            if eng.margin[i] <= 0 or cnt[i, 0] < 0:
                assert got[i] == "[]" or cnt[i, 0] < 0
                continue
            m, other = int(cnt[i, 0]), bool(cnt[i, 1] > cnt[i, 0])
            want = _one_json(
                eng.st, i, m, other, j_top[i], x_top[i], c_top[i], rest[i], names, eng._position_greeks
            )
            assert msgspec.json.decode(got[i]) == msgspec.json.decode(want)
            bulk += not (eng.st.orow[j_top[i, :m]] >= 0).any()
        assert bulk >= 3  # the bulk writer was exercised, not only the per-entry one


def test_small_publishes_written_entry_by_entry_equal_the_bulk_writer(demo_engine, monkeypatch):
    """Below drivers.BULK_FROM rows drivers_json writes entry by entry: the same strings as the bulk
    writer for every account (options' Greeks, external models, margins <= 0), in any subset."""
    import calc.drivers as drivers

    eng = demo_engine
    eng.changed_rows()
    args = (eng.settings.top_drivers, eng._names, eng.ext.contrib, eng._position_greeks)
    for acc in (np.arange(len(eng.accounts)), np.array([len(eng.accounts) - 1, 0]), np.array([2])):
        monkeypatch.setattr(drivers, "BULK_FROM", 0)
        bulk = drivers_json(eng.st, acc, *args)
        monkeypatch.setattr(drivers, "BULK_FROM", 10**6)
        small = drivers_json(eng.st, acc, *args)
        assert small == bulk
        assert sum(d != "[]" for d in small) >= 1
