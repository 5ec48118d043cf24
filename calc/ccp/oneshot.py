"""The one-shot for CCP models and the full-revaluation `hvar` (`marginflow margin --instruments ...`,
`--model NAME` of a [[calc.ccp_models]] entry, `--compare`): positions file -> per account and model the
margin and its components (calc/oneshot.py parses the arguments and prints).

Spot of each underlying = the history's close on `as_of` unless the positions file gives a price. An
option's scenario P&L is full revaluation from its model value; a `price` the positions file gives for an
option is its value for the add-ons (long option credit, concentration), else the model value. Half
spreads and average daily volumes come from an optional quotes file `sym,bid,ask[,adv]` (none: no
liquidity or concentration add-on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from calc.ccp.margin import Addons, evaluate
from calc.ccp.portfolio import Book, portfolio_pnl
from calc.ccp.presets import CcpSpec, plain_hs, resolve
from calc.ccp.scenarios import build_sets
from calc.fullreval import OptionContracts
from calc.history import InputError, PriceHistory, load_prices
from calc.inputs import Positions
from calc.instruments import Instruments, read_rows
from calc.volsurface import VolSurface
from marginflow.config import CalcConfig

COMPONENTS = ("filtered", "stressed", "base", "apc", "liquidity", "concentration", "option_credit")


@dataclass(frozen=True)
class Quotes:
    half_spread: dict[str, float]
    adv: dict[str, float]


def load_quotes(path: str) -> Quotes:
    """`sym,bid,ask[,adv]`: half spread (ask - bid) / 2 per sym (bid <= ask, both finite) and the average
    daily volume in units (> 0) when given."""
    half, adv = {}, {}
    for row in read_rows(path, ("sym", "bid", "ask"), ("adv",)):
        sym = row.name("sym")
        bid, ask = row.number("bid"), row.number("ask")
        if np.isnan(bid) or np.isnan(ask) or bid > ask:
            raise row.error("ask", f"bid {bid!r} and ask {ask!r} must be numbers with bid <= ask")
        half[sym] = (ask - bid) / 2.0
        a = row.number("adv")
        if not np.isnan(a):
            if a <= 0:
                raise row.error("adv", f"{a!r} is not > 0")
            adv[sym] = a
    return Quotes(half, adv)


def model_specs(
    names: Sequence[str], calc: CalcConfig, as_of: str, overrides: dict[str, Any], hvar: dict[str, Any]
) -> list[CcpSpec]:
    """The resolved specs of `names` ("hvar" = plain HS, measure calc.hvar_margin, `hvar`'s fields, e.g.
    lookback_days and ewma_lambda; else [[calc.ccp_models]] entries), command-line `overrides`
    (confidence, holding_days, lookback_days; None = not given) winning; param_id carries as_of."""
    entries = {m.name: (i, m) for i, m in enumerate(calc.ccp_models)}
    given = {k: v for k, v in overrides.items() if v is not None}
    specs = []
    for name in names:
        if name == "hvar":
            fields = {"measure": calc.hvar_margin, **hvar, **given}
            specs.append(resolve(plain_hs(**fields), as_of, "hvar"))
            continue
        if name not in entries:
            known = ", ".join(["hvar", *entries])
            raise InputError(f"--model: unknown model {name!r} (with --instruments: {known})")
        i, m = entries[name]
        specs.append(resolve(msgspec.structs.replace(m, **given), as_of, f"calc.ccp_models[{i}]"))
    return specs


def ccp_accounts(
    specs: Sequence[CcpSpec],
    positions: Positions,
    history: PriceHistory,
    instruments: Instruments | None,
    surface: VolSurface | None,
    as_of: str,
    calc: CalcConfig,
    vol_scenarios: str,
    quotes: Quotes | None = None,
) -> list[dict[str, Any]]:
    """Per account {"account", "models": {name: {model, param_id, var, es, margin, components}}}."""
    book = Book.build(instruments, positions.sym)
    history = history.select(book.cols)
    day = np.datetime64(as_of, "D")
    t = np.flatnonzero(history.dates == day)
    if not len(t):
        raise InputError(
            f"--as-of: no close on {as_of} in the price history ({history.dates[0]} .. {history.dates[-1]})"
        )
    spot = history.closes[int(t[0])].copy()
    for s, p in positions.price.items():
        if s in book.sym_index and book.sym_index[s] < len(book.cols):
            spot[book.sym_index[s]] = p
    contracts = None
    if book.options:
        assert book.instruments is not None
        contracts = OptionContracts.build(
            book.instruments,
            surface,
            book.sym_index,
            day,
            calc.option_rate,
            lambda und: spot[und],
            american=calc.american,
        )
    unit_value = np.concatenate([spot, contracts.greeks(spot[contracts.und])[0] if contracts else []])
    for s, p in positions.price.items():  # an option's given price: its value for the add-ons
        unit_value[book.sym_index[s]] = p
    master_mult: dict[str, float] = {}
    master_adv: dict[str, float] = {}
    if book.instruments is not None:
        master_mult = dict(zip(book.instruments.syms, book.instruments.multiplier.tolist(), strict=True))
        if book.instruments.adv is not None:
            master_adv = dict(zip(book.instruments.syms, book.instruments.adv.tolist(), strict=True))
    quotes = quotes or Quotes({}, {})
    implied = load_prices(calc.vol_history_file) if calc.vol_history_file else None  # beats the vol proxy
    sets_of = [build_sets(history, s, day, vol_scenarios, calc.filter_lambda, "", implied) for s in specs]
    if contracts is not None:  # an option's multiplier is its contract's
        master_mult |= dict(zip(contracts.syms, contracts.mult.tolist(), strict=True))
    accounts = list(dict.fromkeys(positions.account))
    out = []
    for a in accounts:
        net: dict[str, float] = {}
        for acc, s, q in zip(positions.account, positions.sym, positions.qty.tolist(), strict=True):
            if acc == a:
                net[s] = net.get(s, 0.0) + q
        syms = list(net)
        qty = np.array([net[s] for s in syms])
        col, contract = book.columns(syms, contracts)
        given = positions.multiplier  # beats the master's for linear instruments, not for options
        mult = np.array(
            [master_mult[s] if s in book.options else given.get(s, master_mult.get(s, 1.0)) for s in syms]
        )
        price = np.array([unit_value[book.sym_index[s]] for s in syms])
        addons = Addons(
            qty,
            mult,
            price,
            np.array([quotes.half_spread.get(s, 0.0) for s in syms]),
            np.array(
                [quotes.adv.get(s, master_adv.get(s, np.nan)) for s in syms]
            ),  # --quotes beat the master
            contract >= 0,
        )
        models = {}
        for spec, sets in zip(specs, sets_of, strict=True):
            theta = spec.holding_days / 365.0 if calc.theta else 0.0
            pnl = portfolio_pnl(qty, mult, price, col, contract, sets, contracts, spot, theta)
            comp = evaluate(spec, pnl, addons)
            models[spec.name] = row(comp)
        out.append({"account": a, "models": models})
    return out


def row(comp: Any) -> dict[str, Any]:
    """A CcpComponents as the one-shot prints it: model, param_id, var, es, margin, components."""
    d = msgspec.structs.asdict(comp)
    return {
        "model": d["model"],
        "param_id": d["param_id"],
        "var": d["var"],
        "es": d["es"],
        "margin": d["margin"],
        "components": {k: d[k] for k in COMPONENTS},
    }
