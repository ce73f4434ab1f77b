"""The broker's configuration: one frozen object, read from the environment once.

Every environment variable is declared once, in ``VARIABLES``: its name, the
``Settings`` field it fills, how it is read, and what it means. The field's
default in ``Settings`` is the only default; ``from_env``, the commands'
``--help`` and the documentation table all come from these two places.

Nothing else in the package reads ``os.environ``; the composition root builds a
``Settings`` and passes it down. Every malformed value is a
``ConfigurationError`` naming the variable, so a bad deployment stops at start-up
with one clear line instead of failing later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from broker.crypto import KeyRing
from broker.domain.policy import DEFAULT_BACKGROUND_AGE, DEFAULT_PROACTIVE_AGE
from broker.domain.schedule import DEFAULT_SCHEDULE, SweepSchedule
from broker.errors import ConfigurationError
from broker.intuit.endpoints import ENVIRONMENTS, IntuitEnvironment

SHUTDOWN_FLOOR = timedelta(seconds=15)
"""The contract: SIGTERM to exit within 15 s, or the Intuit timeout + 5 s where that is longer."""
SHUTDOWN_AFTER_INTUIT = timedelta(seconds=5)
SHUTDOWN_RESERVE = timedelta(seconds=3)
"""What the grace must leave of the budget: refreshes answered late are stored, then close."""
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SANDBOX = ENVIRONMENTS["sandbox"]


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class Settings:
    database_url: str | None = field(default=None, repr=False)  # may carry a password
    data_dir: Path = Path(".broker-data")
    grpc_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    encryption_keys: KeyRing | None = None

    client_id: str = ""
    client_secret: Secret = Secret("")
    redirect_uri: str = ""
    environment: str = _SANDBOX.name
    auth_url: str = _SANDBOX.auth_url
    token_url: str = _SANDBOX.token_url
    revoke_url: str = _SANDBOX.revoke_url
    api_url: str = _SANDBOX.api_base_url
    intuit_timeout: timedelta = timedelta(seconds=10)

    proactive_age: timedelta = DEFAULT_PROACTIVE_AGE
    background_age: timedelta = DEFAULT_BACKGROUND_AGE
    refresh_job_schedule: SweepSchedule = DEFAULT_SCHEDULE
    refresh_job_rate_limit: timedelta = timedelta(milliseconds=500)
    refresh_job_max_per_run: int = 0
    disable_background_refresh: bool = False
    refresh_job_on_startup: bool = False

    db_pool_size: int = 10
    token_cache_size: int = 100_000
    database_wait: timedelta = timedelta(seconds=120)
    shutdown_grace: timedelta = timedelta(seconds=9)
    log_level: str = "INFO"
    log_format: str = "json"

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    authz_policy_file: Path | None = None
    insecure: bool = False
    max_concurrent_rpcs: int = 2000

    connect_return_urls: tuple[str, ...] = ()
    connect_link_lifetime: timedelta = timedelta(minutes=10)
    watch_heartbeat: timedelta = timedelta(seconds=15)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        for variable in VARIABLES:
            raw = env.get(variable.name, "").strip()
            if raw:
                values[variable.field] = variable.reader.parse(variable.name, raw)
        environment = ENVIRONMENTS[values.get("environment", cls.environment)]
        for endpoint in ("auth_url", "token_url", "revoke_url"):
            values.setdefault(endpoint, getattr(environment, endpoint))
        values.setdefault("api_url", environment.api_base_url)
        return cls(**values)

    def __post_init__(self) -> None:
        self._check_access_control()
        self._check_intuit_endpoints()
        self._check_connect()
        if self.shutdown_grace + SHUTDOWN_RESERVE > self.shutdown_budget:
            raise ConfigurationError(
                f"BROKER_SHUTDOWN_GRACE_SECONDS ({self.shutdown_grace.total_seconds():g}) must "
                f"leave {SHUTDOWN_RESERVE.total_seconds():g} s of the shutdown budget, "
                "max(15, QB_HTTP_TIMEOUT_SECONDS + 5) = "
                f"{self.shutdown_budget.total_seconds():g} s: a refresh sent to Intuit must "
                "always have time to be answered and stored"
            )

    def _check_access_control(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigurationError(
                "BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE must be set together"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigurationError(
                "BROKER_TLS_CLIENT_CA_FILE needs BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE"
            )
        if is_loopback(self.grpc_addr) or self.insecure:
            return
        missing = [
            name
            for name, value in (
                ("BROKER_TLS_CERT_FILE", self.tls_cert_file),
                ("BROKER_TLS_KEY_FILE", self.tls_key_file),
                ("BROKER_TLS_CLIENT_CA_FILE", self.tls_client_ca_file),
                ("BROKER_AUTHZ_POLICY_FILE", self.authz_policy_file),
            )
            if value is None
        ]
        if missing:
            raise ConfigurationError(
                f"BROKER_GRPC_ADDR {self.grpc_addr} is not a loopback address: set "
                f"{', '.join(missing)} (mutual TLS and an authorization policy), or "
                "BROKER_INSECURE=true to serve every caller in plaintext anyway"
            )

    def _check_connect(self) -> None:
        if self.redirect_uri and not urlsplit(self.redirect_uri).path.endswith("/oauth/callback"):
            raise ConfigurationError(
                f"QB_REDIRECT_URI must end in /oauth/callback, got {self.redirect_uri[:80]!r}"
            )
        for prefix in self.connect_return_urls:
            parts = urlsplit(prefix)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ConfigurationError(
                    f"BROKER_CONNECT_RETURN_URLS: {prefix[:80]!r} is not an absolute URL"
                )
            if parts.scheme != "https" and not is_loopback(parts.netloc):
                raise ConfigurationError(
                    f"BROKER_CONNECT_RETURN_URLS: {prefix[:80]!r} must be https "
                    "(plain http only on a loopback address)"
                )

    def _check_intuit_endpoints(self) -> None:
        for name, url in (
            ("QB_AUTH_URL", self.auth_url),
            ("QB_TOKEN_URL", self.token_url),
            ("QB_REVOKE_URL", self.revoke_url),
            ("QB_API_URL", self.api_url),
            ("QB_REDIRECT_URI", self.redirect_uri),
        ):
            parts = urlsplit(url)
            if url and parts.scheme != "https" and not is_loopback(parts.netloc):
                raise ConfigurationError(
                    f"{name} must be https (plain http only on a loopback address), got "
                    f"{url[:80]!r}"
                )

    @property
    def access_controlled(self) -> bool:
        """Callers are identified (mutual TLS) and held to a policy."""
        return self.tls_client_ca_file is not None and self.authz_policy_file is not None

    @property
    def shutdown_budget(self) -> timedelta:
        """How long ``serve`` may take from SIGTERM to exit (Kubernetes'
        ``terminationGracePeriodSeconds`` must be longer)."""
        return max(SHUTDOWN_FLOOR, self.intuit_timeout + SHUTDOWN_AFTER_INTUIT)

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def intuit_environment(self) -> IntuitEnvironment:
        return ENVIRONMENTS[self.environment]

    def require_intuit_credentials(self) -> None:
        """``serve`` and ``sweep`` talk to Intuit and cannot run without an app."""
        missing = [
            name
            for name, value in (
                ("QB_CLIENT_ID", self.client_id),
                ("QB_CLIENT_SECRET", self.client_secret),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(
                f"{' and '.join(missing)} must be set (the Intuit app's credentials); "
                "`qbo-broker dev` runs without them against the built-in fake Intuit"
            )

    def require_key_ring_policy(self) -> None:
        """An external database must come with keys: a generated key would be lost with the pod."""
        if self.database_url is not None and self.encryption_keys is None:
            raise ConfigurationError(
                "BROKER_ENCRYPTION_KEYS must be set when BROKER_DATABASE_URL is set "
                "(format key_id:base64(32 random bytes); generate one with "
                "`qbo-broker keygen`)"
            )


def is_loopback(address: str) -> bool:
    """``host:port``, ``[v6]:port`` or ``host`` on this machine only: ``localhost`` or a
    loopback IP address (127.0.0.0/8, ::1). Anything with user info (``127.0.0.1@elsewhere``)
    or a name that merely starts like one (``127.0.0.1.example``) is not."""
    if "@" in address:
        return False
    host = address
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            return False
        host = address[1:end]
    elif address.count(":") == 1:
        host = address.rpartition(":")[0]
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_of(field_name: str) -> Any:
    """The default of a ``Settings`` field (the one place defaults are written)."""
    return {f.name: f.default for f in dataclasses.fields(Settings)}[field_name]


# -- readers: one per kind of value ------------------------------------------------------


class Reader(Protocol):
    def parse(self, name: str, raw: str) -> Any: ...

    def show(self, value: Any) -> str:
        """A default as it would be written in the environment."""
        ...


class _Text:
    def parse(self, name: str, raw: str) -> Any:
        return raw

    def show(self, value: Any) -> str:
        return "" if value is None else str(value)


class _Secret(_Text):
    def parse(self, name: str, raw: str) -> Any:
        return Secret(raw)

    def show(self, value: Any) -> str:
        return ""


class _Path(_Text):
    def parse(self, name: str, raw: str) -> Any:
        return Path(raw)

    def show(self, value: Any) -> str:
        return "" if value is None else f"./{value}"


class _File(_Path):
    """A file that must exist and be readable when the variable is read."""

    def parse(self, name: str, raw: str) -> Any:
        path = Path(raw)
        if not path.is_file():
            raise ConfigurationError(f"{name}: {raw[:200]} is not a readable file")
        return path


class _Keys(_Text):
    def parse(self, name: str, raw: str) -> Any:
        return KeyRing.parse(raw)

    def show(self, value: Any) -> str:
        return ""


class _Schedule(_Text):
    def parse(self, name: str, raw: str) -> Any:
        return SweepSchedule.parse(raw)

    def show(self, value: Any) -> str:
        return str(value.text)


class _Flag(_Text):
    def parse(self, name: str, raw: str) -> Any:
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"{name} must be true or false, got {raw[:40]!r}")

    def show(self, value: Any) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class _Choice(_Text):
    choices: tuple[str, ...]
    upper: bool = False

    def parse(self, name: str, raw: str) -> Any:
        value = raw.upper() if self.upper else raw.lower()
        if value not in self.choices:
            raise ConfigurationError(
                f"{name} must be one of {', '.join(self.choices)}, got {raw[:40]!r}"
            )
        return value


@dataclass(frozen=True)
class _Number(_Text):
    """A number between ``low`` and ``high``; ``unit`` turns it into a timedelta."""

    low: float
    high: float
    unit: timedelta | None = None
    whole: bool = False

    def parse(self, name: str, raw: str) -> Any:
        if self.whole and not raw.lstrip("+-").isdigit():
            raise ConfigurationError(f"{name} must be a whole number, got {raw[:40]!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number, got {raw[:40]!r}") from None
        if math.isnan(value) or not self.low <= value <= self.high:
            raise ConfigurationError(
                f"{name} must be between {self.low:g} and {self.high:g}, got {raw[:40]}"
            )
        if self.unit is not None:
            return self.unit * value
        return int(value) if self.whole else value

    def show(self, value: Any) -> str:
        number = value / self.unit if self.unit is not None else value
        return f"{number:g}"


class _Url(_Text):
    def parse(self, name: str, raw: str) -> Any:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"{name} must be an http(s) URL, got {raw[:80]!r}")
        return raw


class _Endpoint(_Url):
    def show(self, value: Any) -> str:
        return ""  # the default comes from QB_ENVIRONMENT


class _DatabaseUrl(_Text):
    def parse(self, name: str, raw: str) -> Any:
        # Never echo the value: it may carry a password.
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"{name} is not a valid URL (a bad port?)") from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"{name} must be a postgresql:// URL (postgresql://user:password@host:5432/db)"
            )
        if not parts.hostname and "host" not in parse_qs(parts.query):
            raise ConfigurationError(f"{name} names no host (postgresql://user@host/db)")
        if port == 0:
            raise ConfigurationError(f"{name} has port 0")
        return raw


class _UrlList(_Text):
    def parse(self, name: str, raw: str) -> Any:
        return tuple(part.strip() for part in raw.split(",") if part.strip())

    def show(self, value: Any) -> str:
        return ",".join(value)


class _Address(_Text):
    def parse(self, name: str, raw: str) -> Any:
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigurationError(f"{name} must be host:port, got {raw[:80]!r}")
        return raw


def _days(low: float, high: float) -> _Number:
    return _Number(low, high, unit=timedelta(days=1))


def _seconds(low: float, high: float) -> _Number:
    return _Number(low, high, unit=timedelta(seconds=1))


# -- the variables --------------------------------------------------------------------

SERVE = "serve"
DEV = "dev"
SWEEP = "sweep"
MIGRATE = "migrate"
_DATABASE = (SERVE, DEV, SWEEP, MIGRATE)
_INTUIT = (SERVE, SWEEP)
_PROCESS = (SERVE, DEV)
_POLICY = (SERVE, DEV, SWEEP)


@dataclass(frozen=True)
class Variable:
    name: str
    field: str
    reader: Reader
    meaning: str
    commands: tuple[str, ...]

    @property
    def default_text(self) -> str:
        return self.reader.show(default_of(self.field))


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "BROKER_DATABASE_URL",
        "database_url",
        _DatabaseUrl(),
        "postgresql:// URL of the database; unset: an embedded PostgreSQL under BROKER_DATA_DIR",
        _DATABASE,
    ),
    Variable(
        "BROKER_DATA_DIR",
        "data_dir",
        _Path(),
        "where the embedded database and its generated key live",
        _DATABASE,
    ),
    Variable("BROKER_GRPC_ADDR", "grpc_addr", _Address(), "gRPC listen address", _PROCESS),
    Variable(
        "BROKER_HTTP_ADDR",
        "http_addr",
        _Address(),
        "HTTP listen address (metrics, probes)",
        _PROCESS,
    ),
    Variable(
        "BROKER_ENCRYPTION_KEYS",
        "encryption_keys",
        _Keys(),
        "key ring for tokens at rest: key_id:base64(32 bytes)[,…], primary first; "
        "required with BROKER_DATABASE_URL",
        _DATABASE,
    ),
    Variable("QB_CLIENT_ID", "client_id", _Text(), "the Intuit app's client id", _INTUIT),
    Variable(
        "QB_CLIENT_SECRET", "client_secret", _Secret(), "the Intuit app's client secret", _INTUIT
    ),
    Variable(
        "QB_REDIRECT_URI",
        "redirect_uri",
        _Url(),
        "the redirect URI registered with Intuit (ends in /oauth/callback)",
        _INTUIT,
    ),
    Variable(
        "QB_ENVIRONMENT",
        "environment",
        _Choice(tuple(ENVIRONMENTS)),
        "sandbox or production: which of Intuit's endpoint sets to use",
        _INTUIT,
    ),
    Variable(
        "QB_AUTH_URL",
        "auth_url",
        _Endpoint(),
        "override Intuit's authorization endpoint (default: QB_ENVIRONMENT's)",
        _INTUIT,
    ),
    Variable(
        "QB_TOKEN_URL",
        "token_url",
        _Endpoint(),
        "override Intuit's token endpoint (default: QB_ENVIRONMENT's)",
        _INTUIT,
    ),
    Variable(
        "QB_REVOKE_URL",
        "revoke_url",
        _Endpoint(),
        "override Intuit's revocation endpoint (default: QB_ENVIRONMENT's)",
        _INTUIT,
    ),
    Variable(
        "QB_API_URL",
        "api_url",
        _Endpoint(),
        "override the accounting API's base URL, where the connect flow checks which company "
        "it was granted (default: QB_ENVIRONMENT's)",
        _INTUIT,
    ),
    Variable(
        "QB_HTTP_TIMEOUT_SECONDS",
        "intuit_timeout",
        _seconds(1, 30),
        "total timeout of one call to Intuit (a refresh holds its row lock meanwhile)",
        _POLICY,
    ),
    Variable(
        "QB_REFRESH_TOKEN_PROACTIVE_DAYS",
        "proactive_age",
        _days(1, 100),
        "renew on use when the refresh token is at least this many days old",
        _POLICY,
    ),
    Variable(
        "QB_REFRESH_TOKEN_BACKGROUND_DAYS",
        "background_age",
        _days(1, 100),
        "the sweep renews refresh tokens at least this many days old",
        _POLICY,
    ),
    Variable(
        "QB_REFRESH_JOB_SCHEDULE",
        "refresh_job_schedule",
        _Schedule(),
        "when the sweep runs (UTC): '<weekday> HH:MM', 'daily HH:MM', 'every N hours|minutes'",
        _POLICY,
    ),
    Variable(
        "QB_REFRESH_JOB_RATE_LIMIT_MS",
        "refresh_job_rate_limit",
        _Number(0, 60_000, unit=timedelta(milliseconds=1)),
        "pause between two refreshes of the sweep, in milliseconds",
        _POLICY,
    ),
    Variable(
        "QB_REFRESH_JOB_MAX_PER_RUN",
        "refresh_job_max_per_run",
        _Number(0, 10_000_000, whole=True),
        "the most connections one sweep renews; 0: no cap",
        _POLICY,
    ),
    Variable(
        "QB_DISABLE_BACKGROUND_REFRESH",
        "disable_background_refresh",
        _Flag(),
        "true: no sweep scheduler, renewal on use only",
        _PROCESS,
    ),
    Variable(
        "QB_REFRESH_JOB_ON_STARTUP",
        "refresh_job_on_startup",
        _Flag(),
        "true: a sweep a second after the broker is ready",
        _PROCESS,
    ),
    Variable(
        "BROKER_DB_POOL_SIZE",
        "db_pool_size",
        _Number(2, 200, whole=True),
        "PostgreSQL connections per process",
        _DATABASE,
    ),
    Variable(
        "BROKER_TOKEN_CACHE_SIZE",
        "token_cache_size",
        _Number(100, 10_000_000, whole=True),
        "warm connections kept in memory per replica (about 3.5 KiB each)",
        _PROCESS,
    ),
    Variable(
        "BROKER_DATABASE_WAIT_SECONDS",
        "database_wait",
        _seconds(0, 3600),
        "how long start-up waits for BROKER_DATABASE_URL to answer (each attempt is logged)",
        (SERVE, SWEEP, MIGRATE),
    ),
    Variable(
        "BROKER_SHUTDOWN_GRACE_SECONDS",
        "shutdown_grace",
        _seconds(0, 300),
        "how long in-flight calls may finish after SIGTERM (at most the shutdown budget, "
        "max(15, QB_HTTP_TIMEOUT_SECONDS + 5), less 3 s)",
        _PROCESS,
    ),
    Variable(
        "BROKER_TLS_CERT_FILE",
        "tls_cert_file",
        _File(),
        "the gRPC server's certificate chain (PEM); re-read when it changes on disk",
        _PROCESS,
    ),
    Variable(
        "BROKER_TLS_KEY_FILE",
        "tls_key_file",
        _File(),
        "the gRPC server's private key (PEM); re-read with the certificate",
        _PROCESS,
    ),
    Variable(
        "BROKER_TLS_CLIENT_CA_FILE",
        "tls_client_ca_file",
        _File(),
        "CA bundle for client certificates: set, every gRPC caller must present one (mTLS)",
        _PROCESS,
    ),
    Variable(
        "BROKER_AUTHZ_POLICY_FILE",
        "authz_policy_file",
        _File(),
        "the authorization policy (gRPC authz JSON plus realms); re-read when it changes",
        _PROCESS,
    ),
    Variable(
        "BROKER_INSECURE",
        "insecure",
        _Flag(),
        "true: allow plaintext gRPC and no policy on a non-loopback address (warned)",
        _PROCESS,
    ),
    Variable(
        "BROKER_MAX_CONCURRENT_RPCS",
        "max_concurrent_rpcs",
        _Number(1, 100_000, whole=True),
        "gRPC calls served at once; more are refused with RESOURCE_EXHAUSTED",
        _PROCESS,
    ),
    Variable(
        "BROKER_CONNECT_RETURN_URLS",
        "connect_return_urls",
        _UrlList(),
        "comma-separated URL prefixes a connect link may send the browser back to "
        "(same scheme and host, path under the prefix)",
        _PROCESS,
    ),
    Variable(
        "BROKER_CONNECT_LINK_SECONDS",
        "connect_link_lifetime",
        _seconds(60, 3600),
        "how long a connect link (and the sign-in it starts) stays usable",
        _PROCESS,
    ),
    Variable(
        "BROKER_WATCH_HEARTBEAT_SECONDS",
        "watch_heartbeat",
        _seconds(1, 300),
        "a WatchConnections stream with nothing to say says so this often (proxies)",
        _PROCESS,
    ),
    Variable(
        "BROKER_LOG_LEVEL",
        "log_level",
        _Choice(("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        "DEBUG, INFO, WARNING or ERROR",
        (*_DATABASE,),
    ),
    Variable(
        "BROKER_LOG_FORMAT",
        "log_format",
        _Choice(("json", "text")),
        "json or text (dev defaults to text)",
        (*_DATABASE,),
    ),
)


def variables_for(command: str) -> list[Variable]:
    return [variable for variable in VARIABLES if command in variable.commands]


def environment_help(title: str, variables: Iterable[Variable]) -> str:
    """The "environment:" part of a command's ``--help``: each variable, what it means, its
    default."""
    lines = [title]
    for variable in variables:
        default = variable.default_text
        shown = f" (default {default})" if default else ""
        lines.append(f"  {variable.name}\n      {variable.meaning}{shown}")
    return "\n".join(lines)
