"""Who may do what, as plain functions over plain data: credentials (hashed tokens with roles, a desk and
its accounts), the roles each request needs, throttling of failed authentications, the Origin allow-list,
TLS contexts, and the local credentials the project's own commands use.

The servers (tickerplant, rdb, calc) call these from their websocket handshake: `authenticate` a
`Authorization: Bearer <token>` header against a `CredentialStore`, `Throttle` the peer address, check
`origin_allowed`. Clients find their token with `local_token(role)` (`client_options` builds the
websocket `connect` keyword arguments: the header and, for wss://, the TLS context).

Files (both mode 0600, written atomically, in the git-ignored var/):
- `access.credentials_file`: every credential, the token stored as its sha256 only. Servers reread it
  when it changes (`marginflow tokens rotate/revoke` takes effect without a restart).
- `access.client_credentials_file`: the plaintext tokens of the local credentials (one per role, one per
  demo desk), created on first need so `make demo` and every README command work with no token typed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import ssl
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from marginflow.files import write_atomic

if TYPE_CHECKING:
    from marginflow.config import AccessConfig

ROLES = ("publisher", "subscriber", "query", "admin")  # admin may do everything the others may
LOCAL_ROLES = ROLES  # one local credential per role: local-admin, local-publisher, ...
ADMIN_TABLES = frozenset({"param"})  # upd into these puts risk parameters in force: admin only


class Credential(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One stored credential. `token_sha256` is the hex sha256 of the token; `accounts` ["*"] = all."""

    name: str
    token_sha256: str
    roles: list[str]
    desk: str = ""
    accounts: list[str] = msgspec.field(default_factory=lambda: ["*"])
    created: str = ""


