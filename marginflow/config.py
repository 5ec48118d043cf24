"""The one place configuration keys are read: config.toml's embedded defaults merged with a user file.

Every section is a typed struct; a wrong key or value is refused naming the key and the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from schemas.tables import BUILTIN_MODELS, PARAM_FILES, Policy, RuleKind

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config.toml"
OVERRIDES_ENV = "MARGINFLOW_OVERRIDES"  # JSON overrides a parent (`marginflow up`) hands its children


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TickerplantConfig(Section):
    host: str
    port: int
    journal_dir: str
    publish_interval_ms: float
    fsync: Literal["none", "batch", "interval"]
    fsync_interval_ms: float
    subscriber_queue_frames: int
    max_message_bytes: int
    max_rows_per_message: int
    eod_time: str
    kdb_port: int = 5110  # kdb+ IPC (tickerplant/kdb.py) on `host`; 0 = off, -1 = any free port (tests)


class RdbConfig(Section):
    host: str
    port: int
    hdb_dir: str
    query_timeout_s: float
    max_result_rows: int
    memory_limit: str
    flush_rows: int = 65536  # queued appended rows inserted in one statement (and before every query)
    threads: int = 0  # DuckDB worker threads; 0 = one per core
    recovery_wait_s: float = (
        5.0  # a query during the journal replay waits this long (at most query_timeout_s),
    )
    # then gets an Error saying the rdb is recovering
    max_result_bytes: int = 64 << 20  # results are cut at this many bytes of Arrow data (the reply says so)
    kdb_port: int = 5111  # kdb+ IPC (rdb/kdb.py) on `host`; 0 = off, -1 = any free port (tests)
    live_chunk_ms: float = 50.0  # live batches read and applied in chunks this often; 0 = each on arrival
    nice: int | Literal["idle"] = "idle"  # the rdb's CPU priority: Unix nice 0-19 or "idle" (SCHED_IDLE)

    def __post_init__(self) -> None:
        if not _finite(self.live_chunk_ms, at_least=0.0) or self.live_chunk_ms > 10_000:
            raise ValueError(
                f"rdb.live_chunk_ms: must be a number 0-10000 (0 = off), got {self.live_chunk_ms!r}"
            )
        if self.nice != "idle" and not 0 <= self.nice <= 19:  # (msgspec refuses other kinds, bool too)
            raise ValueError(f'rdb.nice: must be an integer 0-19 or "idle", got {self.nice!r}')


def _finite(x: float, at_least: float | None = None, above: float | None = None) -> bool:
    return (
        isinstance(x, float | int)
        and math.isfinite(x)
        and (at_least is None or x >= at_least)
        and (above is None or x > above)
    )


class StressScenarioConfig(Section):
    """One [[calc.stress]] entry: named shocks per sym or sector, correlation / volatility multipliers."""

    name: str
    shocks: dict[str, float] = {}
    default_shock: float = 0.0
    correlation_multiplier: float = 1.0
    volatility_multiplier: float = 1.0

    def __post_init__(self) -> None:
        for key, move in [*self.shocks.items(), ("default_shock", self.default_shock)]:
            if not _finite(move, above=-1.0):
                raise ValueError(
                    f"calc.stress[{self.name!r}]: shock for {key!r} must be a finite move > -1 (-100%), "
                    f"got {move!r}"
                )
        for key in ("correlation_multiplier", "volatility_multiplier"):
            if not _finite(getattr(self, key), at_least=0.0):
                raise ValueError(
                    f"calc.stress[{self.name!r}]: {key} must be >= 0, got {getattr(self, key)!r}"
                )


class AlertRuleConfig(Section):
    """One [[calc.alerts]] entry (calc/alerts.py evaluates it). `threshold`: level -> margin amount;
    utilisation -> margin/collateral; jump -> relative rise of the margin over its lowest value within
    `window_minutes`; call -> multiple of collateral (1.0 = margin above collateral); predicted_call -> the
    amount of the forecast's call at the CCP's next cycle (calc/projection.py). Cleared below
    `clear` (default threshold * (1 - hysteresis): `clear_level`)."""

    name: str
    kind: RuleKind
    threshold: float
    clear: float | None = None
    hysteresis: float = 0.05
    window_minutes: float = 5.0
    accounts: list[str] = []
    webhook: str = ""  # http(s) URL each raised / cleared alert of this rule is POSTed to ("" = none)
    email: list[str] = []  # addresses each raised / cleared alert of this rule is mailed to (calc.email)
    min_hold_s: float = (
        60.0  # event-time seconds an alert stays raised (or cleared) before it may change again
    )

    def __post_init__(self) -> None:
        where = f"calc.alerts[{self.name!r}]"
        if not _finite(self.threshold):
            raise ValueError(f"{where}: threshold must be a finite number, got {self.threshold!r}")
        if not (0.0 <= self.hysteresis < 1.0):
            raise ValueError(f"{where}: hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if self.clear is not None and not (_finite(self.clear) and self.clear <= self.threshold):
            raise ValueError(f"{where}: clear must be a finite number <= threshold, got {self.clear!r}")
        _check_delivery(where, self.webhook, self.email)
        if not _finite(self.min_hold_s, at_least=0.0):
            raise ValueError(f"{where}: min_hold_s must be a finite number >= 0, got {self.min_hold_s!r}")
        if self.kind == "jump" and not self.window_minutes > 0:
            raise ValueError(f"{where}: window_minutes must be > 0, got {self.window_minutes!r}")

    @property
    def clear_level(self) -> float:
        return self.clear if self.clear is not None else self.threshold * (1.0 - self.hysteresis)


def _check_delivery(where: str, webhook: str, email: list[str]) -> None:
    """An alert route's webhook URL and email addresses (a rule's, or [calc.data_alerts])."""
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ValueError(f"{where}: webhook must be an http:// or https:// URL, got {webhook!r}")
    for address in email:
        if not _email_address(address):
            raise ValueError(f"{where}: email must list addresses like desk@example.com, got {address!r}")


def _email_address(text: str) -> bool:
    """One plain address (local@domain): no display name, spaces, commas or line breaks."""
    local, at, domain = text.partition("@")
    return bool(local and at and domain.strip(".")) and not any(
        c.isspace() or c in ',;<>"@' for c in local + domain
    )


class EmailConfig(Section):
    """[calc.email]: the SMTP server alert emails go through (calc/mail.py); a rule's `email` lists who gets
    its alerts. The password never sits in a config file: it comes from the environment variable
    `password_env`, or the file `password_file` (outside the repo, mode 0600)."""

    host: str = ""  # SMTP server; "" = no email (a rule with `email` then refuses to load)
    port: int = 25  # 25 / 587 (starttls) / 465 (tls)
    tls: Literal["none", "starttls", "tls"] = "none"  # plain SMTP, STARTTLS upgrade, or TLS from the start
    sender: str = "marginflow@localhost"  # the From address
    username: str = ""  # SMTP AUTH user; "" = no login
    password_env: str = "MARGINFLOW_SMTP_PASSWORD"  # environment variable holding the password
    password_file: str = ""  # else a file holding it (its first line); "" = the environment variable only
    timeout_s: float = 10.0  # time limit of one SMTP session (connect, TLS, login, send)
    subject_prefix: str = "[marginflow]"

    def __post_init__(self) -> None:
        if not _email_address(self.sender):
            raise ValueError(
                f"calc.email.sender: must be an address like alerts@example.com, got {self.sender!r}"
            )
        if not (0 < self.port < 65536):
            raise ValueError(f"calc.email.port: must be a TCP port 1-65535, got {self.port!r}")
        if not _finite(self.timeout_s, above=0.0):
            raise ValueError(f"calc.email.timeout_s: must be a finite number > 0, got {self.timeout_s!r}")
        if any(c in self.subject_prefix for c in "\r\n"):
            raise ValueError("calc.email.subject_prefix: must not contain a line break")


class DataAlertsConfig(Section):
    """[calc.data_alerts]: where data alerts go beside the socket and the alert table (kind "data", about an
    instrument or a file rather than an account: a tick held outside its price band, a parameter file
    refused). No [[calc.alerts]] rule raises them, so no rule's webhook or email can route them."""

    webhook: str = ""  # http(s) URL each raised / cleared data alert is POSTed to ("" = none)
    email: list[str] = []  # addresses each raised / cleared data alert is mailed to (calc.email)

    def __post_init__(self) -> None:
        _check_delivery("calc.data_alerts", self.webhook, self.email)


