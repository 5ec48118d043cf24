"""The streaming margin engine: incremental state == full numpy recompute over random event
sequences, drivers add up, what-if touches nothing, alerts fire once per crossing, replays are
bit-identical, bad events are rejected without stopping the engine."""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calc.engine import MarginEngine
from calc.history import InputError, load_prices
from calc.inputs import AccountSpec, Positions, load_accounts, load_positions
from calc.margin_rows import ALERT_COLUMNS, MARGIN_COLUMNS
from calc.models import OTHER, RiskParams, historical, params_from_history
from marginflow import config
from marginflow.config import AlertRuleConfig
from schemas.tables import TABLES
from tests.support import PRICES_FILE, ROOT

PRICES = PRICES_FILE
SYMS = ["AAPL", "MSFT", "XOM", "JPM", "KO", "PFE"]
HISTORY = load_prices(PRICES)
STRESS = (
    {"name": "tech crash", "shocks": {"tech": -0.2}, "correlation_multiplier": 1.5},
    {"name": "squeeze", "shocks": {"XOM": 0.3, "KO": 0.1}, "volatility_multiplier": 1.5},
)
SECTORS = {"AAPL": "tech", "MSFT": "tech"}


def calc_cfg(**kw) -> config.CalcConfig:
    """The [calc] defaults with no stress scenarios, sectors, alert rules or resync unless given."""
    return config.calc_defaults(**{"stress": [], "sectors": {}, "alerts": [], "resync_events": 0, **kw})


ACCOUNTS = [
    AccountSpec("V", "var", 4e5),
    AccountSpec("H", "hvar", 4e5),
    AccountSpec("S", "stress", 6e5),
    AccountSpec("VM", "var", 5e5, "max_stress"),
    AccountSpec("HM", "hvar", 5e5, "max_stress"),
]


def make_engine(
    hvar_margin: str = "var",
    alerts=(),
    lookback: int = 250,
    price_band: float = 0.5,
    params: RiskParams | None = None,
    **kw,
) -> MarginEngine:
    params = params or params_from_history(
        HISTORY.select(SYMS), confidence=0.99, horizon_days=1, lookback_days=lookback, param_id="test-params"
    )
    pos = Positions(
        ["V", "V", "H", "H", "H", "S", "S", "VM", "HM", "HM"],
        ["AAPL", "XOM", "MSFT", "KO", "PFE", "AAPL", "JPM", "XOM", "AAPL", "KO"],
        np.array([1000.0, -2000, 500, 3000, -4000, 2500, 800, 1500, -700, 5000]),
    )
    prices = {s: float(p) for s, p in HISTORY.select(SYMS).latest.items()}
    return MarginEngine(
        params,
        ACCOUNTS,
        pos,
        prices=prices,
        calc_config=calc_cfg(
            hvar_margin=hvar_margin,
            stress=STRESS,
            sectors=SECTORS,
            alerts=list(alerts),
            top_drivers=3,
            price_band={"default": price_band},
        ),
        **kw,
    )


def assert_matches_full(eng: MarginEngine) -> None:
    snap = eng.snapshot()
    ref = eng.compute_full()
    for col in ("margin", "var", "es", "stress"):
        got = np.array(snap[col])
        want = np.maximum(ref[col], 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6, err_msg=col)
    for a in range(len(eng.accounts)):
        if eng.margin[a] <= 0:
            continue
        dense = np.zeros(len(eng.syms))
        n = eng.st.nslot[a]
        dense[eng.st.inst[a, :n]] = eng._contrib(np.array([a]))[0, :n]
        np.testing.assert_allclose(
            dense,
            ref["contrib"][a],
            rtol=1e-9,
            atol=1e-9 * eng.margin[a],
            err_msg=f"drivers of {eng.accounts[a]}",
        )


# ---------------------------------------------------------------- incremental == full


fill_ev = st.tuples(
    st.just("fill"),
    st.integers(0, len(ACCOUNTS) - 1),
    st.integers(0, len(SYMS) - 1),
    st.sampled_from("BS"),
    st.integers(1, 3000),
)
tick_ev = st.tuples(st.just("tick"), st.integers(0, len(SYMS) - 1), st.floats(0.7, 1.4))
batches = st.lists(st.lists(st.one_of(fill_ev, tick_ev), min_size=1, max_size=25), min_size=1, max_size=8)


