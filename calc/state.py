"""The kernel state (calc/kernels.py's State) laid out for the engine's accounts: their model codes
(refused: a model the risk parameters cannot serve), the state allocated for their models, risk
parameters written into it, the slot of each (account, instrument) position found (or opened for a new
one). Plain functions over the State (kernels.alloc / kernels.grow do the allocating); one that may
reallocate returns the State to use from then on.

    model_code, max_stress = model_codes(specs, params)
    st = new_state(model_code, max_stress, n_inst, pcap, n_scenarios, stress_set, price, mult)
    st = install_params(st, params, n, stress_set.vol_mult, hvar_margin)
    st, slots, opened = place_slots(st, a_ix, j_ix)  # slot of each (a_ix[i], j_ix[i]); opened: new ones
    s = slot_of(st, a, j)                            # account a's slot of instrument j (-1: none)

A position's slot is found in the state's own arrays, no index beside them: account a's slots
inst[a, :nslot[a]] or instrument j's holders hold_acc[j, :nhold[j]] (hold_slot their slots), whichever
is shorter (a few dozen entries at most).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from numba import njit

from calc import kernels
from calc.history import InputError
from calc.inputs import AccountSpec
from calc.kernels import M_EXT, M_HVAR, M_STRESS, M_VAR, MODEL_CODE, State
from calc.models import RiskParams, StressSet, tail_weights


def model_codes(specs: Sequence[AccountSpec], params: RiskParams) -> tuple[np.ndarray, np.ndarray]:
    """Each account's model code (kernels.MODEL_CODE, M_EXT for an external model) and whether its
    policy is max_stress; refused: a policy or model the risk parameters cannot serve."""
    model = np.array([MODEL_CODE.get(s.model, M_EXT) for s in specs], dtype=np.int64)
    max_stress = np.array([s.policy == "max_stress" for s in specs], dtype=np.bool_)
    ext = model == M_EXT
    if (ext & max_stress).any():
        a = specs[int(np.flatnonzero(ext & max_stress)[0])].account
        raise InputError(f"account {a!r}: policy max_stress needs a built-in model (var, hvar, stress)")
    if params.scenarios is None and (model == M_HVAR).any():
        raise InputError(
            "model hvar needs a price history (historical scenarios); only a covariance was given"
        )
    if params.cov is None and ((model == M_VAR) | (model == M_STRESS) | max_stress).any():
        raise InputError("models var and stress need a covariance (a price history or a covariance file)")
    return model, max_stress


def new_state(
    model: np.ndarray,
    max_stress: np.ndarray,
    n_inst: int,
    pcap: int,
    n_sc: int,
    stress_set: StressSet,
    price: np.ndarray,
    mult: np.ndarray,
    stress_all: bool = False,
    accounts: Sequence[str] = (),
) -> State:
    """The state (kernels.alloc) for accounts of model codes `model` (policy max_stress where
    `max_stress`) and `n_inst` instruments at `price` and `mult`: `pcap` slots per account, 4 holders per
    instrument, `n_sc` scenarios, the stress scenarios if an account keeps stress state (stress-model and
    max_stress accounts, or with `stress_all` every account on a built-in model), no parameters; `accounts`
    (their names) set when each one's P&L row flushes (flush_share)."""
    f_st = (model == M_STRESS) | max_stress | (stress_all & (model != M_EXT))
    f_par = (model == M_VAR) | (model == M_STRESS)
    k_st = stress_set.k if f_st.any() else 0
    q = min(n_sc, kernels.CAND) if (model == M_HVAR).any() else 0
    st = kernels.alloc(A=len(model), N=n_inst, P=pcap, H=4, S=n_sc, K=k_st, R=int(f_par.sum()), C=0, Q=q)
    return st._replace(
        price=price,
        mult=mult,
        model=model,
        max_stress=max_stress,
        f_hs=model == M_HVAR,
        f_par=f_par,
        f_st=f_st,
        par_row=np.where(f_par, np.cumsum(f_par) - 1, -1).astype(np.int64),
        shock=np.ascontiguousarray(stress_set.shocks[:k_st]),
        cmult=np.ascontiguousarray(stress_set.corr_mult[:k_st]),
        fat=np.array([flush_share(a) for a in accounts] or np.ones(len(model)), dtype=np.float64),
    )


def flush_share(account: str) -> float:
    """The share (0.5 to 1) of its candidates' band at which an account's P&L row is flushed
    (kernels._hs_tail), from a hash of its name: accounts that started together do not all flush in the
    same step, and an account flushes alike in whatever engine holds it (a shard's or the whole book's)."""
    h = int.from_bytes(hashlib.blake2b(account.encode(), digest_size=8).digest(), "little")
    return 0.5 + 0.5 * (h / 2.0**64)


