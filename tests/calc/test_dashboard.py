"""The dashboard in a real browser: `marginflow up --demo` on ephemeral ports, driven by Debian's headless
Chromium through Playwright: live margins, drivers, the day chart (gaps, zoom, hover), what-if, an alert from
a large fill, reconnect after calc dies; and the same page on the front of two calc shards.

Skipped with a reason when Chromium or Playwright is missing, unless MARGINFLOW_REQUIRE_BROWSER=1 (CI).
MARGINFLOW_CHROMIUM overrides the browser path (default /usr/bin/chromium).
MARGINFLOW_SCREENSHOT=docs/dashboard.png also saves the README screenshot (1600x960) along the way.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from marginflow import config
from tests.support import ROOT
from tests.support.servers import recv_type
from tests.support.tokens import desk_token, local_token
from tests.support.up import UpProcess
from tickerplant.client import Publisher

CHROMIUM = os.environ.get("MARGINFLOW_CHROMIUM", "/usr/bin/chromium")  # Debian's package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CFG = config.load()
UTIL_RULE = next(r for r in CFG.calc.alerts if r.kind == "utilisation")  # the alert the test crosses

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (.venv/bin/pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def _require_browser() -> None:
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("MARGINFLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MARGINFLOW_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"browser test skipped: {reason}")


def demo_accounts() -> list[str]:
    with open(ROOT / CFG.calc.accounts_file, newline="") as f:
        return [row["account"] for row in csv.DictReader(f)]


def in_thread(coro: Any, timeout: float = 60) -> Any:
    """Run a coroutine on its own event loop in a thread (Playwright's sync API owns this one)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError("background coroutine did not finish")
    if "error" in out:
        raise out["error"]
    return out["value"]


async def ask(calc_ws: str, *requests: dict) -> list[dict]:
    """Our own API client: one reply per request (pushes are skipped; we never subscribe)."""
    replies = []
    async with connect(f"{calc_ws}/ws", open_timeout=5, **desk_token("risk")) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "auth_reply", hello
        for req in requests:
            await ws.send(json.dumps(req))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] not in ("margin", "alert"):
                    replies.append(msg)
                    break
    return replies


def number(text: str) -> float:
    """Parse a displayed number: thousands separators, a real minus sign, an optional %."""
    t = text.strip().replace("\u2212", "-").replace(",", "").replace("%", "").lstrip("▲▼ ")
    return float(t)


THOUSANDS = re.compile(r"^[+\u2212]?\d{1,3}(,\d{3})*$")


# ---- the system under test -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[UpProcess]:
    _require_browser()
    system = UpProcess(tmp_path_factory.mktemp("up"), "--demo")
    try:
        yield system
    finally:
        system.stop()


@pytest.fixture(scope="module")
def browser_page(up: UpProcess) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 960})
        page.set_default_timeout(20_000)
        page.errors = []  # type: ignore[attr-defined]
        page.frames_in = []  # type: ignore[attr-defined]
        page.opt08 = []  # type: ignore[attr-defined]  # every frame naming OPT08 (never cleared)
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on(
            "console",
            lambda m: (
                m.type == "error" and "WebSocket connection" not in m.text and page.errors.append(m.text)
            ),
        )  # a refused reconnect attempt is logged by Chromium itself
        page.ws_urls = []  # type: ignore[attr-defined]
        page.on(
            "websocket",
            lambda ws: (
                page.ws_urls.append(ws.url),
                ws.on(
                    "framereceived",
                    lambda f: (page.frames_in.append(f), page.opt08.append(f) if '"OPT08"' in f else None),
                ),
            ),
        )
        page.goto(
            up.dashboard.split("#")[0] + "#token=" + local_token("desk:risk")
        )  # as `tokens url` prints it
        try:
            yield page
        finally:
            browser.close()


def no_page_errors(page: Any) -> None:
    assert page.errors == [], f"errors in the page: {page.errors}"


def read_table(page: Any) -> dict[str, dict[str, str]]:
    """Every account row's cell texts, read in one go (the table repaints up to 60 times a second)."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#accounts tbody tr')].map(
        tr => [tr.dataset.account,
               Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.textContent]))]))""")


