"""Numba kernels for SPAN: per-CC scan / intra / spot / SOM, account inter-commodity credits and totals.

A fill updates one CC's scenario loss vector in O(S) and recomputes that CC's charges (plus the account's
inter-commodity credits when the CC is a leg of one); `full_recompute` rebuilds everything from positions.

Layout (numba pays per array argument on every call, so the parameters travel as a few packed tables):
  prm = pack(params): paired[S], time_points[T], ci[N,4], cf[N,3], ra[N,S], cci[C,8], pi[P,3], pf[P,2],
        si[NS,2], sf[NS], li[L,4], lf[L,2], order[NS], n_intra
        (columns: the CI_/CF_/CC_/PI_/PF_/LI_/LF_ constants)
  st  = state: qty[A,N], npos[A,C], loss[A,C,S], pdelta[A,P], rem[A,P], acc[A,C,3], res[A,C,NRES], total[A,K],
        live[A,NS] (the account's inter spreads whose every leg's CC it holds, priority order), nlive[A]
"""

from __future__ import annotations

import numpy as np
from numba import njit

from calc.span.model import KIND_OPT, SpanParams

# contract tables
CI_CC, CI_PERIOD, CI_OPT, CI_CALL = 0, 1, 2, 3
CF_DELTA, CF_VALUE, CF_SOM = 0, 1, 2
# combined commodity table
CC_P0, CC_P1, CC_S0, CC_S1, CC_CUR, CC_SOM_MAX, CC_CAP_ANOV, CC_IN_INTER = range(8)
# period tables
PI_INTRA_TIER, PI_INTER_TIER, PI_SPOT = 0, 1, 2
PF_SPRD, PF_OUTR = 0, 1
# spread legs
LI_CC, LI_PERIOD, LI_TIER, LI_GROSS = 0, 1, 2, 3
LF_SIDE, LF_RATIO = 0, 1
# per-account accumulators acc[A, C, 3]
ACC_SOM_CALLS, ACC_SOM_PUTS, ACC_NOV = 0, 1, 2
# columns of the per-CC result array res[A, C, NRES]
R_SCAN, R_ACTIVE, R_TIME, R_VOL, R_PRICE, R_DELTA, R_WFPR = 0, 1, 2, 3, 4, 5, 6
R_INTRA, R_SPOT, R_INTER, R_SOM, R_NOV, R_REQ = 7, 8, 9, 10, 11, 12
NRES = 13
EPS = 1e-12  # spreads formed below this count are numerical dust


def pack(p: SpanParams) -> tuple:
    """The kernels' view of a parameter file (see the module docstring for the order)."""
    ci = np.stack([p.c_cc, p.c_period, (p.c_kind == KIND_OPT).astype(np.int64), p.c_call.astype(np.int64)], 1)
    cf = np.stack([p.c_delta, p.c_value, p.c_som_rate], 1)
    cci = np.stack(
        [p.cc_p0, p.cc_p1, p.cc_s0, p.cc_s1, p.cc_cur, (p.cc_som_meth == 1).astype(np.int64),
         p.cc_cap_anov.astype(np.int64), p.cc_in_inter.astype(np.int64)], 1,
    )  # fmt: skip
    pi = np.stack([p.p_intra_tier, p.p_inter_tier, p.p_is_spot.astype(np.int64)], 1).reshape(-1, 3)
    pf = np.stack([p.p_spot_sprd, p.p_spot_outr], 1).reshape(-1, 2)
    si = np.stack([p.s_l0, p.s_l1], 1).reshape(-1, 2)
    li = np.stack([p.l_cc, p.l_period, p.l_tier, p.l_gross.astype(np.int64)], 1).reshape(-1, 4)
    lf = np.stack([p.l_side, p.l_ratio], 1).reshape(-1, 2)
    order = np.arange(len(p.s_rate), dtype=np.int64)  # intra spreads run in id order, CC by CC
    tables = (p.point_paired, p.time_points, ci, cf, p.c_ra, cci, pi, pf, si, p.s_rate, li, lf, order)
    return (*(np.ascontiguousarray(t) for t in tables), np.int64(p.n_intra))