def run_batches(eng: MarginEngine, bs, publish: bool = True) -> list[dict]:
    seq = 0
    out = []
    for batch in bs:
        # consecutive events of one table go in one call, as the calc server does with merged batches
        i = 0
        while i < len(batch):
            kind = batch[i][0]
            j = i
            while j < len(batch) and batch[j][0] == kind:
                j += 1
            run = batch[i:j]
            seqs = np.arange(seq + 1, seq + 1 + len(run))
            seq += len(run)
            times = (seqs * 1_000_000_000).astype("datetime64[ns]")
            if kind == "fill":
                eng.apply_fills(
                    [ACCOUNTS[e[1]].account for e in run],
                    [SYMS[e[2]] for e in run],
                    [e[3] for e in run],
                    np.array([float(e[4]) for e in run]),
                    np.full(len(run), 100.0),
                    seqs,
                    times,
                )
            else:
                base = {s: HISTORY.select(SYMS).latest[s] for s in SYMS}
                eng.apply_prices(
                    [SYMS[e[1]] for e in run], np.array([base[SYMS[e[1]]] * e[2] for e in run]), seqs, times
                )
            i = j
        if publish:
            out.append(eng.changed_rows())
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bs=batches, hvar_margin=st.sampled_from(["var", "es"]))
def test_incremental_equals_full_recompute(bs, hvar_margin):
    eng = make_engine(hvar_margin)
    run_batches(eng, bs)
    assert_matches_full(eng)


def test_incremental_equals_full_over_a_long_random_run():
    rng = np.random.default_rng(11)
    eng = make_engine()
    bs = []
    for _ in range(200):
        b = []
        for _ in range(rng.integers(1, 40)):
            if rng.random() < 0.3:
                b.append(
                    (
                        "fill",
                        int(rng.integers(5)),
                        int(rng.integers(6)),
                        "BS"[rng.integers(2)],
                        int(rng.integers(1, 500)),
                    )
                )
            else:
                b.append(("tick", int(rng.integers(6)), float(rng.uniform(0.9, 1.1))))
        bs.append(b)
    run_batches(eng, bs)
    assert eng.events > 2000
    assert_matches_full(eng)


def test_sparse_and_dense_batch_walks_both_match_full():
    """40 accounts x 2 of the 20 real stocks: a single tick or fill touches a few pairs (the kernel walks
    the instrument's holders); ticks on 16 stocks touch most of them (it walks every account's slots,
    taking ticked instruments and filled pairs). After every batch the state equals a full recompute."""
    rng = np.random.default_rng(5)
    syms = list(HISTORY.syms)
    params = params_from_history(
        HISTORY, confidence=0.99, horizon_days=1, lookback_days=250, param_id="walks"
    )
    specs = [
        AccountSpec(f"A{i}", ("var", "hvar", "stress")[i % 3], 1e6, "max_stress" if i % 4 == 0 else "model")
        for i in range(40)
    ]
    acc = [s.account for s in specs for _ in range(2)]
    held = [syms[j] for _ in specs for j in rng.choice(len(syms), 2, replace=False)]
    pos = Positions(acc, held, rng.integers(-3000, 3000, len(acc)).astype(float) + 0.5)
    base = {s: float(p) for s, p in HISTORY.latest.items()}
    eng = MarginEngine(
        params,
        specs,
        pos,
        prices=base,
        calc_config=calc_cfg(stress=STRESS, sectors={"AAPL": "tech", "MSFT": "tech"}, top_drivers=3),
    )
    seq = 0
    for b in range(30):
        seq += 1
        if b % 3 == 0:  # one stock: a few holders
            s = syms[int(rng.integers(len(syms)))]
            eng.apply_prices([s], np.array([base[s] * rng.uniform(0.9, 1.1)]), np.array([seq]))
        elif b % 3 == 1:  # one fill, sometimes opening a new position
            eng.apply_fills(
                [f"A{int(rng.integers(40))}"],
                [syms[int(rng.integers(len(syms)))]],
                ["B"],
                np.array([float(rng.integers(1, 900))]),
                np.array([100.0]),
                np.array([seq]),
            )
        else:  # 16 of the 20 stocks (most pairs), and a fill in one of the other 4
            order = rng.permutation(len(syms))
            ticked, quiet = [syms[j] for j in order[:16]], [syms[j] for j in order[16:]]
            px = np.array([base[s] * rng.uniform(0.85, 1.15) for s in ticked])
            eng.apply_prices(ticked, px, np.arange(seq, seq + len(ticked)))
            seq += len(ticked)
            eng.apply_fills(
                [f"A{int(rng.integers(40))}"],
                [quiet[0]],
                ["S"],
                np.array([float(rng.integers(1, 900))]),
                np.array([100.0]),
                np.array([seq]),
            )
        eng.changed_rows()
        assert_matches_full(eng)