class PriceBandConfig(Section):
    """[calc.price_band]: calc's acceptance band for market data (calc/band.py)."""

    default: float = 0.5  # relative move from the last accepted price beyond which a tick is held as suspect
    confirm_ticks: int = (
        3  # this many consecutive suspect ticks agreeing with each other confirm the new level
    )
    sectors: dict[str, float] = {}  # sector (calc.sectors) -> band
    syms: dict[str, float] = {}  # sym -> band (beats its sector's)

    def __post_init__(self) -> None:
        for where, b in [
            ("default", self.default),
            *((f"sectors.{k}", v) for k, v in self.sectors.items()),
            *((f"syms.{k}", v) for k, v in self.syms.items()),
        ]:
            if not _finite(b, at_least=0.0):
                raise ValueError(
                    f"calc.price_band.{where}: must be a finite number >= 0 (0 = off), got {b!r}"
                )
        if self.confirm_ticks < 1:
            raise ValueError(f"calc.price_band.confirm_ticks: must be >= 1, got {self.confirm_ticks}")


class CcpModelConfig(Section):
    """One [[calc.ccp_models]] entry: a CCP-style VaR model (calc/ccp/) that an account uses by naming it
    in the accounts file's `model` column. Every field left out (None) takes the preset's value, else the
    base value (both tables in calc/ccp/presets.py, the one definition); a field given here wins."""

    name: str  # the model name accounts use (not a built-in model's name, unique)
    preset: Literal["prisma", "span2", ""] = ""  # documented defaults (calc/FEATURES.md); "" = the base table
    measure: Literal["var", "es"] | None = (
        None  # risk measure of each scenario set: VaR or expected shortfall
    )
    confidence: float | None = None  # VaR / ES confidence, in (0, 1)
    holding_days: int | None = None  # holding period (margin period of risk) in days, >= 1
    lookback_days: int | None = None  # daily returns of the filtered set, >= 1
    ewma_lambda: float | None = (
        None  # volatility filtering of the filtered set: EWMA decay in [0, 1); 0 = none
    )
    stress_from: str | None = (
        None  # first date (ISO) of the stressed period ("" with stress_to "" = no stressed set)
    )
    stress_to: str | None = None  # last date (ISO) of the stressed period, within the price history
    stress_combine: Literal["max", "weight"] | None = (
        None  # base = max(filtered, stressed), or the weighted sum
    )
    stress_weight: float | None = None  # "weight": base = x*filtered + (1-x)*stressed (SPAN 2's x), in [0, 1]
    apc: Literal["none", "buffer", "stress_weight", "floor"] | None = None  # RTS 153/2013 art. 28 tool
    apc_buffer: float | None = (
        None  # apc "buffer": add-on = this fraction of the base (>= 0.25 per art. 28(a))
    )
    apc_stress_weight: float | None = (
        None  # apc "stress_weight": weight of the stressed measure (>= 0.25, 28(b))
    )
    apc_floor_days: int | None = (
        None  # apc "floor": daily returns of the unfiltered floor set (2520 = 10 years)
    )
    liquidity: bool | None = None  # add half the live bid-ask spread x |qty| x multiplier per position
    concentration_adv_fraction: float | None = (
        None  # positions above this fraction of ADV take the add-on (> 0)
    )
    concentration_rate: float | None = (
        None  # add-on = rate x (|qty| - fraction x ADV)+ x mult x price; 0 = off
    )
    long_option_credit: float | None = None  # credit at most this fraction of long options' value, in [0, 1]
    premium_margin: bool | None = None  # charge short options' liquidation value (premium-style options)
    rounding: float | None = None  # margin rounded up to a multiple of this (0 = not rounded)

    def check(self, where: str) -> None:
        """Refuse a given value out of range, naming `where`.key (e.g. calc.ccp_models[1].confidence)."""

        def between(lo: float, hi: float, hi_open: bool = False) -> Any:
            return lambda x: _finite(x, at_least=lo) and (x < hi if hi_open else x <= hi)

        def days(x: Any) -> bool:
            return isinstance(x, int) and x >= 1

        checks: list[tuple[str, Any, str]] = [
            ("confidence", lambda x: _finite(x, above=0.0) and x < 1.0, "strictly between 0 and 1"),
            ("holding_days", days, "an integer >= 1"),
            ("lookback_days", days, "an integer >= 1"),
            ("ewma_lambda", between(0.0, 1.0, hi_open=True), "in [0, 1)"),
            ("stress_weight", between(0.0, 1.0), "in [0, 1]"),
            ("apc_buffer", lambda x: _finite(x, at_least=0.0), ">= 0"),
            ("apc_stress_weight", between(0.0, 1.0), "in [0, 1]"),
            ("apc_floor_days", days, "an integer >= 1"),
            ("concentration_adv_fraction", lambda x: _finite(x, above=0.0), "> 0"),
            ("concentration_rate", lambda x: _finite(x, at_least=0.0), ">= 0"),
            ("long_option_credit", between(0.0, 1.0), "in [0, 1]"),
            ("rounding", lambda x: _finite(x, at_least=0.0), ">= 0 (0 = off)"),
        ]
        if not self.name:
            raise ValueError(f"{where}.name: must not be empty")
        for key, ok, rule in checks:
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise ValueError(f"{where}.{key}: must be {rule}, got {value!r}")
        for key in ("stress_from", "stress_to"):
            value = getattr(self, key)
            if value and not _iso_date(value):
                raise ValueError(f"{where}.{key}: must be an ISO date YYYY-MM-DD, got {value!r}")
        lo, hi = self.stress_from, self.stress_to
        if lo is not None and hi is not None and (bool(lo) != bool(hi) or lo > hi):
            raise ValueError(
                f"{where}.stress_to: the stressed period needs stress_from <= stress_to (both or "
                f"neither), got {lo!r} .. {hi!r}"
            )