# ---- the tests -----------------------------------------------------------------------------------------
def test_token_leaves_the_address_bar(up: UpProcess, browser_page: Any) -> None:
    """The page takes #token= once: the address bar and history keep no token, the tab's sessionStorage does,
    and the websocket URL carries none (the token goes in the first `auth` message)."""
    page = browser_page
    page.wait_for_selector("#conn[data-state=live]")
    href = page.evaluate("() => location.href")
    assert "token" not in href and href.startswith(up.dashboard.split("#")[0]), href
    assert page.evaluate("() => sessionStorage.getItem('marginflow.token')") == local_token("desk:risk")
    assert page.ws_urls and all("token" not in u for u in page.ws_urls), page.ws_urls
    no_page_errors(page)


def test_live_table_shows_every_account_and_margins_move(up: UpProcess, browser_page: Any) -> None:
    page = browser_page
    page.wait_for_selector("#conn[data-state=live]")
    assert page.text_content("#desk") == "risk"
    page.wait_for_function(
        "() => [...document.querySelectorAll('#accounts td[data-col=updated]')]"
        ".every(td => /\\d\\d:\\d\\d:\\d\\d/.test(td.textContent))"
    )
    first = read_table(page)
    assert list(first) == demo_accounts()  # demo-risk sees all six, in the accounts file's order
    for acct, row in first.items():
        for col in ("margin", "collateral", "headroom"):
            assert THOUSANDS.match(row[col]), f"{acct} {col}: {row[col]!r} has no thousands separators"
        margin, collateral = number(row["margin"]), number(row["collateral"])
        # the displayed utilisation and headroom agree with the displayed margin and collateral
        assert number(row["utilisation"]) == pytest.approx(
            100 * margin / collateral, abs=0.06 + 50 / collateral
        )
        assert number(row["headroom"]) == pytest.approx(collateral - margin, abs=1.01)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = read_table(page)
        moved = [a for a in now if now[a]["margin"] != first[a]["margin"]]
        if moved:
            break
        time.sleep(0.25)
    assert moved, "no margin changed on the page within 15 s of a running feed"
    no_page_errors(page)


def test_drivers_of_the_clicked_account(up: UpProcess, browser_page: Any) -> None:
    page = browser_page
    page.frames_in.clear()
    page.click("#accounts tr[data-account=TECH01]")
    page.wait_for_function("() => document.querySelector('#detail-account').textContent === 'TECH01'")
    assert "selected" in page.get_attribute("#accounts tr[data-account=TECH01]", "class")
    page.wait_for_selector("#drivers tbody tr[data-sym]")
    shown = page.evaluate("""() => ({
        margin: document.querySelector('#f-margin').textContent,
        drivers: [...document.querySelectorAll('#drivers tbody tr[data-sym]')].map(tr => ({
            sym: tr.dataset.sym, contribution: tr.querySelector('.v').textContent,
            share: tr.cells[3].textContent}))})""")
    (snap,) = in_thread(ask(up.calc_ws, {"type": "snapshot_request", "accounts": ["TECH01"]}))
    row = snap["rows"][0]
    drivers = json.loads(row["drivers"])
    # the same biggest driver as calc's own row (a tech book: its largest long dominates)
    assert shown["drivers"][0]["sym"] == drivers[0]["sym"]
    assert len(shown["drivers"]) == len(drivers)
    # component VaR adds up: the displayed contributions sum to the displayed margin (TECH01 is on "var")
    total = sum(number(d["contribution"]) for d in shown["drivers"])
    assert total == pytest.approx(number(shown["margin"]), abs=0.5 * len(drivers) + 1)
    assert sum(number(d["share"]) for d in shown["drivers"]) == pytest.approx(
        100, abs=0.05 * len(drivers) + 0.01
    )
    # the day chart: history asked of the rdb through calc, then live rows appended
    page.wait_for_function(
        "() => !/loading/.test(document.querySelector('#chart-status').textContent)"
        " && document.querySelector('#chart-status').textContent !== ''"
    )
    assert page.evaluate("() => document.querySelector('#chart canvas').width") > 0  # uPlot's canvas

    def chart_says() -> tuple[dict, str, bool]:
        """The last history answer, the chart's status line, and whether the line tells that answer
        (a later history answer may arrive between reading the two: then read both again)."""
        history = [json.loads(f) for f in page.frames_in if '"history"' in f or '"error"' in f]
        assert history and history[-1].get("account") in ("TECH01", None)
        last, status = history[-1], page.text_content("#chart-status")
        if last["type"] == "error":  # the rdb may be down: the page says so and keeps the live rows
            return last, status, "history unavailable" in status
        if last["time"]:
            return last, status, status.startswith(f"{len(last['time']):,} rows from rdb")
        return last, status, "live only" in status

    deadline = time.monotonic() + 5.0
    last, status, told = chart_says()
    while not told and time.monotonic() < deadline:
        page.wait_for_timeout(100)
        last, status, told = chart_says()
    assert told, (status, last.get("type"), len(last.get("time") or []))
    no_page_errors(page)


