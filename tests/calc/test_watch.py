"""[params.watch]: parameter files that arrive by themselves. The sans-I/O core (what to read given a
listing, what to load given the hashes loaded), then a real tickerplant + calc watching a folder (SPAN
files) and an http.server URL (a vol surface): a dropped file is in force within the poll interval, a
malformed one raises an alert and changes nothing, the same file twice loads once (also after a restart),
and the URL is asked with If-None-Match (304) until its file changes."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from calc import watch
from calc.watch import Entry, ready, to_load
from marginflow import config
from tests.support import ROOT, SPAN_FILE, until
from tests.support.servers import running_tp_and_calc
from tickerplant import journal_reader as reader

SEC = 1_000_000_000
SURFACE = ROOT / "data" / "demo" / "volsurface.csv"


# ---------------------------------------------------------------- the sans-I/O core


def test_a_file_being_written_is_read_once_it_holds_still():
    now = 100 * SEC
    growing = [Entry("cme.spn", 1000, now - SEC // 10)]  # just written to
    assert ready(growing, {}, {}, now, 2 * SEC) == []
    previous = {"cme.spn": (1000, now - SEC // 10)}
    grown = [Entry("cme.spn", 5000, now + SEC)]  # still growing at the next listing
    assert ready(grown, previous, {}, now + SEC, 2 * SEC) == []
    previous = {"cme.spn": (5000, now + SEC)}
    assert ready(grown, previous, {}, now + 2 * SEC, 2 * SEC) == grown  # unchanged since the last listing
    old = [Entry("eurex.csv", 10, now - 3 * SEC)]  # not modified for settle_s: taken at first sight
    assert ready(old, {}, {}, now, 2 * SEC) == old


def test_temporary_and_handled_files_are_skipped_and_the_oldest_comes_first():
    now = 100 * SEC
    listing = [
        Entry("b.spn", 1, 50 * SEC),
        Entry("a.spn", 1, 60 * SEC),
        Entry("c.spn.tmp", 1, 10 * SEC),
        Entry(".d.spn", 1, 10 * SEC),
        Entry("e.part", 1, 10 * SEC),
        Entry("done.spn", 7, 20 * SEC),
        Entry("redone.spn", 8, 30 * SEC),
    ]
    handled = {"done.spn": (7, 20 * SEC), "redone.spn": (8, 1)}  # redone.spn was rewritten since
    assert [e.name for e in ready(listing, {}, handled, now, SEC)] == ["redone.spn", "b.spn", "a.spn"]
    assert to_load("span", "ab" * 32, {("span", "cd" * 32)})
    assert not to_load("span", "ab" * 32, {("span", "ab" * 32)})
    assert to_load("history", "ab" * 32, {("span", "ab" * 32)})  # another kind is another file


def test_conditional_get_headers_names_and_alert_rules():
    assert watch.conditional_headers("", "") == {}
    assert watch.conditional_headers('"v1"', "Tue, 01 Dec 2026 10:00:00 GMT") == {
        "If-None-Match": '"v1"',
        "If-Modified-Since": "Tue, 01 Dec 2026 10:00:00 GMT",
    }
    assert watch.url_file_name("https://ccp.example/span/latest.csv.gz?d=1", "history") == "latest.csv.gz"
    assert watch.url_file_name("https://ccp.example/", "span") == "span"
    assert watch.rule_name("span", "bad\nname\u202e.spn") == "params:span:bad?name?.spn"
    row = watch.alert_row("span", "x.spn", "raised", "x.spn refused: why", 42)
    assert row["account"] == "*" and row["kind"] == "data" and row["rule"] == "params:span:x.spn"
    assert row["last_seq"] == 42


def test_watch_config_is_checked():
    bad = [
        ({"folders": {"positions": "x"}}, "kind 'positions' is not one of span, history"),
        ({"urls": {"span": "ftp://x"}}, "params.watch.urls.span: must be an http:// or https:// URL"),
        ({"poll_interval_s": 0}, "params.watch.poll_interval_s: must be a finite number > 0"),
    ]
    for over, why in bad:
        try:
            config.load(overrides={"params": {"watch": over}})
        except SystemExit as e:
            assert why in str(e), e
        else:
            raise AssertionError(f"{over} accepted")


# ---------------------------------------------------------------- a real calc


class Served:
    """One file over HTTP with an ETag; 304 to a request whose If-None-Match matches. Records requests."""

    def __init__(self, data: bytes):
        self.data = data
        self.requests: list[tuple[str, int]] = []  # (If-None-Match sent, status answered)
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                etag = f'"{hashlib.sha256(served.data).hexdigest()[:16]}"'
                sent = self.headers.get("If-None-Match", "")
                status = 304 if sent == etag else 200
                served.requests.append((sent, status))
                self.send_response(status)
                self.send_header("ETag", etag)
                if status == 200:
                    self.send_header("Content-Length", str(len(served.data)))
                self.end_headers()
                if status == 200:
                    self.wfile.write(served.data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/surface/volsurface.csv"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def span_variant(dst: Path, tag: str) -> str:
    """The Takasbank file with a trailing XML comment (other bytes, same contents); its sha256."""
    data = SPAN_FILE.read_bytes() + f"\n<!-- {tag} -->\n".encode()
    dst.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def without_garan(dst: Path) -> str:
    """The Takasbank file without the GARAN June 2016 future, which the demo's DERIV07 holds: a valid
    file that cannot be put in force. Its sha256."""
    text = SPAN_FILE.read_text()
    i = text.index("<name>GARAN FUTURES</name>")
    j = text.index("<pe>201606S0</pe>", i)
    f0, f1 = text.rindex("<fut>", i, j), text.index("</fut>", j) + len("</fut>")
    dst.write_text(text[:f0] + text[f1:])
    return hashlib.sha256(dst.read_bytes()).hexdigest()


def surface_variant(scale: float) -> bytes:
    lines = SURFACE.read_text().splitlines()
    rows = [lines[0]] + [
        ",".join([*r.split(",")[:3], f"{float(r.split(',')[3]) * scale:.4f}"]) for r in lines[1:]
    ]
    return ("\n".join(rows) + "\n").encode()


def drop(src: Path, inbox: Path, name: str) -> None:
    """Drop a file as a writer should: written under a temporary name, renamed in."""
    tmp = inbox / f"{name}.tmp"
    shutil.copyfile(src, tmp)
    tmp.rename(inbox / name)


POLL = 0.5


def test_calc_loads_dropped_and_served_files_refuses_bad_ones_and_loads_each_once(tmp_path, run):
    inbox, store, jdir = tmp_path / "inbox", tmp_path / "params", tmp_path / "journal"
    served = Served(surface_variant(1.1))
    good, again, newer = tmp_path / "good.spn", tmp_path / "again.spn", tmp_path / "newer.spn"
    good_sha = span_variant(good, "v2")
    bad = tmp_path / "bad.spn"
    bad.write_bytes(SPAN_FILE.read_bytes()[:400_000])  # cut short: a malformed file
    newer_sha = span_variant(newer, "v3")
    nogaran_sha = without_garan(tmp_path / "nogaran.spn")
    shutil.copyfile(good, again)  # the same content under another name
    surface_sha = hashlib.sha256(served.data).hexdigest()
    watched = {"folders": {"span": str(inbox)}, "urls": {"vol_surface": served.url}}
    watched |= {"poll_interval_s": POLL, "settle_s": 0.2, "url_poll_interval_s": 0.2}

    def span_pid(calc) -> str:
        return calc.engine.external["span"].param_id

    async def body():
        out: dict = {}
        async with running_tp_and_calc(jdir, {"watch": watched}, params_dir=str(store)) as (srv, url, calc):
            assert await until(lambda: calc.live, 30)
            pid0 = span_pid(calc)
            # the URL's file is taken at once, then asked again with If-None-Match: 304
            assert await until(lambda: str(calc.engine.vol_surface.source).endswith(f"{surface_sha}.csv"), 30)
            assert await until(lambda: (f'"{surface_sha[:16]}"', 304) in served.requests, 30)

            drop(good, inbox, "good.spn")
            t0 = time.monotonic()
            assert await until(lambda: span_pid(calc).endswith(good_sha[:12]), 30)
            out["in_force_s"] = time.monotonic() - t0
            pid1 = span_pid(calc)

            drop(bad, inbox, "bad.spn")
            rule = "params:span:bad.spn"
            assert await until(lambda: any(a["rule"] == rule for a in calc.today.alerts), 30)
            await asyncio.sleep(POLL * 2)  # more polls: still refused once, nothing changed
            out["after_bad"] = span_pid(calc) == pid1

            drop(tmp_path / "nogaran.spn", inbox, "nogaran.spn")  # valid, but DERIV07's future is missing
            rule2 = "params:span:nogaran.spn"
            assert await until(lambda: any(a["rule"] == rule2 for a in calc.today.alerts), 30)
            out["after_nogaran"] = span_pid(calc) == pid1

            drop(again, inbox, "again.spn")
            assert await until(lambda: calc.watcher.counts.duplicates >= 1, 30)
            await asyncio.sleep(POLL)

            served.data = surface_variant(1.2)  # the URL's file changes: loaded again
            surface2 = hashlib.sha256(served.data).hexdigest()
            assert await until(lambda: str(calc.engine.vol_surface.source).endswith(f"{surface2}.csv"), 30)

            drop(newer, inbox, "newer.spn")  # a good file: in force, the bad file's alert clears
            assert await until(lambda: span_pid(calc).endswith(newer_sha[:12]), 30)
            assert await until(lambda: [a["state"] for a in calc.today.alerts if a["rule"] == rule] == [
                "raised", "cleared"
            ], 30)  # fmt: skip
            assert await until(lambda: calc.watcher.counts.loaded == 5, 30)  # (the watcher's own acks)
            await calc.journal()
            await calc.publisher.wait_acked()
            out.update(
                pid0=pid0, alerts=list(calc.today.alerts), counts=calc.watcher.counts, date=srv.core.date
            )
            out["surface2"] = surface2
        return out

    try:
        out = run(body())
    finally:
        served.close()
    assert (
        out["pid0"].startswith("span:TAKASBANK-20160517-final:") and out["after_bad"] and out["after_nogaran"]
    )
    print(f"in force {out['in_force_s']:.2f} s after the drop")
    assert out["in_force_s"] < POLL + 3.0, out["in_force_s"]  # a poll, then parse + journal + apply (~1 s)
    raised = [a for a in out["alerts"] if a["rule"] == "params:span:bad.spn"]
    assert [a["state"] for a in raised] == ["raised", "cleared"] and raised[0]["account"] == "*"
    assert "bad.spn refused" in raised[0]["message"] and "file ends early" in raised[0]["message"]
    missing = [a for a in out["alerts"] if a["rule"] == "params:span:nogaran.spn"]
    assert [a["state"] for a in missing] == ["raised", "cleared"]
    assert "journaled but not put in force" in missing[0]["message"] and "GARANE" in missing[0]["message"]
    c = out["counts"]
    assert (c.loaded, c.refused, c.not_applied, c.duplicates) == (5, 2, 1, 1), c
    # journaled: one param row per new file (none for the bad file or the duplicate), the alert rows too
    prm = reader.read_table(jdir, out["date"], "param").to_pylist()
    assert [(r["kind"], r["content_hash"]) for r in prm] == [
        ("vol_surface", hashlib.sha256(surface_variant(1.1)).hexdigest()),
        ("span", good_sha),
        ("span", nogaran_sha),
        ("vol_surface", out["surface2"]),
        ("span", newer_sha),
    ]
    assert prm[0]["source"] == served.url and prm[1]["source"] == str((inbox / "good.spn").resolve())
    journaled = reader.read_table(jdir, out["date"], "alert").to_pylist()
    assert [r["state"] for r in journaled if r["rule"] == "params:span:bad.spn"] == ["raised", "cleared"]
    stored = {f"{r['content_hash']}{'.spn' if r['kind'] == 'span' else '.csv'}" for r in prm}
    assert {p.name for p in store.iterdir()} == stored | {watch.LEDGER}  # nothing of bad.spn stored

    # a restart: a new watcher on the same params_dir loads none of the folder's files again
    alerts: list[dict] = []
    again_watcher = watch.ParamWatcher(
        config.WatchConfig(**watched), str(store), "ws://127.0.0.1:1", alerts.append, lambda: 0
    )
    outcomes = asyncio.run(again_watcher.poll_folder("span", str(inbox)))
    assert sorted(outcomes) == ["duplicate"] * 4 + ["refused"]
    assert [a["rule"] for a in alerts] == ["params:span:bad.spn"]  # (calc's alert ledger drops the repeat)
