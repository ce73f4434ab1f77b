"""The values the core passes around. All immutable."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

INTUIT_REFRESH_TOKEN_LIFETIME = timedelta(days=101)
"""The rolling life Intuit gives a refresh token when it does not say otherwise."""


class ConnectionStatus(StrEnum):
    """Spelled as in the database's ``status`` column and metric labels."""

    ACTIVE = "active"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    REVOKED = "revoked"


class Trigger(StrEnum):
    """Why a refresh happened (the ``trigger`` label of the refresh counter)."""

    ACCESS_EXPIRY = "access_expiry"
    PROACTIVE = "proactive"
    SWEEP = "sweep"
    MANUAL = "manual"


class Outcome(StrEnum):
    """How a refresh ended (the ``outcome`` label of the refresh counter)."""

    SUCCESS = "success"
    INVALID_GRANT = "invalid_grant"
    UPSTREAM_ERROR = "upstream_error"


class LostCause(StrEnum):
    """Why a connection needs the customer again (``lost_cause`` column, metric label)."""

    REVOKED_AT_INTUIT = "revoked_at_intuit"
    """Intuit said invalid_grant and no refresh of ours was in doubt."""
    LOST_IN_FLIGHT = "lost_in_flight"
    """A refresh of ours rotated the token, and its answer never arrived or was never stored."""
    EXPIRED = "expired"
    """The refresh token passed its rolling expiry."""
    HARD_LIMIT = "hard_limit"
    """The grant passed Intuit's five-year reconnect deadline."""


@dataclass(frozen=True, slots=True)
class RefreshIntent:
    """A refresh announced before it was sent, whose answer was not stored (yet)."""

    token_fingerprint: str
    replica: str
    replica_alive: bool
    """The replica that sent it was alive moments ago (its answer may still be written)."""
    answer_held: bool = True
    """False once that refresh failed with no answer: the token may have rotated, but no
    replica holds a newer one to write."""


def fingerprint(token: str) -> str:
    """Names a refresh token without revealing it (tokens are long random strings)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A connection as operators see it: everything but the tokens."""

    realm_id: str
    user_id: str
    status: ConnectionStatus
    access_token_expires_at: datetime | None
    refresh_token_created_at: datetime | None
    refresh_token_expires_at: datetime | None
    reconnect_deadline: datetime | None
    last_refreshed_at: datetime | None
    last_used_at: datetime | None
    last_error: str | None
    lost_cause: LostCause | None = None


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class TokenSnapshot:
    """What GetAccessToken needs of one connection: the access token and the dates.

    ``row_version`` is the storage row's version when this was read; it lets the
    in-memory cache tell a stale snapshot from a fresh one. Snapshots compare by
    identity and can be weakly referenced, so a transport can remember what it
    made of one for as long as the cache keeps it.
    """

    realm_id: str
    user_id: str
    status: ConnectionStatus
    access_token: str | None = field(repr=False)  # a token: never in a repr
    access_token_expires_at: datetime | None
    refresh_token_created_at: datetime | None
    refresh_token_expires_at: datetime | None
    reconnect_deadline: datetime | None
    row_version: int

    def access_token_valid_for(self, now: datetime, min_validity: timedelta) -> bool:
        """True when the access token outlives ``now + min_validity`` (zero: unexpired)."""
        expires = self.access_token_expires_at
        if self.access_token is None or expires is None:
            return False
        left = expires - now
        return left > min_validity if not min_validity else left >= min_validity


@dataclass(frozen=True, slots=True)
class LockedConnection:
    """A connection read under its row lock, refresh token included."""

    snapshot: TokenSnapshot
    refresh_token: str | None = field(repr=False)  # a token: never in a repr


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    """What Intuit's token endpoint answered, already checked for shape.

    ``access_token`` is None when the answer carried no usable one (with a
    usable refresh token, which is what matters).
    """

    access_token: str | None = field(repr=False)  # a token: never in a repr
    refresh_token: str = field(repr=False)  # a token: never in a repr
    expires_in: timedelta
    refresh_token_expires_in: timedelta
    hard_expires_in: timedelta | None
    intuit_tid: str | None


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """The columns a successful refresh (or import) writes."""

    access_token: str | None = field(repr=False)  # a token: never in a repr
    access_token_expires_at: datetime | None
    refresh_token: str = field(repr=False)  # a token: never in a repr
    refresh_token_created_at: datetime | None
    refresh_token_expires_at: datetime | None
    reconnect_deadline: datetime | None
    refreshed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ImportRequest:
    """An existing grant moved into the broker (ImportConnection)."""

    realm_id: str
    user_id: str
    refresh_token: str = field(repr=False)  # a token: never in a repr
    access_token: str | None = field(repr=False)  # a token: never in a repr
    access_token_expires_at: datetime | None
    refresh_token_created_at: datetime | None
    refresh_token_expires_at: datetime | None
    replace_active: bool = False


@dataclass(frozen=True, slots=True)
class RealmFilter:
    """Which realms a caller may see, in the shape a SQL filter takes.

    A realm passes when ``allow_all`` or it is in ``allow_exact`` or matches one
    of ``allow_prefixes`` (LIKE patterns, escaped, each ending in ``%``), and
    not ``deny_all``, not in ``deny_exact``, not matching ``deny_prefixes``.
    """

    allow_all: bool
    allow_exact: tuple[str, ...]
    allow_prefixes: tuple[str, ...]
    deny_all: bool
    deny_exact: tuple[str, ...]
    deny_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConnectionFilter:
    status: ConnectionStatus | None = None
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPage:
    connections: list[ConnectionInfo]
    next_after: str | None
    """The last realm of this page when more may follow, else None."""