CHART_PROBE = """async () => {
    const { MarginChart, GAP_MIN_MS } = await import("/chart.js");
    const box = document.createElement("div");  // on top of the page, at a known place
    box.style.cssText = "position:fixed;left:0;top:0;width:800px;height:300px;z-index:99;background:#0e1116";
    document.body.append(box);
    const chart = new MarginChart(box);
    window.chartProbe = chart;
    // one point a second 09:00-10:00, the system down until 13:00, then 13:00-13:30
    const day = Date.UTC(2026, 0, 5), t = [], margin = [], collateral = [];
    const at = (h) => day + h * 3600e3;
    for (let s = 9 * 3600; s < 13.5 * 3600; s++) {
        if (s >= 10 * 3600 && s < 13 * 3600) continue;
        t.push(day + s * 1000); margin.push(1e6 + 5e4 * Math.sin(s / 300)); collateral.push(3e6);
    }
    chart.setData({ t, margin, collateral });
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const u = chart.u;
    const linePixels = (ms) => {  // pixels of the margin line's colour in the column drawn at time ms
        const x = Math.round(u.valToPos(ms, "x", true));
        const d = u.ctx.getImageData(x, u.bbox.top, 1, u.bbox.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
            n += d[i] < 120 && d[i + 1] > 130 && d[i + 1] < 200 && d[i + 2] > 220;
        }
        return n;
    };
    const over = u.over.getBoundingClientRect();
    return {
        points: t.length, xs: u.data[0].length, nulls: u.data[1].filter((v) => v === null).length,
        gaps: chart.gaps, gapMinMs: GAP_MIN_MS,
        inGap: [10.5, 11.5, 12.5].map((h) => linePixels(at(h))),
        inData: [9.5, 13.25].map((h) => linePixels(at(h))),
        over: [over.left, over.top],
        x: Object.fromEntries([9.1, 9.5, 9.6].map((h) => [h, u.valToPos(at(h), "x")])),
    };
}"""


def test_chart_draws_a_gap_as_a_gap_and_zooms(up: UpProcess, browser_page: Any) -> None:
    """The day chart (uPlot, calc/static/chart.js) on a day with three hours down: no line is drawn across
    them; hovering reads out time and margin, a drag zooms (kept while rows arrive), a double-click
    unzooms, and the chart follows its box's size."""
    page = browser_page
    got = page.evaluate(CHART_PROBE)
    try:
        assert got["gaps"] == 1 and got["nulls"] == 1 and got["xs"] == got["points"] + 1
        assert got["inGap"] == [0, 0, 0], got  # nothing drawn across the hours down ...
        assert all(n > 0 for n in got["inData"]), got  # ... and the line is there on both sides
        (left, top), x = got["over"], got["x"]
        page.mouse.move(left + x["9.5"], top + 100)
        tip = page.evaluate("() => [chartProbe.tip.hidden, chartProbe.tip.textContent]")
        assert tip[0] is False and re.match(r"^09:\d\d:\d\d  [\d,]+$", tip[1]), tip
        page.mouse.move(left + x["9.1"], top + 100)
        page.mouse.down()
        page.mouse.move(left + x["9.6"], top + 100, steps=5)
        page.mouse.up()
        scale = "() => [chartProbe.zoomed, chartProbe.u.scales.x.min, chartProbe.u.scales.x.max]"
        zoomed = page.evaluate(scale)
        day = 1767571200000  # 2026-01-05T00:00Z
        assert zoomed[0] is True
        assert zoomed[1] == pytest.approx(day + 9.1 * 3600e3, abs=60e3)
        assert zoomed[2] == pytest.approx(day + 9.6 * 3600e3, abs=60e3)
        page.evaluate("() => chartProbe.setData(chartProbe.series)")  # a live row: the zoom stays
        assert page.evaluate(scale) == zoomed
        page.mouse.dblclick(left + x["9.5"], top + 100)
        assert page.evaluate(scale) == [False, day + 9 * 3600e3, day + 13.5 * 3600e3 - 1000]
        page.evaluate(
            "() => { chartProbe.box.style.width = '600px'; chartProbe.box.style.height = '250px'; }"
        )
        page.wait_for_function("() => chartProbe.u.width === 600 && chartProbe.u.height === 250")
    finally:
        page.evaluate("() => { chartProbe.u.destroy(); chartProbe.box.remove(); delete window.chartProbe; }")
    no_page_errors(page)