@dataclass(frozen=True)
class Principal:
    """An authenticated connection's identity: what its credential may do and see."""

    name: str
    roles: frozenset[str]
    desk: str = ""
    accounts: frozenset[str] | None = None  # None: every account

    def has(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles

    def may_see(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts

    @property
    def main_role(self) -> str:
        return next((r for r in ROLES[::-1] if r in self.roles), "none")


SYSTEM = Principal("system", frozenset(ROLES))  # in-process callers (tests, benchmarks of the core)


def principal_of(c: Credential) -> Principal:
    accounts = None if "*" in c.accounts else frozenset(c.accounts)
    return Principal(c.name, frozenset(c.roles), c.desk, accounts)


def not_permitted(principal: Principal | None, role: str, what: str) -> str | None:
    """None if `principal` has `role`, else the refusal's reason."""
    if principal is None:
        return f"not authenticated: a token with role {role} is needed for {what}"
    if principal.has(role):
        return None
    roles = ", ".join(sorted(principal.roles))
    return f"not permitted: {role} needed for {what} (token {principal.name!r} has {roles})"


# ---- tokens and their hashes ----------------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """sha256 hex. Tokens are 32 random bytes (secrets.token_urlsafe), not passwords: no dictionary to
    attack and 2^256 to search, so a slow salted hash (bcrypt, scrypt) would add nothing but cost per
    handshake, and an unsalted digest lets a store look a token up by its hash (a dict lookup; no
    comparison loop whose timing depends on the secret)."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(headers: Mapping[str, str] | Any) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, "" if the header is malformed, None if
    absent."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---- files: atomic (marginflow/files.py), 0600, under a lock -----------------------------------------------
@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock (flock on `<path>.lock`) held by one process at a time: every change to the
    credential files happens under it, so processes starting together create the local tokens once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_credentials(path: Path) -> list[Credential]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        return msgspec.json.decode(data, type=list[Credential])
    except msgspec.DecodeError as e:
        raise ValueError(f"credentials file {path}: {e}") from None


def write_credentials(path: Path, creds: Iterable[Credential]) -> None:
    write_atomic(path, msgspec.json.format(msgspec.json.encode(sorted(creds, key=lambda c: c.name))) + b"\n")


class CredentialStore:
    """The credentials file as a lookup table hash -> Principal, reread when the file changes (checked by
    stat on every authentication: a handshake is rare, a stat is microseconds)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Principal] = {}
        self.error = ""

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        try:
            creds = read_credentials(self.path)
        except ValueError as e:  # keep the last good table; say why
            self.error = str(e)
            return
        self._stamp, self.error = stamp, ""
        self._by_hash = {c.token_sha256: principal_of(c) for c in creds}

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        self._reload()
        return self._by_hash.get(token_hash(token))


# ---- throttling -----------------------------------------------------------------------------------------
@dataclass
class _Peer:
    failures: list[float] = field(default_factory=list)
    blocked_until: float = 0.0
    level: int = 0  # back-offs so far (each doubles the next)


@dataclass
class Throttle:
    """Failed authentications per peer address: after `max_failures` within `window_s`, the address is
    refused for a back-off (`backoff_s`, doubling at each repeat, at most `backoff_max_s`) before any
    token is looked at. The repeat count decays after a quiet `backoff_max_s`."""

    max_failures: int = 3
    window_s: float = 60.0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    clock: Any = time.monotonic
    peers: dict[str, _Peer] = field(default_factory=dict)
    refused: int = 0  # attempts refused while blocked

    def blocked(self, addr: str) -> float:
        """Seconds the address stays refused (0: it may try)."""
        p = self.peers.get(addr)
        if p is None:
            return 0.0
        left = p.blocked_until - self.clock()
        if left > 0:
            self.refused += 1
            return left
        return 0.0

    def failure(self, addr: str) -> bool:
        """Count a failed authentication; True when the address is now blocked."""
        now = self.clock()
        p = self.peers.setdefault(addr, _Peer())
        if p.level and now - p.blocked_until > self.backoff_max_s:
            p.level = 0
        p.failures = [t for t in p.failures if now - t < self.window_s] + [now]
        if len(p.failures) >= self.max_failures:
            p.blocked_until = now + min(self.backoff_max_s, self.backoff_s * 2**p.level)
            p.level += 1
            p.failures = []
            return True
        if len(self.peers) > 100_000:  # bounded memory under a spray of addresses
            self._prune(now)
        return False

    def _prune(self, now: float) -> None:
        for addr in [a for a, p in self.peers.items() if p.blocked_until < now and not p.failures]:
            del self.peers[addr]


def throttle_of(access: AccessConfig) -> Throttle:
    return Throttle(
        access.max_auth_failures,
        access.auth_failure_window_s,
        access.auth_backoff_s,
        access.auth_backoff_max_s,
    )


# ---- Origin -----------------------------------------------------------------------------------------------
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_origins(calc_host: str, calc_port: int, tls: bool) -> frozenset[str]:
    """The dashboard's own origins: calc's host:port, and its loopback names when it binds loopback or
    every interface."""
    scheme = "https" if tls else "http"
    hosts = {calc_host}
    if is_loopback(calc_host) or calc_host in ("", "0.0.0.0", "::"):
        hosts |= set(LOOPBACK_NAMES)
    hosts.discard("")
    return frozenset(f"{scheme}://{h}:{calc_port}" for h in hosts)


def allowed_origins(access: AccessConfig, calc_host: str, calc_port: int) -> frozenset[str]:
    if access.allowed_origins:
        return frozenset(o.rstrip("/") for o in access.allowed_origins)
    return default_origins(calc_host, calc_port, bool(access.tls_cert))


def configured_origins(access: AccessConfig | None = None) -> frozenset[str]:
    """The allowed Origins with calc's address from the config this process loaded."""
    from marginflow import config

    cfg = config.current()
    return allowed_origins(access or cfg.access, cfg.calc.host, cfg.calc.port)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Programs send no Origin and pass; a browser page passes only from an allowed origin."""
    return origin is None or origin.rstrip("/") in allowed


# ---- TLS and binding ------------------------------------------------------------------------------------
def server_ssl(access: AccessConfig) -> ssl.SSLContext | None:
    if not access.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(access.tls_cert, access.tls_key or None)
    return ctx


def client_ssl(url: str, access: AccessConfig | None = None) -> ssl.SSLContext | None:
    """For a wss:// URL: the system's CAs, or `access.tls_ca` (default: the server's own `tls_cert`, which
    for a self-signed certificate is its own CA)."""
    if not url.startswith("wss://"):
        return None
    access = access or current_access()
    ca = access.tls_ca or access.tls_cert
    return ssl.create_default_context(cafile=ca or None)


def scheme(access: AccessConfig, secure: str = "wss", plain: str = "ws") -> str:
    return secure if access.tls_cert else plain


def check_bind(what: str, host: str, access: AccessConfig) -> None:
    """Refuse to listen beyond loopback in plaintext unless config says so (tokens would cross the network
    in clear)."""
    if is_loopback(host) or access.tls_cert or access.allow_plaintext_remote:
        return
    raise SystemExit(
        f"{what}: refusing to bind {host!r} without TLS: set access.tls_cert and access.tls_key "
        "(or access.allow_plaintext_remote = true on a trusted network)"
    )


# ---- local credentials ------------------------------------------------------------------------------------
def local_names(access: AccessConfig) -> dict[str, Credential]:
    """key in the local tokens file -> the credential it stands for (token hash left empty)."""
    out = {role: Credential(name=f"local-{role}", token_sha256="", roles=[role]) for role in LOCAL_ROLES}
    for d in access.local_desks:
        out[f"desk:{d.desk}"] = Credential(
            name=f"desk-{d.desk}",
            token_sha256="",
            roles=["subscriber", "query"],
            desk=d.desk,
            accounts=list(d.accounts),
        )
    return out


def read_local(access: AccessConfig) -> dict[str, str]:
    try:
        return json.loads(Path(access.client_credentials_file).read_text())
    except FileNotFoundError:
        return {}


def ensure_local(access: AccessConfig) -> tuple[dict[str, str], bool]:
    """The local tokens (key -> token), creating any that are missing (and their credentials) under the
    lock; True when the file was created now (the first start)."""
    local = read_local(access)
    wanted = local_names(access)
    if all(k in local for k in wanted) and os.path.exists(access.credentials_file):
        return local, False
    path = Path(access.client_credentials_file)
    with locked(Path(access.credentials_file)):
        created = not path.exists()
        local = read_local(access)
        creds = {c.name: c for c in read_credentials(Path(access.credentials_file))}
        missing = [k for k in wanted if k not in local]
        lost = [k for k in wanted if k in local and wanted[k].name not in creds]  # credentials file deleted
        if not missing and not lost:
            return local, False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for k in missing + lost:
            local[k] = local.get(k) or new_token()
            creds[wanted[k].name] = msgspec.structs.replace(
                wanted[k], token_sha256=token_hash(local[k]), created=stamp
            )
        write_credentials(
            Path(access.credentials_file), creds.values()
        )  # the hashes first: then the tokens work
        write_atomic(path, json.dumps(local, indent=1).encode() + b"\n")
        return local, created


def local_token(role: str, access: AccessConfig | None = None) -> str:
    """The local token for `role` ("admin", "publisher", "subscriber", "query") or a demo desk
    ("desk:risk")."""
    local, _ = ensure_local(access or current_access())
    if role not in local:
        raise KeyError(f"no local token {role!r}; local tokens are {', '.join(local)}")
    return local[role]


def client_options(
    url: str, role: str, token: str | None = None, access: AccessConfig | None = None
) -> dict[str, Any]:
    """websockets `connect` keyword arguments for a project client: the bearer header (`token`, or the
    local token of `role`) and, for wss://, the TLS context."""
    access = access or current_access()
    token = token or local_token(role, access)
    out: dict[str, Any] = {"additional_headers": {"Authorization": f"Bearer {token}"}}
    ctx = client_ssl(url, access)
    if ctx is not None:
        out["ssl"] = ctx
    return out


def current_access() -> AccessConfig:
    from marginflow import config

    return config.current_access()


# ---- credential administration (marginflow tokens) --------------------------------------------------------
def create(
    access: AccessConfig,
    name: str,
    roles: list[str],
    desk: str = "",
    accounts: list[str] | None = None,
    replace: bool = False,
) -> str:
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"roles: {', '.join(bad) or 'none given'}; roles are {', '.join(ROLES)}")
    path = Path(access.credentials_file)
    token = new_token()
    with locked(path):
        creds = {c.name: c for c in read_credentials(path)}
        if name in creds and not replace:
            raise ValueError(f"name: a credential {name!r} exists (rotate or revoke it)")
        creds[name] = Credential(
            name=name,
            token_sha256=token_hash(token),
            roles=roles,
            desk=desk,
            accounts=accounts or ["*"],
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_credentials(path, creds.values())
    return token


def _local_key(access: AccessConfig, name: str) -> str | None:
    return next((k for k, c in local_names(access).items() if c.name == name), None)


def revoke(access: AccessConfig, name: str) -> None:
    path = Path(access.credentials_file)
    with locked(path):
        creds = {c.name: c for c in read_credentials(path)}
        if name not in creds:
            raise ValueError(f"name: no credential {name!r}")
        del creds[name]
        write_credentials(path, creds.values())
        key = _local_key(access, name)
        local = read_local(access)
        if key and key in local:
            del local[key]
            write_atomic(Path(access.client_credentials_file), json.dumps(local, indent=1).encode() + b"\n")


def rotate(access: AccessConfig, name: str) -> str:
    """A new token for `name` (the old one stops working at once); a local credential's file entry follows."""
    path = Path(access.credentials_file)
    token = new_token()
    with locked(path):
        creds = {c.name: c for c in read_credentials(path)}
        if name not in creds:
            raise ValueError(f"name: no credential {name!r}")
        creds[name] = msgspec.structs.replace(creds[name], token_sha256=token_hash(token))
        write_credentials(path, creds.values())
        key = _local_key(access, name)
        if key:
            local = read_local(access)
            local[key] = token
            write_atomic(Path(access.client_credentials_file), json.dumps(local, indent=1).encode() + b"\n")
    return token


# ---- the handshake: one gate per server -------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status of the refused handshake (401, 403, 429, 400)
    reason: str


NO_URL_TOKENS = (
    "a token in the URL is not accepted (URLs get logged): programs send an Authorization: Bearer "
    "header, the dashboard takes #token= from the page address"
)


class Gate:
    """A server's door: Origin allow-list, throttling by address, bearer token -> Principal, a role needed
    to connect at all. `principals` remembers each accepted connection's principal (weakly)."""

    def __init__(
        self,
        access: AccessConfig,
        origins: frozenset[str],
        role: str | None = None,
        store: CredentialStore | None = None,
    ):
        self.store = store or CredentialStore(access.credentials_file)
        self.throttle = throttle_of(access)
        self.origins = origins
        self.role = role
        self.refused: dict[int, int] = {}  # HTTP status -> handshakes refused
        self.principals: weakref.WeakKeyDictionary[Any, Principal] = weakref.WeakKeyDictionary()

    def _refuse(self, status: int, reason: str) -> Refusal:
        self.refused[status] = self.refused.get(status, 0) + 1
        return Refusal(status, reason)

    def request(self, addr: str, headers: Mapping[str, str] | Any, path: str) -> Refusal | None:
        """Checks every request (HTTP or websocket upgrade) passes: Origin, no token in the URL."""
        origin = headers.get("Origin")
        if not origin_allowed(origin, self.origins):
            return self._refuse(403, f"origin not allowed: {origin}")
        _, _, query = path.partition("?")
        if any(part.split("=", 1)[0] in ("token", "access_token") for part in query.split("&")):
            return self._refuse(400, NO_URL_TOKENS)
        return None

    def handshake(
        self,
        addr: str,
        headers: Mapping[str, str] | Any,
        path: str,
        required: bool = True,
        any_role: bool = False,
    ) -> Principal | Refusal | None:
        """A websocket upgrade (or an HTTP request with a bearer token): the Principal of its bearer
        token, or the Refusal; None when no token came and `required` is False (calc: the dashboard sends
        an auth message instead). `any_role`: any valid token passes, whatever the gate's role (/metrics)."""
        refusal = self.request(addr, headers, path)
        if refusal is not None:
            return refusal
        left = self.throttle.blocked(addr)
        if left:
            return self._refuse(429, f"too many failed authentications from {addr}; retry in {left:.0f} s")
        token = bearer(headers)
        if token is None:
            return (
                self._refuse(401, "authentication required: Authorization: Bearer <token>")
                if required
                else None
            )
        return self.token(addr, token, any_role)

    def token(self, addr: str, token: str, any_role: bool = False) -> Principal | Refusal:
        """Authenticate one token from `addr` (a handshake header or calc's auth message)."""
        left = self.throttle.blocked(addr)
        if left:
            return self._refuse(429, f"too many failed authentications from {addr}; retry in {left:.0f} s")
        p = self.store.authenticate(token)
        if p is None:
            self.throttle.failure(addr)
            return self._refuse(401, "invalid token")
        if self.role and not any_role and not p.has(self.role):
            return self._refuse(403, not_permitted(p, self.role, "this port") or "")
        return p


def peer_host(connection: Any) -> str:
    addr = getattr(connection, "remote_address", None)
    return str(addr[0]) if addr else ""


def respond(connection: Any, refusal: Refusal) -> Any:
    """The HTTP response of a refused request (websockets' `connection.respond`; 401 says Bearer)."""
    response = connection.respond(refusal.status, refusal.reason + "\n")
    if refusal.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def process_request(gate: Gate, required: bool = True) -> Any:
    """A websockets `process_request` hook that lets a connection in only through `gate`."""

    def hook(connection: Any, request: Any) -> Any:
        outcome = gate.handshake(peer_host(connection), request.headers, request.path, required)
        if isinstance(outcome, Refusal):
            return respond(connection, outcome)
        if outcome is not None:
            gate.principals[connection] = outcome
        return None

    return hook
