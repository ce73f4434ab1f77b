"""Every error the broker raises on purpose, in one tree.

::

    BrokerError
    ├── ConfigurationError        settings or key ring are wrong: stop loudly
    ├── InvalidRequest            malformed request                -> INVALID_ARGUMENT
    ├── ConnectionNotFound        no such realm or user            -> NOT_FOUND
    ├── AmbiguousUser             user_id owns several connections -> FAILED_PRECONDITION
    ├── ReauthorizationRequired   the customer must reconnect      -> FAILED_PRECONDITION
    ├── SweepInProgress           another replica is sweeping      -> ABORTED
    ├── ShuttingDown              the broker starts no new work    -> UNAVAILABLE
    ├── UpstreamError             Intuit did not give us tokens
    │   ├── InvalidGrant          the grant is dead (expired, revoked, rotated away)
    │   ├── ClientRejected        Intuit refused our client id/secret -> INTERNAL
    │   └── UpstreamUnavailable   5xx, 429, timeout, reset, garbage -> UNAVAILABLE
    └── StorageError              PostgreSQL failed                 -> INTERNAL
        ├── StorageUnavailable    PostgreSQL cannot be reached      -> UNAVAILABLE
        └── DecryptionFailed      a value does not open with our keys -> INTERNAL

Foreign exceptions (aiohttp, asyncpg, cryptography) are translated once, at the
module that talks to them, with ``raise ... from exc``; the gRPC layer maps this
tree to status codes in one place (``broker.api.status``). Messages never carry
a token or a secret.
"""

from __future__ import annotations

from datetime import timedelta


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigurationError(BrokerError):
    """The broker's own configuration is wrong; it must not start (or go on) like this."""


class InvalidRequest(BrokerError):
    """A request field is malformed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ConnectionNotFound(BrokerError):
    """No connection matches the realm or user asked for."""


class AmbiguousUser(BrokerError):
    """A user_id names more than one connection; the caller must say which realm."""

    def __init__(self) -> None:
        super().__init__("this user_id owns several connections; ask by realm_id instead")


class ReauthorizationRequired(BrokerError):
    """The connection cannot give tokens until the customer connects again."""

    def __init__(self, realm_id: str, reason: str) -> None:
        super().__init__(f"realm {realm_id} needs the customer to reconnect: {reason}")
        self.realm_id = realm_id
        self.reason = reason


class SweepInProgress(BrokerError):
    """Another replica (or another call) is sweeping right now."""


class ShuttingDown(BrokerError):
    """The broker is stopping and starts no new work."""


class UpstreamError(BrokerError):
    """Intuit's OAuth endpoint did not give us what we asked for."""

    def __init__(self, message: str, *, intuit_tid: str | None = None) -> None:
        super().__init__(message)
        self.intuit_tid = intuit_tid


class InvalidGrant(UpstreamError):
    """Intuit answered ``invalid_grant``: the refresh token (or code) is dead."""


class ClientRejected(UpstreamError):
    """Intuit answered ``invalid_client``: our client id or secret is wrong.

    This is the broker's fault, never the connection's: nothing is marked dead.
    """


class UpstreamUnavailable(UpstreamError):
    """Intuit is down, slow, throttling or answering garbage: keep the token, retry later."""

    def __init__(
        self,
        message: str,
        *,
        intuit_tid: str | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(message, intuit_tid=intuit_tid)
        self.retry_after = retry_after


class StorageError(BrokerError):
    """PostgreSQL did not do what we asked."""


class StorageUnavailable(StorageError):
    """PostgreSQL cannot be reached right now."""


class DecryptionFailed(StorageError):
    """A stored token does not decrypt with the key ring: wrong key or tampered row."""