@njit(cache=True, inline="always")
def form_spreads(ids, i0, i1, tier_col, rem, nform, cci, pi, si, li, lf):
    """Form spreads ids[i0..i1-1], in that (priority) order, on the remaining period deltas `rem` (consumed
    in place); nform[s] = spreads s formed.

    A leg is a period (pLeg) or a tier (tLeg, periods whose pi[:, tier_col] is its tier). Side A legs take
    long deltas and side B short ones, or the reverse; a tLeg whose tier is also on the opposite side of the
    same spread spreads that tier's long periods against its short ones.
    """
    for i in range(i0, i1):
        s = ids[i]
        nform[s] = 0.0
        l0 = si[s, 0]
        l1 = si[s, 1]
        for d in range(2):
            sigma = 1.0 if d == 0 else -1.0
            n = np.inf
            for leg in range(l0, l1):
                need = sigma * lf[leg, LF_SIDE]
                p = li[leg, LI_PERIOD]
                avail = 0.0
                if p >= 0:
                    avail = need * rem[p]
                else:
                    c = li[leg, LI_CC]
                    t = li[leg, LI_TIER]
                    gross = li[leg, LI_GROSS] == 1
                    for q in range(cci[c, CC_P0], cci[c, CC_P1]):
                        if pi[q, tier_col] == t:
                            v = need * rem[q]
                            if v > 0.0 or not gross:
                                avail += v
                if avail < 0.0:
                    avail = 0.0
                avail /= lf[leg, LF_RATIO]
                if avail < n:
                    n = avail
            if n > EPS and n < np.inf:
                nform[s] += n
                for leg in range(l0, l1):
                    need = sigma * lf[leg, LF_SIDE]
                    left = n * lf[leg, LF_RATIO]
                    p = li[leg, LI_PERIOD]
                    if p >= 0:
                        rem[p] -= need * left
                    else:  # earliest periods of the tier first
                        c = li[leg, LI_CC]
                        t = li[leg, LI_TIER]
                        for q in range(cci[c, CC_P0], cci[c, CC_P1]):
                            if left <= 0.0:
                                break
                            if pi[q, tier_col] == t:
                                v = need * rem[q]
                                if v > 0.0:
                                    take = v if v < left else left
                                    rem[q] -= need * take
                                    left -= take


@njit(cache=True, inline="always")
def cc_recompute(a, c, prm, st, nform):
    """Scan risk and its time / volatility / price split, net delta, WFPR, intra-commodity and spot charges,
    SOM and NOV of CC c of account a; leaves the deltas remaining after intra spreads in rem[a]."""
    paired, time_points, ci, cf, ra, cci, pi, pf, si, sf, li, lf, order, n_intra = prm
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    p0 = cci[c, CC_P0]
    p1 = cci[c, CC_P1]
    if npos[a, c] == 0:
        for j in range(NRES):
            res[a, c, j] = 0.0
        for p in range(p0, p1):
            rem[a, p] = 0.0
        return
    n_s = loss.shape[2]
    best = loss[a, c, 0]
    active = 0
    for s in range(1, n_s):
        if loss[a, c, s] > best:
            best = loss[a, c, s]
            active = s
    scan = best if best > 0.0 else 0.0
    t_risk = 0.0
    if time_points.shape[0] > 0:
        for i in range(time_points.shape[0]):
            t_risk += loss[a, c, time_points[i]]
        t_risk /= time_points.shape[0]
    v_risk = abs(best - loss[a, c, paired[active]]) * 0.5
    price = scan - t_risk - v_risk
    if scan == 0.0 or price < 0.0:
        price = 0.0
    net = 0.0
    for p in range(p0, p1):
        rem[a, p] = pdelta[a, p]
        net += pdelta[a, p]
    s0 = cci[c, CC_S0]
    s1 = cci[c, CC_S1]
    intra = 0.0
    if s1 > s0:
        form_spreads(order, s0, s1, PI_INTRA_TIER, rem[a], nform, cci, pi, si, li, lf)
        for s in range(s0, s1):
            intra += nform[s] * sf[s]
    spot = 0.0
    for p in range(p0, p1):
        if pi[p, PI_SPOT] == 1:
            left = abs(rem[a, p])
            spot += (abs(pdelta[a, p]) - left) * pf[p, PF_SPRD] + left * pf[p, PF_OUTR]
    som_c = acc[a, c, ACC_SOM_CALLS]
    som_p = acc[a, c, ACC_SOM_PUTS]
    if cci[c, CC_SOM_MAX] == 1:
        som = som_c if som_c > som_p else som_p
    else:
        som = som_c + som_p
    res[a, c, R_SCAN] = scan
    res[a, c, R_ACTIVE] = active + 1
    res[a, c, R_TIME] = t_risk
    res[a, c, R_VOL] = v_risk
    res[a, c, R_PRICE] = price
    res[a, c, R_DELTA] = net
    res[a, c, R_WFPR] = price / abs(net) if abs(net) > EPS else 0.0
    res[a, c, R_INTRA] = intra
    res[a, c, R_SPOT] = spot
    res[a, c, R_SOM] = som
    res[a, c, R_NOV] = acc[a, c, ACC_NOV]


