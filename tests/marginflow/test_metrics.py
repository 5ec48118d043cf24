"""Prometheus metrics and the health paths on real servers (tickerplant, rdb, calc on ephemeral ports):
the counters and histograms move when events flow (scraped before and after), /metrics needs a token of
any role while /healthz and /readyz need none, /readyz says 503 while a process is not ready, calc's
refusal texts map to reason labels, and `marginflow up` hands each child its restart count."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from calc.engine import MarginEngine
from calc.server import CalcService
from marginflow import config, metrics
from marginflow.up import Child, Supervisor, free_port
from rdb.server import Rdb
from tests.support import ROOT, until
from tests.support.http import Http, get
from tests.support.rows import fills, trades
from tests.support.servers import running_system, tp_config
from tests.support.tokens import local_token
from tickerplant.client import Publisher
from tickerplant.server import TickerplantServer


async def scrape(port: int, token: str = "subscriber") -> dict[tuple[str, frozenset], float]:
    status, headers, body = await get("127.0.0.1", port, "/metrics", local_token(token))
    assert status == 200 and headers["content-type"].startswith("text/plain"), body
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"{name}{labels} not exported"
    return after[key] - before.get(key, 0.0)


def test_metrics_move_when_events_flow(tmp_path, run):
    async def body():
        async with running_system(tmp_path, tp={"fsync": "batch"}) as (srv, rdb, calc):
            assert await until(lambda: calc.live and rdb.recovery.state == "live")
            ports = {"tp": srv.port, "rdb": rdb.port, "calc": calc.port}
            before = {k: await scrape(p) for k, p in ports.items()}
            async with Publisher(f"ws://127.0.0.1:{srv.port}") as pub:
                await pub.upd("fill", fills(30, 0))
                await pub.upd("trade", trades(8))
                bad = dict(fills(1, 100), account=["NO-SUCH"])  # journaled, refused by calc
                await pub.upd("fill", bad)
                await pub.upd("trade", dict(trades(1), price=[-1.0]))  # refused by the tickerplant
                await pub.wait_acked()
            assert await until(lambda: rdb.store.max_seq["fill"] >= 31 and calc.engine.rejected >= 1)
            await asyncio.sleep(0.3)
            async with Http("127.0.0.1", calc.rest.port, local_token("desk:risk")) as h:
                what_if = {"account": "TECH01", "trades": [{"sym": "AAPL", "qty": 5}]}
                assert (await h.request("POST", "/v1/what-if", what_if))[0] == 200
                assert (await h.request("GET", "/v1/accounts/TECH01/history"))[0] == 200
            after = {k: await scrape(p) for k, p in ports.items()}
            return before, after

    before, after = run(body())
    tp, rdb, calc = ((before[k], after[k]) for k in ("tp", "rdb", "calc"))
    assert delta(*tp, "marginflow_tp_rows_journaled_total", table="fill") == 31
    assert delta(*tp, "marginflow_tp_rows_journaled_total", table="trade") == 8
    assert delta(*tp, "marginflow_tp_rejected_total", reason="bad_value", table="trade") == 1
    assert delta(*tp, "marginflow_tp_messages_received_total") >= 3  # (and calc's margin rows)
    assert delta(*tp, "marginflow_tp_fsync_seconds_count") >= 1
    assert delta(*tp, "marginflow_tp_journal_bytes", table="fill") > 0
    assert after["tp"][("marginflow_tp_subscribers", frozenset())] >= 2  # rdb and calc
    assert delta(*rdb, "marginflow_rdb_rows_applied_total", table="fill") == 31
    assert delta(*rdb, "marginflow_rdb_rows_applied_total", table="margin") > 0  # calc's rows, journaled
    assert delta(*rdb, "marginflow_rdb_queries_total", outcome="ok") == 1  # the history
    assert delta(*rdb, "marginflow_rdb_query_seconds_count") >= 1
    assert after["rdb"][("marginflow_rdb_ready", frozenset())] == 1
    assert delta(*calc, "marginflow_calc_events_total", table="fill", outcome="applied") == 30
    assert delta(*calc, "marginflow_calc_events_total", table="fill", outcome="rejected") == 1
    trade = {
        o: delta(*calc, "marginflow_calc_events_total", table="trade", outcome=o)
        for o in ("applied", "rejected")
    }
    assert trade == {"applied": 6, "rejected": 2}  # MSFT at 100: 58% below its last close, held as suspect
    assert delta(*calc, "marginflow_calc_rejected_total", kind="price", reason="suspect_price") == 2
    assert delta(*calc, "marginflow_calc_rejected_total", kind="fill", reason="unknown_account") == 1
    assert delta(*calc, "marginflow_calc_event_to_margin_seconds_count") >= 1
    assert delta(*calc, "marginflow_calc_publish_seconds_count") >= 1
    assert delta(*calc, "marginflow_calc_what_if_seconds_count", api="rest") == 1
    assert delta(*calc, "marginflow_calc_margin_rows_total") > 0
    assert delta(*calc, "marginflow_calc_rest_requests_total", endpoint="what-if", status="200") == 1
    assert after["calc"][("marginflow_calc_ready", frozenset())] == 1
    for process in ("tp", "rdb", "calc"):
        assert after[process][("marginflow_restarts", frozenset({("process", process)}))] == 0
    # every metric the sample Grafana dashboard charts is one the processes export
    exported = {name for scraped in after.values() for name, _ in scraped}
    charted = set(re.findall(r"marginflow_\w+", (ROOT / "docs" / "grafana-marginflow.json").read_text()))
    assert charted and {re.sub(r"_bucket$", "_count", n) for n in charted} <= exported


def test_metrics_need_a_token_and_health_paths_do_not(tmp_path, run):
    async def body():
        async with running_system(tmp_path) as (srv, rdb, calc):
            assert await until(lambda: calc.live and rdb.recovery.state == "live")
            out = {}
            for name, port in (("tp", srv.port), ("rdb", rdb.port), ("calc", calc.port)):
                out[name] = {
                    "none": (await get("127.0.0.1", port, "/metrics"))[0],
                    "wrong": (await get("127.0.0.1", port, "/metrics", "not-a-token"))[0],
                    "publisher": (await get("127.0.0.1", port, "/metrics", local_token("publisher")))[0],
                    "healthz": await get("127.0.0.1", port, "/healthz"),
                    "readyz": await get("127.0.0.1", port, "/readyz"),
                }
            out["health"] = (await get("127.0.0.1", calc.port, "/health"))[0]  # calc's own, unchanged
            return out

    out = run(body())
    for name in ("tp", "rdb", "calc"):
        got = out[name]
        assert (got["none"], got["wrong"], got["publisher"]) == (401, 401, 200), name
        for path in ("healthz", "readyz"):
            status, headers, payload = got[path]
            assert status == 200 and json.loads(payload)["status"] == "ok", (name, path)
    assert out["health"] == 200


def test_readyz_is_503_while_not_ready(tmp_path, run):
    async def body():
        rdb = Rdb(config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb")}}).rdb)
        rdb.recovery.begin("starting")  # as `marginflow rdb` does until its subscription has replayed
        await rdb.start()
        cfg = config.load(
            overrides={"tickerplant": {"port": free_port()}, "calc": {"port": 0, "rest_port": 0}}
        )
        calc = CalcService(cfg)  # its tickerplant is not there: never live
        await calc.start()
        try:
            out = {
                "rdb": [await get("127.0.0.1", rdb.port, p) for p in ("/healthz", "/readyz")],
                "calc": [await get("127.0.0.1", calc.port, p) for p in ("/healthz", "/readyz")],
            }
            ready = (await scrape(calc.port))[("marginflow_calc_ready", frozenset())]
            rdb.recovery.done()
            out["rdb_after"] = await get("127.0.0.1", rdb.port, "/readyz")
            return out, ready
        finally:
            await calc.stop()
            await rdb.stop()

    out, ready = run(body())
    for name, why in (("rdb", "recovering"), ("calc", "replaying the journal")):
        (alive, _, _), (status, _, payload) = out[name]
        assert alive == 200 and status == 503, name
        answer = json.loads(payload)
        assert answer["status"] == "not ready" and why in answer["reason"]
    assert ready == 0
    assert out["rdb_after"][0] == 200
    tp = TickerplantServer(tp_config(tmp_path / "journal"))  # not started: its journal is not open
    assert tp.readiness() == "journal not open"


def test_calc_refusals_map_to_reason_labels():
    eng = MarginEngine.from_config(config.load().calc)
    eng.apply_fills(
        ["NO-SUCH", "TECH01", "TECH01", "TECH01"],
        ["AAPL", "NOPE", "AAPL", "AAPL"],
        ["B", "B", "X", "B"],
        [1.0, 1.0, 1.0, 0.0],
        [100.0] * 4,
        [1, 2, 3, 4],
    )
    eng.apply_prices(["AAPL", "MSFT"], [-5.0, 10_000.0], [5, 6])  # a bad price, a jump held as suspect
    got = [metrics.reject_reason(e) for e in eng.rejects]
    assert got == [
        ("fill", "unknown_account"),
        ("fill", "unknown_sym"),
        ("fill", "bad_side"),
        ("fill", "bad_qty"),
        ("price", "bad_price"),
        ("price", "suspect_price"),
    ]


def test_up_hands_each_child_its_restart_count(tmp_path, run, monkeypatch):
    show = [sys.executable, "-c", f"import os; print(os.environ[{metrics.RESTARTS_ENV!r}])"]
    child = Child("show", [], tmp_path / "show.log", command=show)
    sup = Supervisor(config.load(), {}, [child])

    async def body():
        for restarts in (0, 2):
            child.restarts = restarts
            await sup.spawn(child)
            await child.proc.wait()

    run(body())
    assert (tmp_path / "show.log").read_text().split() == ["0", "2"]
    monkeypatch.setenv(metrics.RESTARTS_ENV, "2")
    assert b'marginflow_restarts{process="tp"} 2.0' in metrics.TickerplantMetrics().exposition()


def test_batch_histogram_counts_as_prometheus_histogram_does():
    """calc's folded histogram gives the buckets and sum prometheus_client's Histogram gives, bounds included
    (x <= le), across a fold in the middle."""
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.0, 0.0001, 0.00011, 0.001, 0.0049, 0.005, 3.0, 10.0, 11.0, *[0.002] * 5000]
    ours = metrics.BatchHistogram("x_seconds", "x")
    theirs = Histogram("x_seconds", "x", buckets=metrics.LATENCY_BUCKETS, registry=CollectorRegistry())
    for v in values:
        ours.add(v)
        theirs.observe(v)
    want = {(s.name, s.labels.get("le")): s.value for m in theirs.collect() for s in m.samples}
    got = {(s.name, s.labels.get("le")): s.value for s in ours.metric().samples}
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    assert want.pop(("x_seconds_sum", None)) == pytest.approx(got.pop(("x_seconds_sum", None)), rel=1e-12)
    assert want == got


def test_alerts_are_counted_by_rule_and_a_data_alert_by_its_rule_family():
    m = metrics.CalcMetrics(["fill"])
    rows = [
        {"rule": "utilisation-90", "kind": "utilisation", "state": "raised"},
        {"rule": "price-band:AAPL", "kind": "data", "state": "raised"},
        {"rule": "price-band:MSFT", "kind": "data", "state": "raised"},
        {"rule": "params:span:cme-20261201-1.spn", "kind": "data", "state": "cleared"},
    ]
    for row in rows:
        m.alert(row)
    got = {
        (s.labels["rule"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(m.exposition().decode())
        for s in family.samples
        if s.name == "marginflow_calc_alerts_total"
    }
    assert got == {
        ("utilisation-90", "raised"): 1,
        ("price-band", "raised"): 2,
        ("params:span", "cleared"): 1,
    }
