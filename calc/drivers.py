"""The drivers of each account's margin: per-slot contributions, and the top positions by |contribution|
(then `*other*` summing the rest, so the list adds up to the margin) as the JSON the margin rows carry.
One kernel call for the built-in models (kernels.drivers); external models' contributions (kept by the
engine per account) are ranked by the same kernels.top_slots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np
from numba import njit

from calc import kernels
from calc.kernels import I_KIND, K_EXT, R_MARGIN, State
from calc.models import OTHER
from schemas.rest import Driver

_F0 = np.zeros(0, dtype=np.float64)
_NO_GREEKS: dict[str, float] = {}
# publishes of fewer rows are written entry by entry (_one_json): below ~10 rows the bulk writer's numpy
# set-up costs more than ~13 us a row (bench_calc's hvar book: 4 rows 86 vs 144 us, 8 rows 140 vs 157,
# 16 rows 233 vs 190; BENCHMARKS.md, "Replay / backtest")
BULK_FROM = 10
_json = msgspec.json.Encoder()


def contributions(st: State, acc: np.ndarray, ext_contrib: Mapping[int, np.ndarray]) -> np.ndarray:
    """(len(acc), P) per-slot contributions to each account's margin number."""
    out = np.zeros((len(acc), st.inst.shape[1]))
    kernels.contributions(st, acc, out)
    for i in np.flatnonzero(st.ires[acc, I_KIND] == K_EXT).tolist():
        c = ext_contrib.get(int(acc[i]), _F0)
        out[i, : len(c)] = c
    return out


_KEY_SYM, _KEY_X, _KEY_C = (
    np.frombuffer(k, np.uint8) for k in (b'{"sym":', b',"exposure":', b',"contribution":')
)


class JsonNames(NamedTuple):
    """The instruments' names, then `*other*`: JSON-encoded back to back in `buf` (name j is
    buf[off[j]:off[j + 1]], the bulk writer's), and as strings (`syms`, the entry-by-entry path's)."""

    buf: np.ndarray
    off: np.ndarray
    syms: list[str]


def json_names(syms: Sequence[str], names: JsonNames | None) -> JsonNames:
    """The JsonNames of `syms`, `names` reused while it covers them."""
    if names is not None and len(names.off) == len(syms) + 2:
        return names
    every = [*syms, OTHER]
    enc = [_json.encode(s) for s in every]
    return JsonNames(
        np.frombuffer(b"".join(enc), np.uint8), np.cumsum([0, *map(len, enc)]).astype(np.int64), every
    )


@njit(cache=True)
def _put(out: np.ndarray, o: int, src: np.ndarray, a: int, b: int) -> int:
    for t in range(a, b):
        out[o] = src[t]
        o += 1
    return o


@njit(cache=True)
def _write_json(
    nums: np.ndarray,
    names: np.ndarray,
    off: np.ndarray,
    j: np.ndarray,
    n_ent: np.ndarray,
    out: np.ndarray,
    ends: np.ndarray,
) -> None:
    """Row i's JSON list of n_ent[i] entries {"sym":names[j[i, e]],"exposure":x,"contribution":c} written
    to `out` (ending at ends[i]); x and c are the next tokens of `nums`, a JSON list of numbers."""
    p, o = 1, 0  # nums[0] == "["
    for i in range(j.shape[0]):
        out[o] = 91  # [
        o += 1
        for e in range(n_ent[i]):
            if e:
                out[o] = 44  # ,
                o += 1
            o = _put(out, o, _KEY_SYM, 0, _KEY_SYM.shape[0])
            o = _put(out, o, names, off[j[i, e]], off[j[i, e] + 1])
            for key in range(2):
                o = _put(out, o, _KEY_X if key == 0 else _KEY_C, 0, (_KEY_X if key == 0 else _KEY_C).shape[0])
                q = p
                while nums[q] != 44 and nums[q] != 93:  # the number runs to the next , or ]
                    q += 1
                o = _put(out, o, nums, p, q)
                p = q + 1
            out[o] = 125  # }
            o += 1
        out[o] = 93  # ]
        o += 1
        ends[i] = o