def test_closing_every_position_gives_exactly_zero():
    eng = make_engine()
    run_batches(eng, [[("tick", 0, 1.1), ("tick", 2, 0.9)]])
    # sell out V (AAPL 1000, XOM -2000) after prices moved
    eng.apply_fills(
        ["V", "V"],
        ["AAPL", "XOM"],
        ["S", "B"],
        np.array([1000.0, 2000.0]),
        np.array([1.0, 1.0]),
        np.array([10, 11]),
    )
    rows = eng.changed_rows()
    i = rows["account"].index("V")
    assert rows["margin"][i] == 0.0 and rows["var"][i] == 0.0 and rows["drivers"][i] == "[]"


def test_engine_numbers_against_independent_hs():
    eng = make_engine(lookback=504)
    snap = eng.snapshot()
    a = eng.acc_index["H"]
    # H: MSFT 500, KO 3000, PFE -4000 at the last close; P&L per scenario by hand from price ratios
    h = HISTORY.select(["MSFT", "KO", "PFE"]).window(504)
    qty = np.array([500.0, 3000.0, -4000.0])
    ratios = h.closes[1:] / h.closes[:-1] - 1.0
    pnl = ratios @ (qty * h.closes[-1])
    losses = np.sort(-pnl)[::-1]
    k = math.ceil(0.01 * 504 - 1e-9)  # 6
    assert snap["var"][a] == pytest.approx(losses[k - 1], rel=1e-9)
    tail = 0.01 * 504
    assert snap["es"][a] == pytest.approx(
        (losses[: k - 1].sum() + (tail - (k - 1)) * losses[k - 1]) / tail, rel=1e-9
    )


# ---------------------------------------------------------------- drivers, rows


def test_rows_have_exactly_the_margin_columns_and_validate():
    eng = make_engine()
    rows = eng.changed_rows()
    assert list(rows) == [c.name for c in TABLES["margin"].input_columns] == MARGIN_COLUMNS
    assert len(rows["account"]) == len(ACCOUNTS)  # the first call publishes everyone
    for c in TABLES["margin"].input_columns:
        for v in rows[c.name]:
            msgspec.convert(v, c.check)  # what the tickerplant will check
    assert set(rows["param_id"]) == {"test-params"}


def test_drivers_sum_to_the_margin():
    eng = make_engine()
    run_batches(
        eng,
        [[("fill", 0, 1, "B", 700), ("fill", 0, 3, "S", 900), ("fill", 0, 4, "B", 5000), ("tick", 0, 1.05)]],
    )
    rows = eng.snapshot()
    for i, a in enumerate(rows["account"]):
        drivers = json.loads(rows["drivers"][i])
        assert drivers, a
        assert sum(d["contribution"] for d in drivers) == pytest.approx(rows["margin"][i], rel=1e-9), a
        assert len(drivers) <= 3 + 1
    v = json.loads(rows["drivers"][rows["account"].index("V")])
    assert v[-1]["sym"] == OTHER  # V holds 5 syms now: top 3 plus the rest
    # the max_stress accounts' drivers explain the stress number when stress sets the margin
    i = rows["account"].index("VM")
    assert rows["margin"][i] == pytest.approx(max(rows["var"][i], rows["stress"][i]))


def test_changed_rows_conflate_and_skip_unmoved_accounts():
    eng = make_engine()
    eng.changed_rows()
    assert eng.changed_rows()["account"] == []
    # a tick on PFE moves only H (short PFE); nobody else holds it
    eng.apply_prices(["PFE"], np.array([HISTORY.latest["PFE"] * 1.02]), np.array([1]))
    eng.apply_prices(
        ["PFE", "PFE"],
        np.array([HISTORY.latest["PFE"] * 1.03, HISTORY.latest["PFE"] * 1.04]),
        np.array([2, 3]),
    )
    rows = eng.changed_rows()
    assert rows["account"] == ["H"] and rows["last_seq"] == [3]
    assert rows["change"][0] != 0
    # a price for a sym nobody holds, or an unchanged price: no rows
    eng.apply_prices(["GE", "PFE"], np.array([10.0, HISTORY.latest["PFE"] * 1.04]), np.array([4, 5]))
    assert eng.changed_rows()["account"] == []


def test_same_events_twice_give_identical_rows():
    rng = np.random.default_rng(5)
    bs = [
        [
            ("tick", int(rng.integers(6)), float(rng.uniform(0.9, 1.1)))
            if rng.random() < 0.7
            else (
                "fill",
                int(rng.integers(5)),
                int(rng.integers(6)),
                "BS"[rng.integers(2)],
                int(rng.integers(1, 900)),
            )
            for _ in range(rng.integers(1, 30))
        ]
        for _ in range(60)
    ]
    rules = [{"name": "util", "kind": "utilisation", "threshold": 0.5}]
    runs = []
    for _ in range(2):
        eng = make_engine(alerts=rules)
        rows = run_batches(eng, copy.deepcopy(bs))
        runs.append((msgspec.msgpack.encode(rows), msgspec.msgpack.encode(eng.take_alerts())))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- what-if