class CycleConfig(Section):
    """One margin cycle of a CCP: its name (the `cycle` of its calls) and local time of day "HH:MM"."""

    name: str
    time: str


class CcpConfig(Section):
    """One [[calc.ccps]] entry: when a clearing house calculates and calls (calc/cycles.py). Cycles run on
    business days (Monday to Friday, not `holidays`) at their local `time` in `timezone`, in time order; the
    last is the end-of-day cycle. A call is the requirement (rounded up to `rounding`) minus the collateral,
    made only when at least `minimum_transfer`; each cycle prices positions at the cycle time's prices."""

    name: str
    timezone: str = "UTC"  # an IANA zone, e.g. "America/New_York", "Europe/Berlin"
    cycles: list[CycleConfig] = []
    minimum_transfer: float = 0.0  # a call or return smaller than this is not made
    rounding: float = 0.0  # requirements rounded up to a multiple of this (0 = not rounded)
    holidays: list[str] = []  # ISO dates with no cycle

    def check(self, where: str) -> None:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{where}.timezone: unknown time zone {self.timezone!r}") from None
        if not self.cycles:
            raise ValueError(f"{where}.cycles: a CCP needs at least one cycle")
        last = -1
        for i, c in enumerate(self.cycles):
            try:
                t = dt.time.fromisoformat(c.time)
            except ValueError:
                raise ValueError(f"{where}.cycles[{i}].time: {c.time!r} is not a time HH:MM") from None
            minutes = t.hour * 60 + t.minute
            if minutes <= last:
                raise ValueError(f"{where}.cycles[{i}].time: cycles must be in time order within the day")
            last = minutes
        names = [c.name for c in self.cycles]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"{where}.cycles: names must be unique and non-empty, got {names}")
        for key in ("minimum_transfer", "rounding"):
            if not _finite(getattr(self, key), at_least=0.0):
                raise ValueError(f"{where}.{key}: must be a finite number >= 0, got {getattr(self, key)!r}")
        bad = [d for d in self.holidays if not _iso_date(d)]
        if bad:
            raise ValueError(f"{where}.holidays: not ISO dates YYYY-MM-DD: {bad}")


