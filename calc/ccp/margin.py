"""A portfolio's margin under a CCP model from its scenario P&L per set and its positions' add-on inputs:
each component a plain function over numpy arrays (the hand calculations of tests/calc/ccp/test_margin.py).

    comp = evaluate(spec, {"filtered": pnl_f, "stressed": pnl_s}, addons)   # schemas.calc.CcpComponents

Definitions (losses positive; VaR / ES as the engine's historical simulation, calc/models.py):
- var, es of a P&L vector: VaR = the k-th worst loss, k = ceil((1-c)S) (tail_count); ES = the worst losses
  weighted by tail_weights; both floored at 0. `filtered` / `stressed` = the spec's measure of each set.
- base: stress_combine "max" -> max(filtered, stressed); "weight" -> x filtered + (1-x) stressed.
- apc (RTS 153/2013 art. 28): "buffer" -> apc_buffer x base (never exhausted here: a one-shot number);
  "stress_weight" -> max(0, (1-w) filtered + w stressed - base) (the measures weighted,
  w = apc_stress_weight);
  "floor" -> max(0, the measure of the 10-year unfiltered "floor" set - base); "none" -> 0.
- liquidity (spec.liquidity): sum |qty| x multiplier x half spread (half the live bid-ask spread).
- concentration: sum concentration_rate x max(0, |qty| - concentration_adv_fraction x adv) x mult x price over
  positions with an average daily volume `adv` (NaN = not given: no term).
- option_credit: min(long_option_credit x the long options' value (qty > 0: qty x mult x value), base +
  apc + liquidity + concentration), less the short options' value when premium_margin (their liquidation
  cost: the premium margin of premium-style options); negative = a charge.
- margin: round_up(base + apc + liquidity + concentration - option_credit, rounding), >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from calc.ccp.presets import CcpSpec
from calc.models import tail_count, tail_weights
from schemas.calc import CcpComponents

SETS = ("filtered", "stressed", "floor")  # the scenario set names (calc/ccp/scenarios.py)


@dataclass(frozen=True)
class Addons:
    """Per position (P,) of one portfolio: what the add-ons need. `price` is the unit value (an option's
    value for options); `half_spread` half the live bid-ask spread in price units (0 = none); `adv` the
    average daily volume in units (NaN = not given)."""

    qty: np.ndarray
    mult: np.ndarray
    price: np.ndarray
    half_spread: np.ndarray
    adv: np.ndarray
    is_option: np.ndarray  # bool


def var_es(pnl: np.ndarray, confidence: float) -> tuple[float, float]:
    """(VaR, ES) of one scenario P&L vector, as calc/models.py historical() computes them."""
    s = len(pnl)
    if s == 0:
        return 0.0, 0.0
    k = tail_count(confidence, s)
    losses = -np.sort(pnl, kind="stable")[:k]
    return max(float(losses[k - 1]), 0.0), max(float(losses @ tail_weights(confidence, s)), 0.0)


def measure(pnl: np.ndarray | None, confidence: float, kind: str) -> float:
    """The spec's measure ("var" or "es") of a set; 0 for a set the spec does not use (None)."""
    if pnl is None:
        return 0.0
    v, e = var_es(pnl, confidence)
    return e if kind == "es" else v


def combine(filtered: float, stressed: float, how: str, x: float, has_stress: bool) -> float:
    """base: max(filtered, stressed), or x filtered + (1-x) stressed; the filtered number alone when the
    spec has no stressed period."""
    if not has_stress:
        return filtered
    return max(filtered, stressed) if how == "max" else x * filtered + (1.0 - x) * stressed


def apc_addon(spec: CcpSpec, base: float, filtered: float, stressed: float, floor: float) -> float:
    """The anti-procyclicality add-on of RTS 153/2013 art. 28 on top of `base` (>= 0)."""
    if spec.apc == "buffer":
        return spec.apc_buffer * base
    if spec.apc == "stress_weight":
        w = spec.apc_stress_weight
        return max(0.0, (1.0 - w) * filtered + w * stressed - base)
    if spec.apc == "floor":
        return max(0.0, floor - base)
    return 0.0


def liquidity_addon(qty: np.ndarray, mult: np.ndarray, half_spread: np.ndarray) -> float:
    """Close-out cost at half the bid-ask spread: sum |qty| x mult x half spread."""
    return float(np.sum(np.abs(qty) * mult * half_spread))


def concentration_addon(
    qty: np.ndarray, mult: np.ndarray, price: np.ndarray, adv: np.ndarray, fraction: float, rate: float
) -> float:
    """sum rate x max(0, |qty| - fraction x adv) x mult x |price| over positions with an adv (not NaN)."""
    if rate == 0.0 or len(qty) == 0:
        return 0.0
    on = ~np.isnan(adv)
    excess = np.maximum(np.abs(qty[on]) - fraction * adv[on], 0.0)
    return float(rate * np.sum(excess * mult[on] * np.abs(price[on])))


def option_credit(
    qty: np.ndarray,
    mult: np.ndarray,
    price: np.ndarray,
    is_option: np.ndarray,
    cap: float,
    limit: float,
    premium: bool = False,
) -> float:
    """min(cap x the long options' value, limit) less, with `premium`, the short options' value (their
    liquidation cost, the premium margin CCPs charge for premium-style options): a credit when positive,
    a charge when negative. Values are qty x mult x price over options."""
    value = qty * mult * price
    long = float(np.sum(value[is_option & (qty > 0)]))
    short = -float(np.sum(value[is_option & (qty < 0)]))
    return max(0.0, min(cap * long, limit)) - (short if premium else 0.0)


def round_up(x: float, step: float) -> float:
    """x rounded up to a multiple of step (step 0: x); a value within 1e-9 of a multiple stays on it."""
    if step <= 0.0:
        return x
    return math.ceil(x / step - 1e-9) * step


def evaluate(spec: CcpSpec, pnl_by_set: Mapping[str, np.ndarray], addons: Addons) -> CcpComponents:
    """The margin and its components (see the module docstring). `pnl_by_set`: set name ("filtered",
    "stressed", "floor") -> the portfolio's scenario P&L vector (S,) in that set; a set the spec does not
    use may be left out."""
    c, kind = spec.confidence, spec.measure
    filtered_pnl = pnl_by_set["filtered"]
    v, e = var_es(filtered_pnl, c)
    filtered = e if kind == "es" else v
    has_stress = bool(spec.stress_from)
    stressed = measure(pnl_by_set.get("stressed") if has_stress else None, c, kind)
    base = combine(filtered, stressed, spec.stress_combine, spec.stress_weight, has_stress)
    floor = measure(pnl_by_set.get("floor") if spec.apc == "floor" else None, c, kind)
    apc = apc_addon(spec, base, filtered, stressed, floor)
    a = addons
    liq = liquidity_addon(a.qty, a.mult, a.half_spread) if spec.liquidity else 0.0
    conc = concentration_addon(
        a.qty, a.mult, a.price, a.adv, spec.concentration_adv_fraction, spec.concentration_rate
    )
    gross = base + apc + liq + conc
    credit = option_credit(
        a.qty, a.mult, a.price, a.is_option, spec.long_option_credit, gross, bool(spec.premium_margin)
    )
    margin = round_up(max(0.0, gross - credit), spec.rounding)
    return CcpComponents(
        model=spec.name,
        param_id=spec.param_id,
        var=v,
        es=e,
        filtered=filtered,
        stressed=stressed,
        base=base,
        apc=apc,
        liquidity=liq,
        concentration=conc,
        option_credit=credit,
        margin=margin,
    )
