"""SPAN data model: the parsed parameter file as numpy arrays (`SpanParams`), contract keys, results.

Everything the kernels need is a flat array indexed by contract, combined commodity (CC), period or spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# pf_type codes as they appear in pfLink/undPf of a SPAN file; options are OOP (on physical) and OOF
# (on future)
PF_TYPES = ("PHY", "FUT", "OOP", "OOF")
OPTION_PF_TYPES = ("OOP", "OOF")
KIND_PHY, KIND_FUT, KIND_OPT = 0, 1, 2
METH_F, METH_P, METH_W = 0, 1, 2  # dSpread chargeMeth: flat, per-month flat, weighted price risk
SOM_GROSS, SOM_MAX = 0, 1

# (exch, pf_code, pf_type, pe, o, k): o is "C"/"P" and k the strike for options, "" and None otherwise
ContractKey = tuple[str, str, str, str, str, float | None]


class SpanFileError(ValueError):
    """A SPAN parameter file that cannot be used: names the element (path in the XML) and the reason."""

    def __init__(self, element: str, reason: str, source: str = "") -> None:
        self.element, self.reason, self.source = element, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}SPAN file refused at <{element}>: {reason}")


class SpanPositionError(ValueError):
    """Positions that cannot be margined (unknown contract, bad field): names every offending row."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{len(problems)} position problem(s): {shown}")


def contract_key(
    exch: str, pf_code: str, pf_type: str, pe: str, o: str | None = None, k: float | str | None = None
) -> ContractKey:
    """Normalise a contract's identity as written in a SPAN file; raises ValueError naming the bad field."""
    exch, pf_code, pe = str(exch).strip(), str(pf_code).strip(), str(pe).strip()
    t = str(pf_type).strip().upper()
    if t not in PF_TYPES:
        raise ValueError(f"pf_type {pf_type!r} is not one of {'/'.join(PF_TYPES)}")
    if not exch or not pf_code or not pe:
        raise ValueError("exch, pf_code and pe must be non-empty")
    if t not in OPTION_PF_TYPES:
        return (exch, pf_code, t, pe, "", None)
    side = "" if o is None else str(o).strip().upper()
    if side not in ("C", "P"):
        raise ValueError(f"option o {o!r} must be C or P")
    try:
        strike = float(k)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"option strike k {k!r} is not a number") from None
    if not math.isfinite(strike):
        raise ValueError(f"option strike k {k!r} is not finite")
    return (exch, pf_code, t, pe, side, round(strike, 9))


def format_key(key: ContractKey) -> str:
    """A contract key as one symbol string: EXCH/PF/TYPE/PE, plus /O/K for options
    (e.g. BIST/AKBNKE/OOP/201605S0/C/6)."""
    exch, pf, t, pe, o, k = key
    return f"{exch}/{pf}/{t}/{pe}" + (f"/{o}/{k!r}" if o else "")


def parse_key(sym: str) -> ContractKey:
    """Inverse of format_key; ValueError naming the symbol when it is not one."""
    parts = str(sym).split("/")
    if len(parts) not in (4, 6):
        raise ValueError(f"symbol {sym!r} is not EXCH/PF/TYPE/PE or EXCH/PF/TYPE/PE/O/K")
    try:
        return contract_key(*parts)
    except ValueError as e:
        raise ValueError(f"symbol {sym!r}: {e}") from None


