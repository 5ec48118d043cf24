"""The acceptance band for market data: market data that cannot poison the engine's state.

Each instrument has a last accepted price (at start the price the engine is given: history close,
positions) and a band (calc.price_band: default, per sector, per sym; 0 = off). A tick moving further
than the band from it is held as suspect, not applied: counted in the engine's `rejected` / `rejects`
with its reason, and a data alert is raised (account "*", rule "price-band:SYM", kind "data").
confirm_ticks consecutive suspect ticks within the band of the first confirm the new level; a tick back
inside the band ends the suspicion; `accept` (an operator's journaled `price_accept` param event, through
MarginEngine.accept_price) takes the held or a given price. Either way the alert is cleared. The check is
numpy over the batch; only a batch with a tick outside the band (or for a suspect instrument) walks its
ticks one by one. Decisions depend on the events only, not on how they were batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calc import kernels
from calc.alerts import ALL_ACCOUNTS
from marginflow.config import PriceBandConfig
from schemas.tables import DATA_KIND

BAND_RULE = "price-band"  # data alerts' rule: "price-band:SYM"


@dataclass
class Suspect:
    """An instrument's held suspect ticks: the first price (the level others must agree with), the
    latest, how many agreeing ticks so far, and the reference they moved away from."""

    first: float
    last: float
    count: int
    reference: float


class PriceBand:
    """The band of each of the engine's instruments (`syms`, the engine's own list: it grows with it),
    their last accepted prices and held suspect ticks. Data alert rows go to `alerts` (the engine's
    list, so they keep their order with the rule alerts), refusals to `reject(what, seq, reason)`."""

    def __init__(
        self,
        config: PriceBandConfig,
        sectors: Mapping[str, str],
        syms: Sequence[str],
        price: np.ndarray,
        alerts: list[dict[str, Any]],
        reject: Callable[[str, int, str], None],
    ):
        self.config, self.sectors, self.syms = config, sectors, syms
        self.ref_price = (
            price.copy()
        )  # last accepted price per instrument (NaN: none yet, the first tick sets it)
        self.band = np.array([self.band_of(s) for s in syms], dtype=np.float64)
        self.suspect_mask = np.zeros(len(syms), dtype=np.bool_)
        self.suspects: dict[int, Suspect] = {}  # instrument -> its held suspect ticks
        self.held_ticks = 0  # ticks held as suspect (also counted in the engine's `rejected`)
        self.jumped: set[int] = set()  # instruments whose price jumped by an accepted move: rebuild holders
        self._alerts, self._reject = alerts, reject

    def band_of(self, sym: str) -> float:
        """The band of an instrument: its own, else its sector's, else the default; 0 (off) -> inf."""
        b = self.config.syms.get(sym)
        if b is None:
            b = self.config.sectors.get(self.sectors.get(sym, ""), self.config.default)
        return float(b) if b > 0 else math.inf

    def add(self, syms: Sequence[str], price: np.ndarray) -> None:
        """New instruments (appended to the engine's syms already), accepted at `price`."""
        self.ref_price = np.concatenate([self.ref_price, price])
        self.band = np.concatenate([self.band, [self.band_of(s) for s in syms]])
        self.suspect_mask = np.concatenate([self.suspect_mask, np.zeros(len(syms), dtype=np.bool_)])

    def check(self, ix: np.ndarray, price: np.ndarray, seq: np.ndarray) -> np.ndarray | None:
        """None when every tick is inside its instrument's band, measured from the tick before it (the
        common case: one pass of kernels.band_scan, which moves the references); else the mask of the
        ticks to apply, the ticks from the first one outside decided one by one (`walk`)."""
        k = kernels.band_scan(ix, price, self.ref_price, self.band, self.suspect_mask)
        if k == len(ix):
            return None
        keep = np.ones(len(ix), dtype=np.bool_)
        keep[k:] = self.walk(ix[k:], price[k:], seq[k:])
        return keep

    def walk(self, ix: np.ndarray, price: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """The band tick by tick: inside (from the last accepted price) -> accepted, ending any suspicion;
        outside -> held as suspect, or, as the confirm_ticks-th consecutive tick agreeing with the first
        suspect price (within the band of it), accepted as the new level."""
        keep = np.ones(len(ix), dtype=np.bool_)
        need = self.config.confirm_ticks
        for i, (j, p, q) in enumerate(zip(ix.tolist(), price.tolist(), seq.tolist(), strict=True)):
            r, b = float(self.ref_price[j]), float(self.band[j])
            sus = self.suspects.get(j)
            if not abs(p - r) > b * r:  # inside the band (or no reference yet)
                self.ref_price[j] = p
                if sus is not None:
                    self._end_suspicion(j, p, q, f"back inside the band at {p:,.6g}")
                continue
            if sus is not None and abs(p - sus.first) <= b * sus.first:
                sus.count += 1
                sus.last = p
            else:  # a first suspect tick, or one disagreeing with the held level: a new suspect level
                if sus is None:
                    how = f"{need} agreeing ticks or `marginflow prices accept {self.syms[j]}`"
                    self._data_alert(
                        j, "raised", p, q, f"{self._text(j, p, r, b)}: held as suspect (confirm: {how})"
                    )
                sus = self.suspects[j] = Suspect(p, p, 1, r)
                self.suspect_mask[j] = True
            if sus.count >= need:
                self.accept(j, p, q, f"confirmed by {need} consecutive agreeing ticks")
                continue
            keep[i] = False
            self.held_ticks += 1
            self._reject("price", q, f"{self._text(j, p, r, b)}: held as suspect ({sus.count} of {need})")
        return keep

    def accept(self, j: int, p: float, seq: int, how: str) -> None:
        """Price p becomes instrument j's accepted price (a jump): the engine rebuilds the holders' risk
        state after the step that applies it (`jumped`: no residue of a large rank-one update)."""
        self.ref_price[j] = p
        if j in self.suspects:
            self._end_suspicion(j, p, seq, how)
        self.jumped.add(j)

    def _text(self, j: int, p: float, r: float, b: float) -> str:
        return (
            f"{self.syms[j]} price {p:,.6g} moved {p / r - 1:+.1%} from the last accepted {r:,.6g}, "
            f"outside the {b:.0%} band"
        )

    def _data_alert(self, j: int, state: str, value: float, seq: int, text: str) -> None:
        self._alerts.append(
            {
                "account": ALL_ACCOUNTS,
                "rule": f"{BAND_RULE}:{self.syms[j]}",
                "kind": DATA_KIND,
                "state": state,
                "value": float(value),
                "threshold": float(self.band[j]) if math.isfinite(self.band[j]) else 0.0,
                "message": text,
                "last_seq": int(seq),
            }
        )

    def _end_suspicion(self, j: int, p: float, seq: int, how: str) -> None:
        sus = self.suspects.pop(j)
        self.suspect_mask[j] = False
        self._data_alert(
            j,
            "cleared",
            p,
            seq,
            f"{self.syms[j]}: suspect price {sus.last:,.6g} (from "
            f"{sus.reference:,.6g}) {how}; price in force {p:,.6g}",
        )
