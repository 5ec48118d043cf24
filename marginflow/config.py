"""The one place configuration keys are read: config.toml's embedded defaults merged with a user file.

Every section is a typed struct; a wrong key or value is refused naming the key and the reason.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

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


class StressScenarioConfig(Section):
    """One [[calc.stress]] entry: named shocks per sym or sector, correlation / volatility multipliers."""

    name: str
    shocks: dict[str, float] = {}
    default_shock: float = 0.0
    correlation_multiplier: float = 1.0
    volatility_multiplier: float = 1.0


class AlertRuleConfig(Section):
    """One [[calc.alerts]] entry (calc/alerts.py: AlertRule)."""

    name: str
    kind: Literal["level", "utilisation", "jump", "call"]
    threshold: float
    clear: float | None = None
    hysteresis: float = 0.05
    window_minutes: float = 5.0
    accounts: list[str] = []
    webhook: str = ""
    min_hold_s: float = (
        60.0  # event-time seconds an alert stays raised (or cleared) before it may change again
    )


class PriceBandConfig(Section):
    """[calc.price_band]: calc's acceptance band for market data (calc/engine.py)."""

    default: float = 0.5  # relative move from the last accepted price beyond which a tick is held as suspect
    confirm_ticks: int = (
        3  # this many consecutive suspect ticks agreeing with each other confirm the new level
    )
    sectors: dict[str, float] = {}  # sector (calc.sectors) -> band
    syms: dict[str, float] = {}  # sym -> band (beats its sector's)


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
    default_policy: Literal["model", "max_stress"]
    top_drivers: int
    resync_events: int
    sectors: dict[str, str]
    stress: list[StressScenarioConfig]
    alerts: list[AlertRuleConfig]
    webhook_retries: int
    webhook_timeout_s: float
    webhook_queue: int
    span_file: str = ""  # SPAN XML file in force at start for accounts with model "span" ("" = none)
    params_dir: str = "var/params"  # parameter files stored by content hash (`marginflow params load`)
    price_band: PriceBandConfig = msgspec.field(default_factory=PriceBandConfig)
    stall_after_s: float = (
        10.0  # /health says "stalled" (503) when rows wait this long for the tickerplant's ack
    )
    extra: dict[str, Any] = {}


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


class Config(Section):
    tickerplant: TickerplantConfig
    rdb: RdbConfig
    calc: CalcConfig
    access: AccessConfig
    feed: FeedConfig
    up: UpConfig


PATH_KEYS = {
    ("tickerplant", "journal_dir"),
    ("rdb", "hdb_dir"),
    ("calc", "history_file"),
    ("calc", "positions_file"),
    ("calc", "accounts_file"),
    ("calc", "span_file"),
    ("calc", "params_dir"),
    ("feed", "prices_file"),
    ("access", "credentials_file"),
    ("access", "client_credentials_file"),
    ("access", "tls_cert"),
    ("access", "tls_key"),
    ("access", "tls_ca"),
}
_current: Config | None = None  # the last config this process loaded (its clients' access settings)


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    base = path.resolve().parent
    for section, key in PATH_KEYS:
        if data.get(section, {}).get(key):  # ("" stays "": off)
            data[section][key] = str((base / data[section][key]).resolve())
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
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise SystemExit(f"config: {e}") from None
    global _current
    _current = cfg  # the process's clients find their credentials through it
    return cfg


def current() -> Config:
    """The config this process loaded last (the defaults if none yet): where a client finds its local
    token and TLS settings, and a server the dashboard's address (the default allowed Origin)."""
    return _current if _current is not None else load()


def current_access() -> AccessConfig:
    return current().access
