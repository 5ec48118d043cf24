"""Prometheus metrics of every process, defined here and nowhere else, and the three HTTP paths each
process serves beside its websocket: `/metrics` (the Prometheus text format; any valid token), `/healthz`
(the process is alive: 200) and `/readyz` (ready to serve, Kubernetes' meaning: 200, else 503 with the
reason; tickerplant: journal open; rdb: the journal replayed; calc: replayed and not stalled).

Counting costs nothing per event: what a process already counts (the tickerplant core's rows and refusals,
the rdb service's queries, calc's engine and webhook counters) is read when Prometheus scrapes
(`ProcessMetrics.read`); what must be observed (latencies, fsync times, rows per batch) is observed once
per batch, publish or request. Each process has its own registry (tests run several in one interpreter).

`marginflow up` does not serve HTTP: it hands each child the number of times it restarted it
($MARGINFLOW_RESTARTS) and the child exports it as `marginflow_restarts{process}`.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from marginflow import auth
from schemas.rest import Health
from schemas.tables import DATA_KIND

RESTARTS_ENV = "MARGINFLOW_RESTARTS"  # set by `marginflow up` for each child it starts
PATHS = ("/metrics", "/healthz", "/readyz")
# seconds: 100 us .. 10 s (a what-if is ~1 ms, an event -> margin row a few ms, an fsync 1-20 ms)
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
)
Ready = Callable[[], str]  # "" when ready, else why not


class _Read(Collector):
    """Metric families made when Prometheus scrapes, from state the process keeps anyway."""

    def __init__(self, make: Callable[[], Iterable[Metric]]):
        self.make = make

    def collect(self) -> Iterator[Metric]:
        yield from self.make()

    def describe(self) -> list[Metric]:
        return []  # (not called at registration: the state may not exist yet)


def counter(name: str, doc: str, labels: Sequence[str], values: dict[tuple[str, ...], float] | Any) -> Metric:
    m = CounterMetricFamily(name, doc, labels=list(labels))
    for key, v in values.items():
        m.add_metric(list(key) if isinstance(key, tuple) else [key], v)
    return m


def gauge(
    name: str, doc: str, value: float | None = None, labels: Sequence[str] = (), values: Any = None
) -> Metric:
    m = GaugeMetricFamily(name, doc, value=value, labels=list(labels) if value is None else None)
    for key, v in (values or {}).items():
        m.add_metric(list(key) if isinstance(key, tuple) else [key], v)
    return m


class ProcessMetrics:
    """A process's registry: `marginflow_restarts`, plus what the subclass defines."""

    def __init__(self, process: str):
        self.process = process
        self.registry = CollectorRegistry()
        restarts = Gauge(
            "marginflow_restarts",
            "times `marginflow up` restarted this process before this start",
            ["process"],
            registry=self.registry,
        )
        restarts.labels(process).set(int(os.environ.get(RESTARTS_ENV) or 0))

    def read(self, make: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Read(make))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TickerplantMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__("tp")
        r = self.registry
        self.fsync_seconds = Histogram(
            "marginflow_tp_fsync_seconds",
            "time of one journal fsync (all files)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cutoffs = Counter(
            "marginflow_tp_subscriber_cutoffs", "slow subscribers disconnected (queue full)", registry=r
        )

    def watch(
        self, core: Any, journal_bytes: Callable[[], dict[str, int]], depths: Callable[[], dict[int, int]]
    ) -> None:
        """Read at scrape: the core's counters, the journal's sizes, each subscriber's queue depth."""

        def make() -> Iterator[Metric]:
            yield counter(
                "marginflow_tp_messages_received",
                "upd messages accepted for journaling",
                (),
                {(): core.messages},
            )
            yield counter("marginflow_tp_rows_journaled", "rows journaled", ["table"], core.journaled)
            yield counter(
                "marginflow_tp_rejected",
                "messages refused, by reason and table",
                ["reason", "table"],
                core.rejected,
            )
            yield gauge(
                "marginflow_tp_journal_bytes",
                "bytes of today's journal file",
                labels=["table"],
                values=journal_bytes(),
            )
            yield gauge("marginflow_tp_last_seq", "last seq stamped", core.last_seq)
            q = depths()
            yield gauge("marginflow_tp_subscribers", "subscribed connections", len(q))
            yield gauge(
                "marginflow_tp_subscriber_queue_frames",
                "frames queued for a subscriber",
                labels=["conn"],
                values={str(c): d for c, d in q.items()},
            )
            yield gauge(
                "marginflow_tp_subscriber_queue_max_frames",
                "deepest subscriber queue",
                max(q.values(), default=0),
            )

        self.read(make)


class RdbMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__("rdb")
        r = self.registry
        self.rows_applied = Counter(
            "marginflow_rdb_rows_applied", "rows appended (published or replayed)", ["table"], registry=r
        )
        self.query_seconds = Histogram(
            "marginflow_rdb_query_seconds",
            "time to answer one request frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch(self, service: Any, recovery: Any) -> None:
        def make() -> Iterator[Metric]:
            outcomes = {("ok",): service.queries, **{(k,): v for k, v in service.errors.items()}}
            yield counter(
                "marginflow_rdb_queries",
                "queries answered, by outcome (ok or the error kind)",
                ["outcome"],
                outcomes,
            )
            yield gauge(
                "marginflow_rdb_ready",
                "1 when the journal is replayed (queries answer)",
                float(ready_state(recovery) == ""),
            )
            yield counter(
                "marginflow_rdb_recoveries", "journal replays finished", (), {(): recovery.recoveries}
            )

        self.read(make)


def ready_state(recovery: Any) -> str:
    """The rdb's readiness: "" once it holds the whole day (or stands alone), else why not."""
    return (
        "" if recovery.state in ("live", "standalone") else f"rdb {recovery.state}: {recovery.reason}".strip()
    )


# ---- calc --------------------------------------------------------------------------------------------
# the engine's refusal texts (calc/engine.py, band.py, optionbook.py, margin_rows.py) -> a reason label
_REASONS = (
    ("unknown account", "unknown_account"),
    ("unknown sym", "unknown_sym"),
    ("side ", "bad_side"),
    ("qty ", "bad_qty"),
    ("no risk parameters", "no_risk_parameters"),
    ("quote for", "no_implied_vol"),
    ("price ", "bad_price"),
)


def reject_reason(entry: str) -> tuple[str, str]:
    """(what, reason) of one of the engine's `rejects` entries ("fill seq 12: unknown sym 'X'")."""
    what, _, rest = entry.partition(" seq ")
    reason = rest.partition(": ")[2]
    if "held as suspect" in reason:
        return what, "suspect_price"
    if "not finite after" in reason:
        return what, "not_finite"
    return what, next((name for prefix, name in _REASONS if reason.startswith(prefix)), "other")


class BatchHistogram:
    """A histogram whose observations are appended to a list (~50 ns, no lock) and folded into the bucket
    counts with numpy when scraped (or every 4,096): for calc's per-batch and per-publish latencies, where
    prometheus_client's Histogram.observe (~5 us) would cost more than the rest of the bookkeeping."""

    FOLD = 4096

    def __init__(self, name: str, doc: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.doc = name, doc
        self.bounds = np.array(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.pending: list[float] = []

    def add(self, seconds: float) -> None:
        self.pending.append(seconds)
        if len(self.pending) >= self.FOLD:
            self.fold()

    def fold(self) -> None:
        values, self.pending = np.array(self.pending, dtype=np.float64), []
        if len(values):
            index = np.searchsorted(self.bounds, values, side="left")  # le semantics: x <= bound
            self.counts += np.bincount(index, minlength=len(self.counts))
            self.sum += float(values.sum())

    def metric(self) -> Metric:
        self.fold()
        cumulative = np.cumsum(self.counts).tolist()
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


class CalcMetrics(ProcessMetrics):
    """calc's metrics. The per-batch path (`batch`, `published`) keeps plain ints and BatchHistograms,
    exported when scraped; refusals, alerts, what-ifs and REST requests (rare) use prometheus_client."""

    def __init__(self, tables: Sequence[str]) -> None:
        super().__init__("calc")
        r = self.registry
        self.applied = dict.fromkeys(tables, 0)  # input rows applied, per table
        self.rejected_rows = dict.fromkeys(tables, 0)
        self.rejected = Counter(
            "marginflow_calc_rejected",
            "input rows refused, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.event_to_margin = BatchHistogram(
            "marginflow_calc_event_to_margin_seconds",
            "tickerplant stamp of a live batch's newest event -> calc's publish of its margin rows",
        )
        self.publish_seconds = BatchHistogram(
            "marginflow_calc_publish_seconds", "one publish: margin rows, alerts, fan-out, journal"
        )
        self.what_if_seconds = Histogram(
            "marginflow_calc_what_if_seconds",
            "one what-if (engine)",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            "marginflow_calc_alerts", "alerts raised and cleared", ["rule", "state"], registry=r
        )
        self.rest_requests = Counter(
            "marginflow_calc_rest_requests",
            "REST API requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self._stamps: list[
            int
        ] = []  # newest event time (ns) of each live batch applied since the last publish

    def batch(
        self, table: str, rows: int, rejected: int, rejects: Sequence[str], newest_ns: int | None
    ) -> None:
        """One applied batch: `rejected` of its rows refused (the last entries of the engine's `rejects`);
        `newest_ns` its newest event's tickerplant stamp when live (measured at the next publish)."""
        if rejected:
            self.rejected_rows[table] += rejected
            recent = list(rejects)[-rejected:] if rejected <= len(rejects) else list(rejects)
            for (what, why), n in Tally(reject_reason(e) for e in recent).items():
                self.rejected.labels(what, why).inc(n)
            if rejected > len(recent):
                self.rejected.labels(table, "other").inc(rejected - len(recent))
        self.applied[table] += rows - rejected
        if newest_ns is not None:
            self._stamps.append(newest_ns)

    def alert(self, row: dict[str, Any]) -> None:
        """One alert row raised or cleared, by rule and state; a data alert by its rule's family
        (price-band, params:span), not its instrument or file name: a label set that stays bounded."""
        rule = row["rule"]
        if row.get("kind") == DATA_KIND and ":" in rule:
            rule = rule.rpartition(":")[0]
        self.alerts.labels(rule, row["state"]).inc()

    def published(self, now_ns: int, seconds: float) -> None:
        stamps, self._stamps = self._stamps, []
        for t in stamps:
            self.event_to_margin.add(max(0.0, (now_ns - t) / 1e9))
        self.publish_seconds.add(seconds)

    def watch(self, service: Any) -> None:
        def make() -> Iterator[Metric]:
            eng = service.engine
            rows = {(t, "applied"): n for t, n in self.applied.items()}
            rows.update({(t, "rejected"): n for t, n in self.rejected_rows.items()})
            doc = "input rows from the tickerplant, by outcome"
            yield counter("marginflow_calc_events", doc, ["table", "outcome"], rows)
            yield self.event_to_margin.metric()
            yield self.publish_seconds.metric()
            yield counter(
                "marginflow_calc_margin_rows", "margin rows published", (), {(): service.published_rows}
            )
            yield gauge("marginflow_calc_live", "1 once the journal is replayed", float(service.live))
            yield gauge(
                "marginflow_calc_ready", "1 when /readyz says ready", float(service.readiness() == "")
            )
            yield gauge("marginflow_calc_accounts", "accounts margined", len(eng.accounts))
            yield gauge("marginflow_calc_last_seq", "seq of the last event applied", eng.last_seq)
            yield gauge("marginflow_calc_clients", "websocket clients connected", len(service.peers))
            sent = {}
            queued = {}
            for name, d in service.deliveries().items():
                sent.update(
                    {(name, "sent"): d.sent, (name, "failed"): d.failed, (name, "dropped"): d.dropped}
                )
                queued[(name,)] = d.queue.qsize()
            yield counter(
                "marginflow_calc_alert_deliveries",
                "alert deliveries by channel and outcome",
                ["channel", "outcome"],
                sent,
            )
            yield gauge(
                "marginflow_calc_alert_delivery_queue",
                "alerts waiting for delivery",
                labels=["channel"],
                values=queued,
            )

        self.read(make)


# ---- HTTP beside a websocket server (websockets' process_request) -----------------------------------------
def _json(status: int, body: msgspec.Struct) -> Response:
    reason = "OK" if status == 200 else "Service Unavailable"
    return Response(status, reason, Headers({"Content-Type": "application/json"}), msgspec.json.encode(body))


def http_response(
    connection: Any, request: Request, gate: auth.Gate, metrics: ProcessMetrics, ready: Ready
) -> Response | None:
    """The answer to GET /metrics, /healthz or /readyz (not a websocket upgrade); None for anything else.
    Every request passes the gate's Origin and no-token-in-URL checks; /metrics needs a valid token of any
    role (a Prometheus scrape config's `authorization` with a token file)."""
    path = urlparse(request.path).path
    if path not in PATHS or request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    host = auth.peer_host(connection)
    if path == "/metrics":
        outcome = gate.handshake(host, request.headers, request.path, any_role=True)
        if isinstance(outcome, auth.Refusal):
            return auth.respond(connection, outcome)
        return Response(200, "OK", Headers({"Content-Type": CONTENT_TYPE_LATEST}), metrics.exposition())
    refusal = gate.request(host, request.headers, request.path)
    if refusal is not None:
        return auth.respond(connection, refusal)
    if path == "/healthz":
        return _json(200, Health(status="ok"))
    why = ready()
    return _json(503, Health(status="not ready", reason=why)) if why else _json(200, Health(status="ok"))


def process_request(gate: auth.Gate, metrics: ProcessMetrics, ready: Ready) -> Any:
    """auth.process_request(gate) with /metrics, /healthz and /readyz answered first."""
    inner = auth.process_request(gate)

    def hook(connection: Any, request: Request) -> Any:
        response = http_response(connection, request, gate, metrics, ready)
        return inner(connection, request) if response is None else response

    return hook
