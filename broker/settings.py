"""The broker's configuration: one frozen object, read from the environment once.

Nothing else in the package reads ``os.environ``; the composition root builds a
``Settings`` and passes it down. Every malformed value is a
``ConfigurationError`` naming the variable, so a bad deployment stops at start-up
with one clear line instead of failing later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from broker.crypto import KeyRing
from broker.domain.schedule import SweepSchedule
from broker.errors import ConfigurationError

INTUIT_ENDPOINTS = {
    # Intuit uses the same OAuth endpoints for both environments.
    "auth": "https://appcenter.intuit.com/connect/oauth2",
    "token": "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
    "revoke": "https://developer.api.intuit.com/v2/oauth2/tokens/revoke",
}
DEFAULT_SCHEDULE = SweepSchedule.parse("sunday 02:00")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


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
    environment: str = "sandbox"
    auth_url: str = INTUIT_ENDPOINTS["auth"]
    token_url: str = INTUIT_ENDPOINTS["token"]
    revoke_url: str = INTUIT_ENDPOINTS["revoke"]
    intuit_timeout: timedelta = timedelta(seconds=10)

    proactive_age: timedelta = timedelta(days=30)
    background_age: timedelta = timedelta(days=60)
    refresh_job_schedule: SweepSchedule = DEFAULT_SCHEDULE
    refresh_job_rate_limit: timedelta = timedelta(milliseconds=500)
    refresh_job_max_per_run: int = 0
    disable_background_refresh: bool = False
    refresh_job_on_startup: bool = False

    db_pool_size: int = 10
    shutdown_grace: timedelta = timedelta(seconds=9)
    log_level: str = "INFO"
    log_format: str = "json"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        read = _Reader(env)
        keys = read.text("BROKER_ENCRYPTION_KEYS")
        return cls(
            database_url=read.text("BROKER_DATABASE_URL") or None,
            data_dir=Path(read.text("BROKER_DATA_DIR") or cls.data_dir),
            grpc_addr=read.address("BROKER_GRPC_ADDR", cls.grpc_addr),
            http_addr=read.address("BROKER_HTTP_ADDR", cls.http_addr),
            encryption_keys=KeyRing.parse(keys) if keys else None,
            client_id=read.text("QB_CLIENT_ID"),
            client_secret=Secret(read.text("QB_CLIENT_SECRET")),
            redirect_uri=read.url("QB_REDIRECT_URI", ""),
            environment=read.choice("QB_ENVIRONMENT", ("sandbox", "production"), "sandbox"),
            auth_url=read.url("QB_AUTH_URL", INTUIT_ENDPOINTS["auth"]),
            token_url=read.url("QB_TOKEN_URL", INTUIT_ENDPOINTS["token"]),
            revoke_url=read.url("QB_REVOKE_URL", INTUIT_ENDPOINTS["revoke"]),
            intuit_timeout=timedelta(
                seconds=read.number("QB_HTTP_TIMEOUT_SECONDS", 10, low=1, high=30)
            ),
            proactive_age=timedelta(
                days=read.number("QB_REFRESH_TOKEN_PROACTIVE_DAYS", 30, low=1, high=100)
            ),
            background_age=timedelta(
                days=read.number("QB_REFRESH_TOKEN_BACKGROUND_DAYS", 60, low=1, high=100)
            ),
            refresh_job_schedule=SweepSchedule.parse(
                read.text("QB_REFRESH_JOB_SCHEDULE") or "sunday 02:00"
            ),
            refresh_job_rate_limit=timedelta(
                milliseconds=read.number("QB_REFRESH_JOB_RATE_LIMIT_MS", 500, low=0, high=60_000)
            ),
            refresh_job_max_per_run=read.integer(
                "QB_REFRESH_JOB_MAX_PER_RUN", 0, low=0, high=10_000_000
            ),
            disable_background_refresh=read.flag("QB_DISABLE_BACKGROUND_REFRESH"),
            refresh_job_on_startup=read.flag("QB_REFRESH_JOB_ON_STARTUP"),
            db_pool_size=read.integer("BROKER_DB_POOL_SIZE", 10, low=2, high=200),
            shutdown_grace=timedelta(
                seconds=read.number("BROKER_SHUTDOWN_GRACE_SECONDS", 9, low=0, high=300)
            ),
            log_level=read.choice(
                "BROKER_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            ),
            log_format=read.choice("BROKER_LOG_FORMAT", ("json", "text"), "json"),
        )

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

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
                "`qbo-broker dev` runs without them against the built-in simulator"
            )

    def require_key_ring_policy(self) -> None:
        """An external database must come with keys: a generated key would be lost with the pod."""
        if self.database_url is not None and self.encryption_keys is None:
            raise ConfigurationError(
                "BROKER_ENCRYPTION_KEYS must be set when BROKER_DATABASE_URL is set "
                "(format key_id:base64(32 random bytes); generate one with "
                "`qbo-broker keygen`)"
            )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str:
        return self._env.get(name, "").strip()

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise ConfigurationError(f"{name} must be true or false, got {raw[:40]!r}")

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number, got {raw[:40]!r}") from None
        if not low <= value <= high:
            raise ConfigurationError(f"{name} must be between {low:g} and {high:g}, got {raw[:40]}")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.text(name)
        if raw and not raw.lstrip("+-").isdigit():
            raise ConfigurationError(f"{name} must be a whole number, got {raw[:40]!r}")
        return int(self.number(name, default, low=low, high=high))

    def choice(
        self, name: str, choices: tuple[str, ...], default: str, *, upper: bool = False
    ) -> str:
        raw = self.text(name)
        if not raw:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ConfigurationError(
                f"{name} must be one of {', '.join(choices)}, got {raw[:40]!r}"
            )
        return value

    def url(self, name: str, default: str) -> str:
        raw = self.text(name)
        if not raw:
            return default
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"{name} must be an http(s) URL, got {raw[:80]!r}")
        return raw

    def address(self, name: str, default: str) -> str:
        raw = self.text(name) or default
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigurationError(f"{name} must be host:port, got {raw[:80]!r}")
        return raw
