"""Numba kernels of the streaming margin engine: apply a batch of ticks and fills, bring each
touched (account, position) pair's risk state up to date in O(scenarios) / O(positions), and read
VaR, ES, stress, the margin and drivers off that state. All state is a `State` of numpy arrays.

Per account a: slots s = 0..nslot[a]-1 hold instrument inst[a,s], quantity qty[a,s] and the dollar
exposure xa[a,s] that the risk state currently reflects. The risk state is
  HS      pnl[a, :]     = sum_s xf[a,s] * RT[inst[a,s], :]      (scenario P&L vector, linear slots)
          scenario P&L  = pnl[a, :] + sum_s hq[a,s] * OV[orow[inst[a,s]], :]  (options: full revaluation,
                          added where a scenario is read, never written into the row)
          lazily: the row reflects the linear exposures xf of its last flush; between flushes the tail
          is read off candidates (the scenarios then near it), the changes xa - xf and the options
          (`_hs_tail`), so a refresh costs candidates x (changed + option) slots per account, not
          scenarios x changed slots
          OV[c, :] is option contract c's P&L per unit in each scenario, mult x (V_s - V_0)
          (calc/fullreval.py; OVT the same, scenario-major); `reprice` replaces it when the underlying
          ticks, no row written: its holders' bounds measure each contract's distance from a
          reference row (`_option_moves`). An option's price here is its dollar
          delta per unit (delta x the underlying's price) and its rt/cov/shock rows its underlying's,
          so var and stress see an option as its delta equivalent.
  var     y[a, s]       = (C xa)_{inst[a,s]},  v[a] = xa' C xa   (C.x product and quadratic form);
          ca[par_row[a]]   = C restricted to the account's instruments, slot by slot, so an update
                             reads one contiguous row instead of gathering from the N x N matrix
  stress  g[a, k]       = sum_s xa[a,s] * shock[k, inst[a,s]],  yk/vk as y/v under stressed C_k
An event only changes qty or price and marks what it touched; `step` then moves each touched pair
from xa to the exposure qty*price*mult with rank-one updates (several events on one pair in a batch
make one update) and recomputes the numbers of the accounts that moved. One kernel call per batch:
numba's per-call dispatch costs ~10-20 us for a State, so the hot path never calls in per event.
A batch that touches few pairs walks the holders of each ticked instrument; one that touches many
walks the accounts slot by slot instead (memory in order, each account's rows hot in cache). The
numbers of many accounts are computed on every core (`numbers_parallel`, numba prange), bit for bit
those of the one-core path.
"""

from __future__ import annotations

import functools
from math import nan
from typing import Annotated, NamedTuple, get_args, get_type_hints

import numpy as np
from numba import get_num_threads, njit, prange

from schemas.tables import BUILTIN_MODELS

SMALL_K = 64  # up to this many tail scenarios the worst-k selection is an insertion buffer, else a sort
DENSE_SHARE = 8  # a batch touching more than 1/8 of all slots walks the accounts, not the holders
CAND = 128  # per account, the scenarios kept as candidates of its tail (the lazy tail, `_hs_tail`)
PAR_MIN = 64  # from this many accounts to recompute, a step recomputes them on every core (prange)
REBASE = 8  # an option contract's reference row is its row of every REBASE-th reprice (`_reprice_moves`)
STREAM_PAIRS = 8  # from this many pairs in a scenario, its rows are streamed before the pairs read them

# model codes: a built-in model's index in schemas.tables.BUILTIN_MODELS; any other model is external
MODEL_CODE = {m: i for i, m in enumerate(BUILTIN_MODELS)}
M_VAR, M_HVAR, M_STRESS = MODEL_CODE["var"], MODEL_CODE["hvar"], MODEL_CODE["stress"]
M_EXT = len(BUILTIN_MODELS)
K_EXT, K_PAR, K_HVAR, K_HES, K_STRESS = -1, 0, 1, 2, 3  # driver kinds; stress scenario q is K_STRESS + q
# columns of State.res (float) and State.ires (int)
R_VARP, R_VARH, R_ESH, R_STRESS, R_VAR, R_ES, R_MARGIN = range(7)
N_RES = 7
I_HSIDX, I_STK, I_KIND = range(3)
N_IRES = 3
# State.counts: this step's touched instruments, touched pairs, dirty accounts; then, cumulative, the HS
# rows flushed and the tail candidates evaluated (the scenario work: what a refresh cost beyond O(slots))
N_INST, N_PAIR, N_DIRTY, N_FLUSH, N_EVAL = range(5)

F64, I64, BOOL = np.float64, np.int64, np.bool_
SHARED, ACCOUNT, WORK = "shared", "account", "work"


class Arr(NamedTuple):
    """The layout of one State array: dtype; axes (A accounts, N instruments, P slots per account, H
    holders per instrument, S scenarios, K stresses, R accounts keeping C.x, C option contracts, Q tail
    candidates per account, AP = A * P, AQ = A * Q, S1 = S + 1 flat, or a fixed size); the value of a new
    element; its role in a one-account copy (what-if): SHARED parameters, the ACCOUNT's own row copied,
    or WORK lists started empty."""

    dtype: type
    axes: tuple[str | int, ...]
    fill: float = 0.0
    role: str = ACCOUNT


