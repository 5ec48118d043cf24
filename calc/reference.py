"""The reference path: risk state and margin numbers from scratch, from positions and prices with dense
numpy products, never from the incremental state. The engine rebuilds state this way at start, on a
parameter change, every calc.resync_events events and for an account whose incremental result is not
finite; `full_numbers` (MarginEngine.compute_full) is what the incremental kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from calc import kernels
from calc.kernels import M_EXT, M_HVAR, M_STRESS, M_VAR, State
from calc.models import ExternalResult, StressSet, historical, parametric, stress, stressed_cov


def dense_exposure(st: State, acc: np.ndarray | None = None) -> np.ndarray:
    """(accounts, N) exposures qty * price * multiplier of accounts `acc` (None: all)."""
    acc = np.arange(st.nslot.shape[0]) if acc is None else acc
    x = np.zeros((len(acc), st.price.shape[0]))
    live = np.arange(st.inst.shape[1])[None, :] < st.nslot[acc][:, None]
    r_ix, s_ix = np.nonzero(live)
    a_ix = acc[r_ix]
    j = st.inst[a_ix, s_ix]
    x[r_ix, j] = st.qty[a_ix, s_ix] * (st.price[j] * st.mult[j])
    return x


def option_qty(st: State, acc: np.ndarray) -> np.ndarray:
    """(len(acc), C) quantity of each option contract held by accounts `acc` (kernels.State.orow)."""
    q = np.zeros((len(acc), st.ov.shape[0]))
    live = np.arange(st.inst.shape[1])[None, :] < st.nslot[acc][:, None]
    r_ix, s_ix = np.nonzero(live)
    c = st.orow[st.inst[acc[r_ix], s_ix]]
    opt = c >= 0
    q[r_ix[opt], c[opt]] = st.qty[acc[r_ix[opt]], s_ix[opt]]
    return q


REBUILD_CHUNK = 256  # accounts per block of a rebuild (the temporaries stay small beside the state)


@njit(cache=True)
def slot_products(
    xa: np.ndarray,
    nslot: np.ndarray,
    inst: np.ndarray,
    acc: np.ndarray,
    m: np.ndarray,
    y: np.ndarray,
    v: np.ndarray,
) -> None:
    """For each account a of `acc`, over its live slots t: y[a, s] = sum_t xa[a, t] m[inst[a, t], inst[a, s]]
    for every slot s (the dense (x @ m)[inst[a]]), v[a] = sum_t xa[a, t] y[a, t] (x.m.x). Account by
    account in a fixed order: an account's numbers are the same whatever accounts are rebuilt with it (a
    BLAS product's rounding depends on the block's shape)."""
    n = m.shape[0]
    for i in range(acc.shape[0]):
        a = acc[i]
        k = nslot[a]
        for s in range(inst.shape[1]):
            j = inst[a, s]
            j = j + n if j < 0 else j  # (as numpy indexes)
            total = 0.0
            for t in range(k):
                total += xa[a, t] * m[inst[a, t], j]
            y[a, s] = total
        total = 0.0
        for t in range(k):
            total += xa[a, t] * y[a, t]
        v[a] = total


@njit(cache=True)
def slot_shocks(
    xa: np.ndarray, nslot: np.ndarray, inst: np.ndarray, acc: np.ndarray, shock: np.ndarray, g: np.ndarray
) -> None:
    """g[a, k] = sum over a's live slots t of xa[a, t] shock[k, inst[a, t]] (the dense x @ shock.T),
    account by account (see slot_products)."""
    for i in range(acc.shape[0]):
        a = acc[i]
        for k in range(shock.shape[0]):
            total = 0.0
            for t in range(nslot[a]):
                total += xa[a, t] * shock[k, inst[a, t]]
            g[a, k] = total


def rebuild_state(st: State, acc: np.ndarray | None, vol_mult: np.ndarray) -> None:
    """The risk state of accounts `acc` (None: all) from positions and prices; their numbers are
    recomputed by the next kernel step. `vol_mult`: the stress scenarios' volatility multipliers.
    Done in blocks of REBUILD_CHUNK accounts; an account's numbers do not depend on the others rebuilt
    with it (slot_products), so an engine of a shard's accounts rebuilds them as the whole book's does."""
    every = acc is None
    acc = np.arange(st.nslot.shape[0]) if acc is None else acc
    if every and st.f_par.any():
        kernels.fill_ca(st)
    for c in range(0, len(acc), REBUILD_CHUNK):
        _rebuild_block(st, acc[c : c + REBUILD_CHUNK], every)
    a = acc[st.f_st[acc]]
    for k in range(st.shock.shape[0] if len(a) else 0):  # one stressed matrix at a time
        cov_k = stressed_cov(st.cov, st.shock[k], float(st.cmult[k]), float(vol_mult[k]))
        slot_products(st.xa, st.nslot, st.inst, a, cov_k, st.yk[k], st.vk[k])


def _rebuild_block(st: State, acc: np.ndarray, every: bool) -> None:
    """rebuild_state of one block of accounts but the stressed covariances' products. Every product
    account by account (kernels.rebuild_pnl, slot_products, slot_shocks: each account's the same sums
    whatever else is rebuilt with it)."""
    xa = st.qty[acc] * (st.price * st.mult)[st.inst[acc]]
    xa[np.arange(st.inst.shape[1])[None, :] >= st.nslot[acc][:, None]] = 0.0
    st.xa[acc] = xa
    opt_slot = st.orow[st.inst[acc]] >= 0
    st.hq[acc] = np.where(opt_slot, st.qty[acc], 0.0)
    st.nlive[acc] = ((xa != 0) | (st.hq[acc] != 0)).sum(axis=1)
    st.xf[acc] = np.where(opt_slot, 0.0, xa)  # the P&L rows below reflect today's exposures
    f_hs, f_par, f_st = st.f_hs[acc], st.f_par[acc], st.f_st[acc]
    if f_hs.any() and st.pnl.shape[1]:
        kernels.rebuild_pnl(st, acc[f_hs])
    st.kth[acc] = np.nan  # select from scratch
    if f_par.any():
        if not every:
            for a in acc[f_par].tolist():
                n, inst = int(st.nslot[a]), st.inst[a, : st.nslot[a]]
                st.ca[st.par_row[a], :n, :n] = st.cov[np.ix_(inst, inst)]
        slot_products(st.xa, st.nslot, st.inst, acc[f_par], st.cov, st.y, st.v)
    if f_st.any() and st.shock.shape[0]:
        slot_shocks(st.xa, st.nslot, st.inst, acc[f_st], st.shock, st.g)


def full_numbers(
    st: State,
    stress_set: StressSet,
    confidence: float,
    scale: float,
    hvar_margin: str,
    external: Callable[[int], ExternalResult],
) -> dict[str, np.ndarray]:
    """The numbers from scratch with the numpy models (calc/models.py): margin, var, es, stress per
    account, contrib (A, N) of the margin's drivers and the exposures; `external(a)` evaluates an
    account on an external model. Reads the positions and prices only."""
    x = dense_exposure(st)
    z = np.zeros(st.nslot.shape[0])
    zc = np.zeros_like(x)
    par = parametric(x, st.cov, scale) if st.f_par.any() else None
    hs = None
    if st.f_hs.any():
        opt = st.orow >= 0
        x_lin = np.where(opt, 0.0, x)
        hs = historical(x_lin, st.rt.T, confidence, hvar_margin)
        if opt.any():  # an options holder on its own, over its instruments: qty x their contract's row
            q = option_qty(st, np.arange(st.nslot.shape[0]))
            for a in np.flatnonzero(st.f_hs & (q != 0).any(axis=1)).tolist():
                cols = st.inst[a, : st.nslot[a]]
                rev = np.zeros((1, len(cols), st.rt.shape[1]))
                o = opt[cols]
                rev[0, o] = q[a, st.orow[cols[o]]][:, None] * st.ov[st.orow[cols[o]]]
                r = historical(x_lin[a : a + 1, cols], st.rt[cols].T, confidence, hvar_margin, rev)
                hs.var[a], hs.es[a] = r.var[0], r.es[0]
                hs.contrib[a] = 0.0
                hs.contrib[a, cols] = r.contrib[0]
    k = st.shock.shape[0]
    ss = StressSet(stress_set.names[:k], st.shock, st.cmult, stress_set.vol_mult[:k])
    sr = stress(x, st.cov, ss, scale) if st.f_st.any() else None
    code = st.model
    par_var = par.var if par else z
    var = np.where(code == M_HVAR, hs.var if hs else z, np.where(code == M_EXT, z, par_var))
    es = np.where(code == M_HVAR, hs.es if hs else z, z)
    hs_num = (hs.es if hvar_margin == "es" else hs.var) if hs else z
    st_num = np.where(st.f_st, sr.var, 0.0) if sr else z
    conds = [code == M_VAR, code == M_HVAR, code == M_STRESS]
    number = np.select(conds, [par_var, hs_num, st_num], 0.0)
    contrib = np.select(
        [c[:, None] for c in conds],
        [par.contrib if par else zc, hs.contrib if hs else zc, sr.contrib if sr else zc],
        zc,
    )
    for a in np.flatnonzero(code == M_EXT):
        r = external(int(a))
        var[a], number[a] = r.var, r.var
        contrib[a, st.inst[a, : st.nslot[a]]] = r.contrib
    wins = st.max_stress & (st_num > number)
    number = np.where(wins, st_num, number)
    if sr is not None:
        contrib[wins] = sr.contrib[wins]
    return {
        "margin": np.maximum(number, 0.0),
        "var": np.maximum(var, 0.0),
        "es": np.maximum(es, 0.0),
        "stress": st_num,
        "contrib": contrib,
        "exposure": x,
    }
