"""The engine at scale (issue #19): the lazy HS tail and the parallel step give the numbers of the
per-event path and of a full recompute, stock books and books of options (never in the P&L rows: the
tails add them where they read a scenario); conflated, blocked refreshes equal one event at a time; a
refresh with nothing changed does no scenario work."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calc import kernels
from calc.engine import MarginEngine
from calc.inputs import AccountSpec, Positions
from calc.instruments import Instruments, load_instruments
from calc.models import RiskParams
from marginflow import config

N_ACC, N_INST, N_SCEN, N_POS = 96, 30, 400, 6  # > kernels.PAR_MIN accounts: batches take the parallel step
N_OPT, OPT_PER_ACC, AS_OF = 12, 2, "2026-01-02"  # with options: on the first 3 stocks, half American


def universe(seed: int = 3) -> tuple[RiskParams, Positions, dict[str, float]]:
    """A small factor-model universe: N_POS random positions per account, N_SCEN daily scenarios."""
    rng = np.random.default_rng(seed)
    syms = [f"S{i:02d}" for i in range(N_INST)]
    beta = rng.normal(0, 0.01, (3, N_INST))
    idio = rng.uniform(0.008, 0.02, N_INST)
    cov = beta.T @ beta + np.diag(idio**2)
    daily = rng.normal(0, 1, (N_SCEN, 3)) @ beta + rng.normal(0, 1, (N_SCEN, N_INST)) * idio
    acc, sym, qty = [], [], []
    for a in range(N_ACC):
        for j in rng.choice(N_INST, N_POS, replace=False):
            acc.append(f"A{a:03d}")
            sym.append(syms[j])
            qty.append(float(rng.integers(10, 1000) * rng.choice([-1, 1])))
    prices = dict(zip(syms, rng.uniform(10, 200, N_INST).tolist(), strict=True))
    return (
        RiskParams(syms, cov, np.expm1(daily), 0.99, 1, "scale"),
        Positions(acc, sym, np.array(qty)),
        prices,
    )


def engine(hvar_margin: str = "es", options: bool = False) -> MarginEngine:
    """The stock book, or with `options` each account also holding OPT_PER_ACC of N_OPT listed options
    (full revaluation in every scenario, vols moved by a proxy ratio per scenario)."""
    params, pos, prices = universe()
    specs = [AccountSpec(f"A{a:03d}", "hvar", 1e7) for a in range(N_ACC)]
    calc = config.calc_defaults(alerts=[], stress=[], sectors={}, resync_events=0, hvar_margin=hvar_margin)
    if not options:
        return MarginEngine(params, specs, pos, prices=prices, calc_config=calc)
    rng = np.random.default_rng(4)
    ratio = np.exp(rng.normal(0, 0.05, (N_SCEN, N_INST)))
    params = RiskParams(params.syms, params.cov, params.scenarios, 0.99, 1, "scale", vol_ratio=ratio)
    held = [(f"A{a:03d}", f"O{c:02d}") for a in range(N_ACC) for c in rng.choice(N_OPT, OPT_PER_ACC, False)]
    qty = rng.integers(1, 40, len(held)) * rng.choice([-1, 1], len(held))
    pos = Positions(
        [*pos.account, *(h[0] for h in held)],
        [*pos.sym, *(h[1] for h in held)],
        np.concatenate([pos.qty, qty.astype(float)]),
    )
    calc = config.calc_defaults(
        alerts=[],
        stress=[],
        sectors={},
        resync_events=0,
        hvar_margin=hvar_margin,
        price_band={"default": 0.0},
    )
    master = options_master(tuple(sorted(prices.items())))
    return MarginEngine(params, specs, pos, prices=prices, calc_config=calc, master=master, as_of=AS_OF)


@functools.lru_cache(maxsize=1)
def options_master(prices: tuple[tuple[str, float], ...]) -> Instruments:
    """The stocks and N_OPT options on the first three of them: strikes 90-110% of the price, two expiries,
    calls and puts, European and American."""
    px = dict(prices)
    lines = ["sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield"]
    lines += [f"S{i:02d},equity,,,,,1,,,," for i in range(N_INST)]
    for c in range(N_OPT):
        u = f"S{c % 3:02d}"
        strike, expiry = round(px[u] * (0.9 + 0.05 * (c // 3 % 5)), 2), ("2026-03-20", "2026-09-18")[c % 2]
        exercise = ("european", "american")[c // 2 % 2]
        lines.append(f"O{c:02d},option,{u},{expiry},{strike},{'CP'[c // 3 % 2]},100,{exercise},0.3,0.03,0.01")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instruments.csv"
        path.write_text("\n".join(lines) + "\n")
        return load_instruments(path)


def stream(
    seed: int, n: int, eng: MarginEngine, vol: float = 0.003, jumps: float = 0.02, fills: float = 0.2
) -> list[tuple]:
    """n events: ticks (moves of `vol`, a share `jumps` of them 20%, within the acceptance band) and a
    share `fills` of fills (an account trading an instrument it holds or a new one; with options in the
    engine, a third of them an option)."""
    opts = [eng.sym_index[f"O{c:02d}"] for c in range(N_OPT)] if "O00" in eng.sym_index else []
    rng = np.random.default_rng(seed)
    px = eng.st.price[:N_INST].copy()
    out = []
    for _ in range(n):
        if rng.random() >= fills:
            j = int(rng.integers(N_INST))
            px[j] *= 1.2 if rng.random() < jumps else float(np.exp(rng.normal(0, vol)))
            out.append(("tick", j, float(px[j])))
        else:
            a = int(rng.integers(N_ACC))
            j = int(rng.integers(N_INST))
            if opts and rng.random() < 1 / 3:
                j = opts[int(rng.integers(len(opts)))]
            out.append(("fill", a, j, "B" if rng.random() < 0.5 else "S", float(rng.integers(1, 800))))
    return out


def apply(eng: MarginEngine, events: list[tuple], seq0: int) -> None:
    """The events as the calc server hands them over: runs of one table in one call."""
    i = 0
    while i < len(events):
        kind, j = events[i][0], i
        while j < len(events) and events[j][0] == kind:
            j += 1
        run, seqs = events[i:j], np.arange(seq0 + i + 1, seq0 + j + 1)
        if kind == "tick":
            eng.apply_prices([eng.syms[e[1]] for e in run], np.array([e[2] for e in run]), seqs)
        else:
            eng.apply_fills(
                [eng.accounts[e[1]] for e in run],
                [eng.syms[e[2]] for e in run],
                [e[3] for e in run],
                np.array([e[4] for e in run]),
                np.full(len(run), 100.0),
                seqs,
            )
        i = j


def numbers(eng: MarginEngine) -> np.ndarray:
    eng.refresh()
    return np.column_stack([eng.margin, eng.var, eng.es])


def assert_full(eng: MarginEngine) -> None:
    ref = eng.compute_full()
    for col, got in (("margin", eng.margin), ("var", eng.var), ("es", eng.es)):
        np.testing.assert_allclose(got, np.maximum(ref[col], 0), rtol=1e-9, atol=1e-6, err_msg=col)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    hvar_margin=st.sampled_from(["var", "es"]),
)
def test_blocked_refreshes_equal_the_per_event_path_and_a_full_recompute(seed, cuts, hvar_margin):
    blocked_equal_per_event(seed, cuts, hvar_margin, options=False)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    hvar_margin=st.sampled_from(["var", "es"]),
)
def test_blocked_refreshes_of_an_options_book_equal_the_per_event_path_and_a_full_recompute(
    seed, cuts, hvar_margin
):
    blocked_equal_per_event(seed, cuts, hvar_margin, options=True)


def blocked_equal_per_event(seed: int, cuts: list[int], hvar_margin: str, options: bool) -> None:
    one, blocked = engine(hvar_margin, options), engine(hvar_margin, options)
    events = stream(seed, 600, one)
    for e, ev in enumerate(events):  # one event, one refresh (few accounts each: the serial step)
        apply(one, [ev], e)
        one.refresh()
    edges = sorted({0, len(events), *(min(c * 2, len(events)) for c in cuts)})
    before = blocked.st.counts[kernels.N_EVAL]
    for lo, hi in zip(edges, edges[1:], strict=False):  # conflated batches (many accounts: the parallel step)
        apply(blocked, events[lo:hi], lo)
        blocked.refresh()
    assert blocked.st.counts[kernels.N_EVAL] > before  # the lazy tails did run
    np.testing.assert_allclose(numbers(blocked), numbers(one), rtol=1e-9, atol=1e-6)
    assert_full(one)
    assert_full(blocked)
    for eng in (one, blocked):  # drivers (the ES tail read back without a flush) sum to the margin
        acc = np.arange(N_ACC)
        np.testing.assert_allclose(eng._contrib(acc).sum(axis=1), eng.margin, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("options", [False, True])
def test_parallel_and_serial_numbers_are_bit_identical(options):
    eng = engine(options=options)
    apply(eng, stream(7, 3000, eng), 0)
    n = kernels.step(eng.st, *eng._take_queue(), False, True)  # events in; numbers left to do
    assert n >= kernels.PAR_MIN
    saved = {k: getattr(eng.st, k).copy() for k in kernels.LAYOUT}
    kernels.numbers_parallel(eng.st, n, 2)
    par = eng.st.res.copy(), eng.st.ires.copy(), eng.st.pnl.copy()
    for k, v in saved.items():
        getattr(eng.st, k)[...] = v
    kernels._numbers(eng.st, 0, n)
    for got, want in zip((eng.st.res, eng.st.ires, eng.st.pnl), par, strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("options", [False, True])
def test_the_tails_second_pass_leaves_out_candidates_one_limit_would_evaluate(options):
    """A tail's candidates are read in two passes: under kth + moved, then under the first pass's k-th
    lowest + moved (moved: how far any scenario can have moved since the flush), not all under kth + 2
    moved; the numbers stay a full recompute's."""
    eng = engine(options=options)
    apply(eng, stream(3, 2000, eng), 0)
    eng.refresh()
    apply(eng, stream(4, 300, eng, vol=0.0005, jumps=0.0, fills=0.02), 2000)
    st = eng.st
    n = kernels.step(st, *eng._take_queue(), False, True)  # events in; numbers left to do
    one_limit, lazy = 0, 0
    for a in st.dirty_list[:n]:
        ns = st.nslot[a]
        inst = st.inst[a, :ns]
        moved = np.sum(np.abs(st.xa[a, :ns] - st.xf[a, :ns]) * st.rmax[inst] * (st.orow[inst] < 0))
        moved += kernels._option_moves(st, a) + st.obound[a]
        if np.isnan(st.kth[a]) or not 2 * moved * (1 + 1e-6) < st.band[a] * st.fat[a]:
            continue  # flushed
        lazy += 1
        one_limit += int(np.sum(st.cval[a, : st.ncand[a]] <= st.kth[a] + 2 * moved * (1 + 1e-6)))
    evals = int(st.counts[kernels.N_EVAL])
    kernels.numbers_parallel(st, n, 2)
    st.counts[kernels.N_DIRTY] = 0
    evaluated = int(st.counts[kernels.N_EVAL]) - evals
    assert lazy > N_ACC // 4
    assert st.w.shape[0] * lazy <= evaluated < 0.9 * one_limit, (evaluated, one_limit)
    assert_full(eng)