def test_what_if_result_matches_calcs_reply(up: UpProcess, browser_page: Any) -> None:
    page = browser_page
    page.select_option("#wi-account", "TECH01")
    page.fill("#wi-sym", "aapl")  # typed in lower case: the page upper-cases symbols
    page.click("#whatif .side span:text-is('Buy')")
    page.fill("#wi-qty", "1000")
    page.frames_in.clear()
    page.click("#wi-run")
    page.wait_for_selector("#whatif-result[data-state=done]")
    shown = {k: page.text_content(f"#whatif-result dd[data-key={k}]") for k in ("before", "after", "change")}
    replies = [json.loads(f) for f in page.frames_in if '"what_if_reply"' in f]
    assert len(replies) == 1
    res = replies[0]["result"]
    assert res["account"] == "TECH01"
    # what the page shows is calc's answer, rounded to whole units
    assert number(shown["before"]) == pytest.approx(res["margin_before"], abs=0.51)
    assert number(shown["after"]) == pytest.approx(res["margin_after"], abs=0.51)
    assert number(shown["change"].split("(")[0]) == pytest.approx(
        res["margin_after"] - res["margin_before"], abs=1.01
    )
    pct = number(shown["change"].split("(")[1].rstrip(")"))
    assert pct == pytest.approx(100 * res["change"] / res["margin_before"], abs=0.051)
    # buying more of the book's largest long adds risk
    assert res["change"] > 0 and shown["change"].startswith("+")
    # a bad symbol: calc's reason (naming the sym) is shown, nothing crashes
    page.fill("#wi-sym", "NOPE")
    page.click("#wi-run")
    page.wait_for_selector("#whatif-result[data-state=error]")
    assert "NOPE" in page.text_content("#whatif-result .error")
    no_page_errors(page)


def test_options_account_shows_its_ccp_components_greeks_and_a_model_comparison(
    up: UpProcess, browser_page: Any
) -> None:
    """The demo's options book (OPT08, on the prisma model): its margin's parts as calc computed them, its
    option drivers with delta / gamma / vega, and a what-if comparing hvar, prisma and span2."""
    page = browser_page
    page.click("#accounts tr[data-account=OPT08]")
    page.wait_for_function("() => document.querySelector('#detail-account').textContent === 'OPT08'")
    page.wait_for_selector("#detail-components:not([hidden]) .part")
    parts = page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#detail-components .part[data-key]')]"
        ".map(p => [p.dataset.key, p.querySelector('.num').textContent]))"
    )
    # what the page shows is one of the OPT08 rows it received (live rows move it between two reads, more
    # than 5% at times: compare with the rows themselves, not with a later snapshot)
    seen = [
        json.loads(r["components"])
        for f in list(page.opt08)
        for r in json.loads(f).get("rows", [])
        if r.get("account") == "OPT08" and r.get("components", "{}") != "{}"
    ]
    assert seen and seen[-1]["model"] == "prisma"
    assert set(parts) >= {"filtered", "stressed", "base", "option_credit"}
    assert any(
        all(number(parts[k]) == pytest.approx(c[k], abs=0.51) for k in ("filtered", "stressed", "base"))
        for c in seen[-5:]
    ), (parts, seen[-5:])
    greeks = page.evaluate("() => [...document.querySelectorAll('#drivers .greeks')].map(g => g.textContent)")
    assert greeks and all(g.startswith("\u0394 ") and "\u03bd" in g for g in greeks)
    page.select_option("#wi-account", "OPT08")
    page.fill("#wi-sym", "AAPL230127C125")
    page.click("#whatif .side span:text-is('Buy')")
    page.fill("#wi-qty", "10")
    page.check("#wi-compare")
    page.frames_in.clear()
    page.click("#wi-run")
    page.wait_for_selector("#whatif-result[data-state=done] table.compare")
    rows = page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#whatif-result table.compare tbody tr')]"
        ".map(tr => [tr.dataset.model, tr.cells[2].textContent]))"
    )
    (res,) = [json.loads(f)["result"] for f in page.frames_in if '"what_if_reply"' in f]
    assert set(rows) == {"hvar", "prisma", "span2"} == set(res["compare"])
    for m, shown in rows.items():
        assert number(shown) == pytest.approx(res["compare"][m]["margin_after"], abs=0.51), m
    assert res["compare"]["prisma"]["margin_after"] == pytest.approx(res["margin_after"], rel=1e-12)
    no_page_errors(page)