@dataclass(frozen=True, eq=False)
class SpanParams:
    """One SPAN risk parameter file, parsed once into arrays (see calc/span/FEATURES.md for what is used)."""

    file_id: str  # "<clearing org>-<business date>-<kind>", e.g. TAKASBANK-20160517-final
    sha256: str  # of the file's bytes
    clearing_org: str
    business_date: str  # YYYYMMDD
    file_kind: str  # setlQualifier (e.g. final), else setl / itd
    created: str
    # scan points (scenarios), in point order
    point_price: np.ndarray  # float64[S] price move as a fraction of the price scan range
    point_vol: np.ndarray  # float64[S] volatility move as a fraction of the vol scan range
    point_weight: np.ndarray  # float64[S] cover fraction (already applied inside the risk arrays)
    point_paired: np.ndarray  # int64[S] 0-based paired scenario (same price move, opposite vol move)
    time_points: np.ndarray  # int64 0-based scenarios without a price move: time risk is their mean loss
    # contracts (futures, physicals, options), one row each
    keys: tuple[ContractKey, ...]
    index: dict[ContractKey, int]
    c_cc: np.ndarray  # int64[N] combined commodity
    c_period: np.ndarray  # int64[N] global period that carries the contract's delta
    c_kind: np.ndarray  # int8[N] KIND_PHY / KIND_FUT / KIND_OPT
    c_call: np.ndarray  # bool[N]
    c_ra: np.ndarray  # float64[N, S] risk array: loss per long contract per scenario (currency units)
    c_delta: np.ndarray  # float64[N] composite delta x delta scaling
    c_value: np.ndarray  # float64[N] premium value per contract (premium-style options), else 0
    c_som_rate: np.ndarray  # float64[N] short option minimum rate per short option contract, else 0
    c_price: np.ndarray  # float64[N] settlement price
    c_cvf: np.ndarray  # float64[N] contract value factor
    # combined commodities
    cc_names: tuple[str, ...]
    cc_index: dict[str, int]
    cc_currency: tuple[str, ...]
    currencies: tuple[str, ...]
    cc_cur: np.ndarray  # int64[C] index into currencies
    cc_som_meth: np.ndarray  # int8[C] SOM_GROSS / SOM_MAX
    cc_cap_anov: np.ndarray  # bool[C] net option value may not offset other CCs
    cc_p0: np.ndarray  # int64[C] first global period of the CC
    cc_p1: np.ndarray  # int64[C] one past the last
    cc_s0: np.ndarray  # int64[C] first intra-commodity spread of the CC
    cc_s1: np.ndarray  # int64[C]
    cc_in_inter: np.ndarray  # bool[C] the CC is a leg of some inter-commodity spread
    cc_adj_rate: np.ndarray  # float64[C] adjRate val (parsed, not applied: see FEATURES.md)
    # periods (contract months), grouped by CC, sorted by pe within a CC
    p_cc: np.ndarray  # int64[P]
    p_pe: tuple[str, ...]
    p_intra_tier: np.ndarray  # int64[P] intraTiers tier number, -1 when in none
    p_inter_tier: np.ndarray  # int64[P] interTiers tier number, -1 when in none
    p_spot_sprd: np.ndarray  # float64[P] spot charge per spread delta (spotRate sprd), 0 if not spot
    p_spot_outr: np.ndarray  # float64[P] spot charge per outright delta (spotRate outr)
    p_is_spot: np.ndarray  # bool[P]
    # delta spreads: intra-commodity ones first (grouped by CC, priority order), then inter-commodity ones
    n_intra: int
    s_cc: np.ndarray  # int64[NS] owning CC (intra), -1 for inter
    s_meth: np.ndarray  # int8[NS] METH_F / METH_P / METH_W
    s_rate: np.ndarray  # float64[NS] charge per spread (F, P) or credit fraction (W)
    s_l0: np.ndarray  # int64[NS] first leg
    s_l1: np.ndarray  # int64[NS]
    s_name: tuple[str, ...]
    l_cc: np.ndarray  # int64[L]
    l_period: np.ndarray  # int64[L] global period for a pLeg, -1 for a tLeg
    l_tier: np.ndarray  # int64[L] tier number for a tLeg
    l_side: np.ndarray  # float64[L] +1 for side A, -1 for side B
    l_ratio: np.ndarray  # float64[L] deltas per spread
    l_gross: np.ndarray  # bool[L] tLeg whose tier is also on the opposite side: longs vs shorts inside it
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_points(self) -> int:
        return int(self.point_price.shape[0])

    @property
    def n_contracts(self) -> int:
        return len(self.keys)

    def lookup(self, key: ContractKey) -> int:
        """Contract row of a normalised key; KeyError naming it when the file does not have it."""
        try:
            return self.index[key]
        except KeyError:
            raise KeyError(f"contract {format_key(key)} is not in SPAN file {self.file_id}") from None


@dataclass(frozen=True)
class CCMargin:
    """One combined commodity of one account: the SPAN components (currency of the CC)."""

    cc: str
    currency: str
    scan: float  # max over scenarios of the loss, floored at 0
    active_scenario: int  # 1-based scenario giving the scan risk
    time_risk: float  # mean loss of the scenarios without a price move
    vol_risk: float  # half the gap between the active scenario and its paired one
    price_risk: float  # scan - time - vol, floored at 0
    net_delta: float
    wfpr: float  # weighted futures price risk = price risk / |net delta|
    intra: float
    spot: float
    inter: float  # inter-commodity credit (subtracted)
    som: float
    nov: float  # net option value at market: long positive, short negative
    requirement: float  # max(scan + intra + spot - inter, som)

    def as_dict(self) -> dict[str, float | int | str]:
        """The one-shot JSON shape: cc, scan, intra, spot, inter, som, nov, requirement, active_scenario."""
        return {
            "cc": self.cc, "scan": self.scan, "intra": self.intra, "spot": self.spot, "inter": self.inter,
            "som": self.som, "nov": self.nov, "requirement": self.requirement,
            "active_scenario": self.active_scenario,
        }  # fmt: skip


@dataclass(frozen=True)
class AccountMargin:
    """An account's SPAN margin in one currency: total = max(0, sum of requirements - sum of NOV)."""

    account: str
    currency: str
    total: float
    ccs: tuple[CCMargin, ...]

    def as_dict(self) -> dict:
        return {
            "account": self.account,
            "total": self.total,
            "currency": self.currency,
            "ccs": [c.as_dict() for c in self.ccs],
        }