class State(NamedTuple):
    """The engine's arrays. Each is annotated with its layout (`Arr`: dtype, axes, fill, role), from which
    `alloc`, `grow` and `one_account` build them: the one place the state is allocated."""

    price: Annotated[np.ndarray, Arr(F64, ("N",), nan, SHARED)]  # latest price
    mult: Annotated[np.ndarray, Arr(F64, ("N",), 1.0, SHARED)]  # contract multiplier
    inst: Annotated[np.ndarray, Arr(I64, ("A", "P"))]  # instrument of each slot
    nslot: Annotated[np.ndarray, Arr(I64, ("A",))]  # slots in use
    qty: Annotated[np.ndarray, Arr(F64, ("A", "P"))]  # position
    xa: Annotated[np.ndarray, Arr(F64, ("A", "P"))]  # exposure reflected in the risk state
    # slots with xa != 0 (a flat account's state is reset to exact zeros)
    nlive: Annotated[np.ndarray, Arr(I64, ("A",))]
    hold_acc: Annotated[np.ndarray, Arr(I64, ("N", "H"), 0, WORK)]  # accounts holding each instrument
    hold_slot: Annotated[np.ndarray, Arr(I64, ("N", "H"), 0, WORK)]  # their slot
    nhold: Annotated[np.ndarray, Arr(I64, ("N",), 0, WORK)]
    model: Annotated[np.ndarray, Arr(I64, ("A",))]  # model code
    max_stress: Annotated[np.ndarray, Arr(BOOL, ("A",))]  # margin = max(model, stress)
    f_hs: Annotated[np.ndarray, Arr(BOOL, ("A",))]  # keeps a scenario P&L vector
    f_par: Annotated[np.ndarray, Arr(BOOL, ("A",))]  # keeps C.x and x'Cx
    f_st: Annotated[np.ndarray, Arr(BOOL, ("A",))]  # keeps stress state
    rt: Annotated[np.ndarray, Arr(F64, ("N", "S"), 0, SHARED)]  # scenario returns, instrument-major
    rtT: Annotated[np.ndarray, Arr(F64, ("S", "N"), 0, SHARED)]  # the same, scenario-major (the lazy tail)
    # max |rt[j, :]|: bounds how far one update can move any scenario's P&L
    rmax: Annotated[np.ndarray, Arr(F64, ("N",), 0, SHARED)]
    pnl: Annotated[np.ndarray, Arr(F64, ("A", "S"))]
    orow: Annotated[np.ndarray, Arr(I64, ("N",), -1, SHARED)]  # option contract of an instrument (-1: linear)
    ov: Annotated[np.ndarray, Arr(F64, ("C", "S"), 0, SHARED)]  # option contracts' P&L per unit per scenario
    ovT: Annotated[np.ndarray, Arr(F64, ("S", "C"), 0, SHARED)]  # the same, scenario-major (the lazy tail)
    omax: Annotated[np.ndarray, Arr(F64, ("C",), 0, SHARED)]  # max |ov[c, :]| (NaN if one is NaN)
    oinst: Annotated[np.ndarray, Arr(I64, ("C",), 0, SHARED)]  # instrument of each option contract
    hq: Annotated[np.ndarray, Arr(F64, ("A", "P"))]  # option slots: the quantity the tails read (not in pnl)
    # k-th lowest P&L at the last selection (NaN: unknown, select from scratch)
    kth: Annotated[np.ndarray, Arr(F64, ("A",), nan)]
    cov: Annotated[np.ndarray, Arr(F64, ("N", "N"), 0, SHARED)]  # daily covariance
    par_row: Annotated[np.ndarray, Arr(I64, ("A",))]  # row of ca of accounts that keep C.x (-1: none)
    # ca[par_row[a], s, t] = cov[inst[a, s], inst[a, t]] for slots in use
    ca: Annotated[np.ndarray, Arr(F64, ("R", "P", "P"))]
    y: Annotated[np.ndarray, Arr(F64, ("A", "P"))]
    v: Annotated[np.ndarray, Arr(F64, ("A",))]
    sd: Annotated[np.ndarray, Arr(F64, ("N",), 0, SHARED)]  # sqrt(diag C)
    shock: Annotated[np.ndarray, Arr(F64, ("K", "N"), 0, SHARED)]
    # stressed vol of the shocked exposure: vol_mult * sd * (1 + shock)
    fk: Annotated[np.ndarray, Arr(F64, ("K", "N"), 0, SHARED)]
    cmult: Annotated[np.ndarray, Arr(F64, ("K",), 0, SHARED)]  # correlation multiplier
    g: Annotated[np.ndarray, Arr(F64, ("A", "K"))]  # shock P&L
    yk: Annotated[np.ndarray, Arr(F64, ("K", "A", "P"))]
    vk: Annotated[np.ndarray, Arr(F64, ("K", "A"))]
    # scale = z sqrt(h), 1.0 if the hvar margin is ES else 0.0
    fpar: Annotated[np.ndarray, Arr(F64, (2,), 0, SHARED)]
    w: Annotated[np.ndarray, Arr(F64, (1,), 0, SHARED)]  # ES weights on the k worst losses (VaR is the k-th)
    res: Annotated[np.ndarray, Arr(F64, ("A", N_RES))]  # numbers per account
    ires: Annotated[np.ndarray, Arr(I64, ("A", N_IRES))]  # VaR scenario, worst stress, driver kind
    # work lists: what events touched since the last step, HS updates pending, accounts that moved
    inst_mark: Annotated[np.ndarray, Arr(BOOL, ("N",), 0, WORK)]
    inst_list: Annotated[np.ndarray, Arr(I64, ("N",), 0, WORK)]
    pair_mark: Annotated[np.ndarray, Arr(BOOL, ("A", "P"), 0, WORK)]
    pair_a: Annotated[np.ndarray, Arr(I64, ("AP",), 0, WORK)]
    pair_s: Annotated[np.ndarray, Arr(I64, ("AP",), 0, WORK)]
    # the lazy tail (see `_hs_tail`): pnl[a] reflects linear exposures xf, not xa, until it is flushed;
    # cand[a, :ncand[a]] (ascending) are the scenarios whose stored P&L is below kth[a] + band[a]
    xf: Annotated[np.ndarray, Arr(F64, ("A", "P"))]
    cand: Annotated[np.ndarray, Arr(I64, ("A", "Q"))]
    cval: Annotated[np.ndarray, Arr(F64, ("A", "Q"))]  # their P&L at the flush, options included
    clin: Annotated[np.ndarray, Arr(F64, ("A", "Q"))]  # of it, the linear slots' (pnl[a, cand[a]])
    ncand: Annotated[np.ndarray, Arr(I64, ("A",))]
    band: Annotated[np.ndarray, Arr(F64, ("A",))]
    # how far held options have moved any scenario's P&L since the flush: `_option_moves` over the option
    # slots (each contract's distance from its reference row) plus obound, what re-bases of the reference
    # rows since the flush committed (`_reprice_moves`); the tail's limit widens by it
    obound: Annotated[np.ndarray, Arr(F64, ("A",))]
    oref: Annotated[np.ndarray, Arr(F64, ("C", "S"), 0, SHARED)]  # each contract's row at its last re-base
    odist: Annotated[np.ndarray, Arr(F64, ("C",), 0, SHARED)]  # max |ov[c] - oref[c]| (NaN if one is NaN)
    oage: Annotated[np.ndarray, Arr(I64, ("C",), 0, SHARED)]  # reprices since its last re-base
    hqf: Annotated[np.ndarray, Arr(F64, ("A", "P"))]  # option slots: hq at the flush (or re-base since)
    fdist: Annotated[np.ndarray, Arr(F64, ("A", "P"))]  # and its contract's odist then
    # per account the share (0.5 to 1) of its band at which its row flushes (calc/state.py flush_share)
    fat: Annotated[np.ndarray, Arr(F64, ("A",))]
    # work of a parallel step's lazy tails (`numbers_parallel`): per account its changed linear slots'
    # instruments and exposure changes, its candidate limit; the (account, candidate) pairs by scenario
    chg_j: Annotated[np.ndarray, Arr(I64, ("A", "P"), 0, WORK)]
    chg_d: Annotated[np.ndarray, Arr(F64, ("A", "P"), 0, WORK)]
    nchg: Annotated[np.ndarray, Arr(I64, ("A",), 0, WORK)]
    nopt: Annotated[np.ndarray, Arr(I64, ("A",), 0, WORK)]  # option slots after them: (contract, hq)
    lim: Annotated[np.ndarray, Arr(F64, ("A",), 0, WORK)]
    moved: Annotated[np.ndarray, Arr(F64, ("A",), 0, WORK)]  # bound + obound (`_first_limit`)
    # the candidates under the limits (positions): sel[a, :nsel0[a]] the first pass's, then the second's
    sel: Annotated[np.ndarray, Arr(I64, ("A", "Q"), 0, WORK)]
    nsel0: Annotated[np.ndarray, Arr(I64, ("A",), 0, WORK)]
    nsel: Annotated[np.ndarray, Arr(I64, ("A",), 0, WORK)]
    sval: Annotated[np.ndarray, Arr(F64, ("A", "Q"), 0, WORK)]  # the true P&L of each (_tails_evaluate)
    pair_at: Annotated[np.ndarray, Arr(I64, ("S1",), 0, WORK)]  # pairs of scenario q: pair_at[q]..[q+1]
    pair_acc: Annotated[np.ndarray, Arr(I64, ("AQ",), 0, WORK)]
    pair_val: Annotated[np.ndarray, Arr(F64, ("AQ",), 0, WORK)]  # its stored P&L
    pair_dst: Annotated[np.ndarray, Arr(I64, ("AQ",), 0, WORK)]  # where its true P&L goes: sval.flat
    dirty: Annotated[np.ndarray, Arr(BOOL, ("A",), 0, WORK)]
    dirty_list: Annotated[np.ndarray, Arr(I64, ("A",), 0, WORK)]
    counts: Annotated[np.ndarray, Arr(I64, (5,), 0, WORK)]  # N_INST .. N_EVAL


LAYOUT: dict[str, Arr] = {
    name: get_args(hint)[1] for name, hint in get_type_hints(State, include_extras=True).items()
}


def _shape(axes: tuple[str | int, ...], size: dict[str, int]) -> tuple[int, ...]:
    derived = {"AP": size["A"] * size["P"], "AQ": size["A"] * size["Q"], "S1": size["S"] + 1}
    return tuple(a if isinstance(a, int) else derived[a] if a in derived else size[a] for a in axes)


def sizes(st: State) -> dict[str, int]:
    """The sizes of the state's axes."""
    return {
        "A": st.nslot.shape[0],
        "N": st.price.shape[0],
        "P": st.inst.shape[1],
        "H": st.hold_acc.shape[1],
        "S": st.rt.shape[1],
        "K": st.shock.shape[0],
        "R": st.ca.shape[0],
        "C": st.ov.shape[0],
        "Q": st.cand.shape[1],
    }


def _new(shape: tuple[int, ...], dtype: type | np.dtype, fill: float) -> np.ndarray:
    """A State array at its fill value; at 0 from np.zeros (calloc: the pages of it nothing has written yet,
    e.g. the work lists' unused ends or another model's arrays, take no memory)."""
    return np.zeros(shape, dtype) if fill == 0 else np.full(shape, fill, dtype)


def alloc(**size: int) -> State:
    """A state of the given axis sizes (A, N, P, H, S, K, R, C, Q), every array at its fill value."""
    return State(**{k: _new(_shape(f.axes, size), f.dtype, f.fill) for k, f in LAYOUT.items()})


def grow(st: State, **size: int) -> State:
    """`st` with the given axes grown (e.g. N=new instrument count): every array along them is
    reallocated at its fill value with its old contents at the start; the others are st's own."""
    new = {**sizes(st), **size}
    out = {}
    for k, f in LAYOUT.items():
        old = getattr(st, k)
        derived = {"AP": ("A", "P"), "AQ": ("A", "Q"), "S1": ("S",)}
        if any(a in size or any(d in size for d in derived.get(a, ())) for a in f.axes):
            a = _new(_shape(f.axes, new), f.dtype, f.fill)
            a[tuple(slice(0, n) for n in old.shape)] = old
            out[k] = a
    return st._replace(**out)