def install_params(st: State, params: RiskParams, n: int, vol_mult: np.ndarray, hvar_margin: str) -> State:
    """Risk parameters (already fitted to the state's first `n` instruments, inputs.fit_params) written
    into the state: scenarios, covariance, volatilities, stressed factors, scale, tail weights. Returns
    the state (new if the tail weights changed length)."""
    n_sc = st.rt.shape[1]
    st.rt[:] = 0.0
    if params.scenarios is not None:
        st.rt[:n] = params.scenarios.T
    st.rtT[:] = st.rt.T
    # max |rt[j, :]| without an (N, S) temporary (the exact same value: max |x| = max(max x, -min x))
    st.rmax[:] = np.maximum(st.rt.max(axis=1), -st.rt.min(axis=1)) if n_sc else 0.0
    st.cov[:] = 0.0
    if params.cov is not None:
        st.cov[:n, :n] = params.cov
    st.sd[:] = np.sqrt(np.maximum(np.diag(st.cov), 0.0))
    k = st.shock.shape[0]
    st.fk[:] = vol_mult[:k, None] * st.sd[None, :] * (1.0 + st.shock)
    st.fpar[:] = (params.scale, 1.0 if hvar_margin == "es" else 0.0)
    w = tail_weights(params.confidence, max(1, n_sc))
    if len(w) != len(st.w):
        st = st._replace(w=w)
    else:
        st.w[:] = w
    return st


@njit(cache=True)
def _find(
    inst: np.ndarray,
    nslot: np.ndarray,
    hold_acc: np.ndarray,
    hold_slot: np.ndarray,
    nhold: np.ndarray,
    a: int,
    j: int,
) -> int:
    """Account a's slot of instrument j, -1 if none: a scan of a's slots or of j's holders, the shorter."""
    if nhold[j] < nslot[a]:
        for h in range(nhold[j]):
            if hold_acc[j, h] == a:
                return hold_slot[j, h]
        return -1
    for s in range(nslot[a]):
        if inst[a, s] == j:
            return s
    return -1


@njit(cache=True)
def _place(
    inst: np.ndarray,
    nslot: np.ndarray,
    hold_acc: np.ndarray,
    hold_slot: np.ndarray,
    nhold: np.ndarray,
    a_ix: np.ndarray,
    j_ix: np.ndarray,
    slots: np.ndarray,
    opened: np.ndarray,
    start: int,
) -> int:
    """place_slots from pair `start` on, in order, until a pair needs a slot or holder entry that is
    full; returns that pair's index (len(a_ix): all placed)."""
    for i in range(start, a_ix.shape[0]):
        a, j = a_ix[i], j_ix[i]
        s = _find(inst, nslot, hold_acc, hold_slot, nhold, a, j)
        if s < 0:
            s, h = nslot[a], nhold[j]
            if s == inst.shape[1] or h == hold_acc.shape[1]:
                return i
            inst[a, s] = j
            nslot[a] = s + 1
            hold_acc[j, h] = a
            hold_slot[j, h] = s
            nhold[j] = h + 1
            opened[i] = True
        slots[i] = s
    return a_ix.shape[0]


def place_slots(st: State, a_ix: np.ndarray, j_ix: np.ndarray) -> tuple[State, np.ndarray, np.ndarray]:
    """The slot of each (account a_ix[i], instrument j_ix[i]), in order: the account's slot of the
    instrument, else a new one (with a holder entry of the instrument for it; a pair met again later in
    the same call gets that slot), the slots or holders doubled when full. Returns the state, the slots
    and which pairs opened theirs."""
    a_ix = np.asarray(a_ix, dtype=np.int64)
    j_ix = np.asarray(j_ix, dtype=np.int64)
    slots = np.empty(len(a_ix), dtype=np.int64)
    opened = np.zeros(len(a_ix), dtype=np.bool_)
    i = 0
    while True:
        i = _place(st.inst, st.nslot, st.hold_acc, st.hold_slot, st.nhold, a_ix, j_ix, slots, opened, i)
        if i == len(a_ix):
            return st, slots, opened
        s, h = int(st.nslot[a_ix[i]]), int(st.nhold[j_ix[i]])
        if s == st.inst.shape[1]:
            st = kernels.grow(st, P=2 * s)
        if h == st.hold_acc.shape[1]:
            st = kernels.grow(st, H=2 * h)


def slot_of(st: State, a: int, j: int) -> int:
    """Account a's slot of instrument j, -1 if it has none."""
    return int(_find(st.inst, st.nslot, st.hold_acc, st.hold_slot, st.nhold, a, j))