def test_the_options_bound_covers_every_scenarios_move_since_the_flush_and_is_tighter_than_the_sum():
    """However an options book's rows and quantities move after its P&L rows were flushed (reprices past
    REBASE re-bases, fills, sign flips, a position closed), each holder's options bound (`_option_moves` +
    obound) is at least the largest move of its options' P&L in any scenario since the flush, and mostly
    well under the sum of each reprice's and fill's largest move (the bound before, session 21): a random
    walk of n steps moves ~sqrt(n) steps' worth."""
    eng = engine(options=True)
    apply(eng, stream(6, 500, eng), 0)
    eng.refresh()
    st = eng.st
    st.kth[:] = np.nan  # every tail selected afresh: the flush the moves are measured from
    kernels.run_step(st, *eng._take_queue(), True)
    st.dirty[:] = False
    opt = st.orow[st.inst] >= 0
    hs = np.flatnonzero(st.f_hs & opt.any(axis=1))

    def option_pnl() -> np.ndarray:  # (accounts, scenarios): sum over option slots of hq x ov
        rows = st.ov[np.where(opt, st.orow[st.inst], 0)]
        return np.einsum("ap,aps->as", np.where(opt, st.hq, 0.0), rows)

    at_flush = option_pnl()
    summed = np.zeros(st.nslot.shape[0])  # the bound before: each move's largest, added up
    rng = np.random.default_rng(8)
    n_c = int(st.orow.max()) + 1
    for r in range(12 * kernels.REBASE):  # each contract repriced ~6 x REBASE times
        cs = rng.choice(n_c, n_c // 2, replace=False).astype(np.int64)
        walk = np.exp(rng.normal(0, 0.01, (len(cs), 1)))  # the underlyings' random walk, and some noise
        rows = st.ov[cs] * walk + rng.normal(0, 1e-4, (len(cs), st.ov.shape[1]))
        widest = np.abs(rows - st.ov[cs]).max(axis=1)
        for i, c in enumerate(cs.tolist()):
            summed += np.abs(np.where(opt & (st.orow[st.inst] == c), st.hq, 0.0)).sum(axis=1) * widest[i]
        kernels.reprice(st, cs, rows)
        st.dirty[:] = False
        st.counts[kernels.N_DIRTY] = 0
        if r in (20, 60):  # fills: new quantities, flips, closes
            a, p = np.nonzero(opt)
            pick = rng.random(len(a)) < 0.1
            new = rng.choice([0.0, -1.0, 1.0, 2.0], pick.sum()) * st.hq[a[pick], p[pick]] + 3.0
            omax = st.omax[st.orow[st.inst[a[pick], p[pick]]]]
            np.add.at(summed, a[pick], np.abs(new - st.hq[a[pick], p[pick]]) * omax)
            st.hq[a[pick], p[pick]] = new
    moved = np.abs(option_pnl() - at_flush).max(axis=1)
    bound = np.array([kernels._option_moves(st, a) + st.obound[a] for a in range(st.nslot.shape[0])])
    assert (moved[hs] <= bound[hs] * (1 + 1e-12) + 1e-9).all()
    assert (moved[hs] > 0).all() and np.median(bound[hs] / summed[hs]) < 0.6


def test_lazy_tail_flushes_rarely_in_a_calm_market_and_stays_exact_over_a_long_run():
    eng = engine()
    flushes0 = int(eng.st.counts[kernels.N_FLUSH])
    events = stream(11, 20_000, eng, vol=0.0005, jumps=0.0, fills=0.01)
    for lo in range(0, len(events), 500):
        apply(eng, events[lo : lo + 500], lo)
        eng.refresh()
    refreshes = len(events) // 500
    flushed = int(eng.st.counts[kernels.N_FLUSH]) - flushes0
    assert flushed < 0.5 * refreshes * N_ACC  # most refreshes of most accounts read only their candidates
    assert_full(eng)


def test_a_refresh_with_nothing_changed_does_no_scenario_work():
    eng = engine()
    apply(eng, stream(5, 200, eng), 0)
    eng.refresh()
    work = eng.st.counts[[kernels.N_FLUSH, kernels.N_EVAL]].copy()
    pnl = eng.st.pnl.copy()
    eng.refresh()  # nothing queued
    eng.apply_prices(["NOT-A-SYM"], np.array([5.0]), np.array([10_000]))  # market data nobody holds
    eng.refresh()
    assert np.array_equal(eng.st.counts[[kernels.N_FLUSH, kernels.N_EVAL]], work)
    assert np.array_equal(eng.st.pnl, pnl)
    assert eng.scenario_work() == {"flushes": int(work[0]), "evaluations": int(work[1])}


def test_each_accounts_flush_point_comes_from_its_name(demo_engine):
    """The lazy tail's flush share of an account is a hash of its name (the same in a shard's engine as in
    the whole book's, wherever the account sits), between 0.5 and 1, and differs between accounts."""
    from calc.state import flush_share

    eng = demo_engine
    want = [flush_share(a) for a in eng.accounts]
    assert eng.st.fat.tolist() == want
    assert all(0.5 <= v < 1.0 for v in want) and len(set(want)) == len(want)
    assert flush_share("TECH01") == flush_share("TECH01") != flush_share("TECH02")