@functools.lru_cache(maxsize=256)
def _one_account_plan(size: tuple[tuple[str, int], ...], n: int) -> tuple:
    """Per non-SHARED array of a one-account copy: its State field number, shape, dtype, fill and, for the
    account's own rows, where they go and where they come from with the account's axis left open (cached:
    the what-if pays per array only the numpy calls, ~1 us, not the layout walk)."""
    sz = dict(size)
    plan = []
    for i, (k, f) in enumerate(LAYOUT.items()):
        if f.role == SHARED:
            continue
        shape = _shape(f.axes, sz)
        copy = f.role == ACCOUNT and k != "ca"  # ca's block is per par_row: copied by one_account
        dst = tuple(slice(0, n) if x == "P" else slice(None) for x in f.axes) if copy else None
        a_axis = f.axes.index("A") if copy else -1
        before, after = (dst[:a_axis], dst[a_axis + 1 :]) if copy else ((), ())
        plan.append((i, shape, np.dtype(f.dtype), f.fill, dst, before, after))
    return tuple(plan)


def one_account(st: State, a: int, n: int, p: int) -> State:
    """A one-account copy of account a's state for the what-if kernel: its first n slots with room
    for p, par_row 0 (its ca block copied), fresh work lists, st's own parameter arrays (SHARED)."""
    size = {**sizes(st), "A": 1, "P": p, "H": 1, "R": 1}
    out = list(st)
    row = slice(a, a + 1)
    for i, shape, dtype, fill, dst, before, after in _one_account_plan(tuple(size.items()), n):
        out[i] = new = _new(shape, dtype, fill)
        if dst is not None:
            new[dst] = st[i][(*before, row, *after)]
    copy = State._make(out)
    if st.par_row[a] >= 0:
        copy.ca[0, :n, :n] = st.ca[st.par_row[a], :n, :n]
    copy.par_row[:] = 0
    return copy


# ---------------------------------------------------------------- helpers (cold paths)
#
# Performance rule for the hot path: numba increfs/decrefs every array passed to a called function
# and every view it creates (~30 ns each), so the per-pair and per-scenario loops in `step` are
# written inline over local arrays; helpers that take the State run once per account at most.


@njit(cache=True, inline="always")
def _push_worst(loss: np.ndarray, idx: np.ndarray, n: int, k: int, lo: float, s: int) -> int:
    """Insert loss `lo` of scenario `s` into the k worst so far (`loss` descending, `idx` alongside),
    which hold `n` entries; returns the new count. Ties keep the earlier scenario first."""
    if n == k:
        if lo <= loss[k - 1]:
            return n
        pos = k - 1
    else:
        pos = n
        n += 1
    while pos > 0 and loss[pos - 1] < lo:
        loss[pos] = loss[pos - 1]
        idx[pos] = idx[pos - 1]
        pos -= 1
    loss[pos] = lo
    idx[pos] = s
    return n


@njit(cache=True)
def stressed_entry(st: State, k: int, i: int, j: int) -> float:
    """Entry (i, j) of stress k's covariance of shocked exposures (models.stressed_cov)."""
    if i == j:
        return st.fk[k, i] * st.fk[k, i]
    den = st.sd[i] * st.sd[j]
    if den <= 0.0:
        return 0.0
    r = st.cov[i, j] / den * st.cmult[k]
    if r > 1.0:
        r = 1.0
    elif r < -1.0:
        r = -1.0
    return r * (st.fk[k, i] * st.fk[k, j])


@njit(cache=True)
def _init_slot(st: State, a: int, s: int) -> None:
    """Risk state of a newly opened slot (exposure 0): y = (C xa)_j over the account's slots."""
    j = st.inst[a, s]
    if st.f_par[a]:
        r = st.par_row[a]
        acc_y = 0.0
        for t in range(st.nslot[a]):
            c = st.cov[j, st.inst[a, t]]
            st.ca[r, s, t] = c
            st.ca[r, t, s] = c
            acc_y += c * st.xa[a, t]
        st.y[a, s] = acc_y
    if st.f_st[a]:
        for k in range(st.shock.shape[0]):
            acc_y = 0.0
            for t in range(st.nslot[a]):
                acc_y += stressed_entry(st, k, j, st.inst[a, t]) * st.xa[a, t]
            st.yk[k, a, s] = acc_y


@njit(cache=True)
def _zero_account(st: State, a: int) -> None:
    """A flat account's risk is exactly zero (no rounding residue left from the updates)."""
    st.pnl[a, :] = 0.0
    st.kth[a] = np.nan
    for t in range(st.nslot[a]):
        st.xf[a, t] = 0.0
    st.v[a] = 0.0
    st.g[a, :] = 0.0
    for t in range(st.nslot[a]):
        st.y[a, t] = 0.0
        for k in range(st.shock.shape[0]):
            st.yk[k, a, t] = 0.0
    for k in range(st.shock.shape[0]):
        st.vk[k, a] = 0.0


@njit(cache=True)
def fill_ca(st: State) -> None:
    """ca for every account that keeps C.x, from cov (after new parameters)."""
    for a in range(st.nslot.shape[0]):
        r = st.par_row[a]
        if r < 0:
            continue
        for s in range(st.nslot[a]):
            for t in range(st.nslot[a]):
                st.ca[r, s, t] = st.cov[st.inst[a, s], st.inst[a, t]]


@njit(cache=True)
def worst_k(pnl: np.ndarray, k: int, idx: np.ndarray, loss: np.ndarray) -> None:
    """The k largest losses (-pnl), worst first, ties to the lower scenario index (a stable sort)."""
    if k > SMALL_K:
        order = np.argsort(pnl, kind="mergesort")
        for i in range(k):
            idx[i] = order[i]
            loss[i] = -pnl[order[i]]
        return
    n = 0
    for s in range(pnl.shape[0]):
        n = _push_worst(loss, idx, n, k, -pnl[s], s)