def drivers_json(
    st: State,
    acc: np.ndarray,
    top_n: int,
    names: JsonNames,
    ext_contrib: Mapping[int, np.ndarray],
    greeks: Callable[[int, int], dict[str, float]] | None = None,
) -> list[str]:
    """Top `top_n` drivers of each account's margin as JSON (ties by slot); "[]" for a margin <= 0. An
    option position's entry adds its Greeks, `greeks(account, instrument)` (delta, gamma, vega of the
    position: qty x multiplier x per unit). `names`: json_names of the instruments. The usual rows (no
    option among the top, finite numbers) are written in one pass: their numbers in one msgspec encode
    (its shortest round-trip floats), the bytes around them by _write_json."""
    k = len(acc)
    if not k:
        return []
    j_top, cnt = np.zeros((k, top_n), np.int64), np.zeros((k, 2), np.int64)
    c_top, x_top, rest = np.zeros((k, top_n)), np.zeros((k, top_n)), np.zeros((k, 2))
    kernels.drivers(st, acc, j_top, c_top, x_top, cnt, rest)
    for i in np.flatnonzero(cnt[:, 0] < 0).tolist():  # external models
        a = int(acc[i])
        n = int(st.nslot[a])
        c = np.zeros(n)
        own = ext_contrib.get(a, _F0)[:n]
        c[: len(own)] = own
        kernels.top_slots(c, st.xa[a, :n], n, j_top[i], c_top[i], x_top[i], cnt[i], rest[i])
        j_top[i, : cnt[i, 0]] = st.inst[a, j_top[i, : cnt[i, 0]]]
    m, other = cnt[:, 0], cnt[:, 1] > cnt[:, 0]
    pos = st.res[acc, R_MARGIN] > 0
    out = ["[]"] * k
    if k < BULK_FROM:  # a small publish: entry by entry is cheaper than the bulk writer's array set-up
        slow = pos
    else:
        slow = _write_bulk(st, top_n, names, greeks, j_top, c_top, x_top, rest, m, other, pos, out)
    for i in np.flatnonzero(slow).tolist():
        out[i] = _one_json(
            st, int(acc[i]), int(m[i]), bool(other[i]), j_top[i], x_top[i], c_top[i], rest[i], names, greeks
        )
    return out


def _write_bulk(
    st: State,
    top_n: int,
    names: JsonNames,
    greeks: Callable[[int, int], dict[str, float]] | None,
    j_top: np.ndarray,
    c_top: np.ndarray,
    x_top: np.ndarray,
    rest: np.ndarray,
    m: np.ndarray,
    other: np.ndarray,
    pos: np.ndarray,
    out: list[str],
) -> np.ndarray:
    """drivers_json's usual rows (a margin > 0, no option among the top, finite numbers) written into
    `out` in one pass; returns the rows left to write entry by entry (`pos` and not written)."""
    k = len(out)
    # the entries of each row: its top m, then *other* (rest) where more positions are held
    je, xe, ce = np.zeros((k, top_n + 1), np.int64), np.zeros((k, top_n + 1)), np.zeros((k, top_n + 1))
    je[:, :top_n], xe[:, :top_n], ce[:, :top_n] = j_top, x_top, c_top
    rows = np.arange(k)
    je[rows, m], xe[rows, m], ce[rows, m] = len(names[1]) - 2, rest[:, 1], rest[:, 0]
    n_ent = m + other
    live = np.arange(top_n + 1)[None, :] < n_ent[:, None]
    good = pos & np.isfinite(np.where(live, xe + ce, 0.0)).all(axis=1)
    if greeks is not None:  # options' entries carry Greeks: written entry by entry
        good &= ~((np.arange(top_n)[None, :] < m[:, None]) & (st.orow[j_top] >= 0)).any(axis=1)
    fast = np.flatnonzero(good)
    if len(fast):
        xc = np.stack([xe[fast], ce[fast]], axis=2)[live[fast]]  # (entries, 2) in row order
        for i, text in zip(fast.tolist(), bulk_json(xc, names, je[fast], n_ent[fast]), strict=True):
            out[i] = text
    return pos & ~good