def _iso_date(text: str) -> bool:
    try:
        return len(text) == 10 and dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


class CalcConfig(Section):
    host: str
    port: int
    publish_interval_ms: float
    journal_interval_ms: float
    busy_poll_ms: float
    history_file: str
    lookback_days: int
    confidence: float
    horizon_days: int
    ewma_lambda: float
    filtered: bool
    positions_file: str
    accounts_file: str
    filter_lambda: float
    hvar_margin: Literal["var", "es"]
    default_policy: Policy
    top_drivers: Annotated[int, msgspec.Meta(ge=1)]
    resync_events: Annotated[int, msgspec.Meta(ge=0)]  # 0 = never
    sectors: dict[str, str]
    stress: list[StressScenarioConfig]
    alerts: list[AlertRuleConfig]
    webhook_retries: int
    webhook_timeout_s: float
    webhook_queue: int
    instruments_file: str = (
        ""  # instrument master (calc/instruments.py): options and futures; "" = stocks only
    )
    vol_surface_file: str = (
        ""  # implied vols by underlying, expiry, moneyness (calc/volsurface.py); "" = none
    )
    vol_scenarios: Literal["none", "proxy"] = "proxy"  # options' implied vol in the HS scenarios
    vol_history_file: str = ""  # implied-vol history per underlying (a price-history layout) beats the proxy
    theta: bool = False  # HS full revaluation: age options by the holding period in each scenario
    american: Literal["bs2002", "bs1993"] = "bs2002"  # Bjerksund-Stensland version for American options
    option_rate: float = 0.0  # risk-free rate of options whose instruments row gives no `rate`
    as_of: str = (
        ""  # options' valuation date (time to expiry): "" = the history's last date, "today" = UTC date
    )
    span_file: str = ""  # SPAN XML file in force at start for accounts with model "span" ("" = none)
    params_dir: str = "var/params"  # parameter files stored by content hash (`marginflow params load`)
    price_band: PriceBandConfig = msgspec.field(default_factory=PriceBandConfig)
    ccp_models: list[CcpModelConfig] = []  # CCP-style VaR models ([[calc.ccp_models]], calc/ccp/)
    stall_after_s: float = (
        10.0  # /health says "stalled" (503) when rows wait this long for the tickerplant's ack
    )
    stress_all: bool = True  # stress scenarios for every built-in-model account (else stress/max_stress only)
    ccps: list[CcpConfig] = []  # when each CCP calls ([[calc.ccps]]); an account's `ccp` or the first one
    forecast_file: str = ""  # a trained forecast (`marginflow forecast train`); "" = the replica + its errors
    forecast_leads_s: list[int] = msgspec.field(default_factory=lambda: [900, 3600, 7200])  # parallel run
    forecast_interval_ms: float = 100.0  # the forecast is evaluated at most this often (0 = every publish)
    email: EmailConfig = msgspec.field(default_factory=EmailConfig)  # SMTP for the rules' `email`
    data_alerts: DataAlertsConfig = msgspec.field(default_factory=DataAlertsConfig)  # data alerts' routes
    rest_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = (
        5013  # REST API on calc's host (calc/rest.py); 0 = off
    )
    metrics: bool = (
        True  # count events, latencies, what-ifs for /metrics (false: only what is read at scrape)
    )
    shard: str = ""  # "K/N": this calc owns shard K (0..N-1) of N (calc/shard.py); "" = every account
    shard_file: str = ""  # explicit assignments, CSV account,shard (beats the hash); "" = hash only
    extra: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if self.shard:
            from calc.shard import parse_shard

            parse_shard(self.shard)
        names = [r.name for r in self.alerts]
        if len(set(names)) != len(names):
            raise ValueError(f"calc.alerts: rule names must be unique, got {names}")
        for r in self.alerts:
            if r.email and not self.email.host:
                raise ValueError(f"calc.alerts[{r.name!r}]: email needs an SMTP server (calc.email.host)")
        if self.data_alerts.email and not self.email.host:
            raise ValueError("calc.data_alerts: email needs an SMTP server (calc.email.host)")
        seen: set[str] = set()
        for i, m in enumerate(self.ccp_models):
            where = f"calc.ccp_models[{i}]"
            m.check(where)
            if m.name in BUILTIN_MODELS or m.name == "span" or m.name in seen:
                why = "a built-in model's name" if m.name not in seen else "used by an earlier entry"
                raise ValueError(f"{where}.name: {m.name!r} is {why} (names must be unique)")
            seen.add(m.name)
        ccp_names = [c.name for c in self.ccps]
        if len(set(ccp_names)) != len(ccp_names):
            raise ValueError(f"calc.ccps: names must be unique, got {ccp_names}")
        for i, c in enumerate(self.ccps):
            c.check(f"calc.ccps[{i}]")
        if not _finite(self.forecast_interval_ms, at_least=0.0) or self.forecast_interval_ms > 60_000:
            raise ValueError(
                f"calc.forecast_interval_ms: must be a number 0-60000 (0 = every publish), "
                f"got {self.forecast_interval_ms!r}"
            )
        if any(not (isinstance(s, int) and s > 0) for s in self.forecast_leads_s):
            raise ValueError(f"calc.forecast_leads_s: seconds > 0, got {self.forecast_leads_s}")


