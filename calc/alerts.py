"""Alert rules over published margins: level, utilisation, jump within a time window, predicted call.

Each (account, rule) is raised once when its value crosses the threshold and cleared once when it
falls back below the clear level (hysteresis), so a margin hovering at a threshold alerts once. A rule's
`min_hold_s` keeps a raised alert raised (and a cleared one cleared) at least that long, in event time
(the margin rows' clock, not the wall clock: a replay decides the same), so a margin swinging across a
threshold every few seconds raises once a minute at most, not every few seconds.

Data alerts (kind "data", raised by calc/engine.py when a tick is held as suspect) concern an
instrument, not an account: their account is ALL_ACCOUNTS ("*"), meant for every desk.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("level", "utilisation", "jump", "call")
DATA_KIND = "data"  # alerts about market data (calc/engine.py's acceptance band), not about a rule of config
ALL_ACCOUNTS = "*"  # the account of an alert row meant for every desk (as "*" in a token's accounts)
NS_PER_MINUTE = 60_000_000_000
NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class AlertRule:
    """`threshold`: level -> margin amount; utilisation -> margin/collateral; jump -> relative rise of
    the margin over its lowest value within `window_minutes`; call -> multiple of collateral (1.0 =
    margin above collateral). Cleared below `clear` (default threshold * (1 - hysteresis))."""

    name: str
    kind: str
    threshold: float
    clear: float | None = None
    hysteresis: float = 0.05
    window_minutes: float = 5.0
    accounts: tuple[str, ...] = ()
    webhook: str = ""  # http(s) URL each raised / cleared alert of this rule is POSTed to ("" = none)
    min_hold_s: float = (
        60.0  # event-time seconds between a raise and its clear, or a clear and the next raise
    )

    def __post_init__(self) -> None:
        where = f"calc.alerts[{self.name!r}]"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"{where}: threshold must be a finite number, got {self.threshold!r}")
        if not (0.0 <= self.hysteresis < 1.0):
            raise ValueError(f"{where}: hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if self.clear is not None and not (math.isfinite(self.clear) and self.clear <= self.threshold):
            raise ValueError(f"{where}: clear must be a finite number <= threshold, got {self.clear!r}")
        if self.webhook and not self.webhook.startswith(("http://", "https://")):
            raise ValueError(f"{where}: webhook must be an http:// or https:// URL, got {self.webhook!r}")
        if not (math.isfinite(self.min_hold_s) and self.min_hold_s >= 0):
            raise ValueError(f"{where}: min_hold_s must be a finite number >= 0, got {self.min_hold_s!r}")
        if self.kind == "jump" and not self.window_minutes > 0:
            raise ValueError(f"{where}: window_minutes must be > 0, got {self.window_minutes!r}")

    @property
    def clear_level(self) -> float:
        return self.clear if self.clear is not None else self.threshold * (1.0 - self.hysteresis)

    @classmethod
    def from_config(cls, c: Any) -> AlertRule:
        get = c.get if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
        return cls(
            name=str(get("name")),
            kind=str(get("kind")),
            threshold=float(get("threshold")),
            clear=None if get("clear") is None else float(get("clear")),
            hysteresis=float(get("hysteresis", 0.05)),
            window_minutes=float(get("window_minutes", 5.0)),
            accounts=tuple(get("accounts", ()) or ()),
            webhook=str(get("webhook", "") or ""),
            min_hold_s=float(get("min_hold_s", 60.0)),
        )


@dataclass
class _Window:
    """Published margins of one account: `seen` (time, margin) oldest first, pruned to the value in
    force at the window start and later; `mins` a monotonic deque for the minimum over them."""

    seen: deque[tuple[int, float]] = field(default_factory=deque)
    mins: deque[tuple[int, float]] = field(default_factory=deque)

    def add(self, t: int, m: float, width: int) -> float:
        """Record margin m at time t; the lowest margin in force during [t - width, t]."""
        self.seen.append((t, m))
        while self.mins and self.mins[-1][1] >= m:
            self.mins.pop()
        self.mins.append((t, m))
        start = t - width
        while len(self.seen) >= 2 and self.seen[1][0] <= start:
            self.seen.popleft()
        t0, m0 = self.seen[0]  # in force at the window start (or the first value ever)
        while self.mins and self.mins[0][0] <= start:
            self.mins.popleft()
        return min(m0, self.mins[0][1]) if self.mins else m0


class AlertBook:
    """Evaluates rules per published margin row; returns alert rows (dicts of the alert columns)."""

    def __init__(self, rules: Sequence[AlertRule]):
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"calc.alerts: rule names must be unique, got {names}")
        self.rules = list(rules)
        self.raised: dict[tuple[str, str], bool] = {}
        self.changed_at: dict[tuple[str, str], int] = {}  # event time (ns) of the last raise or clear
        self.held = 0  # crossings not acted on because the alert was still within min_hold_s
        self.windows: dict[tuple[str, str], _Window] = {}

    def evaluate(
        self, account: str, margin: float, collateral: float, now: int, seq: int
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for r in self.rules:
            if r.accounts and account not in r.accounts:
                continue
            key = (account, r.name)
            up = self.raised.get(key, False)
            low = 0.0
            if r.kind == "level":
                value, thr, clear = margin, r.threshold, r.clear_level
            elif r.kind == "utilisation":
                value = margin / collateral if collateral > 0 else math.inf
                thr, clear = r.threshold, r.clear_level
            elif r.kind == "call":
                value, thr = margin, r.threshold * collateral
                clear = (r.clear if r.clear is not None else r.threshold * (1.0 - r.hysteresis)) * collateral
            else:  # jump
                w = self.windows.setdefault(key, _Window())
                low = w.add(now, margin, int(r.window_minutes * NS_PER_MINUTE))
                value = margin / low - 1.0 if low > 0 else 0.0
                thr, clear = r.threshold, r.clear_level
            if not up and value > thr:
                state, word = "raised", "above"
            elif up and value < clear:
                state, word = "cleared", "back below"
            else:
                continue  # no crossing: nothing to say (the message is built only for a crossing)
            since = self.changed_at.get(key)
            if since is not None and now - since < r.min_hold_s * NS_PER_SECOND:
                self.held += 1  # raised (or cleared) too recently: hold the state, look again at the next row
                continue
            self.raised[key] = state == "raised"
            self.changed_at[key] = now
            out.append(
                {
                    "account": account,
                    "rule": r.name,
                    "kind": r.kind,
                    "state": state,
                    "value": float(value) if math.isfinite(value) else 1e300,
                    "threshold": float(thr),
                    "message": f"{account}: {_describe(r, word, margin, collateral, value, thr, low)}",
                    "last_seq": int(seq),
                }
            )
        return out


def _describe(
    r: AlertRule, word: str, margin: float, collateral: float, value: float, thr: float, low: float
) -> str:
    """The human part of an alert message; `word` is "above" or "back below"."""
    if r.kind == "level":
        return f"margin {margin:,.2f} {word} level {thr:,.2f}"
    if r.kind == "utilisation":
        return f"utilisation {value:.1%} {word} {thr:.1%}"
    if r.kind == "call":
        return f"predicted call: margin {margin:,.2f} {word} {r.threshold:g} x collateral {collateral:,.2f}"
    return f"margin rose {value:.1%} from {low:,.2f} within {r.window_minutes:g} min ({word} {thr:.1%})"


class AlertLedger:
    """The state each (account, rule) alert last had in the journal, so that a restarted calc does not raise
    again what it raised before it stopped (its rules start blank and would): `restore` takes journaled alert
    rows (the replay), `changes` keeps only the rows that change a state and records them."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, str], str] = {}
        self.repeats = 0  # rows dropped because the journal already had that state

    def restore(self, accounts: Sequence[str], rules: Sequence[str], states: Sequence[str]) -> None:
        for key, state in zip(zip(accounts, rules, strict=True), states, strict=True):
            self.state[key] = state

    def changes(self, cols: dict[str, list]) -> dict[str, list]:
        keep = []
        for i, key in enumerate(zip(cols["account"], cols["rule"], strict=True)):
            if self.state.get(key) != cols["state"][i]:
                self.state[key] = cols["state"][i]
                keep.append(i)
        self.repeats += len(cols["account"]) - len(keep)
        return (
            cols if len(keep) == len(cols["account"]) else {k: [v[i] for i in keep] for k, v in cols.items()}
        )
