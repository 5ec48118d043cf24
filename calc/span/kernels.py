"""Numba kernels for SPAN: per-CC scan / intra / spot / SOM, account inter-commodity credits and totals.

A fill updates one CC's 16-scenario loss vector in O(S) and recomputes that CC's charges (plus the account's
inter-commodity credits when the CC is a leg of one); `full_recompute` rebuilds everything from positions.

Argument order: `prm` is SpanParams.kernel_params(), `st` is the state tuple built by portfolio._State.args():
  qty[A,N], npos[A,C], loss[A,C,S], pdelta[A,P], rem[A,P], somc[A,C], somp[A,C], nov[A,C],
  res[A,C,NRES] (columns R_*), total[A,K]
"""

from __future__ import annotations

import numpy as np
from numba import njit

# columns of the per-CC result array res[A, C, NRES]
R_SCAN, R_ACTIVE, R_TIME, R_VOL, R_PRICE, R_DELTA, R_WFPR = 0, 1, 2, 3, 4, 5, 6
R_INTRA, R_SPOT, R_INTER, R_SOM, R_NOV, R_REQ = 7, 8, 9, 10, 11, 12
NRES = 13
EPS = 1e-12  # spreads formed below this count are numerical dust


@njit(cache=True)
def scan_split(loss, paired, time_points):
    """(scan, active 0-based, time risk, volatility risk, price risk) of one CC's loss vector."""
    best = loss[0]
    active = 0
    for s in range(1, loss.shape[0]):
        if loss[s] > best:
            best = loss[s]
            active = s
    scan = best if best > 0.0 else 0.0
    t = 0.0
    if time_points.shape[0] > 0:
        for i in range(time_points.shape[0]):
            t += loss[time_points[i]]
        t /= time_points.shape[0]
    v = abs(best - loss[paired[active]]) * 0.5
    price = scan - t - v
    if scan == 0.0 or price < 0.0:
        price = 0.0
    return scan, active, t, v, price


@njit(cache=True)
def _leg_avail(leg, need, rem, l_cc, l_period, l_tier, l_gross, p_tier, cc_p0, cc_p1):
    """Deltas on the required side (need = +1 long, -1 short) available to a leg, >= 0."""
    p = l_period[leg]
    if p >= 0:
        v = need * rem[p]
        return v if v > 0.0 else 0.0
    c = l_cc[leg]
    t = l_tier[leg]
    s = 0.0
    if l_gross[leg]:  # same tier on both sides: longs against shorts of the periods inside the tier
        for q in range(cc_p0[c], cc_p1[c]):
            if p_tier[q] == t:
                v = need * rem[q]
                if v > 0.0:
                    s += v
        return s
    for q in range(cc_p0[c], cc_p1[c]):
        if p_tier[q] == t:
            s += rem[q]
    s *= need
    return s if s > 0.0 else 0.0


@njit(cache=True)
def _leg_consume(leg, need, amount, rem, l_cc, l_period, l_tier, p_tier, cc_p0, cc_p1):
    """Take `amount` deltas of the required side from the leg's period(s), earliest period first."""
    p = l_period[leg]
    if p >= 0:
        rem[p] -= need * amount
        return
    c = l_cc[leg]
    t = l_tier[leg]
    left = amount
    for q in range(cc_p0[c], cc_p1[c]):
        if left <= 0.0:
            break
        if p_tier[q] == t:
            v = need * rem[q]
            if v > 0.0:
                take = v if v < left else left
                rem[q] -= need * take
                left -= take


@njit(cache=True)
def _form(s, sigma, rem, s_l0, s_l1, l_cc, l_period, l_tier, l_side, l_ratio, l_gross, p_tier, cc_p0, cc_p1):
    """Form as many spreads s as the remaining deltas allow in direction sigma (A legs long when +1)."""
    n = np.inf
    for leg in range(s_l0[s], s_l1[s]):
        avail = _leg_avail(
            leg, sigma * l_side[leg], rem, l_cc, l_period, l_tier, l_gross, p_tier, cc_p0, cc_p1
        )
        avail /= l_ratio[leg]
        if avail < n:
            n = avail
    if not n > EPS or n == np.inf:
        return 0.0
    for leg in range(s_l0[s], s_l1[s]):
        _leg_consume(
            leg, sigma * l_side[leg], n * l_ratio[leg], rem, l_cc, l_period, l_tier, p_tier, cc_p0, cc_p1
        )
    return n


