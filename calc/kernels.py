"""Numba kernels of the streaming margin engine: apply events to positions and prices, bring each
touched (account, position) pair's risk state up to date in O(scenarios) / O(positions), and read
VaR, ES, stress and drivers off that state. All state is a `State` of numpy arrays.

Per account a: slots s = 0..nslot[a]-1 hold instrument inst[a,s], quantity qty[a,s] and the dollar
exposure xa[a,s] that the risk state currently reflects. The risk state is
  HS      pnl[a, :]     = sum_s xa[a,s] * RT[inst[a,s], :]      (scenario P&L vector)
  var     y[a, s]       = (C xa)_{inst[a,s]},  v[a] = xa' C xa   (C.x product and quadratic form)
  stress  g[a, k]       = sum_s xa[a,s] * shock[k, inst[a,s]],  yk/vk as y/v under stressed C_k
An event only changes qty or price and marks what it touched; `refresh` then moves each touched
pair from xa to the exposure qty*price*mult with rank-one updates (netting several events on the
same pair into one update).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

SMALL_K = 64  # up to this many tail scenarios the worst-k selection is an insertion buffer, else a sort


class State(NamedTuple):
    """The engine's arrays (A accounts, N instruments, P slots per account, S scenarios, K stresses)."""

    price: np.ndarray  # (N,) latest price
    mult: np.ndarray  # (N,) contract multiplier
    inst: np.ndarray  # (A, P) int64 instrument of each slot
    nslot: np.ndarray  # (A,) int64 slots in use
    qty: np.ndarray  # (A, P) position
    xa: np.ndarray  # (A, P) exposure reflected in the risk state
    nlive: np.ndarray  # (A,) int64 slots with xa != 0 (a flat account's state is reset to exact zeros)
    hold_acc: np.ndarray  # (N, H) int64 accounts holding each instrument
    hold_slot: np.ndarray  # (N, H) int64 their slot
    nhold: np.ndarray  # (N,) int64
    f_hs: np.ndarray  # (A,) bool: keeps a scenario P&L vector
    f_par: np.ndarray  # (A,) bool: keeps C.x and x'Cx
    f_st: np.ndarray  # (A,) bool: keeps stress state
    rt: np.ndarray  # (N, S) scenario returns, instrument-major
    pnl: np.ndarray  # (A, S)
    cov: np.ndarray  # (N, N) daily covariance
    y: np.ndarray  # (A, P)
    v: np.ndarray  # (A,)
    sd: np.ndarray  # (N,) sqrt(diag C)
    shock: np.ndarray  # (K, N)
    fk: np.ndarray  # (K, N) stressed vol of the shocked exposure: vol_mult * sd * (1 + shock)
    cmult: np.ndarray  # (K,) correlation multiplier
    g: np.ndarray  # (A, K) shock P&L
    yk: np.ndarray  # (K, A, P)
    vk: np.ndarray  # (K, A)
    # work lists: what events touched since the last refresh, and accounts whose numbers moved
    inst_mark: np.ndarray  # (N,) bool
    inst_list: np.ndarray  # (N,) int64
    pair_mark: np.ndarray  # (A, P) bool
    pair_a: np.ndarray  # (A*P,) int64
    pair_s: np.ndarray  # (A*P,) int64
    dirty: np.ndarray  # (A,) bool
    dirty_list: np.ndarray  # (A,) int64
    counts: np.ndarray  # (3,) int64: touched instruments, touched pairs, dirty accounts


N_INST, N_PAIR, N_DIRTY = 0, 1, 2


# ---------------------------------------------------------------- events


@njit(cache=True)
def apply_ticks(st: State, ix: np.ndarray, price: np.ndarray) -> None:
    """New prices for instruments ix (in event order; the last one wins)."""
    for e in range(ix.shape[0]):
        j = ix[e]
        st.price[j] = price[e]
        if not st.inst_mark[j]:
            st.inst_mark[j] = True
            st.inst_list[st.counts[N_INST]] = j
            st.counts[N_INST] += 1