def _state_bytes(eng: MarginEngine) -> list[bytes]:
    arrays = [a.tobytes() for a in eng.st]
    arrays += [x.tobytes() for x in (eng._published, eng._changed)]
    arrays += [str({k: [x.tobytes() for x in v] for k, v in eng._queue.items()}).encode()]
    return arrays


def test_what_if_leaves_state_unchanged_and_matches_doing_it():
    eng = make_engine()
    eng.changed_rows()
    # pending events not yet refreshed must be part of "before"
    eng.apply_prices(["AAPL"], np.array([HISTORY.latest["AAPL"] * 1.1]), np.array([1]))
    before_state = _state_bytes(eng)
    trades = [
        {"sym": "MSFT", "qty": 1200},
        {"sym": "AAPL", "side": "S", "qty": 300},
        {"sym": "MSFT", "qty": -200},
    ]
    for name in ("V", "H", "S", "VM", "HM"):
        r = eng.what_if(name, trades)
        assert _state_bytes(eng) == before_state, name
        other = copy.deepcopy(eng)
        other.refresh()
        a = other.acc_index[name]
        assert r["margin_before"] == pytest.approx(other.margin[a], rel=1e-9)
        other.apply_fills(
            [name] * 3,
            ["MSFT", "AAPL", "MSFT"],
            ["B", "S", "S"],
            np.array([1200.0, 300, 200]),
            np.full(3, 1.0),
            np.array([2, 3, 4]),
        )
        other.refresh()
        assert r["margin_after"] == pytest.approx(other.margin[a], rel=1e-9), name
        assert r["change"] == pytest.approx(r["margin_after"] - r["margin_before"])
        assert sum(d["contribution"] for d in r["drivers"]) == pytest.approx(r["margin_after"], rel=1e-9)
        row = other.drivers(a)  # the margin row's drivers once done: ranked by the same kernel
        assert [d["sym"] for d in r["drivers"]] == [d["sym"] for d in row], name
        for got, want in zip(r["drivers"], row, strict=True):
            assert got["contribution"] == pytest.approx(want["contribution"], rel=1e-9, abs=1e-6)
            assert got["exposure"] == pytest.approx(want["exposure"], rel=1e-12)
    with pytest.raises(InputError, match="unknown sym 'NOPE'"):
        eng.what_if("V", [{"sym": "NOPE", "qty": 1}])
    with pytest.raises(InputError, match="unknown account"):
        eng.what_if("ZZ", [])


# ---------------------------------------------------------------- alerts


def _margin_of(eng: MarginEngine, name: str) -> float:
    return float(eng.margin[eng.acc_index[name]])


def test_alerts_fire_once_per_crossing_with_hysteresis():
    m0 = _margin_of(make_engine(), "V")  # V: long AAPL, short XOM; margin rises with AAPL's price
    coll = 2.0 * m0
    rules = [
        AlertRuleConfig(
            name="u",
            kind="utilisation",
            threshold=1.3 * m0 / coll,
            clear=1.15 * m0 / coll,
            accounts=["V"],
            min_hold_s=0,
        ),
        AlertRuleConfig(name="lvl", kind="level", threshold=1.5 * m0, accounts=["V"], min_hold_s=0),
        AlertRuleConfig(name="call", kind="call", threshold=1.0, accounts=["V"], min_hold_s=0),
    ]
    eng = make_engine(alerts=rules, price_band=0.0)  # (AAPL moves 2-4x here: no acceptance band)
    eng.set_collateral("V", coll)
    eng.changed_rows()
    assert eng.take_alerts()["account"] == []
    base = HISTORY.latest["AAPL"]
    margins = []
    seq = 1
    # move AAPL up and down: V's margin crosses the thresholds several times and hovers around them
    path = [1.0, 2.1, 2.15, 2.2, 2.1, 2.05, 2.2, 1.0, 0.99, 1.01, 2.6, 2.65, 1.0, 4.0, 4.1, 1.0]
    events = []
    for f in path:
        eng.apply_prices(["AAPL"], np.array([base * f]), np.array([seq]))
        seq += 1
        eng.changed_rows()
        margins.append(_margin_of(eng, "V"))
        events += list(zip(*eng.take_alerts().values(), strict=True))
    # expected by hand from the margin path: raise above the threshold, clear below the clear level
    expect = []
    up = {"u": False, "lvl": False, "call": False}
    for m in margins:
        for name, val, thr, clear in (
            ("u", m / coll, 1.3 * m0 / coll, 1.15 * m0 / coll),
            ("lvl", m, 1.5 * m0, 1.5 * m0 * 0.95),
            ("call", m, coll, coll * 0.95),
        ):
            if not up[name] and val > thr:
                up[name] = True
                expect.append((name, "raised"))
            elif up[name] and val < clear:
                up[name] = False
                expect.append((name, "cleared"))
    got = [(e[ALERT_COLUMNS.index("rule")], e[ALERT_COLUMNS.index("state")]) for e in events]
    assert got == expect
    assert got.count(("u", "raised")) == 3 and got.count(("call", "raised")) == 1  # the path really crosses
    assert got.count(("u", "cleared")) == 3
    assert all(e[ALERT_COLUMNS.index("last_seq")] > 0 for e in events)