@njit(cache=True)
def cc_recompute(a, c, prm, st):
    """Scan split, net delta, WFPR, intra-commodity and spot charges, SOM and NOV of CC c of account a."""
    (paired, time_points, c_cc, c_period, c_kind, c_call, c_ra, c_delta, c_value, c_som_rate,
     cc_cur, cc_som_meth, cc_cap_anov, cc_p0, cc_p1, cc_s0, cc_s1, cc_in_inter,
     p_intra_tier, p_inter_tier, p_spot_sprd, p_spot_outr, p_is_spot,
     n_intra, s_meth, s_rate, s_l0, s_l1, l_cc, l_period, l_tier, l_side, l_ratio, l_gross) = prm  # fmt: skip
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    r = res[a, c]
    if npos[a, c] == 0:
        r[:] = 0.0
        for p in range(cc_p0[c], cc_p1[c]):
            rem[a, p] = 0.0
        return
    scan, active, t, v, price = scan_split(loss[a, c], paired, time_points)
    net = 0.0
    for p in range(cc_p0[c], cc_p1[c]):
        rem[a, p] = pdelta[a, p]
        net += pdelta[a, p]
    ra = rem[a]
    intra = 0.0
    for s in range(cc_s0[c], cc_s1[c]):
        for sigma in (1.0, -1.0):
            n = _form(s, sigma, ra, s_l0, s_l1, l_cc, l_period, l_tier, l_side, l_ratio, l_gross,
                      p_intra_tier, cc_p0, cc_p1)  # fmt: skip
            intra += n * s_rate[s]
    spot = 0.0
    for p in range(cc_p0[c], cc_p1[c]):
        if p_is_spot[p]:
            left = abs(ra[p])
            spot += (abs(pdelta[a, p]) - left) * p_spot_sprd[p] + left * p_spot_outr[p]
    if cc_som_meth[c] == 1:
        som = max(somc[a, c], somp[a, c])
    else:
        som = somc[a, c] + somp[a, c]
    r[R_SCAN] = scan
    r[R_ACTIVE] = active + 1
    r[R_TIME] = t
    r[R_VOL] = v
    r[R_PRICE] = price
    r[R_DELTA] = net
    r[R_WFPR] = price / abs(net) if abs(net) > EPS else 0.0
    r[R_INTRA] = intra
    r[R_SPOT] = spot
    r[R_SOM] = som
    r[R_NOV] = nov[a, c]


@njit(cache=True)
def account_inter(a, prm, st, work):
    """Inter-commodity credits of account a, spreads in priority order on the deltas left after intra."""
    (paired, time_points, c_cc, c_period, c_kind, c_call, c_ra, c_delta, c_value, c_som_rate,
     cc_cur, cc_som_meth, cc_cap_anov, cc_p0, cc_p1, cc_s0, cc_s1, cc_in_inter,
     p_intra_tier, p_inter_tier, p_spot_sprd, p_spot_outr, p_is_spot,
     n_intra, s_meth, s_rate, s_l0, s_l1, l_cc, l_period, l_tier, l_side, l_ratio, l_gross) = prm  # fmt: skip
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    res[a, :, R_INTER] = 0.0
    copied = False
    for s in range(n_intra, s_meth.shape[0]):
        held = True
        for leg in range(s_l0[s], s_l1[s]):
            if npos[a, l_cc[leg]] == 0:
                held = False
                break
        if not held:
            continue
        if not copied:
            work[:] = rem[a]
            copied = True
        for sigma in (1.0, -1.0):
            n = _form(s, sigma, work, s_l0, s_l1, l_cc, l_period, l_tier, l_side, l_ratio, l_gross,
                      p_inter_tier, cc_p0, cc_p1)  # fmt: skip
            if n > 0.0:
                for leg in range(s_l0[s], s_l1[s]):
                    c = l_cc[leg]
                    res[a, c, R_INTER] += n * l_ratio[leg] * res[a, c, R_WFPR] * s_rate[s]


