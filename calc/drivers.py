"""The drivers of each account's margin: per-slot contributions, and the top positions by |contribution|
(then `*other*` summing the rest, so the list adds up to the margin) as the JSON the margin rows carry.
One kernel call for the built-in models (kernels.drivers); external models' contributions (kept by the
engine per account) are ranked by the same kernels.top_slots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import msgspec
import numpy as np

from calc import kernels
from calc.kernels import I_KIND, K_EXT, R_MARGIN, State
from calc.models import OTHER

_F0 = np.zeros(0, dtype=np.float64)
_json = msgspec.json.Encoder()


def contributions(st: State, acc: np.ndarray, ext_contrib: Mapping[int, np.ndarray]) -> np.ndarray:
    """(len(acc), P) per-slot contributions to each account's margin number."""
    out = np.zeros((len(acc), st.inst.shape[1]))
    kernels.contributions(st, acc, out)
    for i in np.flatnonzero(st.ires[acc, I_KIND] == K_EXT).tolist():
        c = ext_contrib.get(int(acc[i]), _F0)
        out[i, : len(c)] = c
    return out


def drivers_json(
    st: State,
    acc: np.ndarray,
    top_n: int,
    syms: Sequence[str],
    ext_contrib: Mapping[int, np.ndarray],
    greeks: Callable[[int, int], dict[str, float]] | None = None,
) -> list[str]:
    """Top `top_n` drivers of each account's margin as JSON (ties by slot); "[]" for a margin <= 0. An
    option position's entry adds its Greeks, `greeks(account, instrument)` (delta, gamma, vega of the
    position: qty x multiplier x per unit)."""
    k = len(acc)
    if not k:
        return []
    j_top, cnt = np.zeros((k, top_n), np.int64), np.zeros((k, 2), np.int64)
    c_top, x_top, rest = np.zeros((k, top_n)), np.zeros((k, top_n)), np.zeros((k, 2))
    kernels.drivers(st, acc, j_top, c_top, x_top, cnt, rest)
    acc_l, cnt_l = acc.tolist(), cnt.tolist()
    for i in [i for i, (m, _) in enumerate(cnt_l) if m < 0]:  # external models
        a = acc_l[i]
        n = int(st.nslot[a])
        c = np.zeros(n)
        own = ext_contrib.get(a, _F0)[:n]
        c[: len(own)] = own
        kernels.top_slots(c, st.xa[a, :n], n, j_top[i], c_top[i], x_top[i], cnt[i], rest[i])
        j_top[i, : cnt[i, 0]] = st.inst[a, j_top[i, : cnt[i, 0]]]
        cnt_l[i] = cnt[i].tolist()
    margin = st.res[acc, R_MARGIN].tolist()
    out = []
    for i, ((m, held), j_i, c_i, x_i, (rc, rx)) in enumerate(
        zip(cnt_l, j_top.tolist(), c_top.tolist(), x_top.tolist(), rest.tolist(), strict=True)
    ):
        if margin[i] <= 0:
            out.append("[]")
            continue
        d = [
            {"sym": syms[j], "exposure": x, "contribution": c}
            for j, x, c in zip(j_i[:m], x_i[:m], c_i[:m], strict=True)
        ]
        if greeks is not None:
            for e, j in zip(d, j_i[:m], strict=False):
                if st.orow[j] >= 0:
                    e.update(greeks(acc_l[i], j))
        if held > m:
            d.append({"sym": OTHER, "exposure": rx, "contribution": rc})
        out.append(_json.encode(d).decode())
    return out