@njit(cache=True)
def _nth_smallest(work: np.ndarray, n: int, m: int) -> float:
    """The m-th smallest (0-based) of work[:n], which is reordered (Hoare's quickselect, median of three)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        a, b, c = work[lo], work[mid], work[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while work[i] < pivot:
                i += 1
            while work[j] > pivot:
                j -= 1
            if i <= j:
                work[i], work[j] = work[j], work[i]
                i += 1
                j -= 1
        if m <= j:
            hi = j
        elif m >= i:
            lo = i
        else:
            return work[m]
    return work[m]


@njit(cache=True, inline="always")
def _hs_changes(st: State, a: int, dj: np.ndarray, dd: np.ndarray, dr: int) -> tuple[int, int, float]:
    """Account a's linear slots whose exposure moved since its P&L row was flushed: their instruments
    (dj[dr]) and exposure changes (dd[dr], = xa - xf), in slot order; after them its option slots held
    (contract, hq: the row holds no option, `_hs_tail`). Returns (how many linear, how many options, bound
    = sum |d| rmax over the linear + `_option_moves`). (dj, dd 2-d with a row index: no array views on
    the hot path.)"""
    rmax, orow, inst, xa, xf, hq = st.rmax, st.orow, st.inst[a], st.xa[a], st.xf[a], st.hq[a]
    n_slot = st.nslot[a]
    nd = 0
    bound = 0.0
    for t in range(n_slot):
        j = inst[t]
        if orow[j] >= 0:
            continue
        d = xa[t] - xf[t]
        if d != 0.0:
            dj[dr, nd] = j
            dd[dr, nd] = d
            nd += 1
            bound += abs(d) * rmax[j]
    no = 0
    for t in range(n_slot):
        c = orow[inst[t]]
        if c >= 0 and hq[t] != 0.0:
            dj[dr, nd + no] = c
            dd[dr, nd + no] = hq[t]
            no += 1
    if st.ov.shape[0]:  # (a book with option contracts)
        bound += _option_moves(st, a)
    return nd, no, bound


@njit(cache=True, inline="always")
def _option_moves(st: State, a: int) -> float:
    """How far account a's options can have moved any scenario's P&L since its flush, re-bases since
    (obound) aside: per option slot, with hqf its quantity then, hq now and ov_f its contract's row then,
    hq ov - hqf ov_f = hqf (ov - ov_f) + (hq - hqf) ov, and |ov - ov_f| <= odist + fdist (each row's
    distance from the reference row both were measured against), so |hqf| (odist + fdist) + |hq - hqf|
    omax. A random walk of the underlying moves a contract's row ~sqrt(n) steps' worth in n reprices: the
    sum of each reprice's move (the bound before, session 21) grew n steps' worth."""
    orow, inst, hq, hqf, fdist = st.orow, st.inst[a], st.hq[a], st.hqf[a], st.fdist[a]
    odist, omax = st.odist, st.omax
    out = 0.0
    for t in range(st.nslot[a]):
        c = orow[inst[t]]
        if c >= 0 and (hq[t] != 0.0 or hqf[t] != 0.0):
            out += abs(hqf[t]) * (odist[c] + fdist[t]) + abs(hq[t] - hqf[t]) * omax[c]
    return out


@njit(cache=True, inline="always")
def _true_pnl(
    stored: float, r: np.ndarray, ro: np.ndarray, dj: np.ndarray, dd: np.ndarray, dr: int, nd: int, no: int
) -> float:
    """A scenario's true P&L: its stored linear P&L plus sum dd[dr, i] x r[dj[dr, i]] over the nd linear
    changes (r: the scenario's row of rtT) in four interleaved partial sums, plus the no option slots'
    hq x ro[contract] after them (ro: its row of ovT) in order; the same order wherever it is computed."""
    s0, s1, s2, s3 = 0.0, 0.0, 0.0, 0.0
    i = 0
    while i + 3 < nd:
        s0 += dd[dr, i] * r[dj[dr, i]]
        s1 += dd[dr, i + 1] * r[dj[dr, i + 1]]
        s2 += dd[dr, i + 2] * r[dj[dr, i + 2]]
        s3 += dd[dr, i + 3] * r[dj[dr, i + 3]]
        i += 4
    while i < nd:
        s0 += dd[dr, i] * r[dj[dr, i]]
        i += 1
    o = 0.0
    for i in range(nd, nd + no):
        o += dd[dr, i] * ro[dj[dr, i]]
    return (stored + ((s0 + s1) + (s2 + s3))) + o


@njit(cache=True, inline="always")
def _hs_limit(kth: float, band: float, bound: float, obound: float, flush_at: float) -> float:
    """The limit on the P&L at the flush (cval) under which the true k worst must lie, kth + 2 (bound +
    obound) with room for rounding (no scenario moved by more than the linear moves, up to bound, and the
    options', up to obound), or NaN when the candidates do not cover it (2 (bound + obound) past flush_at x
    band, or no selection yet)."""
    slack = 1e-9 * (abs(kth) + bound + obound) + 1e-300
    if np.isnan(kth) or not 2.0 * (bound + obound) + slack < band * flush_at:
        return np.nan
    return kth + 2.0 * (bound + obound) + slack


@njit(cache=True, inline="always")
def _first_limit(kth: float, moved: float, lim: float) -> float:
    """The limit of a lazy tail's first pass, kth + moved (moved = bound + obound; at most `lim`): the k
    scenarios that were the k worst at the flush are under it, so its candidates' true P&L give a k-th
    lowest T at most kth + moved, and a candidate past it matters only if under T + moved
    (`_second_limit`), which is mostly below it: about a fifth fewer evaluated than under lim (10,000 x
    2,500, session 22)."""
    return min(lim, kth + moved + 1e-9 * (abs(kth) + moved) + 1e-300)


@njit(cache=True, inline="always")
def _second_limit(t: float, moved: float, lim: float) -> float:
    """The limit of a lazy tail's second pass: no scenario moved by more than `moved`, so one whose P&L
    at the flush was past t + moved (t: the first pass's k-th lowest true P&L) is past t now, and not
    among the k worst (`lim` if t is NaN: the first pass found fewer than k)."""
    if np.isnan(t):
        return lim
    return min(lim, t + moved + 1e-9 * (abs(t) + moved) + 1e-300)


@njit(cache=True)
def _hs_flush(
    st: State,
    a: int,
    k: int,
    nd: int,
    no: int,
    dj: np.ndarray,
    dd: np.ndarray,
    dr: int,
    idx: np.ndarray,
    loss: np.ndarray,
    work: np.ndarray,
) -> None:
    """Account a's P&L row brought up to date (row += sum dd[dr, :nd] x rt[dj[dr, :nd]], xf = xa), its
    P&L with its options (the no option slots after them, hq x ov: work[0], as `_true_pnl` sums it) and
    off that its k worst (idx, loss), kth, band and candidates (the scenarios below the (CAND + 1)-th
    lowest; cval their P&L, clin the row's) selected afresh. work: (2, scenarios) of scratch."""
    row, rt, orow, inst, xa, xf, n_slot = (
        st.pnl[a],
        st.rt,
        st.orow,
        st.inst[a],
        st.xa[a],
        st.xf[a],
        st.nslot[a],
    )
    kth, band, cand, cval, ncand, obound = st.kth, st.band, st.cand, st.cval, st.ncand, st.obound
    clin, ov = st.clin, st.ov
    sc = row.shape[0]
    i = 0
    while i + 1 < nd:  # two instruments per pass over the row
        d0, d1, j0, j1 = dd[dr, i], dd[dr, i + 1], dj[dr, i], dj[dr, i + 1]
        for q in range(sc):
            row[q] += d0 * rt[j0, q] + d1 * rt[j1, q]
        i += 2
    if i < nd:
        d0, j0 = dd[dr, i], dj[dr, i]
        for q in range(sc):
            row[q] += d0 * rt[j0, q]
    hq, hqf, fdist, odist = st.hq[a], st.hqf[a], st.fdist[a], st.odist
    for t in range(n_slot):  # options as the selection below sees them: what `_option_moves` measures from
        c = orow[inst[t]]
        if c < 0:
            xf[t] = xa[t]
        else:
            hqf[t] = hq[t]
            fdist[t] = odist[c]
    tot, scratch = work[0], work[1]
    if no:
        tot[:] = 0.0
        for i in range(nd, nd + no):  # (the option slots in order, as _true_pnl adds them)
            d0, r0 = dd[dr, i], ov[dj[dr, i]]
            for q in range(sc):
                tot[q] += d0 * r0[q]
        for q in range(sc):
            tot[q] = row[q] + tot[q]
    else:
        tot[:] = row
    q_cap = cand.shape[1]
    nc = 0
    top = -np.inf
    if q_cap > k and sc > q_cap:
        for q in range(sc):
            scratch[q] = tot[q]
        top = _nth_smallest(scratch, sc, q_cap)  # the (q_cap + 1)-th lowest: cand = the scenarios below it
        for q in range(sc):
            if tot[q] < top:
                cand[a, nc] = q
                cval[a, nc] = tot[q]
                clin[a, nc] = row[q]
                nc += 1
    elif q_cap > k:  # as many candidates as scenarios: every scenario, until the positions move by
        lo, hi = np.inf, -np.inf  # as much as the row's own spread
        for q in range(sc):
            cand[a, q] = q
            cval[a, q] = tot[q]
            clin[a, q] = row[q]
            lo, hi = min(lo, tot[q]), max(hi, tot[q])
        nc, top = sc, 2.0 * hi - lo + 1.0
    filled = 0
    if nc >= k:
        for c in range(nc):
            filled = _push_worst(loss, idx, filled, k, -cval[a, c], cand[a, c])
    elif k > SMALL_K:  # a large tail (k >= the candidates): a stable sort, flushed every time
        worst_k(tot, k, idx, loss)
    else:
        for q in range(sc):
            filled = _push_worst(loss, idx, filled, k, -tot[q], q)
    kth[a] = -loss[k - 1]
    obound[a] = 0.0
    ncand[a] = nc
    band[a] = top - kth[a] if nc >= k else -np.inf


@njit(cache=True)
def _hs_tail(
    st: State,
    a: int,
    k: int,
    flush_at: float,
    idx: np.ndarray,
    loss: np.ndarray,
    dj: np.ndarray,
    dd: np.ndarray,
    dr: int,
    work: np.ndarray,
    tally: np.ndarray,
) -> None:
    """The k worst scenarios of account a (idx, loss: worst first, ties to the lower scenario) from its
    stored P&L row, which reflects the linear exposures xf (the exposures at its last flush), the
    exposure changes d = xa - xf since, and its options as they are now (hq x ovT: never in the row, so a
    reprice writes no holder's row).

    Lazy: no scenario's P&L moved since the flush by more than bound = sum |d| x rmax plus the options'
    moves (`_option_moves` + obound: "moved" in all), so the true k worst all had a P&L at the flush <=
    kth + 2 moved (kth: the k-th lowest then); while that stays below kth + band, the true P&L of just
    those candidates (cand; cval their P&L at the flush, clin the row's) is computed, at a cost of
    candidates x (changed slots + option slots) instead of scenarios x changed slots, in two passes:
    those under `_first_limit`, then those the first pass's k-th lowest leaves under `_second_limit`.
    Otherwise (past flush_at x band: flush_at < 1, State.fat, staggers the accounts' flushes; or kth NaN:
    new slots or parameters) the row is flushed (_hs_flush). flush_at < 0: read only (for contributions):
    never flushed; every scenario's true P&L if the candidates do not cover the tail. work: (2, scenarios)
    of scratch ((2, candidates) when read only)."""
    row, rtT, ovT, cand, cval, clin, ncand = st.pnl[a], st.rtT, st.ovT, st.cand, st.cval, st.clin, st.ncand
    nd, no, bound = _hs_changes(st, a, dj, dd, dr)
    lim = _hs_limit(st.kth[a], st.band[a], bound, st.obound[a], flush_at if flush_at > 0.0 else 1.0)
    if not np.isnan(lim):
        val = work[1]  # the true P&L of the candidates of the first pass (ncand <= scenarios, candidates)
        lim1 = _first_limit(st.kth[a], bound + st.obound[a], lim)
        filled, ne = 0, 0
        for c in range(ncand[a]):
            if cval[a, c] <= lim1:
                q = cand[a, c]
                val[c] = _true_pnl(clin[a, c], rtT[q], ovT[q], dj, dd, dr, nd, no)
                filled = _push_worst(loss, idx, filled, k, -val[c], q)
                ne += 1
        top = max(lim1, _second_limit(-loss[k - 1] if filled == k else np.nan, bound + st.obound[a], lim))
        if top > lim1:  # a second pass: every candidate under its limit in order (ties as one pass has them)
            filled = 0
            for c in range(ncand[a]):
                if cval[a, c] <= top:
                    q = cand[a, c]
                    if cval[a, c] > lim1:
                        val[c] = _true_pnl(clin[a, c], rtT[q], ovT[q], dj, dd, dr, nd, no)
                        ne += 1
                    filled = _push_worst(loss, idx, filled, k, -val[c], q)
        tally[N_EVAL] += ne
    elif flush_at < 0.0:  # read only, the candidates do not cover the tail: every scenario's true P&L
        filled = 0
        for q in range(row.shape[0]):
            v = _true_pnl(row[q], rtT[q], ovT[q], dj, dd, dr, nd, no)
            filled = _push_worst(loss, idx, filled, k, -v, q)
    else:
        tally[N_FLUSH] += 1
        _hs_flush(st, a, k, nd, no, dj, dd, dr, idx, loss, work)


# ---------------------------------------------------------------- the batch step


@njit(cache=True)
def step(
    st: State,
    tick_ix: np.ndarray,
    tick_px: np.ndarray,
    fill_a: np.ndarray,
    fill_s: np.ndarray,
    fill_dq: np.ndarray,
    new_a: np.ndarray,
    new_s: np.ndarray,
    all_dirty: bool,
    parallel: bool = False,
) -> int:
    """One batch: initialise new slots, apply ticks (last price wins) and fills (signed quantity
    changes), move every touched pair to its new exposure with rank-one updates, and recompute
    the accounts that moved (every account if all_dirty): parametric VaR, HS VaR/ES, stress and
    the margin under the account's model and policy. Returns n: dirty_list[:n] are those accounts. With
    `parallel` and n >= PAR_MIN the numbers are left to numbers_parallel (counts[N_DIRTY] stays n):
    `run_step` does both."""
    price, mult, inst, nslot, qty, xa, nlive = st.price, st.mult, st.inst, st.nslot, st.qty, st.xa, st.nlive
    hold_acc, hold_slot, nhold = st.hold_acc, st.hold_slot, st.nhold
    f_par, f_st = st.f_par, st.f_st
    cov, y, v = st.cov, st.y, st.v
    orow, hq = st.orow, st.hq
    sd, shock, fk, cmult, g, yk, vk = st.sd, st.shock, st.fk, st.cmult, st.g, st.yk, st.vk
    inst_mark, inst_list, pair_mark, pair_a, pair_s = (
        st.inst_mark,
        st.inst_list,
        st.pair_mark,
        st.pair_a,
        st.pair_s,
    )
    dirty, dirty_list, counts = st.dirty, st.dirty_list, st.counts
    n_k = shock.shape[0]

    for e in range(new_a.shape[0]):
        _init_slot(st, new_a[e], new_s[e])
    for e in range(tick_ix.shape[0]):
        j = tick_ix[e]
        price[j] = tick_px[e]
        if not inst_mark[j]:
            inst_mark[j] = True
            inst_list[counts[N_INST]] = j
            counts[N_INST] += 1
    for e in range(fill_a.shape[0]):
        a, s = fill_a[e], fill_s[e]
        qty[a, s] += fill_dq[e]
        if not pair_mark[a, s]:
            pair_mark[a, s] = True
            pair_a[counts[N_PAIR]] = a
            pair_s[counts[N_PAIR]] = s
            counts[N_PAIR] += 1

    # every touched pair, walked one of two ways (a pair reached twice finds dx == 0 the second time):
    # sparse: the holders of each ticked instrument, then the filled pairs; dense (the touched pairs
    # are a good share of all slots): every account's slots in order, taking the touched ones
    ca, par_row = st.ca, st.par_row
    n_inst, n_pair = counts[N_INST], counts[N_PAIR]
    touched = n_pair
    for e in range(n_inst):
        touched += nhold[inst_list[e]]
    dense = touched * DENSE_SHARE > nslot.sum()
    e_inst, h, e_pair = 0, 0, 0
    a_walk, s_walk = 0, 0
    while True:
        if dense:
            if a_walk == nslot.shape[0]:
                break
            if s_walk >= nslot[a_walk]:
                a_walk += 1
                s_walk = 0
                continue
            a, s = a_walk, s_walk
            s_walk += 1
            j = inst[a, s]
            if not (inst_mark[j] or pair_mark[a, s]):
                continue
            pair_mark[a, s] = False
        elif e_inst < n_inst:
            j = inst_list[e_inst]
            if h >= nhold[j]:
                e_inst += 1
                h = 0
                continue
            a, s = hold_acc[j, h], hold_slot[j, h]
            h += 1
        elif e_pair < n_pair:
            a, s = pair_a[e_pair], pair_s[e_pair]
            pair_mark[a, s] = False
            e_pair += 1
            j = inst[a, s]
        else:
            break
        xn = qty[a, s] * (price[j] * mult[j])
        old = xa[a, s]
        dx = xn - old
        live_old, live_new, moved = old != 0.0, xn != 0.0, dx != 0.0
        c = orow[j]
        if c >= 0:  # an option: its scenario P&L is hq x its row, moved here (the row by `reprice`)
            q_old, q_new = hq[a, s], qty[a, s]
            live_old, live_new = live_old or q_old != 0.0, live_new or q_new != 0.0
            if q_new != q_old:  # (its tail's bound measures hq against hqf: `_option_moves`)
                hq[a, s] = q_new
                moved = True
        if not moved:
            continue
        if f_par[a]:
            r = par_row[a]
            v[a] += dx * (2.0 * y[a, s] + dx * ca[r, s, s])
            for t in range(nslot[a]):
                y[a, t] += ca[r, s, t] * dx
        if f_st[a]:
            for k in range(n_k):
                g[a, k] += dx * shock[k, j]
                vk[k, a] += dx * (2.0 * yk[k, a, s] + dx * (fk[k, j] * fk[k, j]))
                for t in range(nslot[a]):
                    i = inst[a, t]
                    if i == j:
                        c = fk[k, j] * fk[k, j]
                    elif sd[i] * sd[j] <= 0.0:
                        c = 0.0
                    else:
                        c = min(1.0, max(-1.0, cov[i, j] / (sd[i] * sd[j]) * cmult[k])) * (
                            fk[k, i] * fk[k, j]
                        )
                    yk[k, a, t] += c * dx
        xa[a, s] = xn
        nlive[a] += int(live_new) - int(live_old)
        if nlive[a] == 0:
            _zero_account(st, a)
        if not dirty[a]:
            dirty[a] = True
            dirty_list[counts[N_DIRTY]] = a
            counts[N_DIRTY] += 1
    for e in range(n_inst):
        inst_mark[inst_list[e]] = False
    if dense:
        for e in range(n_pair):
            pair_mark[pair_a[e], pair_s[e]] = False
    counts[N_INST] = 0
    counts[N_PAIR] = 0

    if all_dirty:
        for a in range(dirty.shape[0]):
            dirty[a] = True
            dirty_list[a] = a
        counts[N_DIRTY] = dirty.shape[0]
    n = counts[N_DIRTY]
    if n < PAR_MIN or not parallel:
        _numbers(st, n - n, n)  # (n - n: a literal 0 would compile a copy of _numbers for it)
        counts[N_DIRTY] = 0
    return n


def run_step(st: State, *args: np.ndarray | bool) -> int:
    """`step` with the numbers of many accounts recomputed on every core: step leaves them to
    `numbers_parallel` (a parallel kernel cannot be called from a cached one). Returns n."""
    n = step(st, *args, True)  # args: step's, tick_ix .. all_dirty
    if st.counts[N_DIRTY]:
        numbers_parallel(st, n, get_num_threads())
        st.counts[N_DIRTY] = 0
    return n


@njit(cache=True, inline="always")
def _hs_result(st: State, a: int, idx: np.ndarray, loss: np.ndarray) -> None:
    """HS VaR (the k-th worst loss), ES (the weighted k worst) and the VaR scenario from the k worst."""
    w = st.w
    k = w.shape[0]
    es = 0.0
    for i in range(k):
        es += w[i] * loss[i]
    st.res[a, R_VARH] = loss[k - 1]
    st.res[a, R_ESH] = es
    st.ires[a, I_HSIDX] = idx[k - 1]


@njit(cache=True, inline="always")
def _finish(st: State, a: int) -> None:
    """Account a's parametric VaR, worst stress and margin under its model and policy, from its state
    (HS numbers already in res); clears its dirty mark."""
    res, ires = st.res, st.ires
    st.dirty[a] = False
    scale, hs_es = st.fpar[0], st.fpar[1] != 0.0
    if st.f_par[a]:
        res[a, R_VARP] = scale * np.sqrt(max(st.v[a], 0.0))
    if st.f_st[a]:
        best, bk = 0.0, 0
        for q in range(st.shock.shape[0]):
            val = -st.g[a, q] + scale * np.sqrt(max(st.vk[q, a], 0.0))
            if q == 0 or val > best:
                best, bk = val, q
        res[a, R_STRESS] = best
        ires[a, I_STK] = bk
    code = st.model[a]
    if code == M_EXT:
        ires[a, I_KIND] = K_EXT
        return
    es = 0.0
    if code == M_VAR:
        var, number, kind = res[a, R_VARP], res[a, R_VARP], K_PAR
    elif code == M_HVAR:
        var, es = res[a, R_VARH], res[a, R_ESH]
        number, kind = (es, K_HES) if hs_es else (var, K_HVAR)
    else:
        var, number, kind = res[a, R_VARP], res[a, R_STRESS], K_STRESS + ires[a, I_STK]
    if st.max_stress[a] and res[a, R_STRESS] > number:
        number, kind = res[a, R_STRESS], K_STRESS + ires[a, I_STK]
    res[a, R_VAR] = max(var, 0.0)
    res[a, R_ES] = max(es, 0.0)
    res[a, R_MARGIN] = max(number, 0.0)
    ires[a, I_KIND] = kind


@njit(cache=True)
def _numbers(st: State, lo: int, hi: int) -> None:
    """The numbers of accounts dirty_list[lo:hi], one after the other: HS VaR/ES (the lazy tail,
    `_hs_tail`), then `_finish`."""
    pnl, inst = st.pnl, st.inst
    k_tail = st.w.shape[0]
    idx = np.empty(k_tail, dtype=np.int64)
    loss = np.empty(k_tail)
    dj = np.empty((1, inst.shape[1]), dtype=np.int64)
    dd = np.empty((1, inst.shape[1]))
    work = np.empty((2, pnl.shape[1]))
    for e in range(lo, hi):
        a = st.dirty_list[e]
        if st.f_hs[a] and pnl.shape[1] > 0:
            # (lo - lo: row 0 of dj, dd; not a literal 0, which compiles copies of the callees)
            _hs_tail(st, a, k_tail, st.fat[a], idx, loss, dj, dd, lo - lo, work, st.counts)
            _hs_result(st, a, idx, loss)
        _finish(st, a)


@njit(cache=True)
def _tails_prepare(st: State, lo: int, hi: int) -> None:
    """numbers_parallel (1) for accounts dirty_list[lo:hi]: the changed slots and limit of each account
    on HS (lim NaN: none, or flushed here)."""
    k_tail = st.w.shape[0]
    idx = np.empty(k_tail, dtype=np.int64)
    loss = np.empty(k_tail)
    work = np.empty((2, st.pnl.shape[1]))
    chg_j, chg_d = st.chg_j, st.chg_d
    for e in range(lo, hi):
        a = st.dirty_list[e]
        st.lim[a] = np.nan
        if not st.f_hs[a]:
            continue
        nd, no, bound = _hs_changes(st, a, chg_j, chg_d, a)
        st.nchg[a] = nd
        st.nopt[a] = no
        lim = _hs_limit(st.kth[a], st.band[a], bound, st.obound[a], st.fat[a])
        st.lim[a] = lim
        st.moved[a] = bound + st.obound[a]
        m = 0
        if not np.isnan(lim):
            lim1 = _first_limit(st.kth[a], st.moved[a], lim)
            for c in range(st.ncand[a]):
                if st.cval[a, c] <= lim1:
                    st.sel[a, m] = c
                    m += 1
        st.nsel0[a] = 0
        st.nsel[a] = m
        if np.isnan(lim):
            _hs_flush(st, a, k_tail, nd, no, chg_j, chg_d, a, idx, loss, work)
            _hs_result(st, a, idx, loss)


@njit(cache=True)
def _tails_count(st: State, lo: int, hi: int, at: np.ndarray) -> None:
    """numbers_parallel (2a) for accounts dirty_list[lo:hi]: how many of this pass's pairs (account,
    candidate sel[a, nsel0[a]:nsel[a]]) each scenario has (at[q + 1], counted from zero), and the flushes
    (at[0])."""
    lim, cand, sel, nsel0, nsel = st.lim, st.cand, st.sel, st.nsel0, st.nsel
    at[:] = 0
    for e in range(lo, hi):
        a = st.dirty_list[e]
        if not np.isnan(lim[a]):
            for m in range(nsel0[a], nsel[a]):
                at[cand[a, sel[a, m]] + 1] += 1
        elif st.f_hs[a]:  # flushed by _tails_prepare
            at[0] += 1


@njit(cache=True)
def _tails_place(st: State, lo: int, hi: int, fill: np.ndarray) -> None:
    """numbers_parallel (2b) for accounts dirty_list[lo:hi]: their pairs written from fill[q] on for
    scenario q (each part's pairs after the parts before it: accounts in dirty_list order in every
    scenario, as one pass over them all would place them)."""
    lim, cand, sel, nsel0, nsel = st.lim, st.cand, st.sel, st.nsel0, st.nsel
    for e in range(lo, hi):
        a = st.dirty_list[e]
        if not np.isnan(lim[a]):
            for m in range(nsel0[a], nsel[a]):
                c = sel[a, m]
                q = cand[a, c]
                p = fill[q]
                st.pair_acc[p] = a
                st.pair_val[p] = st.clin[a, c]
                st.pair_dst[p] = a * sel.shape[1] + m
                fill[q] += 1


@njit(cache=True)
def _tails_evaluate(st: State, q0: int, q1: int) -> float:
    """numbers_parallel (3) for scenarios q0..q1-1: the true P&L of each pair of scenario q (into sval,
    written where its account reads it: scattered stores here, no scattered loads after), reading the
    rows rtT[q] and ovT[q] (in cache) instead of one line of rt or ov per (pair, slot). Each row is first
    read end to end a line at a time (the hardware prefetcher streams it: the pairs' scattered reads of
    it then hit the cache instead of each waiting for memory, ~1.5x faster at 10,000 x 2,500 with
    options) when the scenario has STREAM_PAIRS pairs or more (a second pass has ~1 a scenario: streaming
    every row again would cost more than its pairs); returns the sum of what that read, for the caller to
    keep (so it is not left out)."""
    pair_acc, pair_val, pair_dst, chg_j, chg_d = st.pair_acc, st.pair_val, st.pair_dst, st.chg_j, st.chg_d
    nchg, nopt = st.nchg, st.nopt
    sval = st.sval.reshape(st.sval.size)  # (a view)
    touched = 0.0
    for q in range(q0, q1):
        r, ro = st.rtT[q], st.ovT[q]
        if st.pair_at[q + 1] - st.pair_at[q] < STREAM_PAIRS:
            if st.pair_at[q + 1] == st.pair_at[q]:
                continue
        else:
            for k in range(0, r.shape[0], 8):
                touched += r[k]
            for k in range(0, ro.shape[0], 8):
                touched += ro[k]
        for p in range(st.pair_at[q], st.pair_at[q + 1]):  # pairs in memory order: no random access but r's
            a = pair_acc[p]
            sval[pair_dst[p]] = _true_pnl(pair_val[p], r, ro, chg_j, chg_d, a, nchg[a], nopt[a])
    return touched


@njit(cache=True)
def _tails_widen(st: State, lo: int, hi: int) -> None:
    """numbers_parallel (4) for accounts dirty_list[lo:hi]: the second pass's candidates, those past the
    first limit and under `_second_limit` of the first pass's k-th lowest (sel[a, nsel0[a]:nsel[a]])."""
    k_tail = st.w.shape[0]
    lim, cval, sel, sval = st.lim, st.cval, st.sel, st.sval
    work = np.empty(sel.shape[1])
    for e in range(lo, hi):
        a = st.dirty_list[e]
        if not st.f_hs[a] or np.isnan(lim[a]):
            continue
        m1 = st.nsel[a]
        st.nsel0[a] = m1
        under = 0
        for m in range(m1):
            under += sval[a, m] <= st.kth[a]
        if under >= k_tail:  # the k-th lowest is at most kth: the second limit is under the first
            continue
        t = np.nan
        if m1 >= k_tail:
            work[:m1] = sval[a, :m1]
            t = _nth_smallest(work, m1, k_tail - 1)
        lim1 = _first_limit(st.kth[a], st.moved[a], lim[a])
        lim2 = _second_limit(t, st.moved[a], lim[a])
        m = m1
        for c in range(st.ncand[a]):
            if lim1 < cval[a, c] <= lim2:
                sel[a, m] = c
                m += 1
        st.nsel[a] = m


@njit(cache=True)
def _tails_finish(st: State, lo: int, hi: int) -> None:
    """numbers_parallel (5) for accounts dirty_list[lo:hi]: the k worst of the evaluated candidates (both
    passes' merged in candidate order, which is scenario order: ties as `_hs_tail`), then `_finish`."""
    k_tail = st.w.shape[0]
    idx = np.empty(k_tail, dtype=np.int64)
    loss = np.empty(k_tail)
    lim, cand, sel, val = st.lim, st.cand, st.sel, st.sval
    for e in range(lo, hi):
        a = st.dirty_list[e]
        if st.f_hs[a] and not np.isnan(lim[a]):
            ns = st.nsel[a]
            filled = 0
            i, j, m1 = 0, st.nsel0[a], st.nsel0[a]
            while i < m1 or j < ns:  # the two passes' ascending runs merged
                if j >= ns or (i < m1 and sel[a, i] < sel[a, j]):
                    filled = _push_worst(loss, idx, filled, k_tail, -val[a, i], cand[a, sel[a, i]])
                    i += 1
                else:
                    filled = _push_worst(loss, idx, filled, k_tail, -val[a, j], cand[a, sel[a, j]])
                    j += 1
            _hs_result(st, a, idx, loss)
        _finish(st, a)


@njit(cache=True, parallel=True)
def numbers_parallel(st: State, n: int, chunks: int) -> None:
    """The numbers of accounts dirty_list[:n] on every core (numba prange over `chunks` parts), the lazy
    tails by scenario in two passes, as `_hs_tail` takes them: (1) per account its changed slots and
    first limit, or its flush (_tails_prepare); (2) the (account, candidate) pairs under the limits by
    scenario (a counting sort on every core: _tails_count, _tails_place); (3) per scenario, its pairs' true
    P&L (_tails_evaluate); (4) per account the second pass's candidates (_tails_widen), then (2) and (3)
    for them; (5) per account its k worst, then _finish (_tails_finish).
    The same sums in the same order as `_numbers`: the same numbers, bit for bit."""
    if st.pnl.shape[1] == 0:
        for t in prange(chunks):
            _numbers(st, n * t // chunks, n * (t + 1) // chunks)
        return
    for t in prange(chunks):
        _tails_prepare(st, n * t // chunks, n * (t + 1) // chunks)
    sc = st.pnl.shape[1]
    part = np.empty((chunks, sc + 1), dtype=np.int64)  # (2) the pairs by scenario: a counting sort
    pair_at = st.pair_at  # pair_at[q]: the first pair of scenario q; part t's start in q after parts < t
    touched = np.zeros(chunks)  # (kept: see _tails_evaluate)
    bounds = np.empty(chunks + 1, dtype=np.int64)  # scenario ranges of about a pass's pairs / chunks each
    base = 0  # the second pass's pairs after the first's
    for pas in range(2):
        if pas:
            for t in prange(chunks):
                _tails_widen(st, n * t // chunks, n * (t + 1) // chunks)
        for t in prange(chunks):
            _tails_count(st, n * t // chunks, n * (t + 1) // chunks, part[t])
        pair_at[0] = base
        for q in range(sc):
            c = 0
            for t in range(chunks):
                c += part[t, q + 1]
            pair_at[q + 1] = pair_at[q] + c
        for t in range(chunks):
            st.counts[N_FLUSH] += 0 if pas else part[t, 0]
            part[t, 0] = 0
        for q in range(sc):
            start = pair_at[q]
            for t in range(chunks):
                c = part[t, q + 1]
                part[t, q] = start
                start += c
        total = pair_at[sc] - base
        st.counts[N_EVAL] += total
        for t in prange(chunks):
            _tails_place(st, n * t // chunks, n * (t + 1) // chunks, part[t])
        for t in range(chunks):
            bounds[t] = (
                min(sc, np.searchsorted(pair_at, base + total * t // chunks, side="right") - 1) if t else 0
            )
        bounds[chunks] = sc
        for t in prange(chunks):
            touched[t] += _tails_evaluate(st, bounds[t], bounds[t + 1])
        base += total
    for t in prange(chunks):
        _tails_finish(st, n * t // chunks, n * (t + 1) // chunks)


@njit(cache=True)
def rebuild_pnl(st: State, acc: np.ndarray) -> None:
    """The P&L rows of accounts `acc` from scratch: sum over linear slots of xa x rt[j], slot by slot (an
    account's row is the same sums whatever accounts are rebuilt with it; options are never in the row:
    `_hs_tail` adds them)."""
    sc = st.pnl.shape[1]
    for i in range(acc.shape[0]):
        a = acc[i]
        row = st.pnl[a]
        row[:] = 0.0
        for t in range(st.nslot[a]):
            j = st.inst[a, t]
            x = st.xa[a, t]
            if st.orow[j] >= 0 or x == 0.0:
                continue
            r = st.rt[j]
            for q in range(sc):
                row[q] += x * r[q]


@njit(cache=True)
def _row_change(new: np.ndarray, old: np.ndarray) -> float:
    """max |new - old|, NaN if any of the difference is NaN (reprice; old = 0: a row's max |value|)."""
    top = 0.0
    nan = False
    for k in range(new.shape[0]):
        d = new[k] - old[k]
        top = max(top, abs(d))
        nan |= d != d
    return np.nan if nan else top


@njit(cache=True, parallel=True)
def set_option_rows(st: State, cs: np.ndarray, rows: np.ndarray, fresh: bool) -> None:
    """ov[cs[i]] = rows[i], omax[cs[i]] = max |rows[i]| (NaN if one is NaN) and the scenario-major copy
    ovT[:, cs[i]] (in blocks of 8 scenarios: a line of each row read, a line of each of the block's ovT
    rows written, on every core). `fresh` (the holders' P&L rebuilt after): each row also becomes its
    contract's reference row (oref, odist 0)."""
    ov, ovT, omax = st.ov, st.ovT, st.omax  # (locals: `st.omax[c] = ...` inside the prange was dropped)
    oref, odist, oage = st.oref, st.odist, st.oage
    n_cs, n_sc = cs.shape[0], ov.shape[1]
    zero = np.zeros(n_sc)
    for i in prange(n_cs):
        ov[cs[i]] = rows[i]
        omax[cs[i]] = _row_change(rows[i], zero)
        if fresh:
            oref[cs[i]] = rows[i]
            odist[cs[i]] = 0.0
            oage[cs[i]] = 0
    for b in prange((n_sc + 7) // 8):
        q0, q1 = b * 8, min(n_sc, b * 8 + 8)
        for i in range(n_cs):
            c = cs[i]
            for q in range(q0, q1):
                ovT[q, c] = rows[i, q]


@njit(cache=True, parallel=True)
def _reprice_moves(st: State, cs: np.ndarray, rows: np.ndarray) -> None:
    """reprice's bookkeeping, after ov took the rows: each contract's distance from its reference row
    (odist), or on its REBASE-th reprice (or a NaN distance) the rows become the references, each holder
    that keeps a scenario P&L vector committing what `_option_moves` measured up to the new row to its
    obound (hqf then hq, fdist 0); holders with a quantity are marked dirty."""
    hq, hqf, fdist, f_hs, oref, odist, oage, omax = (
        st.hq,
        st.hqf,
        st.fdist,
        st.f_hs,
        st.oref,
        st.odist,
        st.oage,
        st.omax,
    )
    dirty, dirty_list, counts = st.dirty, st.dirty_list, st.counts
    n_cs = cs.shape[0]
    dist = np.zeros(n_cs)  # max_k |rows[i, k] - oref[cs[i], k]|, NaN if one is NaN
    for i in prange(n_cs):
        dist[i] = _row_change(rows[i], oref[cs[i]])
    for i in range(n_cs):
        c = cs[i]
        rebase = oage[c] + 1 >= REBASE or np.isnan(dist[i])
        j = st.oinst[c]
        for h in range(st.nhold[j]):
            a, s = st.hold_acc[j, h], st.hold_slot[j, h]
            if not f_hs[a] or (hq[a, s] == 0.0 and hqf[a, s] == 0.0):
                continue
            if rebase:
                st.obound[a] += abs(hqf[a, s]) * (dist[i] + fdist[a, s]) + abs(hq[a, s] - hqf[a, s]) * omax[c]
                hqf[a, s] = hq[a, s]
                fdist[a, s] = 0.0
            if hq[a, s] != 0.0 and not dirty[a]:
                dirty[a] = True
                dirty_list[counts[N_DIRTY]] = a
                counts[N_DIRTY] += 1
        if rebase:
            oref[c] = rows[i]
            odist[c] = 0.0
            oage[c] = 0
        else:
            odist[c] = dist[i]
            oage[c] += 1


def reprice(st: State, cs: np.ndarray, rows: np.ndarray) -> None:
    """Option contracts cs[i] take new scenario rows rows[i] (per unit; their underlying moved or their
    vol did). No holder's P&L row holds an option (`_hs_tail` adds hq x ovT at the scenarios it reads),
    so a reprice writes no row: ov / ovT / omax take the rows, each contract's distance from its reference
    row moves its holders' bounds (`_option_moves`; NaN if a move is NaN, and the limit then fails and the
    row is flushed), re-bases commit them (`_reprice_moves`), and the holders are marked dirty."""
    set_option_rows(st, cs, rows, False)
    _reprice_moves(st, cs, rows)


@njit(cache=True)
def hs_held(st: State, inst: np.ndarray) -> np.ndarray:
    """Per instrument inst[i]: held by an account that keeps a scenario P&L vector (an HS account with a
    slot in it, whatever its quantity): the instruments whose option rows those vectors read."""
    out = np.zeros(inst.shape[0], dtype=np.bool_)
    for i in range(inst.shape[0]):
        j = inst[i]
        for h in range(st.nhold[j]):
            if st.f_hs[st.hold_acc[j, h]]:
                out[i] = True
                break
    return out


@njit(cache=True)
def band_scan(
    tick_ix: np.ndarray, tick_px: np.ndarray, ref: np.ndarray, band: np.ndarray, suspect: np.ndarray
) -> int:
    """The acceptance band's common case, in one pass: ticks in order, each inside its instrument's band
    (|price - ref| <= band * ref, ref the last accepted price; NaN ref: none yet) moves ref to its price.
    Returns the index of the first tick that is outside, or for an instrument already suspect (the
    engine walks the rest one by one), or the number of ticks when all were accepted."""
    for e in range(tick_ix.shape[0]):
        j = tick_ix[e]
        p = tick_px[e]
        r = ref[j]
        if suspect[j] or abs(p - r) > band[j] * r:
            return e
        ref[j] = p
    return tick_ix.shape[0]


@njit(cache=True)
def _contrib_es(st: State, a: int, out: np.ndarray) -> None:
    """_contrib_one's ES-weighted tail P&L per slot: the tail as the last step found it (read only: the
    lazy tail, not flushed)."""
    n = st.nslot[a]
    k = st.w.shape[0]
    idx = np.empty(k, dtype=np.int64)
    loss = np.empty(k)
    p_cap = st.inst.shape[1]
    dj, dd = np.empty((1, p_cap), dtype=np.int64), np.empty((1, p_cap))
    tally = np.zeros(N_EVAL + 1, dtype=np.int64)  # (contributions: not the engine's work)
    # (a - a: row 0 of dj, dd; not a literal 0, which compiles copies of the callees)
    work = np.empty((2, st.cand.shape[1]))  # (read only: no flush; work[1] the candidates' true P&L)
    _hs_tail(st, a, k, -1.0, idx, loss, dj, dd, a - a, work, tally)
    for t in range(n):
        out[t] = 0.0
    for i in range(k):  # scenario by scenario (rows of rtT), each slot's sum still in i order
        q, wi = idx[i], st.w[i]
        rq = st.rtT[q]
        for t in range(n):
            j = st.inst[a, t]
            c = st.orow[j]
            out[t] += wi * (rq[j] if c < 0 else st.ov[c, q])
    for t in range(n):
        c = st.orow[st.inst[a, t]]
        out[t] = -(st.xa[a, t] if c < 0 else st.hq[a, t]) * out[t]


@njit(cache=True, inline="always")  # (a call per account would pass, and count references to, all of st)
def _contrib_one(st: State, a: int, kind: int, out: np.ndarray) -> None:
    """Per-slot contribution of account a's positions to one number (they sum to it):
    parametric component VaR; HS P&L in the VaR scenario, or ES-weighted tail P&L; stress
    scenario q: shock loss plus component stressed VaR."""
    n = st.nslot[a]
    scale = st.fpar[0]
    if kind == K_PAR:
        sq = np.sqrt(max(st.v[a], 0.0))
        for t in range(n):
            out[t] = scale * st.xa[a, t] * st.y[a, t] / sq if sq > 0.0 else 0.0
    elif kind == K_HVAR:  # the VaR scenario, as the last selection found it
        q = st.ires[a, I_HSIDX]
        rq = st.rtT[q]  # (its scenario-major row: one region of memory, not a line of each slot's row)
        for t in range(n):
            j = st.inst[a, t]
            c = st.orow[j]
            out[t] = -st.xa[a, t] * rq[j] if c < 0 else -st.hq[a, t] * st.ov[c, q]
    elif kind == K_HES:
        _contrib_es(st, a, out)
    elif kind >= K_STRESS:
        q = kind - K_STRESS
        sq = np.sqrt(max(st.vk[q, a], 0.0))
        for t in range(n):
            j = st.inst[a, t]
            comp = scale * st.xa[a, t] * st.yk[q, a, t] / sq if sq > 0.0 else 0.0
            out[t] = -st.xa[a, t] * st.shock[q, j] + comp


@njit(cache=True)
def contributions(st: State, accounts: np.ndarray, out: np.ndarray) -> None:
    """out[i, :nslot] = per-slot contributions to the margin number of accounts[i] (its kind)."""
    for i in range(accounts.shape[0]):
        a = accounts[i]
        _contrib_one(st, a, st.ires[a, I_KIND], out[i])


@njit(cache=True)
def top_slots(
    contrib: np.ndarray,
    expo: np.ndarray,
    n: int,
    slot: np.ndarray,
    c_out: np.ndarray,
    x_out: np.ndarray,
    cnt: np.ndarray,
    rest: np.ndarray,
) -> None:
    """Top drivers of one account from its first n slots: the len(slot) held positions (exposure or
    contribution != 0) with the largest |contribution|, largest first, ties to the lower slot.
    Writes their slots, contributions and exposures; cnt = (how many written, positions held);
    rest = (contribution, exposure) summed over the held positions not written."""
    top_n = slot.shape[0]
    m, held = 0, 0
    rest_c, rest_x = 0.0, 0.0
    for t in range(n):
        c, x = contrib[t], expo[t]
        if c == 0.0 and x == 0.0:
            continue
        held += 1
        key = abs(c)
        if m == top_n:
            if key <= abs(c_out[top_n - 1]):
                continue
            pos = top_n - 1
        else:
            pos = m
            m += 1
        while pos > 0 and abs(c_out[pos - 1]) < key:
            slot[pos], c_out[pos], x_out[pos] = slot[pos - 1], c_out[pos - 1], x_out[pos - 1]
            pos -= 1
        slot[pos], c_out[pos], x_out[pos] = t, c, x
    if held > m:  # the rest, summed in slot order
        for t in range(n):
            if contrib[t] == 0.0 and expo[t] == 0.0:
                continue
            top = False
            for r in range(m):
                top = top or slot[r] == t
            if not top:
                rest_c += contrib[t]
                rest_x += expo[t]
    cnt[0], cnt[1] = m, held
    rest[0], rest[1] = rest_c, rest_x


@njit(cache=True)
def drivers(
    st: State,
    accounts: np.ndarray,
    j_out: np.ndarray,
    c_out: np.ndarray,
    x_out: np.ndarray,
    cnt: np.ndarray,
    rest: np.ndarray,
) -> None:
    """Top drivers (top_slots) of each account with a built-in model, in one call, as instruments
    (j_out); accounts on an external model get cnt[i, 0] = -1 (their contributions live outside the
    kernel state)."""
    scratch = np.zeros(st.inst.shape[1])
    for i in range(accounts.shape[0]):
        a = accounts[i]
        kind = st.ires[a, I_KIND]
        if kind == K_EXT:
            cnt[i, 0] = -1
            continue
        _contrib_one(st, a, kind, scratch)
        top_slots(scratch, st.xa[a], st.nslot[a], j_out[i], c_out[i], x_out[i], cnt[i], rest[i])
        for r in range(cnt[i, 0]):
            j_out[i, r] = st.inst[a, j_out[i, r]]


@njit(cache=True)
def what_if(
    st: State,
    n_old: int,
    slots: np.ndarray,
    dq: np.ndarray,
    res: np.ndarray,
    ires: np.ndarray,
    contrib: np.ndarray,
) -> None:
    """On a one-account copy of the state (account 0, slots >= n_old newly opened): row 0 of
    res/ires/contrib gets the numbers with every pending event applied, row 1 after the trades."""
    p = st.nslot[0]
    every = np.arange(p)
    none_i = slots[:0]
    # account 0 and the flags as runtime values: a literal argument (0, True, False) compiles its own
    # copy of the callee; these calls then share the engine's compiled signatures
    a0, yes, no = p - p, p >= 0, p < 0
    for r in range(2):
        if r == 0:  # new slots, then every slot brought up to date with the queued events
            new_s = every[n_old:]
            step(st, none_i, dq[:0], every[:0] * 0, every[:0], dq[:0], new_s * 0, new_s, no, no)
            step(st, none_i, dq[:0], every * 0, every, np.zeros(p), none_i, none_i, yes, no)
        else:
            step(st, none_i, dq[:0], slots * 0, slots, dq, none_i, none_i, yes, no)
        res[r] = st.res[a0]
        ires[r] = st.ires[a0]
        _contrib_one(st, a0, st.ires[a0, I_KIND], contrib[r])