class LocalDesk(Section):
    """One [[access.local_desks]] entry: a desk credential created with the local tokens (demo desks)."""

    desk: str
    accounts: list[str]  # ["*"] = every account


class AccessConfig(Section):
    """Authentication and authorization on every port (marginflow/auth.py)."""

    credentials_file: str = "var/credentials.json"  # every credential, tokens stored as sha256 (mode 0600)
    client_credentials_file: str = "var/client-credentials.json"  # the local commands' own credentials (0600)
    local_desks: list[LocalDesk] = []
    allowed_origins: list[str] = []  # browser origins allowed on every port; [] = calc's own http://host:port
    max_auth_failures: int = 3  # failed authentications per address within the window before it is blocked
    auth_failure_window_s: float = 60.0
    auth_backoff_s: float = 2.0  # first block; doubles on each repeat up to auth_backoff_max_s
    auth_backoff_max_s: float = 60.0
    tls_cert: str = ""  # PEM certificate (chain) for every server; "" = plaintext ws:// and http://
    tls_key: str = ""  # its PEM private key ("" = in tls_cert)
    tls_ca: str = ""  # CA file clients trust for wss:// ("" = tls_cert when set, else the system's CAs)
    allow_plaintext_remote: bool = False  # allow binding a non-loopback host without TLS