@njit(cache=True)
def apply_fills(st: State, acc: np.ndarray, slot: np.ndarray, dq: np.ndarray) -> None:
    """Signed quantity changes dq for (account, slot) pairs, in event order."""
    for e in range(acc.shape[0]):
        a = acc[e]
        s = slot[e]
        st.qty[a, s] += dq[e]
        if not st.pair_mark[a, s]:
            st.pair_mark[a, s] = True
            st.pair_a[st.counts[N_PAIR]] = a
            st.pair_s[st.counts[N_PAIR]] = s
            st.counts[N_PAIR] += 1


@njit(cache=True, inline="always")
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
def init_slots(st: State, acc: np.ndarray, slot: np.ndarray) -> None:
    """Risk state of newly opened slots (exposure 0): y = (C xa)_j over the account's other slots."""
    for e in range(acc.shape[0]):
        a = acc[e]
        s = slot[e]
        j = st.inst[a, s]
        if st.f_par[a]:
            acc_y = 0.0
            for t in range(st.nslot[a]):
                acc_y += st.cov[j, st.inst[a, t]] * st.xa[a, t]
            st.y[a, s] = acc_y
        if st.f_st[a]:
            for k in range(st.shock.shape[0]):
                acc_y = 0.0
                for t in range(st.nslot[a]):
                    acc_y += stressed_entry(st, k, j, st.inst[a, t]) * st.xa[a, t]
                st.yk[k, a, s] = acc_y


# ---------------------------------------------------------------- refresh: rank-one updates


@njit(cache=True)
def _zero_account(st: State, a: int) -> None:
    """A flat account's risk is exactly zero (no rounding residue left from the updates)."""
    st.pnl[a, :] = 0.0
    st.v[a] = 0.0
    st.g[a, :] = 0.0
    for t in range(st.nslot[a]):
        st.y[a, t] = 0.0
        for k in range(st.shock.shape[0]):
            st.yk[k, a, t] = 0.0
    for k in range(st.shock.shape[0]):
        st.vk[k, a] = 0.0


@njit(cache=True)
def _update_pair(st: State, a: int, s: int) -> None:
    j = st.inst[a, s]
    xn = st.qty[a, s] * (st.price[j] * st.mult[j])
    old = st.xa[a, s]
    dx = xn - old
    if dx == 0.0:
        return
    if st.f_hs[a]:
        row = st.pnl[a]
        r = st.rt[j]
        for q in range(row.shape[0]):
            row[q] += dx * r[q]
    if st.f_par[a]:
        st.v[a] += dx * (2.0 * st.y[a, s] + dx * st.cov[j, j])
        cj = st.cov[j]
        for t in range(st.nslot[a]):
            st.y[a, t] += cj[st.inst[a, t]] * dx
    if st.f_st[a]:
        for k in range(st.shock.shape[0]):
            st.g[a, k] += dx * st.shock[k, j]
            st.vk[k, a] += dx * (2.0 * st.yk[k, a, s] + dx * stressed_entry(st, k, j, j))
            for t in range(st.nslot[a]):
                st.yk[k, a, t] += stressed_entry(st, k, j, st.inst[a, t]) * dx
    st.xa[a, s] = xn
    st.nlive[a] += int(xn != 0.0) - int(old != 0.0)
    if st.nlive[a] == 0:
        _zero_account(st, a)
    if not st.dirty[a]:
        st.dirty[a] = True
        st.dirty_list[st.counts[N_DIRTY]] = a
        st.counts[N_DIRTY] += 1


@njit(cache=True)
def refresh(st: State) -> None:
    """Bring every pair touched since the last refresh up to date (ticks first, then fills; a pair
    touched by both is updated once, the second visit finds nothing left to do)."""
    for e in range(st.counts[N_INST]):
        j = st.inst_list[e]
        st.inst_mark[j] = False
        for h in range(st.nhold[j]):
            _update_pair(st, st.hold_acc[j, h], st.hold_slot[j, h])
    st.counts[N_INST] = 0
    for e in range(st.counts[N_PAIR]):
        a = st.pair_a[e]
        s = st.pair_s[e]
        st.pair_mark[a, s] = False
        _update_pair(st, a, s)
    st.counts[N_PAIR] = 0


