"""The preset tables of the CCP models and the resolution of a [[calc.ccp_models]] entry into a spec.

This is the one definition of every CCP model default: `BASE` (preset "") and per preset the values it
changes (`PRESETS`). A field given in the config entry wins over its preset, the preset over `BASE`.
calc/FEATURES.md says which public methodology each preset follows and where it may differ.

    spec = resolve(cfg_entry, last_date="2022-12-28", where="calc.ccp_models[0]")
    spec.confidence, spec.measure, spec.param_id          # "prisma_eq:3f9a1c2b7d:2022-12-28"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from marginflow.config import CcpModelConfig

# Every field of CcpModelConfig but name / preset: the values of a model with no preset.
BASE: dict[str, Any] = {
    "measure": "var",
    "confidence": 0.99,
    "holding_days": 1,
    "lookback_days": 504,
    "ewma_lambda": 0.0,  # plain (unfiltered) historical simulation
    "stress_from": "",  # no stressed set
    "stress_to": "",
    "stress_combine": "max",
    "stress_weight": 0.5,
    "apc": "none",
    "apc_buffer": 0.25,  # RTS 153/2013 art. 28(a): at least 25 %
    "apc_stress_weight": 0.25,  # art. 28(b): at least 25 %
    "apc_floor_days": 2520,  # art. 28(c): 10 years of 252 trading days
    "liquidity": False,
    "concentration_adv_fraction": 0.1,
    "concentration_rate": 0.0,  # no concentration add-on
    "long_option_credit": 0.0,  # no credit for long options
    "premium_margin": False,  # no charge for short options' value (a plain VaR of the book)
    "rounding": 0.0,
}

# 2008-06-02 .. 2009-05-29: the ~250 trading days around the 2008 crisis (both presets' stressed period;
# within the demo history 1990-2022)
_STRESS_2008 = {"stress_from": "2008-06-02", "stress_to": "2009-05-29"}

PRESETS: dict[str, dict[str, Any]] = {
    # Eurex Prisma (listed equity derivatives): filtered HS ES, 2-day holding period, 750-day lookback,
    # a stress-period component as a floor (max), liquidity add-on with a market-impact term, long option
    # value credited.
    "prisma": {
        "measure": "es",
        "holding_days": 2,
        "lookback_days": 750,
        "ewma_lambda": 0.94,
        **_STRESS_2008,
        "stress_combine": "max",
        "liquidity": True,
        "concentration_adv_fraction": 0.1,
        "concentration_rate": 0.02,
        "long_option_credit": 1.0,
        "premium_margin": True,
        "rounding": 0.01,
    },
    # CME SPAN 2: x * HVaR + (1 - x) * Stress + Liquidity + Concentration; HVaR over at least 10 years
    # with volatility scaling, 1-day holding period (futures), x = 0.75 (ours: CME does not publish x).
    "span2": {
        "measure": "var",
        "holding_days": 1,
        "lookback_days": 2520,
        "ewma_lambda": 0.97,
        **_STRESS_2008,
        "stress_combine": "weight",
        "stress_weight": 0.75,
        "liquidity": True,
        "concentration_adv_fraction": 0.2,
        "concentration_rate": 0.05,
        "long_option_credit": 1.0,
        "premium_margin": True,
        "rounding": 1.0,
    },
}


@dataclass(frozen=True)
class CcpSpec:
    """A resolved CCP model: `model` has every field set; `param_id` = name:hash of the resolved fields:
    the history's last date (margin rows carry it). Fields read through: spec.confidence, spec.apc, ..."""

    model: CcpModelConfig
    param_id: str

    def __getattr__(self, key: str) -> Any:
        return getattr(self.model, key)


def resolved_fields(cfg: CcpModelConfig) -> dict[str, Any]:
    """The entry's fields with every None filled from its preset, then from BASE."""
    given = {k: v for k, v in msgspec.structs.asdict(cfg).items() if v is not None}
    return {**BASE, **PRESETS.get(cfg.preset, {}), **given}


def resolve(cfg: CcpModelConfig, last_date: str = "", where: str = "") -> CcpSpec:
    """The spec of a config entry (checked again after resolution, errors naming `where`.key); its
    param_id includes `last_date` (the price history's last date the scenarios use)."""
    model = msgspec.convert(resolved_fields(cfg), CcpModelConfig)
    model.check(where or f"calc.ccp_models[{cfg.name!r}]")
    digest = hashlib.sha256(msgspec.json.encode(model)).hexdigest()[:10]
    return CcpSpec(model, f"{model.name}:{digest}:{last_date}")


def plain_hs(name: str = "hvar", **fields: Any) -> CcpModelConfig:
    """A model entry with no preset, add-on or stressed set: the plain historical simulation (the one-shot's
    `--model hvar --instruments`), `fields` (confidence, holding_days, lookback_days, measure) over BASE."""
    return CcpModelConfig(name=name, **{k: v for k, v in fields.items() if v is not None})