class FeedConfig(Section):
    rate: float
    accounts: int
    fill_ratio: float
    seed: int
    prices_file: str


class UpConfig(Section):
    """`marginflow up`'s supervision of its children."""

    health_interval_s: float = 2.0
    unhealthy_restart_s: float = 15.0
    healthy_reset_s: float = 30.0
    max_backoff_s: float = 5.0


class WatchConfig(Section):
    """[params.watch]: parameter files that arrive by themselves (calc/watch.py). Per kind of
    `marginflow params load` (schemas.tables.PARAM_FILES) a folder whose new files are loaded, and/or an
    http(s) URL polled (ETag / Last-Modified respected); each new file is loaded as `params load` does."""

    folders: dict[str, str] = {}  # kind -> folder, e.g. { span = "var/inbox/span" } ({} = none watched)
    urls: dict[str, str] = {}  # kind -> http(s) URL of the latest file, e.g. { span = "https://ccp/x.spn" }
    poll_interval_s: float = 5.0  # the folders are listed this often
    settle_s: float = 2.0  # a file is read once unchanged (size, mtime) since the last listing or this long
    url_poll_interval_s: float = 300.0  # each URL is asked this often (a conditional GET)
    timeout_s: float = 30.0  # time limit of one URL download
    max_file_bytes: int = 268435456  # a larger file is refused with an alert (256 MiB)

    def __post_init__(self) -> None:
        for key, kinds in (("folders", self.folders), ("urls", self.urls)):
            for kind, where in kinds.items():
                if kind not in PARAM_FILES:
                    raise ValueError(
                        f"params.watch.{key}: kind {kind!r} is not one of {', '.join(PARAM_FILES)}"
                    )
                if not where:
                    raise ValueError(f"params.watch.{key}.{kind}: must not be empty")
        for kind, url in self.urls.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"params.watch.urls.{kind}: must be an http:// or https:// URL, got {url!r}")
        for key in ("poll_interval_s", "url_poll_interval_s", "timeout_s"):
            if not _finite(getattr(self, key), above=0.0):
                raise ValueError(
                    f"params.watch.{key}: must be a finite number > 0, got {getattr(self, key)!r}"
                )
        if not _finite(self.settle_s, at_least=0.0):
            raise ValueError(f"params.watch.settle_s: must be a finite number >= 0, got {self.settle_s!r}")
        if self.max_file_bytes < 1:
            raise ValueError(f"params.watch.max_file_bytes: must be >= 1, got {self.max_file_bytes!r}")