@njit(cache=True)
def mark_all(st: State) -> None:
    """Mark every account dirty (after a full recompute or a parameter change)."""
    st.counts[N_DIRTY] = 0
    for a in range(st.dirty.shape[0]):
        st.dirty[a] = True
        st.dirty_list[a] = a
    st.counts[N_DIRTY] = st.dirty.shape[0]


# ---------------------------------------------------------------- reading numbers off the state


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
        lo = -pnl[s]
        if n == k:
            if lo <= loss[k - 1]:
                continue
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


@njit(cache=True)
def measures(
    st: State, accounts: np.ndarray, scale: float, k: int, w: np.ndarray,
    var_p: np.ndarray, var_h: np.ndarray, es_h: np.ndarray, stress: np.ndarray,
    hs_idx: np.ndarray, st_k: np.ndarray,
) -> None:
    """Parametric VaR, HS VaR/ES (k worst, ES weights w) and stress for the given accounts."""
    idx = np.empty(k, dtype=np.int64)
    loss = np.empty(k)
    for e in range(accounts.shape[0]):
        a = accounts[e]
        if st.f_par[a]:
            var_p[a] = scale * np.sqrt(max(st.v[a], 0.0))
        if st.f_hs[a]:
            worst_k(st.pnl[a], k, idx, loss)
            es = 0.0
            for i in range(k):
                es += w[i] * loss[i]
            var_h[a] = loss[k - 1]
            es_h[a] = es
            hs_idx[a] = idx[k - 1]
        if st.f_st[a]:
            best = -np.inf
            bk = 0
            for q in range(st.shock.shape[0]):
                val = -st.g[a, q] + scale * np.sqrt(max(st.vk[q, a], 0.0))
                if val > best:
                    best = val
                    bk = q
            stress[a] = best if st.shock.shape[0] > 0 else 0.0
            st_k[a] = bk


@njit(cache=True)
def contributions(
    st: State, a: int, kind: int, scale: float, k: int, w: np.ndarray, out: np.ndarray,
) -> None:
    """Per-slot contribution of account a's positions to one number (they sum to it):
    kind 0 parametric (component VaR), 1 HS VaR (P&L in the VaR scenario), 2 HS ES (ES-weighted
    tail P&L), 3+q stress scenario q (shock loss + component stressed VaR)."""
    n = st.nslot[a]
    if kind == 0:
        sq = np.sqrt(max(st.v[a], 0.0))
        for t in range(n):
            out[t] = scale * st.xa[a, t] * st.y[a, t] / sq if sq > 0.0 else 0.0
    elif kind == 1 or kind == 2:
        idx = np.empty(k, dtype=np.int64)
        loss = np.empty(k)
        worst_k(st.pnl[a], k, idx, loss)
        for t in range(n):
            r = st.rt[st.inst[a, t]]
            if kind == 1:
                out[t] = -st.xa[a, t] * r[idx[k - 1]]
            else:
                acc = 0.0
                for i in range(k):
                    acc += w[i] * r[idx[i]]
                out[t] = -st.xa[a, t] * acc
    else:
        q = kind - 3
        sq = np.sqrt(max(st.vk[q, a], 0.0))
        for t in range(n):
            j = st.inst[a, t]
            comp = scale * st.xa[a, t] * st.yk[q, a, t] / sq if sq > 0.0 else 0.0
            out[t] = -st.xa[a, t] * st.shock[q, j] + comp


@njit(cache=True)
def take_dirty(st: State, out: np.ndarray) -> int:
    """Move the dirty accounts into out[:n] (in the order they became dirty) and clear them."""
    n = st.counts[N_DIRTY]
    for e in range(n):
        a = st.dirty_list[e]
        out[e] = a
        st.dirty[a] = False
    st.counts[N_DIRTY] = 0
    return n