def bulk_json(xc: np.ndarray, names: JsonNames, je: np.ndarray, nb: np.ndarray) -> list[str]:
    """The JSON lists of rows of nb[i] entries each: instrument je[i, e] (of `names`), exposure and
    contribution xc[...] (entries in row order): their numbers in one msgspec encode, the bytes around
    them by _write_json. (calc/warm.py calls it on a tiny book: the drivers of a small publish skip it.)"""
    nums = np.frombuffer(_json.encode(xc.ravel().tolist()), np.uint8)
    names_buf, off = names[0], names[1]
    live = np.arange(je.shape[1])[None, :] < nb[:, None]
    size = len(nums) + 2 * len(nb) + int(nb.sum()) * 40 + int((off[1:] - off[:-1])[je][live].sum())
    buf, ends = np.empty(size, np.uint8), np.empty(len(nb), np.int64)
    _write_json(nums, names_buf, off, je, nb, buf, ends)
    raw = buf[: ends[-1]].tobytes()
    text = raw.decode()
    whole = text if len(text) == len(raw) else None  # ASCII: byte offsets are character offsets
    return [
        whole[a:b] if whole is not None else raw[a:b].decode()
        for a, b in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)
    ]


def entries(
    syms: Sequence[str], exposure: Sequence[float], contrib: Sequence[float], rest: np.ndarray | None
) -> list[dict[str, Any]]:
    """Drivers as {sym, exposure, contribution} entries, then the `*other*` entry when `rest` (its
    contribution, exposure: the held positions outside the top) is given."""
    out: list[dict[str, Any]] = [
        {"sym": s, "exposure": x, "contribution": c} for s, x, c in zip(syms, exposure, contrib, strict=True)
    ]
    if rest is not None:
        out.append({"sym": OTHER, "exposure": float(rest[1]), "contribution": float(rest[0])})
    return out


def ranked(
    syms: Sequence[str], inst: Sequence[int], exposure: np.ndarray, contrib: np.ndarray, top: int
) -> list[dict[str, Any]]:
    """The drivers of a portfolio outside the engine state (a what-if's: position t in instrument inst[t],
    named syms[inst[t]]), ranked and summed by the kernel that ranks the margin rows' (kernels.top_slots)."""
    slot, c, x = np.zeros(top, np.int64), np.zeros(top), np.zeros(top)
    cnt, rest = np.zeros(2, np.int64), np.zeros(2)
    kernels.top_slots(contrib, exposure, len(inst), slot, c, x, cnt, rest)
    m = int(cnt[0])
    names = [syms[inst[t]] for t in slot[:m].tolist()]
    return entries(names, x[:m].tolist(), c[:m].tolist(), rest if cnt[1] > m else None)


def _one_json(
    st: State,
    a: int,
    m: int,
    other: bool,
    j_i: np.ndarray,
    x_i: np.ndarray,
    c_i: np.ndarray,
    rest: np.ndarray,
    names: JsonNames,
    greeks: Callable[[int, int], dict[str, float]] | None,
) -> str:
    """One account's drivers JSON entry by entry (schemas.rest.Driver: options' Greeks; non-finite numbers
    as null)."""
    d = []
    for j, x, c in zip(j_i[:m].tolist(), x_i[:m].tolist(), c_i[:m].tolist(), strict=True):
        g = greeks(a, j) if greeks is not None and st.orow[j] >= 0 else _NO_GREEKS
        d.append(Driver(sym=names.syms[j], exposure=x, contribution=c, **g))
    if other:
        d.append(Driver(sym=OTHER, exposure=float(rest[1]), contribution=float(rest[0])))
    return _json.encode(d).decode()