class ParamsConfig(Section):
    """[params]: risk parameter files beyond `marginflow params load` (which needs no settings)."""

    watch: WatchConfig = msgspec.field(default_factory=WatchConfig)


class BusConfig(Section):
    """[bus]: how batches leave the tickerplant besides its websocket fan-out (tickerplant/bus.py).
    "websocket" (the default) changes nothing; "nats" also publishes every journaled batch to a NATS
    JetStream stream, from which tickerplant/nats_client.py's NatsSubscriber reads."""

    kind: Literal["websocket", "nats"] = "websocket"
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])  # any nodes' URLs
    stream: str = "MF"  # the JetStream stream on subjects mf.> (created if missing)
    replicas: int = 1  # the stream's copies across nodes: 3 in a 3-node cluster (R3)
    duplicate_window_s: float = 120.0  # JetStream drops a message whose Nats-Msg-Id it stored this recently
    max_age_s: float = 172800.0  # messages older than this leave the stream (the journal keeps everything)
    ack_timeout_s: float = 2.0  # a publish not acknowledged this fast counts as failed (then resent)
    retry_interval_s: float = 1.0  # while the bus is down, try again this often (resending from the journal)
    max_pending_batches: int = 10000  # flushes queued for the bus beyond this: resent from the journal later
    credentials_env: str = ""  # name of an environment variable holding the bus token ("" = none)
    credentials_file: str = ""  # a NATS .creds file (JWT + seed; "" = none); never put a secret in config
    tls_ca: str = ""  # CA file the client trusts for tls:// servers ("" = the system's CAs)
    tls_cert: str = ""  # client certificate (mutual TLS; "" = none)
    tls_key: str = ""  # its private key ("" = in tls_cert)
    lease_bucket: str = "MF_SHARDS"  # JetStream key-value bucket of the calc shards' leases (calc/shard.py)
    lease_ttl_s: float = 3.0  # a shard's lease lapses this long after its holder's last renewal
    buckets: int = 64  # subjects mf.<table>.<b>, b = blake2b(key) mod this (schemas/bus.py); fixed per stream

    def __post_init__(self) -> None:
        if not self.lease_bucket or any(c in self.lease_bucket for c in ". *>"):
            raise ValueError(
                f"bus.lease_bucket: a name without spaces, '.', '*' or '>', got {self.lease_bucket!r}"
            )
        if self.kind == "nats" and not self.servers:
            raise ValueError('bus.servers: at least one NATS URL when kind = "nats"')
        if not self.stream or any(c in self.stream for c in ". *>"):
            raise ValueError(f"bus.stream: a name without spaces, '.', '*' or '>', got {self.stream!r}")
        if self.replicas < 1 or self.replicas > 5:
            raise ValueError(f"bus.replicas: must be 1..5, got {self.replicas!r}")
        for key in ("duplicate_window_s", "max_age_s", "ack_timeout_s", "retry_interval_s", "lease_ttl_s"):
            if not _finite(getattr(self, key), above=0.0):
                raise ValueError(f"bus.{key}: must be a finite number > 0, got {getattr(self, key)!r}")
        if self.max_pending_batches < 1:
            raise ValueError(f"bus.max_pending_batches: must be >= 1, got {self.max_pending_batches!r}")
        if not 1 <= self.buckets <= 4096:
            raise ValueError(f"bus.buckets: must be 1..4096, got {self.buckets!r}")