@njit(cache=True, inline="always")
def account_inter(a, prm, st, work, nform):
    """Inter-commodity credits of account a: spreads in priority order on the deltas left after intra;
    each leg's CC is credited spreads x ratio x its weighted futures price risk x the spread's rate."""
    paired, time_points, ci, cf, ra, cci, pi, pf, si, sf, li, lf, order, n_intra = prm
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    n_cc = npos.shape[1]
    for c in range(n_cc):
        res[a, c, R_INTER] = 0.0
    n_live = nlive[a]
    if n_live == 0:
        return
    for p in range(work.shape[0]):
        work[p] = rem[a, p]
    form_spreads(live[a], 0, n_live, PI_INTER_TIER, work, nform, cci, pi, si, li, lf)
    for i in range(n_live):
        s = live[a, i]
        n = nform[s]
        if n > 0.0:
            for leg in range(si[s, 0], si[s, 1]):
                c = li[leg, LI_CC]
                res[a, c, R_INTER] += n * lf[leg, LF_RATIO] * res[a, c, R_WFPR] * sf[s]


@njit(cache=True, inline="always")
def rebuild_live(a, prm, st):
    """The account's inter spreads whose legs are all in CCs it holds (called when its held set changes)."""
    paired, time_points, ci, cf, ra, cci, pi, pf, si, sf, li, lf, order, n_intra = prm
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    n = 0
    for s in range(n_intra, si.shape[0]):
        held = True
        for leg in range(si[s, 0], si[s, 1]):
            if npos[a, li[leg, LI_CC]] == 0:
                held = False
                break
        if held:
            live[a, n] = s
            n += 1
    nlive[a] = n


@njit(cache=True, inline="always")
def account_totals(a, prm, st):
    """CC requirement = max(scan + intra + spot - inter, SOM); total per currency = max(0, sum - NOV)."""
    cci = prm[5]
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    for k in range(total.shape[1]):
        total[a, k] = 0.0
    for c in range(npos.shape[1]):
        if npos[a, c] == 0:  # cc_recompute already zeroed the row of a CC without positions
            continue
        req = res[a, c, R_SCAN] + res[a, c, R_INTRA] + res[a, c, R_SPOT] - res[a, c, R_INTER]
        if res[a, c, R_SOM] > req:
            req = res[a, c, R_SOM]
        res[a, c, R_REQ] = req
        net = req - res[a, c, R_NOV]
        if cci[c, CC_CAP_ANOV] == 1 and net < 0.0:
            net = 0.0
        total[a, cci[c, CC_CUR]] += net
    for k in range(total.shape[1]):
        if total[a, k] < 0.0:
            total[a, k] = 0.0