@njit(cache=True)
def account_totals(a, prm, st):
    """CC requirement = max(scan + intra + spot - inter, SOM); total per currency = max(0, sum - NOV)."""
    cc_cur = prm[10]
    cc_cap_anov = prm[12]
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    total[a, :] = 0.0
    for c in range(npos.shape[1]):
        r = res[a, c]
        if npos[a, c] == 0:
            r[R_REQ] = 0.0
            continue
        req = r[R_SCAN] + r[R_INTRA] + r[R_SPOT] - r[R_INTER]
        if r[R_SOM] > req:
            req = r[R_SOM]
        r[R_REQ] = req
        net = req - r[R_NOV]
        if cc_cap_anov[c] and net < 0.0:
            net = 0.0
        total[a, cc_cur[c]] += net
    for k in range(total.shape[1]):
        if total[a, k] < 0.0:
            total[a, k] = 0.0


@njit(cache=True)
def _add_position(a, k, old, new, prm, st):
    """Move contract k of account a from quantity old to new: O(S) on the CC's accumulators."""
    c_cc, c_period, c_kind, c_call, c_ra, c_delta, c_value, c_som_rate = prm[2:10]
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    dq = new - old
    c = c_cc[k]
    qty[a, k] = new
    if old == 0.0 and new != 0.0:
        npos[a, c] += 1
    elif old != 0.0 and new == 0.0:
        npos[a, c] -= 1
    row = loss[a, c]
    for s in range(row.shape[0]):
        row[s] += dq * c_ra[k, s]
    pdelta[a, c_period[k]] += dq * c_delta[k]
    if c_kind[k] == 2:
        nov[a, c] += dq * c_value[k]
        short_change = (-new if new < 0.0 else 0.0) - (-old if old < 0.0 else 0.0)
        if c_call[k]:
            somc[a, c] += short_change * c_som_rate[k]
        else:
            somp[a, c] += short_change * c_som_rate[k]


@njit(cache=True)
def _clear_cc(a, c, prm, st):
    """An account's CC with no position left: reset its accumulators to exact zeros (no drift)."""
    cc_p0, cc_p1 = prm[13], prm[14]
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    loss[a, c, :] = 0.0
    for p in range(cc_p0[c], cc_p1[c]):
        pdelta[a, p] = 0.0
        rem[a, p] = 0.0
    somc[a, c] = 0.0
    somp[a, c] = 0.0
    nov[a, c] = 0.0


@njit(cache=True)
def apply_fills(f_acct, f_contract, f_dq, prm, st, out_total):
    """Apply fills in order; after each, recompute its CC (and the account's inter credits, totals).

    out_total[i] receives the account's total, in the fill's CC currency, after fill i.
    """
    c_cc = prm[2]
    cc_cur = prm[10]
    cc_in_inter = prm[17]
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    work = np.empty(pdelta.shape[1])
    for i in range(f_acct.shape[0]):
        a = f_acct[i]
        k = f_contract[i]
        c = c_cc[k]
        old = qty[a, k]
        new = old + f_dq[i]
        _add_position(a, k, old, new, prm, st)
        if npos[a, c] == 0:
            _clear_cc(a, c, prm, st)
        cc_recompute(a, c, prm, st)
        if cc_in_inter[c]:
            account_inter(a, prm, st, work)
        account_totals(a, prm, st)
        out_total[i] = total[a, cc_cur[c]]


@njit(cache=True)
def full_recompute(prm, st):
    """Rebuild every account's accumulators from qty[A, N], then every CC, inter credit and total."""
    qty, npos, loss, pdelta, rem, somc, somp, nov, res, total = st
    npos[:] = 0
    loss[:] = 0.0
    pdelta[:] = 0.0
    rem[:] = 0.0
    somc[:] = 0.0
    somp[:] = 0.0
    nov[:] = 0.0
    res[:] = 0.0
    work = np.empty(pdelta.shape[1])
    n_acct, n_con = qty.shape
    n_cc = npos.shape[1]
    for a in range(n_acct):
        for k in range(n_con):
            q = qty[a, k]
            if q != 0.0:
                _add_position(a, k, 0.0, q, prm, st)
        for c in range(n_cc):
            if npos[a, c] > 0:
                cc_recompute(a, c, prm, st)
        account_inter(a, prm, st, work)
        account_totals(a, prm, st)