class Config(Section):
    tickerplant: TickerplantConfig
    rdb: RdbConfig
    calc: CalcConfig
    access: AccessConfig
    feed: FeedConfig
    up: UpConfig
    params: ParamsConfig = msgspec.field(default_factory=ParamsConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)


PATH_KEYS = {
    ("tickerplant", "journal_dir"),
    ("rdb", "hdb_dir"),
    ("calc", "history_file"),
    ("calc", "positions_file"),
    ("calc", "accounts_file"),
    ("calc", "span_file"),
    ("calc", "forecast_file"),
    ("calc", "params_dir"),
    ("calc", "shard_file"),
    ("feed", "prices_file"),
    ("access", "credentials_file"),
    ("access", "client_credentials_file"),
    ("access", "tls_cert"),
    ("access", "tls_key"),
    ("access", "tls_ca"),
    ("bus", "credentials_file"),
    ("bus", "tls_ca"),
    ("bus", "tls_cert"),
    ("bus", "tls_key"),
}
_current: Config | None = None  # the last config this process loaded (its clients' access settings)


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    base = path.resolve().parent
    for section, key in PATH_KEYS:
        if data.get(section, {}).get(key):  # ("" stays "": off)
            data[section][key] = str((base / data[section][key]).resolve())
    folders = data.get("params", {}).get("watch", {}).get("folders")
    if isinstance(folders, dict):  # watched folders: relative to the file that names them, too
        folders.update({k: str((base / v).resolve()) for k, v in folders.items() if isinstance(v, str) and v})
    email = data.get("calc", {}).get("email", {})
    if isinstance(email, dict) and email.get("password_file"):
        email["password_file"] = str((base / email["password_file"]).resolve())
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults from the project's config.toml, then `path` merged over them, then the JSON in
    $MARGINFLOW_OVERRIDES, then `overrides` (a nested dict, e.g. {"tickerplant": {"port": 0}});
    refused with the key and reason if invalid."""
    data = _read(DEFAULT_CONFIG)
    if path is not None:
        data = _merge(data, _read(Path(path)))
    if os.environ.get(OVERRIDES_ENV):
        data = _merge(data, json.loads(os.environ[OVERRIDES_ENV]))
    if overrides:
        data = _merge(data, overrides)
    cfg = _convert(data, Config)
    global _current
    _current = cfg  # the process's clients find their credentials through it
    return cfg


def _convert(data: dict[str, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as e:
        raise SystemExit(f"config: {e}") from None


def calc_defaults(**overrides: Any) -> CalcConfig:
    """The [calc] section of the project's config.toml with `overrides` (its keys; nested sections as
    dicts or structs) merged over it, checked as `load` checks: for programs and tests that build an
    engine without a config file. Reads no $MARGINFLOW_OVERRIDES and leaves `current()` alone."""
    data = _merge(_read(DEFAULT_CONFIG)["calc"], msgspec.to_builtins(overrides))
    return _convert(data, CalcConfig)


def current() -> Config:
    """The config this process loaded last (the defaults if none yet): where a client finds its local
    token and TLS settings, and a server the dashboard's address (the default allowed Origin)."""
    return _current if _current is not None else load()


def current_access() -> AccessConfig:
    return current().access