@njit(cache=True, inline="always")
def move_position(a, k, new, prm, st):
    """Set contract k of account a to quantity `new`: O(S) on its CC's accumulators; returns the CC."""
    paired, time_points, ci, cf, ra, cci, pi, pf, si, sf, li, lf, order, n_intra = prm
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    old = qty[a, k]
    dq = new - old
    c = ci[k, CI_CC]
    qty[a, k] = new
    if old == 0.0 and new != 0.0:
        npos[a, c] += 1
    elif old != 0.0 and new == 0.0:
        npos[a, c] -= 1
    for s in range(loss.shape[2]):
        loss[a, c, s] += dq * ra[k, s]
    pdelta[a, ci[k, CI_PERIOD]] += dq * cf[k, CF_DELTA]
    if ci[k, CI_OPT] == 1:
        acc[a, c, ACC_NOV] += dq * cf[k, CF_VALUE]
        short_change = (-new if new < 0.0 else 0.0) - (-old if old < 0.0 else 0.0)
        acc[a, c, ACC_SOM_PUTS - ci[k, CI_CALL]] += short_change * cf[k, CF_SOM]
    if npos[a, c] == 0:  # nothing left in the CC: exact zeros, no accumulated rounding
        for s in range(loss.shape[2]):
            loss[a, c, s] = 0.0
        for p in range(cci[c, CC_P0], cci[c, CC_P1]):
            pdelta[a, p] = 0.0
        for j in range(3):
            acc[a, c, j] = 0.0
    return c


@njit(cache=True)
def apply_fills(f_acct, f_contract, f_dq, prm, st, out_total):
    """Apply fills in order; after each, recompute its CC (and the account's inter credits, totals).

    out_total[i] receives the account's total, in the fill's CC currency, after fill i.
    """
    ci = prm[2]
    cci = prm[5]
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    work = np.empty(pdelta.shape[1])
    nform = np.empty(prm[8].shape[0])
    for i in range(f_acct.shape[0]):
        a = f_acct[i]
        k = f_contract[i]
        was_held = npos[a, ci[k, CI_CC]] > 0
        c = move_position(a, k, qty[a, k] + f_dq[i], prm, st)
        cc_recompute(a, c, prm, st, nform)
        if cci[c, CC_IN_INTER] == 1:
            if was_held != (npos[a, c] > 0):
                rebuild_live(a, prm, st)
            account_inter(a, prm, st, work, nform)
        account_totals(a, prm, st)
        out_total[i] = total[a, cci[c, CC_CUR]]


@njit(cache=True)
def full_recompute(prm, st):
    """Rebuild every account's accumulators from qty[A, N], then every CC, inter credit and total."""
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    npos[:] = 0
    loss[:] = 0.0
    pdelta[:] = 0.0
    rem[:] = 0.0
    acc[:] = 0.0
    res[:] = 0.0
    nlive[:] = 0
    work = np.empty(pdelta.shape[1])
    nform = np.empty(prm[8].shape[0])
    n_acct, n_con = qty.shape
    for a in range(n_acct):
        for k in range(n_con):
            q = qty[a, k]
            if q != 0.0:
                qty[a, k] = 0.0
                move_position(a, k, q, prm, st)
        for c in range(npos.shape[1]):
            if npos[a, c] > 0:
                cc_recompute(a, c, prm, st, nform)
        rebuild_live(a, prm, st)
        account_inter(a, prm, st, work, nform)
        account_totals(a, prm, st)


