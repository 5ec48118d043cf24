"""Parameter files that arrive by themselves ([params.watch]): per kind of `marginflow params load` a folder,
and optionally an http(s) URL polled on a schedule. A new file is validated and stored by hash
(calc.params.store), journaled as one `param` row through the tickerplant (calc.params.journal, the admin
token) and put in force when that row comes back through calc's subscription: exactly what
`marginflow params load FILE --kind KIND` does, by the same functions, so a replay of the journal decides
the same. A file calc cannot use is refused with a data alert (account "*", rule "params:KIND:NAME", the
file and the reason in its message) and nothing of it is stored or journaled: the file in force stays.
That alert clears when a later file of the same kind is put in force. A file that validates but cannot be
put in force (a SPAN file lacking a held contract) raises the same alert when calc applies its row.

Where it runs: a task in calc's process, not a `marginflow params watch` process. The alert of a bad file
must reach users, and alert rows reach them through calc (its dashboard fan-out, the journaled `alert`
table, webhooks and email, the ledger that keeps a restart from raising it twice): raised here it takes
that path unchanged, while a separate process would need calc to forward other publishers' alert rows
live. calc also knows when its journal replay is done (the watcher starts polling only then) and which
param rows that replay held. Reading, hashing and validating a file run in a thread (asyncio.to_thread),
so calc's loop keeps serving margin while a large SPAN file is parsed.

The same file (same kind and sha256) is loaded once: what was loaded is remembered in
<params_dir>/watch-loaded.jsonl (across restarts and days) and learnt from the param rows calc applies
(the journal's replay and `params load` by hand). A file still being written is not read half: it is taken
once its size and mtime are unchanged since the previous listing, or it has not been modified for
`settle_s`; names starting with "." or ending in .tmp, .part, .partial, .crdownload or ~ are never read
(a writer that pauses longer than settle_s should write under such a name and rename the file in). Files of
a folder are taken oldest first, so the newest one ends in force. A URL is asked with If-None-Match /
If-Modified-Since from its last answer: 304 means nothing new.

Sans-I/O core: `ready` (given a folder listing, the previous one and what was handled: what to read now),
`to_load` (given a file's hash and what was loaded: load it?), `conditional_headers`, `alert_row`; the
`ParamWatcher` around them does the listing, reading, HTTP and journaling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calc import params
from calc.alerts import ALL_ACCOUNTS
from calc.events import ParamResult
from marginflow.config import WatchConfig
from schemas.tables import DATA_KIND, NAME_RE

log = logging.getLogger("marginflow.calc.watch")
LEDGER = "watch-loaded.jsonl"  # in params_dir: one JSON line per file the watcher journaled
TEMPORARY = (".tmp", ".part", ".partial", ".crdownload", "~")  # names being written: never read
RULE = "params"  # data alerts of refused files: rule "params:<kind>:<name>"
MAX_REASON = 4000  # characters of a refusal's reason kept in the alert message
Signature = tuple[int, int]  # (size, mtime_ns): a file that holds still keeps it


@dataclass(frozen=True)
class Entry:
    """One file of a folder listing."""

    name: str
    size: int
    mtime_ns: int

    @property
    def signature(self) -> Signature:
        return (self.size, self.mtime_ns)


def ignored(name: str) -> bool:
    """Hidden or temporary names (a file being written, to be renamed in): never read."""
    return name.startswith(".") or name.endswith(TEMPORARY)


def ready(
    listing: Sequence[Entry],
    previous: Mapping[str, Signature],
    handled: Mapping[str, Signature],
    now_ns: int,
    settle_ns: int,
) -> list[Entry]:
    """The files to read now, oldest first: not hidden or temporary, not already handled with this size
    and mtime, and holding still: unchanged since the `previous` listing, or not modified for settle_ns."""
    out = [
        e
        for e in listing
        if not ignored(e.name)
        and handled.get(e.name) != e.signature
        and (previous.get(e.name) == e.signature or now_ns - e.mtime_ns >= settle_ns)
    ]
    return sorted(out, key=lambda e: (e.mtime_ns, e.name))


def to_load(kind: str, digest: str, loaded: Set[tuple[str, str]]) -> bool:
    """Whether a file of `kind` with this sha256 is new (not loaded before, by the watcher or by hand)."""
    return (kind, digest) not in loaded


def conditional_headers(etag: str, last_modified: str) -> dict[str, str]:
    """The headers of a conditional GET after an answer with these validators."""
    out = {}
    if etag:
        out["If-None-Match"] = etag
    if last_modified:
        out["If-Modified-Since"] = last_modified
    return out


def url_file_name(url: str, kind: str) -> str:
    """The name a downloaded file is stored under: the URL path's last part (its suffixes pick the reader:
    .csv.gz, .spn), else the kind."""
    name = Path(urllib.parse.urlparse(url).path).name
    return name if name and not ignored(name) else kind


def rule_name(kind: str, name: str) -> str:
    """The alert rule of a refused file: params:<kind>:<name>, made a valid name (a symbol column)."""
    clean = "".join(c if c.isprintable() else "?" for c in name).strip() or "?"
    rule = f"{RULE}:{kind}:{clean}"[:256]
    return rule if NAME_RE.search(rule) else f"{RULE}:{kind}:?"


def alert_row(kind: str, name: str, state: str, message: str, seq: int, value: float = 0.0) -> dict[str, Any]:
    """A data alert row (every desk) about the parameter file `name` of `kind`."""
    return {
        "account": ALL_ACCOUNTS,
        "rule": rule_name(kind, name),
        "kind": DATA_KIND,
        "state": state,
        "value": float(value),
        "threshold": 0.0,
        "message": message[:60000],
        "last_seq": int(seq),
    }


def read_ledger(params_dir: str | Path) -> set[tuple[str, str]]:
    """(kind, sha256) of every file the watcher journaled, from <params_dir>/watch-loaded.jsonl."""
    path = Path(params_dir) / LEDGER
    out: set[tuple[str, str]] = set()
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    except OSError as e:
        log.error("%s: cannot read (files seen before may load again): %s", path, e)
        return out
    for line in lines:
        try:
            row = json.loads(line)
            out.add((str(row["kind"]), str(row["content_hash"])))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: a line that is not a loaded file is skipped: %.80r", path, line)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    url: str, headers: Mapping[str, str], timeout_s: float, max_bytes: int, dest: Path
) -> tuple[int, Any]:
    """GET url into dest: (200, response headers), (304, None), or (0, the reason). A body over max_bytes
    is cut and reported as (413, its size so far)."""
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
            size = 0
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    return 413, size
                out.write(chunk)
            return response.status, response.headers
    except urllib.error.HTTPError as e:
        return (304, None) if e.code == 304 else (0, f"HTTP {e.code}")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        return 0, str(getattr(e, "reason", e))


@dataclass
class UrlState:
    etag: str = ""
    last_modified: str = ""


@dataclass
class WatchCounts:
    loaded: int = 0  # files journaled
    duplicates: int = 0  # files whose content was loaded before
    refused: int = 0  # files refused, or journaled but not put in force (alerted)
    not_applied: int = 0  # journaled, but calc could not put them in force (alerted)
    journal_retries: int = 0  # files to try again: the tickerplant was not reachable
    url_polls: int = 0
    url_not_modified: int = 0
    url_errors: int = 0
    last_error: str = ""


@dataclass
class ParamWatcher:
    """The [params.watch] task of calc (calc/server.py starts `run` and feeds `note` each param result).
    `raise_alert(row)` publishes an alert row with calc's next margin rows; `last_seq()` is calc's."""

    watch: WatchConfig
    params_dir: str
    tp_url: str
    raise_alert: Callable[[dict[str, Any]], None]
    last_seq: Callable[[], int]
    loaded: set[tuple[str, str]] = field(default_factory=set)
    counts: WatchCounts = field(default_factory=WatchCounts)
    previous: dict[str, dict[str, Signature]] = field(default_factory=dict)  # kind -> last listing
    handled: dict[str, dict[str, Signature]] = field(default_factory=dict)  # kind -> files taken or refused
    urls: dict[str, UrlState] = field(default_factory=dict)
    journaled: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 -> (kind, name), to apply
    raised: dict[str, set[str]] = field(default_factory=dict)  # kind -> names whose alert is raised
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one file at a time (folders and URLs)

    def __post_init__(self) -> None:
        self.loaded |= read_ledger(self.params_dir)

    # ---- what calc applied ----------------------------------------------------------------------
    def note(self, result: ParamResult) -> None:
        """A param row calc applied (or could not): its file counts as loaded; for a file this watcher
        journaled, an alert if it could not be put in force, else the kind's raised alerts clear."""
        row = result.row
        kind, digest = str(row.get("kind")), str(row.get("content_hash"))
        if kind not in params.KINDS:
            return
        self.loaded.add((kind, digest))
        mine = self.journaled.pop(digest, None)
        if mine is not None and not result.applied:
            self.counts.not_applied += 1
            self._refuse(kind, mine[1], f"journaled but not put in force: {result.message}")
        elif result.applied and (mine is not None or self.raised.get(kind)):
            for name in sorted(self.raised.pop(kind, set())):
                text = f"{kind} file {name}: superseded, {kind} file {row.get('file_id')} is in force"
                self.raise_alert(alert_row(kind, name, "cleared", text, self.last_seq()))

    def _refuse(self, kind: str, name: str, reason: str, value: float = 0.0) -> None:
        self.counts.refused += 1
        self.counts.last_error = f"{kind} {name}: {reason}"[:MAX_REASON]
        log.error("watched %s file %s refused, the file in force stays: %s", kind, name, reason)
        text = f"{kind} file {name} refused, the {kind} file in force stays: {reason[:MAX_REASON]}"
        self.raised.setdefault(kind, set()).add(name)
        self.raise_alert(alert_row(kind, name, "raised", text, self.last_seq(), value))

    # ---- one file ---------------------------------------------------------------------------------
    async def take(self, kind: str, path: Path, name: str, source: str) -> str:
        """Load one complete file as `params load` does: "loaded", "duplicate", "refused" or "retry"
        (the tickerplant was not reachable: try again at the next poll). One at a time: the same content
        from a folder and a URL at once is loaded once."""
        async with self.lock:
            return await self._take(kind, path, name, source)

    async def _take(self, kind: str, path: Path, name: str, source: str) -> str:
        try:
            size = path.stat().st_size
            if size > self.watch.max_file_bytes:
                why = f"{size} bytes, more than params.watch.max_file_bytes = {self.watch.max_file_bytes}"
                self._refuse(kind, name, why, size)
                return "refused"
            digest = await asyncio.to_thread(sha256_file, path)
        except FileNotFoundError:  # removed since the listing: nothing to say
            return "retry"
        except OSError as e:
            self._refuse(kind, name, f"cannot read: {e.strerror or e}")
            return "refused"
        if not to_load(kind, digest, self.loaded):
            self.counts.duplicates += 1
            log.info("watched %s file %s: sha256 %s... loaded before, skipped", kind, name, digest[:12])
            return "duplicate"
        try:
            row = await asyncio.to_thread(params.store, path, kind, self.params_dir)
        except Exception as e:  # the readers' InputError / SpanFileError, or any parser failure: refused
            self._refuse(kind, name, str(e) or type(e).__name__)
            return "refused"
        row["source"] = source
        digest = row["content_hash"]
        self.journaled[digest] = (kind, name)  # (calc may apply the row before the ack reaches us)
        try:
            seq = await params.journal(self.tp_url, row)
        except params.JournalRefused as e:
            self.journaled.pop(digest, None)
            self._refuse(kind, name, str(e))
            return "refused"
        except params.InputError as e:
            self.journaled.pop(digest, None)
            self.counts.journal_retries += 1
            self.counts.last_error = f"{kind} {name}: {e}"
            log.warning(
                "watched %s file %s stored but not journaled (next poll tries again): %s", kind, name, e
            )
            return "retry"
        self.loaded.add((kind, digest))
        self.counts.loaded += 1
        self._remember(dict(row, seq=seq, at=time.time()))
        log.info("watched %s file %s (%s) journaled at seq %d", kind, name, row["file_id"], seq)
        return "loaded"

    def _remember(self, row: Mapping[str, Any]) -> None:
        path = Path(self.params_dir) / LEDGER
        try:
            with open(path, "a") as f:
                f.write(json.dumps(dict(row)) + "\n")
        except OSError as e:  # loaded all the same; only a restart would load it again
            log.error("%s: cannot record a loaded file: %s", path, e)

    # ---- folders and URLs -------------------------------------------------------------------------
    async def poll_folder(self, kind: str, folder: str) -> list[str]:
        """List one folder and take what is ready; the outcomes, in order."""
        listing = await asyncio.to_thread(list_folder, Path(folder))
        previous = self.previous.get(kind, {})
        handled = self.handled.setdefault(kind, {})
        self.previous[kind] = {e.name: e.signature for e in listing}
        for gone in set(handled) - set(self.previous[kind]):
            del handled[gone]
        now = time.time_ns()
        out = []
        for e in ready(listing, previous, handled, now, int(self.watch.settle_s * 1e9)):
            path = Path(folder) / e.name
            outcome = await self.take(kind, path, e.name, str(path.resolve()))
            if outcome != "retry":
                handled[e.name] = e.signature
            out.append(outcome)
        return out

    async def poll_url(self, kind: str, url: str) -> str:
        """One conditional GET of a URL, and the file taken if it is new: the outcome ("not modified",
        "error", or take's)."""
        state = self.urls.setdefault(kind, UrlState())
        name = url_file_name(url, kind)
        self.counts.url_polls += 1
        with tempfile.TemporaryDirectory(prefix="marginflow-watch-") as tmp:
            dest = Path(tmp) / name
            headers = conditional_headers(state.etag, state.last_modified)
            status, info = await asyncio.to_thread(
                fetch, url, headers, self.watch.timeout_s, self.watch.max_file_bytes, dest
            )
            if status == 304:
                self.counts.url_not_modified += 1
                return "not modified"
            if status == 413:
                why = f"more than params.watch.max_file_bytes = {self.watch.max_file_bytes} bytes"
                self._refuse(kind, url, why, info)
                return "refused"
            if status != 200:
                self.counts.url_errors += 1
                self.counts.last_error = f"{kind} {url}: {info or status}"
                log.warning("watched %s URL %s: %s", kind, url, info or f"HTTP {status}")
                return "error"
            outcome = await self.take(kind, dest, url, url)
        if outcome != "retry":  # the validators of an answer handled (a retry downloads it again)
            state.etag, state.last_modified = info.get("ETag", ""), info.get("Last-Modified", "")
        return outcome

    async def run(self, is_live: Callable[[], bool]) -> None:
        """Poll the folders and URLs for ever, from when calc is live (its journal replay done)."""
        for kind, folder in self.watch.folders.items():
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.error("params.watch.folders.%s %s: cannot create: %s", kind, folder, e)
        while not is_live():
            await asyncio.sleep(0.05)
        log.info(
            "watching %s for parameter files",
            ", ".join([f"{k} {v}" for k, v in self.watch.folders.items()] + list(self.watch.urls.values())),
        )
        await asyncio.gather(self._folders(), *(self._url(k, u) for k, u in self.watch.urls.items()))

    async def _folders(self) -> None:
        while self.watch.folders:
            for kind, folder in self.watch.folders.items():
                await self.poll_folder(kind, folder)
            await asyncio.sleep(self.watch.poll_interval_s)

    async def _url(self, kind: str, url: str) -> None:
        while True:
            await self.poll_url(kind, url)
            await asyncio.sleep(self.watch.url_poll_interval_s)

    def health(self) -> dict[str, Any]:
        return dict(vars(self.counts), known_files=len(self.loaded))


def list_folder(folder: Path) -> list[Entry]:
    """The regular files of a folder (none if it is missing or unreadable: logged)."""
    out = []
    try:
        with os.scandir(folder) as it:
            for d in it:
                try:
                    if d.is_file(follow_symlinks=True):
                        st = d.stat()
                        out.append(Entry(d.name, st.st_size, st.st_mtime_ns))
                except OSError:
                    continue  # removed while listed
    except OSError as e:
        log.warning("watched folder %s: %s", folder, e)
    return out
