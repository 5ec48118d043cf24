"""Alert rules over published margins: level, utilisation, jump within a time window, predicted call.

Each (account, rule) is raised once when its value crosses the threshold and cleared once when it
falls back below the clear level (hysteresis), so a margin hovering at a threshold alerts once. A rule's
`min_hold_s` keeps a raised alert raised (and a cleared one cleared) at least that long, in event time
(the margin rows' clock, not the wall clock: a replay decides the same), so a margin swinging across a
threshold every few seconds raises once a minute at most, not every few seconds.

A rule is a config struct (marginflow.config.AlertRuleConfig: its fields, checks and clear level); the
kinds are schemas.tables.RuleKind. Data alerts (kind "data", raised by calc/band.py when a tick is held
as suspect, and by calc/watch.py when a parameter file is refused) concern an instrument or a file, not an
account: their account is ALL_ACCOUNTS ("*"), every desk.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from marginflow.config import AlertRuleConfig

ALL_ACCOUNTS = "*"  # the account of an alert row meant for every desk (as "*" in a token's accounts)
NS_PER_MINUTE = 60_000_000_000
NS_PER_SECOND = 1_000_000_000


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

    def __init__(self, rules: Sequence[AlertRuleConfig]):  # (names unique: CalcConfig checks)
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
            if (r.accounts and account not in r.accounts) or r.kind == "predicted_call":
                continue  # (predicted_call rules watch the forecast rows: evaluate_forecast)
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
                clear = r.clear_level * collateral
            else:  # jump
                w = self.windows.setdefault(key, _Window())
                low = w.add(now, margin, int(r.window_minutes * NS_PER_MINUTE))
                value = margin / low - 1.0 if low > 0 else 0.0
                thr, clear = r.threshold, r.clear_level
            row = self._crossing(r, key, up, value, thr, clear, now)
            if row is not None:
                state, word = row
                text = _describe(r, word, margin, collateral, value, thr, low)
                out.append(_row(account, r, state, value, thr, f"{account}: {text}", seq))
        return out

    def _crossing(
        self,
        r: AlertRuleConfig,
        key: tuple[str, str],
        up: bool,
        value: float,
        thr: float,
        clear: float,
        now: int,
    ) -> tuple[str, str] | None:
        """(state, word) when `value` crosses the rule's threshold (raised) or clear level (cleared) and
        the alert has held its state for min_hold_s; else None."""
        if not up and value > thr:
            state, word = "raised", "above"
        elif up and value < clear:
            state, word = "cleared", "back below"
        else:
            return None  # no crossing: nothing to say (the message is built only for a crossing)
        since = self.changed_at.get(key)
        if since is not None and now - since < r.min_hold_s * NS_PER_SECOND:
            self.held += 1  # raised (or cleared) too recently: hold the state, look again at the next row
            return None
        self.raised[key] = state == "raised"
        self.changed_at[key] = now
        return state, word

    def evaluate_forecast(
        self,
        account: str,
        call_p50: float,
        call_p95: float,
        lead_s: float,
        cycle: str,
        now: int,
        seq: int,
        detail: str = "",
    ) -> list[dict[str, Any]]:
        """predicted_call rules on an account's forecast for its CCP's next cycle: raised when the
        projected call (P50) exceeds the threshold (an amount), with the lead time; `detail` (drivers,
        stress results) is appended to the message."""
        out: list[dict[str, Any]] = []
        for r in self.rules:
            if r.kind != "predicted_call" or (r.accounts and account not in r.accounts):
                continue
            key = (account, r.name)
            up = self.raised.get(key, False)
            row = self._crossing(r, key, up, call_p50, r.threshold, r.clear_level, now)
            if row is not None:
                state, word = row
                text = (
                    f"{account}: projected call {call_p50:,.0f} (P95 {call_p95:,.0f}) at {cycle} in "
                    f"{_duration(lead_s)}, {word} {r.threshold:,.0f}" + (f"; {detail}" if detail else "")
                )
                out.append(_row(account, r, state, call_p50, r.threshold, text, seq))
        return out


def _row(
    account: str, r: AlertRuleConfig, state: str, value: float, thr: float, message: str, seq: int
) -> dict[str, Any]:
    return {
        "account": account,
        "rule": r.name,
        "kind": r.kind,
        "state": state,
        "value": float(value) if math.isfinite(value) else 1e300,
        "threshold": float(thr),
        "message": message,
        "last_seq": int(seq),
    }


def _duration(seconds: float) -> str:
    m = max(int(seconds // 60), 0)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m} min"


def _describe(
    r: AlertRuleConfig, word: str, margin: float, collateral: float, value: float, thr: float, low: float
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