@njit(cache=True)
def contributions(a, rows, q, prm, st, out):
    """Each listed contract's share of account a's total (see SpanBook.contributions for the rule): rows[i]
    (-1 = none) held in quantity q[i]; the rows must list every contract the account holds, once."""
    paired, time_points, ci, cf, ra, cci, pi, pf, si, sf, li, lf, order, n_intra = prm
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    n_cc = npos.shape[1]
    wd = np.zeros(n_cc)
    cnt = np.zeros(n_cc)
    s_call = np.zeros(n_cc)
    s_put = np.zeros(n_cc)
    for i in range(rows.shape[0]):
        k = rows[i]
        if k < 0 or q[i] == 0.0:
            continue
        c = ci[k, CI_CC]
        wd[c] += abs(q[i] * cf[k, CF_DELTA])
        cnt[c] += 1.0
        if ci[k, CI_OPT] == 1 and q[i] < 0.0:
            if ci[k, CI_CALL] == 1:
                s_call[c] -= q[i] * cf[k, CF_SOM]
            else:
                s_put[c] -= q[i] * cf[k, CF_SOM]
    for i in range(rows.shape[0]):
        out[i] = 0.0
        k = rows[i]
        if k < 0 or q[i] == 0.0:
            continue
        c = ci[k, CI_CC]
        if total[a, cci[c, CC_CUR]] <= 0.0:
            continue
        req = res[a, c, R_REQ]
        if cci[c, CC_CAP_ANOV] == 1 and req - res[a, c, R_NOV] < 0.0:
            continue
        other = res[a, c, R_INTRA] + res[a, c, R_SPOT] - res[a, c, R_INTER]
        opt = ci[k, CI_OPT] == 1
        if (
            res[a, c, R_SOM] > res[a, c, R_SCAN] + other
        ):  # SOM sets the requirement: the short options share it
            call_side = s_call[c] > s_put[c]
            if cci[c, CC_SOM_MAX] == 1:
                den = s_call[c] if call_side else s_put[c]
            else:
                den = s_call[c] + s_put[c]
            mine = 0.0
            if opt and q[i] < 0.0 and (cci[c, CC_SOM_MAX] == 0 or (ci[k, CI_CALL] == 1) == call_side):
                mine = -q[i] * cf[k, CF_SOM]
            amt = req * mine / den if den > 0.0 else 0.0
        else:
            amt = 0.0
            if res[a, c, R_SCAN] > 0.0:
                amt = q[i] * ra[k, int(res[a, c, R_ACTIVE]) - 1]
            if wd[c] > 0.0:
                amt += other * abs(q[i] * cf[k, CF_DELTA]) / wd[c]
            else:
                amt += other / cnt[c]
        if opt:
            amt -= q[i] * cf[k, CF_VALUE]
        out[i] = amt


@njit(cache=True)
def sync_account(a, rows, q, prm, st, out):
    """Set account a's quantities to q[i] in contracts rows[i] (-1 = skip), recomputing once each CC that
    moved (then inter credits and totals if needed); per-row contributions into out. Returns the account's
    total summed over currencies."""
    ci = prm[2]
    cci = prm[5]
    qty, npos, loss, pdelta, rem, acc, res, total, live, nlive = st
    n_cc = npos.shape[1]
    touched = np.zeros(n_cc, np.bool_)
    moved = False
    inter = False
    relive = False
    for i in range(rows.shape[0]):
        k = rows[i]
        if k < 0 or qty[a, k] == q[i]:
            continue
        c = ci[k, CI_CC]
        was_held = npos[a, c] > 0
        move_position(a, k, q[i], prm, st)
        touched[c] = True
        moved = True
        if cci[c, CC_IN_INTER] == 1:
            inter = True
            if was_held != (npos[a, c] > 0):
                relive = True
    if moved:
        nform = np.empty(prm[8].shape[0])
        for c in range(n_cc):
            if touched[c]:
                cc_recompute(a, c, prm, st, nform)
        if relive:
            rebuild_live(a, prm, st)
        if inter:
            work = np.empty(pdelta.shape[1])
            account_inter(a, prm, st, work, nform)
        account_totals(a, prm, st)
    contributions(a, rows, q, prm, st, out)
    t = 0.0
    for j in range(total.shape[1]):
        t += total[a, j]
    return t