async def latest_forecasts(calc_ws: str, account: str) -> dict[str, dict]:
    """A new subscriber's forecast rows of `account` per horizon (calc sends the latest on subscribe)."""
    async with connect(f"{calc_ws}/ws", open_timeout=5, **desk_token("risk")) as ws:
        await recv_type(ws, "auth_reply")
        await ws.send(json.dumps({"type": "subscribe", "accounts": [account]}))
        return {r["horizon"]: r for r in (await recv_type(ws, "forecast"))["rows"]}


async def publish_call(tp_url: str, f: dict, requirement: float) -> None:
    async with Publisher(tp_url) as pub:
        row = {k: [f[k]] for k in ("business_date", "cycle", "ccp", "account")}
        await pub.upd(
            "call", row | {"requirement": [requirement], "call": [0.0], "collateral": [requirement]}
        )
        await pub.wait_acked()


def test_call_forecast_and_the_calls_panel(up: UpProcess, browser_page: Any) -> None:
    """The account's call forecast per horizon as calc publishes it, then an actual call for its T+1 cycle
    (every lead time stands for it) in the calls panel beside what was forecast, with the accuracy."""
    page = browser_page
    page.click("#accounts tr[data-account=TECH01]")
    page.wait_for_selector("#detail-forecast:not([hidden]) tr[data-horizon=next]")
    f = in_thread(latest_forecasts(up.calc_ws, "TECH01"))
    assert set(f) == {"next", "eod", "t+1"} and f["next"]["ccp"] == "DEMO-CCP"
    shown = page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#detail-forecast tbody tr')]"
        ".map(tr => [tr.dataset.horizon, [tr.cells[1].textContent, tr.cells[3].textContent]]))"
    )
    assert set(shown) == set(f)
    for h, (cycle, p50) in shown.items():  # (a tick between the two reads may move P50 a little)
        assert f[h]["cycle"] in cycle and number(p50) == pytest.approx(f[h]["p50"], rel=0.05), h
    target = f["t+1"]
    in_thread(publish_call(up.tickerplant, target, target["p50"] * 1.02))
    page.wait_for_selector("#calls tbody tr[data-account=TECH01]")
    rows = page.evaluate(
        "() => [...document.querySelectorAll('#calls tbody tr[data-account=TECH01]')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))"
    )
    assert len(rows) == 3  # one per lead time: 15 min, 1 h, 2 h
    for r in rows:
        assert target["cycle"] in r[1] and number(r[4]) == pytest.approx(target["p50"] * 1.02, abs=0.51)
        assert number(r[5]) == pytest.approx(number(r[3]) - number(r[4]), abs=1.01)
    leads = page.evaluate(
        "() => [...document.querySelectorAll('#calls-accuracy tbody tr')].map(t => t.dataset.lead)"
    )
    assert leads == ["900", "3600", "7200"]
    no_page_errors(page)


