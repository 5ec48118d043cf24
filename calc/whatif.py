"""What-if: an account's margin before and after hypothetical trades, on a one-account copy of its
kernel state (kernels.one_account), so the engine's own state is never touched. "Before" includes
the events queued since the last refresh (their prices, the account's own fills and new slots).

    what_if(engine, "acct", [Trade(sym="AAPL", qty=-500)])   # or dicts {"sym", "qty"[, "side"]}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from calc import kernels
from calc.drivers import ranked
from calc.external import numbers
from calc.history import InputError
from calc.kernels import M_EXT, R_ES, R_MARGIN, R_STRESS, R_VAR
from schemas.calc import Trade

if TYPE_CHECKING:
    from calc.engine import MarginEngine


def _trade(i: int, t: Trade | Mapping[str, Any]) -> Trade:
    """A typed trade (the API's are already); a mapping is checked by the same schema."""
    if isinstance(t, Trade):
        return t
    try:
        return msgspec.convert(t, Trade)
    except msgspec.ValidationError as e:
        raise InputError(f"what_if: trade {i}: {e}") from None


def _trades(eng: MarginEngine, a: int, trades: Sequence[Trade | Mapping[str, Any]]) -> tuple[list, list]:
    """Instrument and signed quantity of each trade (an external model's new contract added to the
    engine as an instrument); InputError names the trade and the reason."""
    ix, dqs = [], []
    model = eng.specs[a].model
    for i, raw in enumerate(trades):
        t = _trade(i, raw)
        s, q = t.sym, float(t.qty)
        if eng.model_code[a] == M_EXT:
            known = eng.ext.instrument(model, s)
            if known is None:
                raise InputError(
                    f"what_if: trade {i}: unknown sym {s!r} (not an instrument of model {model!r})"
                )
            if known and s not in eng.sym_index:
                eng._add_instruments([s], model)
        if s not in eng.sym_index:
            raise InputError(f"what_if: trade {i}: unknown sym {s!r}")
        if t.side is not None:
            if not q > 0:
                raise InputError(f"what_if: trade {i}: side must be B or S with qty > 0")
            q = q if t.side == "B" else -q
        if not math.isfinite(q):
            raise InputError(f"what_if: trade {i}: qty must be finite")
        j = eng.sym_index[s]
        if eng.model_code[a] != M_EXT and not eng.has_params[j]:
            raise InputError(f"what_if: trade {i}: no risk parameters for sym {s!r}")
        ix.append(j)
        dqs.append(q)
    return ix, dqs


def _evaluate(
    model: Any, syms: list[str], qty: np.ndarray, price: np.ndarray, inst: list[int], mult: np.ndarray
):
    """An external model's result for positions at the what-if's prices: `evaluate_at` with every
    instrument's price (queued ticks applied) when the model reads the market (CCP models), else
    `evaluate` with the positions' own prices."""
    if hasattr(model, "evaluate_at"):
        return model.evaluate_at(syms, qty, mult[inst], price)
    return model.evaluate(syms, qty, price[inst], mult[inst])


def what_if(
    eng: MarginEngine, account: str, trades: Sequence[Trade | Mapping[str, Any]], compare: bool = False
) -> dict[str, Any]:
    """Margin of `account` before and after hypothetical trades (qty signed, or side "B"/"S" with
    qty > 0), without touching the engine's state; compare=True adds "compare": {model: margin before,
    after, change, components after} under every model of eng.compare_models() (CCP models configured)."""
    if account not in eng.acc_index:
        raise InputError(f"what_if: unknown account {account!r}")
    a = eng.acc_index[account]
    ix, dqs = _trades(eng, a, trades)
    st = eng.st
    # the account's view of queued events: prices (last one wins), its own fills and new slots
    q = eng._queued()
    price, ticked = eng._queued_prices()
    for i, j in enumerate(ix):
        if not math.isfinite(price[j]):
            raise InputError(f"what_if: trade {i}: no price for sym {eng.syms[j]!r}")
    n = int(st.nslot[a])
    n_old = n - int(np.count_nonzero(q["new_a"] == a))
    inst = st.inst[a, :n].tolist()
    slot_list = []
    for j in ix:  # the trade's slot: the account's own, or a new one after them
        if j not in inst:
            inst.append(j)
        slot_list.append(inst.index(j))
    p = len(inst)
    scratch = kernels.one_account(st, a, n, p)
    scratch.inst[0] = inst
    scratch.nslot[0] = p
    if eng.options is not None:  # options on a queued tick's underlying repriced in the copy
        scratch = eng.options.preview(scratch, inst, ticked, price)
    scratch = scratch._replace(price=price)
    mine = q["fill_a"] == a
    np.add.at(scratch.qty[0], q["fill_s"][mine].astype(np.int64), q["fill_dq"][mine])
    res, ires, contrib = (
        np.zeros((2, kernels.N_RES)),
        np.zeros((2, kernels.N_IRES), np.int64),
        np.zeros((2, p)),
    )
    slots = np.array(slot_list, dtype=np.int64)
    qty_before = scratch.qty[0].copy()
    x_before = qty_before * (price * st.mult)[inst]
    kernels.what_if(scratch, n_old, slots, np.array(dqs, dtype=np.float64), res, ires, contrib)
    model = eng.specs[a].model
    out: dict[str, Any] = {"account": account, "model": model}
    for r, when in enumerate(("before", "after")):
        x = scratch.xa[0] if r == 1 else x_before
        if eng.model_code[a] == M_EXT:
            e = _evaluate(
                eng.external[model],
                [eng.syms[j] for j in inst],
                qty_before if r == 0 else scratch.qty[0].copy(),
                price,
                inst,
                st.mult,
            )
            res[r, [R_VAR, R_ES, R_MARGIN]] = numbers(e)
            contrib[r, : len(e.contrib)] = e.contrib
        margin = float(res[r, R_MARGIN])
        out[f"margin_{when}"] = margin
        out[f"var_{when}"] = float(res[r, R_VAR])
        out[f"es_{when}"] = float(res[r, R_ES])
        out[f"stress_{when}"] = max(float(res[r, R_STRESS]), 0.0)
        out[f"drivers_{when}"] = (
            ranked(eng.syms, inst, x, contrib[r], eng.settings.top_drivers) if margin > 0 else []
        )
    out["change"] = out["margin_after"] - out["margin_before"]
    models = eng.compare_models() if compare else {}
    if models:  # the same portfolio before and after under every configured model, side by side
        qty = {"before": qty_before, "after": scratch.qty[0].copy()}
        out["compare"] = {}
        syms = [eng.syms[j] for j in inst]
        for name, m in models.items():
            try:
                r = {w: _evaluate(m, syms, q, price, inst, st.mult) for w, q in qty.items()}
            except InputError as e:  # e.g. a contract outside the model's price history
                out["compare"][name] = {"error": str(e)}
                continue
            out["compare"][name] = {
                "margin_before": numbers(r["before"])[2],
                "margin_after": numbers(r["after"])[2],
                "change": numbers(r["after"])[2] - numbers(r["before"])[2],
                "components_after": None
                if r["after"].components is None
                else msgspec.structs.asdict(r["after"].components),
            }
    out["collateral"] = float(eng.collateral[a])
    out["utilisation_after"] = out["margin_after"] / float(eng.collateral[a])
    out["drivers"] = out["drivers_after"]
    return out
