"""What a screen that subscribes is sent first, so it starts with the whole day: today's alerts, the latest
forecast per account and horizon, today's call checks. Kept by calc from its own rows and by the front
(calc/front.py) from every shard's rows in the tickerplant; plain data, no I/O."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from calc.api import Client, rows_as_dicts
from schemas import calc as api

ALERTS_KEPT, CHECKS_KEPT = 1000, 5000  # the newest rows a new screen gets


class Today:
    def __init__(self) -> None:
        self.alerts: deque[dict] = deque(maxlen=ALERTS_KEPT)
        self.forecasts: dict[tuple[str, str], dict] = {}  # (account, horizon) -> its latest forecast row
        self.callchecks: deque[dict] = deque(maxlen=CHECKS_KEPT)

    def add(self, table: str, cols: Mapping[str, Sequence[Any]]) -> None:
        """Rows (columns, `time` included) of the alert, forecast or callcheck table; others are ignored."""
        if table == "alert":
            self.alerts.extend(rows_as_dicts(cols))
        elif table == "forecast":
            for row in rows_as_dicts(cols):
                self.forecasts[(row["account"], row["horizon"])] = row
        elif table == "callcheck":
            self.callchecks.extend(rows_as_dicts(cols))

    def check_columns(self, names: Sequence[str]) -> dict[str, list]:
        """Today's call checks as columns `names` (the parallel run's accuracy reads them)."""
        return {c: [r[c] for r in self.callchecks] for c in names}

    def for_subscriber(self, client: Client) -> list[api.ApiMsg]:
        """The updates a client that just subscribed is sent: the kept rows of the accounts it follows."""
        out: list[api.ApiMsg] = []
        for rows, update in (
            (self.alerts, api.AlertUpdate),
            (self.forecasts.values(), api.ForecastUpdate),
            (self.callchecks, api.CallcheckUpdate),
        ):
            mine = [r for r in rows if client.follows(r["account"])]
            if mine:
                out.append(update(rows=mine))  # type: ignore[call-arg]
        return out