def test_alert_after_a_large_fill(up: UpProcess, browser_page: Any) -> None:
    page = browser_page
    (snap,) = in_thread(ask(up.calc_ws, {"type": "snapshot_request"}))
    quiet = [r for r in snap["rows"] if r["utilisation"] < (UTIL_RULE.clear or UTIL_RULE.threshold) - 0.1]
    assert quiet, "every demo account is already near its utilisation alert"
    row = min(quiet, key=lambda r: r["utilisation"])
    acct = row["account"]
    sym = max(
        json.loads(row["drivers"]), key=lambda d: d["contribution"] if d["sym"] != "*other*" else -math.inf
    )
    side = "B" if sym["exposure"] > 0 else "S"  # grow the biggest risk
    target = UTIL_RULE.threshold + 0.15  # clearly above the rule, whatever the feed does meanwhile

    def util_after(q: float) -> float:
        (wi,) = in_thread(
            ask(
                up.calc_ws,
                {
                    "type": "what_if",
                    "account": acct,
                    "trades": [{"sym": sym["sym"], "qty": q, "side": side}],
                    "id": 1,
                },
            )
        )
        assert wi["type"] == "what_if_reply", wi
        return wi["result"]["utilisation_after"]

    lo, hi = 0.0, 1000.0
    while util_after(hi) < target:  # size the fill with calc's own what-if: double, then bisect
        lo, hi = hi, hi * 2
        assert hi < 1e9, f"no quantity of {sym['sym']} takes {acct} over {target:.0%}"
    for _ in range(6):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if util_after(mid) < target else (lo, mid)
    qty = math.ceil(hi * 1.02)  # a little over the smallest found: the live feed moves prices meanwhile
    assert util_after(qty) >= target

    async def publish() -> None:
        async with Publisher(up.tickerplant) as pub:
            await pub.upd(
                "fill",
                {
                    "account": [acct],
                    "sym": [sym["sym"]],
                    "side": [side],
                    "qty": [qty],
                    "price": [100.0],
                    "order_id": ["browser-test"],
                    "exec_id": ["browser-test-1"],
                },
            )
            await pub.wait_acked()
            assert pub.errors == []

    in_thread(publish())
    raised = f"#alerts li[data-account={acct}][data-rule='{UTIL_RULE.name}'][data-state=raised]"
    page.wait_for_selector(raised)
    assert acct in page.text_content(f"{raised} .msg")
    page.wait_for_selector(f"#accounts tr[data-account={acct}].alerting")
    util = number(read_table(page)[acct]["utilisation"])
    assert util > 100 * UTIL_RULE.threshold
    assert page.get_attribute(f"#accounts tr[data-account={acct}] td[data-col=utilisation]", "data-band") in (
        "breach",
        "call",
    )
    assert int(page.text_content("#kpi-alerts")) >= 1
    # the alerted account's chart shows the jump; its what-if is the README picture
    page.click(f"{raised}")
    page.wait_for_function(f"() => document.querySelector('#detail-account').textContent === '{acct}'")
    if os.environ.get("MARGINFLOW_SCREENSHOT"):
        page.select_option("#wi-account", acct)
        page.fill("#wi-sym", sym["sym"])
        page.click("#whatif .side span:text-is('Sell')")
        page.fill("#wi-qty", str(int(qty / 2)))
        page.click("#wi-run")
        page.wait_for_selector("#whatif-result[data-state=done]")
        time.sleep(2)
        page.screenshot(path=os.environ["MARGINFLOW_SCREENSHOT"])
    no_page_errors(page)


def test_reconnects_after_calc_is_killed(up: UpProcess, browser_page: Any) -> None:
    page = browser_page
    os.kill(up.pids["calc"], signal.SIGKILL)
    page.wait_for_selector("#conn[data-state=reconnecting]", timeout=10_000)
    up.wait_for_line(r"calc restarted", timeout=90)
    page.wait_for_selector("#conn[data-state=live]", timeout=30_000)
    before = read_table(page)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and read_table(page) == before:
        time.sleep(0.25)
    assert read_table(page) != before, "no margin update after the reconnect"
    no_page_errors(page)


def test_the_dashboard_against_two_shards_and_the_front(tmp_path: Any, browser_page: Any) -> None:
    """`marginflow up --demo --bus nats --shards 2`: the same page on the front shows every account of both
    shards live, the clicked account's drivers and its day chart from the rdb, and its call forecast (a page
    of the module's browser: Playwright's sync API runs one instance per thread)."""
    system = UpProcess(tmp_path / "var", "--demo", "--bus", "nats", "--shards", "2")
    page = browser_page.context.browser.new_page(viewport={"width": 1600, "height": 960})
    try:
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(system.dashboard.split("#")[0] + "#token=" + local_token("desk:risk"))
        page.wait_for_selector("#conn[data-state=live]")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#accounts td[data-col=updated]')]"
            f".filter(td => /\\d\\d:\\d\\d:\\d\\d/.test(td.textContent)).length >= {len(demo_accounts())}"
        )
        assert set(read_table(page)) == set(demo_accounts())  # both shards' accounts, one table
        deadline = time.monotonic() + 30  # the front answers history from the rdb once it holds rows
        while True:
            (h,) = in_thread(ask(system.calc_ws, {"type": "history_request", "account": "TECH01", "id": 1}))
            assert h["type"] == "history", h
            if h["time"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert h["time"], "the rdb held no margin row of TECH01 after 30 s"
        page.click("#accounts tr[data-account=TECH01]")
        page.wait_for_selector("#drivers tbody tr[data-sym]")
        page.wait_for_function(  # the day chart: history from the rdb, through the front
            "() => /rows from rdb/.test(document.querySelector('#chart-status').textContent)"
        )
        page.wait_for_selector(
            "#detail-forecast:not([hidden]) tr[data-horizon=next]"
        )  # the shards' forecasts
        assert errors == [], errors
    finally:
        page.close()
        system.stop()