def test_jump_alert_uses_event_time_window():
    # VM holds only XOM, so its margin is proportional to XOM's price
    eng = make_engine(
        alerts=[
            AlertRuleConfig(
                name="jump", kind="jump", threshold=0.10, clear=0.02, window_minutes=5, accounts=["VM"]
            )
        ]
    )
    base = HISTORY.latest["XOM"]
    minute = 60_000_000_000
    t0 = 1_700_000_000 * 1_000_000_000

    def at(t_ns: int, f: float, s: int) -> list:
        eng.apply_prices(
            ["XOM"], np.array([base * f]), np.array([s]), np.array([t_ns], dtype="datetime64[ns]")
        )
        eng.changed_rows()
        return eng.take_alerts()["state"]

    assert at(t0, 1.0, 1) == []
    m0 = _margin_of(eng, "VM")
    # a slow rise: +4% per 4 minutes never rises 10% within 5 minutes
    f = 1.0
    for i in range(1, 6):
        f *= 1.04
        assert at(t0 + 4 * i * minute, f, 1 + i) == [], i
    assert _margin_of(eng, "VM") == pytest.approx(m0 * f, rel=1e-9)  # yet it rose 21.7% overall
    # a fast rise: +15% within a minute raises once; a further rise does not raise again
    t = t0 + 30 * minute
    assert at(t, f * 1.15, 10) == ["raised"]
    assert at(t + minute // 2, f * 1.17, 11) == []
    # 7 minutes later the window has moved past the low: the next published margin clears it
    assert at(t + 7 * minute, f * 1.171, 12) == ["cleared"]
    alerts_value = eng.alerts.rules[0]
    assert alerts_value.kind == "jump"


# ---------------------------------------------------------------- bad input, parameters


def test_bad_events_are_rejected_not_fatal():
    eng = make_engine()
    eng.changed_rows()
    n = eng.apply_fills(
        ["V", "NOPE", "V", "V", "V", "V"],
        ["AAPL", "AAPL", "ZZZ", "AAPL", "AAPL", "AAPL"],
        ["B", "B", "B", "X", "B", "B"],
        np.array([10.0, 1, 1, 1, -5, float("nan")]),
        np.full(6, 100.0),
        np.arange(1, 7),
    )
    assert n == 1 and eng.rejected == 5
    reasons = " | ".join(eng.rejects)
    for text in ("unknown account 'NOPE'", "unknown sym 'ZZZ'", "side 'X'", "qty -5.0", "qty nan"):
        assert text in reasons
    assert eng.apply_prices(["AAPL", "MSFT"], np.array([float("nan"), -1.0]), np.array([7, 8])) == 0
    assert eng.rejected == 7
    assert eng.changed_rows()["account"] == ["V"]  # the one good fill
    assert_matches_full(eng)


def test_new_positions_grow_capacity():
    eng = make_engine()
    cap = eng.st.inst.shape[1]
    names = [a.account for a in ACCOUNTS]
    acc = [n for n in names for _ in SYMS]
    syms = SYMS * len(names)
    eng.apply_fills(
        acc,
        syms,
        ["B"] * len(acc),
        np.arange(1.0, len(acc) + 1),
        np.full(len(acc), 1.0),
        np.arange(1, len(acc) + 1),
    )
    assert (eng.st.nslot == len(SYMS)).all()
    assert eng.st.inst.shape[1] >= cap
    assert_matches_full(eng)


def test_param_event_recomputes_everything():
    eng = make_engine()
    eng.changed_rows()
    old = np.array(eng.margin)
    new = params_from_history(
        HISTORY.select(SYMS),
        confidence=0.99,
        horizon_days=1,
        lookback_days=250,
        ewma_lambda=0.94,
        param_id="ewma",
    )
    eng.set_params(new)
    rows = eng.changed_rows()
    assert set(rows["param_id"]) == {"ewma"} and len(rows["account"]) == len(ACCOUNTS)
    assert not np.allclose(old, eng.margin)
    assert_matches_full(eng)


def test_resync_every_n_events_keeps_numbers():
    eng = make_engine()
    eng.settings = calc_cfg(stress=STRESS, sectors=SECTORS, resync_events=5)
    run_batches(eng, [[("tick", i % 6, 1.0 + 0.01 * i) for i in range(7)]])
    assert eng._since_resync == 0
    assert_matches_full(eng)


def test_construction_errors_are_clear():
    params = params_from_history(HISTORY.select(SYMS), confidence=0.99, horizon_days=1, lookback_days=100)
    with pytest.raises(InputError, match="unknown sym 'ZZZ'"):
        MarginEngine(
            params,
            [AccountSpec("A", "var", 1.0)],
            Positions(["A"], ["ZZZ"], np.array([1.0])),
            prices=HISTORY.latest,
            calc_config=calc_cfg(),
        )
    with pytest.raises(InputError, match="unknown model 'nope'"):
        MarginEngine(params, [AccountSpec("A", "nope", 1.0)], calc_config=calc_cfg())
    with pytest.raises(InputError, match="collateral"):
        AccountSpec("A", "var", 0.0)
    cov_only = RiskParams(SYMS, params.cov, None, 0.99, 1)
    with pytest.raises(InputError, match="hvar needs a price history"):
        MarginEngine(cov_only, [AccountSpec("A", "hvar", 1.0)], calc_config=calc_cfg())


def test_demo_config_engine_utilisation_40_to_90_percent():
    cfg = config.load().calc
    eng = MarginEngine.from_config(cfg)
    rows = eng.changed_rows()
    assert sorted(set(rows["model"])) == ["hvar", "prisma", "span", "stress", "var"]
    assert len(rows["account"]) == len(load_accounts(cfg.accounts_file)) == 8
    assert all(0.4 <= u <= 0.9 for u in rows["utilisation"]), rows["utilisation"]
    assert len(load_positions(cfg.positions_file).sym) > 20
    # the hvar account's VaR equals an independent HS on its positions
    h = HISTORY.window(cfg.lookback_days)
    a = rows["account"].index("DIV02")
    pos = load_positions(cfg.positions_file)
    x = np.zeros((1, 20))
    for acc, s, q in zip(pos.account, pos.sym, pos.qty, strict=True):
        if acc == "DIV02":
            x[0, h.syms.index(s)] += q * h.closes[-1, h.syms.index(s)]
    ref = historical(x, h.closes[1:] / h.closes[:-1] - 1.0, cfg.confidence)
    assert rows["var"][a] == pytest.approx(ref.var[0], rel=1e-9)


def test_external_model_plugs_in_through_the_registry():
    """A model registered by name (as calc.span does) margins its accounts inside the engine."""
    from calc.models import EXTERNAL_MODELS, ExternalResult, register_model

    class Haircut:  # margin = 10% of gross notional, each position contributing its own 10%
        def evaluate(self, syms, qty, price, multiplier):
            c = 0.1 * np.abs(qty * price * multiplier)
            return ExternalResult(var=float(c.sum()), es=0.0, contrib=c)

    register_model("haircut", lambda cfg: Haircut())
    try:
        params = params_from_history(HISTORY.select(SYMS), confidence=0.99, horizon_days=1, lookback_days=100)
        eng = MarginEngine(
            params,
            [AccountSpec("X", "haircut", 1e6), AccountSpec("V", "var", 1e6)],
            Positions(["X", "X", "V"], ["AAPL", "XOM", "AAPL"], np.array([100.0, -50, 10])),
            prices=HISTORY.latest,
            calc_config=calc_cfg(),
        )
        px = HISTORY.latest
        rows = eng.changed_rows()
        x = rows["account"].index("X")
        assert rows["margin"][x] == pytest.approx(0.1 * (100 * px["AAPL"] + 50 * px["XOM"]), rel=1e-12)
        eng.apply_prices(["XOM"], np.array([px["XOM"] * 1.3]), np.array([1]))  # (inside the 50% band)
        rows = eng.changed_rows()
        assert rows["account"] == ["X"]
        assert rows["margin"][0] == pytest.approx(0.1 * (100 * px["AAPL"] + 65 * px["XOM"]), rel=1e-12)
        drivers = json.loads(rows["drivers"][0])
        assert sum(d["contribution"] for d in drivers) == pytest.approx(rows["margin"][0])
        r = eng.what_if("X", [{"sym": "KO", "qty": 10}])
        assert r["change"] == pytest.approx(0.1 * 10 * px["KO"], rel=1e-12)
    finally:
        EXTERNAL_MODELS.pop("haircut", None)


def test_covariance_file_param_event_keeps_scenarios(tmp_path):
    from calc.history import covariance, log_returns, write_covariance
    from calc.inputs import params_from_config

    eng = make_engine()
    eng.changed_rows()
    hs_before = float(eng.margin[eng.acc_index["H"]])
    var_before = float(eng.margin[eng.acc_index["V"]])
    # a CCP-style covariance file, syms in another order, with an extra sym the engine does not use
    syms = ["PFE", "KO", "JPM", "XOM", "MSFT", "AAPL", "GE"]
    h = HISTORY.select(syms).window(60)
    cov = covariance(log_returns(h.closes)) * 2.0
    write_covariance(tmp_path / "ccp.csv", syms, cov)
    calc = config.load().calc
    eng.set_params(params_from_config(calc, covariance_file=tmp_path / "ccp.csv"))
    rows = eng.changed_rows()
    assert set(rows["param_id"]) == {"covariance:ccp.csv"} and len(rows["account"]) == len(ACCOUNTS)
    assert float(eng.margin[eng.acc_index["H"]]) == hs_before  # HS scenarios untouched
    assert float(eng.margin[eng.acc_index["V"]]) != var_before
    # V: AAPL 1000, XOM -2000 under the file's covariance, by hand
    px = HISTORY.latest
    x = np.array([1000 * px["AAPL"], -2000 * px["XOM"]])
    i, j = syms.index("AAPL"), syms.index("XOM")
    c2 = np.array([[cov[i, i], cov[i, j]], [cov[j, i], cov[j, j]]])
    assert float(eng.margin[eng.acc_index["V"]]) == pytest.approx(
        2.3263478740408408 * math.sqrt(x @ c2 @ x), rel=1e-9
    )
    assert_matches_full(eng)
    with pytest.raises(InputError, match="unknown sym 'AAPL'"):
        write_covariance(tmp_path / "small.csv", ["KO"], np.array([[1e-4]]))
        eng.set_params(params_from_config(calc, covariance_file=tmp_path / "small.csv"))


@pytest.mark.parametrize(
    ("calc", "key"),
    [
        ({"hvar_margin": "median"}, "hvar_margin"),
        ({"top_drivers": 0}, "top_drivers"),
        ({"resync_events": -1}, "resync_events"),
        ({"default_policy": "max"}, "default_policy"),
        ({"alerts": [{"name": "x", "kind": "levels", "threshold": 1.0}]}, "alerts[0].kind"),
        (
            {"alerts": [{"name": "x", "kind": "jump", "threshold": 0.1, "window_minutes": 0}]},
            "window_minutes",
        ),
        ({"alerts": [{"name": "x", "kind": "level", "threshold": 1.0, "hysteresis": 1.0}]}, "hysteresis"),
        ({"alerts": [{"name": "x", "kind": "level", "threshold": 1.0}] * 2}, "rule names must be unique"),
        ({"price_band": {"confirm_ticks": 0}}, "confirm_ticks"),
        ({"stress": [{"name": "x", "volatility_multiplier": -1.0}]}, "volatility_multiplier"),
    ],
)
def test_bad_calc_settings_are_refused_when_the_config_is_loaded(calc, key):
    """The config structs are the one definition of each setting and its check: a bad value stops
    `config.load` naming the key, before any engine is built."""
    with pytest.raises(SystemExit, match=re.escape(key)):
        config.load(overrides={"calc": calc})


def test_the_engine_defaults_are_config_toml():
    """No second set of defaults: an engine on calc_defaults() has config.toml's settings (the old
    engine.Settings() had resync_events=0 where config.toml says 1,000,000)."""
    with open(ROOT / "config.toml", "rb") as f:
        toml = tomllib.load(f)["calc"]
    eng = MarginEngine(
        RiskParams(["A"], np.eye(1) * 1e-4, None, 0.99, 1),
        [AccountSpec("V", "var", 1e6)],
        calc_config=config.calc_defaults(),
    )
    assert eng.settings.resync_events == toml["resync_events"] == 1_000_000
    assert eng.settings.filter_lambda == toml["filter_lambda"]
    assert [r.name for r in eng.alerts.rules] == [r["name"] for r in toml["alerts"]]
    assert eng.price_band.config.default == toml["price_band"]["default"]


def test_what_if_takes_typed_trades_as_the_api_sends_them():
    from schemas.calc import Trade

    eng = make_engine()
    typed = eng.what_if("V", [Trade(sym="AAPL", qty=-300.0), Trade(sym="KO", qty=200.0, side="S")])
    plain = eng.what_if("V", [{"sym": "AAPL", "qty": -300.0}, {"sym": "KO", "qty": 200.0, "side": "S"}])
    assert typed == plain and typed["change"] != 0
    with pytest.raises(InputError, match="what_if: trade 0: .*qty"):
        eng.what_if("V", [{"sym": "AAPL", "qty": "x"}])


def test_an_account_s_rebuilt_state_does_not_depend_on_the_accounts_rebuilt_with_it():
    """A price jump rebuilds its holders' parametric and stress state (reference.rebuild_state): an
    account's y, v, g, yk, vk must be the same bits whether it is rebuilt alone or with others (a shard's
    engine holds only its accounts; a BLAS product over a block of them rounds by the block's shape)."""
    from calc import reference

    rng = np.random.default_rng(5)
    n_inst, n_acc = 150, 40
    syms = [f"Q{i:03d}" for i in range(n_inst)]
    beta = rng.normal(0, 0.01, (4, n_inst))
    cov = beta.T @ beta + np.diag(rng.uniform(1e-4, 4e-4, n_inst))
    params = RiskParams(syms, cov, rng.normal(0, 0.01, (100, n_inst)), 0.99, 1, "det")
    models = ("var", "stress", "var")
    specs = [
        AccountSpec(f"D{a:02d}", models[a % 3], 1e6, "max_stress" if a % 2 else "model") for a in range(n_acc)
    ]
    pos = [(f"D{a:02d}", syms[j]) for a in range(n_acc) for j in rng.choice(n_inst, 30, replace=False)]
    qty = rng.integers(1, 500, len(pos)) * rng.choice([-1.0, 1.0], len(pos))
    shocks = {"name": "down", "shocks": {s: -0.1 for s in syms[:60]}, "correlation_multiplier": 1.3}
    eng = MarginEngine(
        params,
        specs,
        Positions([a for a, _ in pos], [s for _, s in pos], qty),
        prices={s: 20.0 + 3.7 * i for i, s in enumerate(syms)},
        calc_config=calc_cfg(stress=[shocks, {**shocks, "name": "vol", "volatility_multiplier": 1.6}]),
    )
    st, vm = eng.st, eng.stress_set.vol_mult
    assert st.f_par.any() and st.f_st.any() and st.shock.shape[0] == 2

    def state(a: int) -> list[bytes]:
        return [
            st.y[a].tobytes(),
            st.v[a].tobytes(),
            st.g[a].tobytes(),
            st.yk[:, a].tobytes(),
            st.vk[:, a].tobytes(),
        ]

    alone = {}
    for a in range(n_acc):
        reference.rebuild_state(st, np.array([a]), vm)
        alone[a] = state(a)
    for together in (np.arange(n_acc), np.arange(1, n_acc, 3)):
        reference.rebuild_state(st, together, vm)
        for a in together.tolist():
            assert state(a) == alone[a], f"account {a} rebuilt with others differs from alone"


def test_param_events_after_the_engine_dropped_its_arrays_equal_a_fresh_engine(tmp_path):
    """The engine keeps its risk parameters light (the covariance and scenarios live in the state only,
    issue #19); params_in_force reads them back exactly, and a covariance-only param event (which takes
    the scenarios in force) gives bit for bit the numbers of a fresh engine built on the merged inputs."""
    import dataclasses

    from calc.history import covariance, log_returns, write_covariance
    from calc.inputs import params_from_config

    eng = make_engine()
    orig = params_from_history(
        HISTORY.select(SYMS), confidence=0.99, horizon_days=1, lookback_days=250, param_id="test-params"
    )
    assert eng.params.cov is None and eng.params.scenarios is None  # no copy beside the state's
    whole = eng.params_in_force()
    assert np.array_equal(whole.cov, orig.cov) and np.array_equal(whole.scenarios, orig.scenarios)
    assert whole.param_id == orig.param_id and whole.confidence == orig.confidence
    syms = ["PFE", "KO", "JPM", "XOM", "MSFT", "AAPL"]
    cov = covariance(log_returns(HISTORY.select(syms).window(60).closes)) * 1.5
    write_covariance(tmp_path / "ccp.csv", syms, cov)
    new = params_from_config(config.load().calc, covariance_file=tmp_path / "ccp.csv")
    eng.set_params(new)
    fresh = make_engine(params=dataclasses.replace(new.select(SYMS), scenarios=orig.scenarios))
    for k in ("margin", "var", "es", "stress"):
        assert np.array_equal(getattr(eng, k), getattr(fresh, k)), k
    assert not np.array_equal(eng.margin, make_engine().margin)  # the file moved the parametric ones
    assert eng.params.cov is None and eng.params.param_id == new.param_id
    assert np.array_equal(eng.params_in_force().cov, new.select(SYMS).cov)
    assert_matches_full(eng)
