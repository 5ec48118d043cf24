"""When a CCP calculates and calls, and what it would call: its cycle schedule in its own time zone, the
next / end-of-day / next-day cycles for any UTC instant, and the call a requirement makes. Plain functions.

    sched = Schedule.of(ccp_config)           # a [[calc.ccps]] entry (marginflow/config.py CcpConfig)
    sched.horizons(now_ns)                    # {"next": CycleAt, "eod": CycleAt, "t+1": CycleAt}
    call_amount(requirement, collateral, mta) # > 0 the member pays, < 0 the CCP returns, 0 below the MTA

Business days are Monday to Friday less the CCP's holidays; a cycle's business date is its local date. A
cycle at an instant is "past" from that instant on (`next` is strictly after `now`). Local times that a
daylight-saving change skips or repeats are taken as zoneinfo does (fold 0: the earlier offset).
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from marginflow.config import CcpConfig
from schemas.tables import HORIZONS

NS = 1_000_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SEARCH_DAYS = 15  # business days are found within this many calendar days (a long holiday run)


@dataclass(frozen=True)
class CycleAt:
    """One run of a cycle: the CCP, the cycle's name, its business date (local, ISO) and UTC time."""

    ccp: str
    name: str
    business_date: str
    time_ns: int
    end_of_day: bool


def ns_of(t: dt.datetime) -> int:
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * NS + d.microseconds * 1000


class Schedule:
    """A CCP's cycles as instants. Build with `Schedule.of(cfg)`; the config has been checked on load."""

    def __init__(self, cfg: CcpConfig) -> None:
        self.ccp = cfg.name
        self.zone = zoneinfo.ZoneInfo(cfg.timezone)
        self.times = [(c.name, dt.time.fromisoformat(c.time)) for c in cfg.cycles]
        self.holidays = frozenset(dt.date.fromisoformat(d) for d in cfg.holidays)
        self.rounding = cfg.rounding
        self.minimum_transfer = cfg.minimum_transfer
        self.on = lru_cache(maxsize=64)(self._cycles_on)

    @classmethod
    def of(cls, cfg: CcpConfig) -> Schedule:
        return cls(cfg)

    def business_day(self, day: dt.date) -> bool:
        return day.weekday() < 5 and day not in self.holidays

    def _cycles_on(self, day: dt.date) -> tuple[CycleAt, ...]:
        if not self.business_day(day):
            return ()
        last = len(self.times) - 1
        return tuple(
            CycleAt(
                self.ccp,
                name,
                day.isoformat(),
                ns_of(dt.datetime.combine(day, t, tzinfo=self.zone)),
                i == last,
            )
            for i, (name, t) in enumerate(self.times)
        )

    def local_date(self, now_ns: int) -> dt.date:
        return (_EPOCH + dt.timedelta(microseconds=now_ns // 1000)).astimezone(self.zone).date()

    def next(self, now_ns: int) -> CycleAt:
        """The first cycle strictly after `now_ns`."""
        day = self.local_date(now_ns) - dt.timedelta(
            days=1
        )  # a cycle late in the evening may be "tomorrow" UTC
        for k in range(_SEARCH_DAYS + 1):
            for c in self.on(day + dt.timedelta(days=k)):
                if c.time_ns > now_ns:
                    return c
        raise ValueError(
            f"ccp {self.ccp}: no business day within {_SEARCH_DAYS} days of {self.local_date(now_ns)}"
        )

    def previous(self, now_ns: int) -> CycleAt | None:
        """The last cycle at or before `now_ns` (None if none within the search window)."""
        day = self.local_date(now_ns) + dt.timedelta(days=1)
        for k in range(_SEARCH_DAYS + 1):
            for c in reversed(self.on(day - dt.timedelta(days=k))):
                if c.time_ns <= now_ns:
                    return c
        return None

    def end_of_day(self, business_date: str) -> CycleAt:
        return self.on(dt.date.fromisoformat(business_date))[-1]

    def next_business_eod(self, business_date: str) -> CycleAt:
        """The end-of-day cycle of the business day after `business_date`."""
        day = dt.date.fromisoformat(business_date)
        for k in range(1, _SEARCH_DAYS + 1):
            cycles = self.on(day + dt.timedelta(days=k))
            if cycles:
                return cycles[-1]
        raise ValueError(f"ccp {self.ccp}: no business day within {_SEARCH_DAYS} days after {business_date}")

    def horizons(self, now_ns: int) -> dict[str, CycleAt]:
        """The forecast's targets: the next cycle, the end of day of its business day, and the next
        business day's end of day (T+1 from the end of day)."""
        nxt = self.next(now_ns)
        eod = self.end_of_day(nxt.business_date)
        out = {"next": nxt, "eod": eod, "t+1": self.next_business_eod(eod.business_date)}
        assert tuple(out) == HORIZONS
        return out

    def find(self, business_date: str, name: str) -> CycleAt | None:
        """The cycle `name` on `business_date`, or None (unknown name, not a business day)."""
        try:
            day = dt.date.fromisoformat(business_date)
        except ValueError:
            return None
        return next((c for c in self.on(day) if c.name == name), None)

    def requirement(self, margin: float) -> float:
        return rounded_up(margin, self.rounding)

    def requirements(self, margin: np.ndarray) -> np.ndarray:
        """`requirement` of each margin (numpy; the same numbers as rounded_up)."""
        if self.rounding <= 0:
            return margin.astype(np.float64, copy=True)
        k = margin / self.rounding
        return np.ceil(k - 1e-9 * np.maximum(1.0, np.abs(k))) * self.rounding

    def call(self, requirement: float, collateral: float) -> float:
        return call_amount(requirement, collateral, self.minimum_transfer)


def rounded_up(x: float, step: float) -> float:
    """`x` rounded up to a multiple of `step` (step 0: unchanged). Rounding a requirement up is the
    CCP's conservative side; a hair above a multiple (1e-9 relative) is taken as that multiple."""
    if step <= 0 or not math.isfinite(x):
        return x
    k = x / step
    return math.ceil(k - 1e-9 * max(1.0, abs(k))) * step


def call_amount(requirement: float, collateral: float, minimum_transfer: float = 0.0) -> float:
    """What the CCP calls: requirement - collateral (> 0 the member pays, < 0 excess returned), or 0 when
    its size is below the minimum transfer amount."""
    diff = requirement - collateral
    return 0.0 if abs(diff) < minimum_transfer else diff
