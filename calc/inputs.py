"""What the margin engine starts from: accounts (model, collateral, policy, desk) and start-of-day
positions read from CSV / Parquet, and risk parameters under the [calc] settings from a price history
or a covariance file; shaped for the engine: start prices and multipliers, parameters fitted to its
instruments. Bad input raises InputError naming the file, row and field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError, PriceHistory, load_covariance, load_prices, read_table
from calc.models import RiskParams, params_from_history
from marginflow.config import CalcConfig
from schemas.tables import POLICIES


@dataclass(frozen=True)
class AccountSpec:
    """An account's margin model, collateral posted and policy ("model" or "max_stress")."""

    account: str
    model: str
    collateral: float
    policy: str = "model"
    desk: str = ""
    ccp: str = ""  # the clearing house ([[calc.ccps]] name); "" = the first configured

    def __post_init__(self) -> None:
        where = f"account {self.account!r}"
        if not self.account:
            raise InputError("account: empty account name")
        if not (
            isinstance(self.collateral, float | int)
            and math.isfinite(self.collateral)
            and self.collateral > 0
        ):
            raise InputError(f"{where}: collateral must be a finite number > 0, got {self.collateral!r}")
        if self.policy not in POLICIES:
            raise InputError(f"{where}: policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.model:
            raise InputError(f"{where}: empty model")


@dataclass(frozen=True)
class Positions:
    """Start-of-day positions: parallel columns, one row per (account, sym)."""

    account: list[str]
    sym: list[str]
    qty: np.ndarray
    multiplier: dict[str, float] = field(default_factory=dict)
    price: dict[str, float] = field(default_factory=dict)


def _strings(table: Any, name: str, path: Path) -> list[str]:
    lower = {c.lower(): c for c in table.column_names}
    if name not in lower:
        raise InputError(f"{path}: missing column {name!r} (columns are {table.column_names})")
    vals = table.column(lower[name]).to_pylist()
    for i, v in enumerate(vals):
        if v is None or str(v).strip() == "":
            raise InputError(f"{path}: row {i + 1}: empty {name!r}")
    return [str(v).strip() for v in vals]


def _numbers(table: Any, name: str, path: Path, required: bool = True) -> np.ndarray | None:
    lower = {c.lower(): c for c in table.column_names}
    if name not in lower:
        if required:
            raise InputError(f"{path}: missing column {name!r} (columns are {table.column_names})")
        return None
    col = table.column(lower[name])
    try:
        vals = np.array([np.nan if v is None else float(v) for v in col.to_pylist()], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: column {name!r}: not a number") from None
    bad = ~np.isfinite(vals)
    if bad.any():
        raise InputError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 1}: {name!r} is NaN or missing")
    return vals


def load_positions(path: str | Path) -> Positions:
    """`account,sym,qty` with optional `multiplier` (per sym, > 0) and `price` (per sym, > 0);
    CSV, CSV.gz or Parquet. Rows of the same (account, sym) add up."""
    path = Path(path)
    t = read_table(path)
    account, sym = _strings(t, "account", path), _strings(t, "sym", path)
    qty = _numbers(t, "qty", path)
    assert qty is not None
    per_sym: dict[str, dict[str, float]] = {}
    for name in ("multiplier", "price"):
        vals = _numbers(t, name, path, required=False)
        per_sym[name] = {}
        if vals is None:
            continue
        for i, (s, v) in enumerate(zip(sym, vals.tolist(), strict=True)):
            if v <= 0:
                raise InputError(f"{path}: row {i + 1}: {name} for {s!r} must be > 0, got {v!r}")
            if per_sym[name].setdefault(s, v) != v:
                raise InputError(f"{path}: row {i + 1}: {name} for {s!r} differs from an earlier row")
    return Positions(account, sym, qty, per_sym["multiplier"], per_sym["price"])


def load_accounts(path: str | Path, default_policy: str = "model") -> dict[str, AccountSpec]:
    """`account,model,collateral` with optional `policy`, `desk` and `ccp`."""
    path = Path(path)
    t = read_table(path)
    names, models = _strings(t, "account", path), _strings(t, "model", path)
    coll = _numbers(t, "collateral", path)
    assert coll is not None
    lower = {c.lower(): c for c in t.column_names}
    pol = (
        [str(v or default_policy).strip() for v in t.column(lower["policy"]).to_pylist()]
        if "policy" in lower
        else [default_policy] * len(names)
    )
    desk = (
        [str(v or "") for v in t.column(lower["desk"]).to_pylist()] if "desk" in lower else [""] * len(names)
    )
    ccp = (
        [str(v or "").strip() for v in t.column(lower["ccp"]).to_pylist()]
        if "ccp" in lower
        else [""] * len(names)
    )
    out: dict[str, AccountSpec] = {}
    for i, a in enumerate(names):
        if a in out:
            raise InputError(f"{path}: row {i + 1}: account {a!r} appears twice")
        try:
            out[a] = AccountSpec(a, models[i], float(coll[i]), pol[i], desk[i], ccp[i])
        except InputError as e:
            raise InputError(f"{path}: row {i + 1}: {e}") from None
    return out


def params_from_config(
    calc: CalcConfig,
    history: PriceHistory | str | Path | None = None,
    *,
    covariance_file: str | Path | None = None,
    param_id: str | None = None,
) -> RiskParams:
    """Risk parameters under the [calc] settings (confidence, horizon, lookback, EWMA, filtering)
    from a price history (a PriceHistory, a path, or calc.history_file) or, for a `covariance`
    param event, a covariance file (parametric and stress models only). For `set_params`."""
    if covariance_file is not None:
        syms, cov = load_covariance(covariance_file)
        return RiskParams(
            syms,
            cov,
            None,
            calc.confidence,
            calc.horizon_days,
            param_id or f"covariance:{Path(covariance_file).name}",
        )
    if history is None or isinstance(history, str | Path):
        history = load_prices(history or calc.history_file)
    lookback = calc.lookback_days if calc.lookback_days > 0 else None
    return params_from_history(
        history,
        confidence=calc.confidence,
        horizon_days=calc.horizon_days,
        lookback_days=lookback,
        ewma_lambda=calc.ewma_lambda,
        filtered=calc.filtered,
        filter_lambda=calc.filter_lambda,
        vol_scenarios=calc.vol_scenarios,
        implied_vols=load_prices(calc.vol_history_file) if calc.vol_history_file else None,
        param_id=param_id or f"history:{Path(calc.history_file).name}:{history.dates[-1]}",
    )


def start_prices(
    sym_index: Mapping[str, int],
    positions: Positions,
    prices: Mapping[str, float],
    multipliers: Mapping[str, float],
    contract: Callable[[str, str], tuple[float, float] | tuple[()]],
) -> tuple[np.ndarray, np.ndarray]:
    """Start price and multiplier per instrument (`sym_index`: sym -> its index): the positions' columns
    beat the given ones; `contract(account, sym)` is (price, multiplier) of an external model's contract
    (priced by the model where no price was given), () for any other position."""
    syms = list(sym_index)
    price = np.full(len(syms), np.nan)
    for s, p in prices.items():
        if s in sym_index:
            price[sym_index[s]] = p
    for s, p in positions.price.items():
        price[sym_index[s]] = p
    mult = np.ones(len(syms))
    given_mult = {**multipliers, **positions.multiplier}
    for s, m in given_mult.items():
        if s in sym_index:
            mult[sym_index[s]] = m
    for a, s in zip(positions.account, positions.sym, strict=True):  # an external model's own contracts
        info = contract(a, s)
        if info:
            j = sym_index[s]
            price[j] = info[0] if np.isnan(price[j]) else price[j]
            mult[j] = mult[j] if s in given_mult else info[1]
    bad = ~(np.isfinite(mult) & (mult > 0))
    if bad.any():
        raise InputError(f"multiplier for sym {syms[int(np.flatnonzero(bad)[0])]!r} must be > 0")
    return price, mult


def fit_params(params: RiskParams, syms: Sequence[str], n_sc: int, old: RiskParams | None) -> RiskParams:
    """Risk parameters for the engine's instruments with parameters (`syms`; reordered to them, an
    instrument missing from them is refused) and its `n_sc` scenarios; a part they lack (a covariance
    file has no scenarios) is the engine's current one (`old`)."""
    params = params if params.syms == list(syms) else params.select(list(syms))
    if params.scenarios is not None and params.scenarios.shape[0] != n_sc:
        raise InputError(f"new scenarios: {params.scenarios.shape[0]} scenarios, the engine has {n_sc}")
    if old is None:
        return params
    if params.scenarios is not None:
        return params if params.cov is not None else dataclasses.replace(params, cov=old.cov)
    return dataclasses.replace(
        params,
        cov=params.cov if params.cov is not None else old.cov,
        scenarios=old.scenarios,
        vol_ratio=old.vol_ratio,
    )
