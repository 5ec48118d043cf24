"""Pure-Python SPAN for one account at a time: the naive baseline of the benchmark and a second method
for tests.

Deliberately plain (dicts and lists, no numpy, no numba); it follows the same rules as kernels.py.
"""

from __future__ import annotations

from collections.abc import Mapping

from calc.span.model import KIND_OPT, SOM_MAX, ContractKey, SpanParams


class ReferenceSpan:
    """Python lists copied once from SpanParams; `margin(positions)` recomputes an account from scratch."""

    def __init__(self, params: SpanParams) -> None:
        p = params
        self.p = p
        self.ra = p.c_ra.tolist()
        self.cc_of = p.c_cc.tolist()
        self.period_of = p.c_period.tolist()
        self.delta = p.c_delta.tolist()
        self.is_opt = (p.c_kind == KIND_OPT).tolist()
        self.is_call = p.c_call.tolist()
        self.value = p.c_value.tolist()
        self.som_rate = p.c_som_rate.tolist()
        self.paired = p.point_paired.tolist()
        self.time_pts = p.time_points.tolist()
        self.periods_of_cc = [
            list(range(a, b)) for a, b in zip(p.cc_p0.tolist(), p.cc_p1.tolist(), strict=True)
        ]
        self.intra_tier = p.p_intra_tier.tolist()
        self.inter_tier = p.p_inter_tier.tolist()
        self.spot = {q: (p.p_spot_sprd[q], p.p_spot_outr[q]) for q in range(len(p.p_pe)) if p.p_is_spot[q]}
        self.spreads = []  # (owner cc or -1, rate, [(cc, period or -1, tier, side, ratio, gross)])
        for s in range(len(p.s_rate)):
            legs = [
                (int(p.l_cc[j]), int(p.l_period[j]), int(p.l_tier[j]),
                 float(p.l_side[j]), float(p.l_ratio[j]), bool(p.l_gross[j]))
                for j in range(p.s_l0[s], p.s_l1[s])
            ]  # fmt: skip
            self.spreads.append((int(p.s_cc[s]), float(p.s_rate[s]), legs))

    def margin(self, positions: Mapping[ContractKey, float]) -> dict:
        """{'total': {currency: x}, 'ccs': {cc name: {scan, active_scenario, ..., requirement}}}."""
        p = self.p
        S = p.n_points
        loss: dict[int, list[float]] = {}
        pdelta: dict[int, float] = {}
        som_c: dict[int, float] = {}
        som_p: dict[int, float] = {}
        nov: dict[int, float] = {}
        for key, q in positions.items():
            if q == 0:
                continue
            k = p.index[key]
            c = self.cc_of[k]
            vec = loss.setdefault(c, [0.0] * S)
            ra = self.ra[k]
            for s in range(S):
                vec[s] += q * ra[s]
            pdelta[self.period_of[k]] = pdelta.get(self.period_of[k], 0.0) + q * self.delta[k]
            if self.is_opt[k]:
                nov[c] = nov.get(c, 0.0) + q * self.value[k]
                if q < 0:
                    bucket = som_c if self.is_call[k] else som_p
                    bucket[c] = bucket.get(c, 0.0) - q * self.som_rate[k]
        ccs: dict[int, dict] = {}
        remaining: dict[int, float] = {}
        for c, vec in loss.items():
            best = max(vec)
            active = vec.index(best)
            scan = max(best, 0.0)
            time_risk = sum(vec[s] for s in self.time_pts) / len(self.time_pts) if self.time_pts else 0.0
            vol_risk = abs(best - vec[self.paired[active]]) / 2
            price = scan - time_risk - vol_risk
            price = 0.0 if scan == 0.0 or price < 0 else price
            periods = self.periods_of_cc[c]
            rem = {q: pdelta.get(q, 0.0) for q in periods}
            net = sum(rem.values())
            intra = 0.0
            for owner, rate, legs in self.spreads:
                if owner == c:
                    intra += rate * self._spread(legs, rem, self.intra_tier)
            spot = 0.0
            for q in periods:
                if q in self.spot:
                    sprd, outr = self.spot[q]
                    spot += (abs(pdelta.get(q, 0.0)) - abs(rem[q])) * sprd + abs(rem[q]) * outr
            som = (
                max(som_c.get(c, 0.0), som_p.get(c, 0.0))
                if p.cc_som_meth[c] == SOM_MAX
                else som_c.get(c, 0.0) + som_p.get(c, 0.0)
            )
            remaining.update(rem)
            ccs[c] = dict(
                scan=scan, active_scenario=active + 1,
                time_risk=time_risk, vol_risk=vol_risk, price_risk=price,
                net_delta=net, wfpr=price / abs(net) if abs(net) > 1e-12 else 0.0, intra=intra, spot=spot,
                inter=0.0, som=som, nov=nov.get(c, 0.0),
            )  # fmt: skip
        for owner, rate, legs in self.spreads:
            if owner >= 0 or any(leg[0] not in ccs for leg in legs):
                continue
            for sigma in (1.0, -1.0):
                n = self._form(legs, sigma, remaining, self.inter_tier)
                for leg in legs:
                    ccs[leg[0]]["inter"] += n * leg[4] * ccs[leg[0]]["wfpr"] * rate
        totals: dict[str, float] = {}
        for c, r in ccs.items():
            r["requirement"] = max(r["scan"] + r["intra"] + r["spot"] - r["inter"], r["som"])
            net_c = r["requirement"] - r["nov"]
            if p.cc_cap_anov[c]:
                net_c = max(net_c, 0.0)
            cur = p.cc_currency[c]
            totals[cur] = totals.get(cur, 0.0) + net_c
        return {
            "total": {cur: max(v, 0.0) for cur, v in totals.items()},
            "ccs": {p.cc_names[c]: r for c, r in ccs.items()},
        }

    def _spread(self, legs: list, rem: dict[int, float], tier_of: list[int]) -> float:
        return self._form(legs, 1.0, rem, tier_of) + self._form(legs, -1.0, rem, tier_of)

    def _periods(self, leg: tuple, tier_of: list[int]) -> list[int]:
        cc, period, tier = leg[0], leg[1], leg[2]
        if period >= 0:
            return [period]
        return [q for q in self.periods_of_cc[cc] if tier_of[q] == tier]

    def _form(self, legs: list, sigma: float, rem: dict[int, float], tier_of: list[int]) -> float:
        counts = []
        for leg in legs:
            need = sigma * leg[3]
            qs = self._periods(leg, tier_of)
            if leg[5]:  # longs against shorts inside one tier
                avail = sum(max(need * rem.get(q, 0.0), 0.0) for q in qs)
            else:
                avail = max(need * sum(rem.get(q, 0.0) for q in qs), 0.0)
            counts.append(avail / leg[4])
        n = min(counts)
        if not n > 1e-12:
            return 0.0
        for leg in legs:
            need = sigma * leg[3]
            left = n * leg[4]
            for q in self._periods(leg, tier_of):
                if left <= 0:
                    break
                v = need * rem.get(q, 0.0)
                if v > 0 or leg[1] >= 0:
                    take = min(v, left) if leg[1] < 0 else left
                    rem[q] = rem.get(q, 0.0) - need * take
                    left -= take
        return n
