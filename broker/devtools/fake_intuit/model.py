"""A pure model of how Intuit's OAuth server treats codes and tokens.

No I/O and no asyncio: the HTTP simulator (``server.py``) and the fleet
simulation both drive the same object, and the clock is injected so that
"101 days later" is ``FakeClock.advance`` rather than a wait.

The rules follow what Intuit documents and its clients report, taking the harsher reading
wherever sources disagree:

- a *grant* is one authorization of one realm; it lives at most
  ``hard_limit`` from the original authorization, whatever rotation does;
- a refresh within ``rotation_after`` of the current refresh token's issue
  returns the *same* refresh token, whose remaining life keeps counting down;
  a later refresh issues a new one and the old one dies (after
  ``old_token_grace``, zero by default);
- an authorization code is single-use, lives ten minutes, and re-using it
  revokes the grant it produced;
- revoking any token of a grant (refresh or access) revokes the whole grant;
  revoking an unknown token is a silent no-op, as RFC 7009 asks.

Memory stays bounded over long simulations: one grant per realm, a few
unexpired access tokens per grant, and a fixed-size memory of dead refresh
tokens (only so that their ``invalid_grant`` can be attributed to a realm).
"""

from __future__ import annotations

import secrets
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import count
from typing import Any, Final

from broker.clock import Clock

AUTHORIZATION_CODE_TTL: Final = timedelta(minutes=10)
ACCESS_TOKENS_KEPT_PER_GRANT: Final = 16
"""Older access tokens of a grant are forgotten (they then fail validation)."""
DEAD_TOKENS_REMEMBERED: Final = 100_000
"""Dead refresh tokens remembered for realm attribution; older ones become merely unknown."""

OAUTH_ERRORS: Final = frozenset(
    {"invalid_grant", "invalid_client", "invalid_request", "unsupported_grant_type"}
)


class OAuthError(Exception):
    """An OAuth error as Intuit's token endpoint would report it.

    ``error`` is one of ``OAUTH_ERRORS``; ``realm_id`` is set when the model
    knows which company the failing token or code belonged to.
    """

    def __init__(self, error: str, description: str, *, realm_id: str | None = None) -> None:
        if error not in OAUTH_ERRORS:
            raise ValueError(f"unknown OAuth error code {error!r}")
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.realm_id = realm_id

    @property
    def status(self) -> int:
        """The HTTP status Intuit answers this error with."""
        return 401 if self.error == "invalid_client" else 400


@dataclass(frozen=True)
class SimulatorConfig:
    access_token_ttl: timedelta = timedelta(hours=1)
    refresh_token_ttl: timedelta = timedelta(days=101)
    rotation_after: timedelta = timedelta(hours=24)
    old_token_grace: timedelta = timedelta(0)
    hard_limit: timedelta = timedelta(days=5 * 365)
    strict_rotation: bool = False
    """Every refresh issues a new refresh token and kills the old one at once."""
    sequential_tokens: bool = False
    """Number tokens (``sim-rt-1``, ``sim-at-2``…) instead of drawing random ones: for
    fleet simulations, where drawing millions of random values costs more than the rules."""
    client_id: str = "sim-client-id"
    client_secret: str = field(default="sim-client-secret", repr=False)


@dataclass(frozen=True)
class TokenResponse:
    """What a successful code exchange or refresh returns. Tokens stay out of ``repr``."""

    realm_id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    x_refresh_token_expires_in: int
    x_refresh_token_hard_expires_in: int

    def to_json(self, include_hard_expiry: bool = False) -> dict[str, str | int]:
        """Intuit's JSON body; the hard-expiry field only when the client asked for it."""
        body: dict[str, str | int] = {
            "token_type": "bearer",
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_in": self.expires_in,
            "x_refresh_token_expires_in": self.x_refresh_token_expires_in,
        }
        if include_hard_expiry:
            body["x_refresh_token_hard_expires_in"] = self.x_refresh_token_hard_expires_in
        return body


@dataclass
class SimulatorStats:
    """Counters that tests and ``/_simulator/stats`` read."""

    refresh_calls: int = 0
    refresh_calls_by_realm: Counter[str] = field(default_factory=Counter)
    rotations: int = 0
    rotations_by_realm: Counter[str] = field(default_factory=Counter)
    invalid_grants: int = 0
    invalid_grants_by_realm: Counter[str] = field(default_factory=Counter)
    code_exchanges: int = 0
    revocations: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "refresh_calls": self.refresh_calls,
            "refresh_calls_by_realm": dict(self.refresh_calls_by_realm),
            "rotations": self.rotations,
            "rotations_by_realm": dict(self.rotations_by_realm),
            "invalid_grants": self.invalid_grants,
            "invalid_grants_by_realm": dict(self.invalid_grants_by_realm),
            "code_exchanges": self.code_exchanges,
            "revocations": self.revocations,
        }


@dataclass(eq=False)
class _RefreshToken:
    value: str = field(repr=False)
    grant: _Grant
    issued_at: datetime
    expires_at: datetime
    dies_at: datetime | None = None
    """Set once rotated away: the end of its grace period."""


@dataclass(eq=False)
class _AccessToken:
    grant: _Grant
    expires_at: datetime


@dataclass(eq=False)
class _Grant:
    realm_id: str
    granted_at: datetime
    hard_expires_at: datetime
    current: _RefreshToken = field(init=False)
    superseded: deque[_RefreshToken] = field(default_factory=deque)
    """Rotated-away refresh tokens still inside their grace period."""
    access_tokens: deque[str] = field(default_factory=deque)
    alive: bool = True


@dataclass(eq=False)
class _AuthorizationCode:
    realm_id: str
    redirect_uri: str | None
    expires_at: datetime
    grant: _Grant | None = None
    """The grant this code produced, once exchanged."""


class IntuitModel:
    """Intuit's OAuth server as a pure state machine, one grant per realm."""

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self.stats = SimulatorStats()
        self._grants: dict[str, _Grant] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._codes: OrderedDict[str, _AuthorizationCode] = OrderedDict()
        self._dead_refresh_tokens: OrderedDict[str, str] = OrderedDict()
        self._serial = count(1)

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def now(self) -> datetime:
        return self._clock()

    # -- the OAuth operations ------------------------------------------------

    def create_grant(
        self,
        realm_id: str,
        *,
        granted_at: datetime | None = None,
        refresh_token_issued_at: datetime | None = None,
        access_token_issued_at: datetime | None = None,
    ) -> TokenResponse:
        """Seed a grant as if authorized at ``granted_at`` and last rotated at
        ``refresh_token_issued_at``: "a company whose refresh token is 35 days old".

        ``granted_at`` defaults to ``refresh_token_issued_at`` if given, else now;
        ``refresh_token_issued_at`` defaults to ``granted_at``. Any existing grant
        of the realm dies. The access token is dated ``access_token_issued_at``,
        by default with the refresh token, so an old seed comes with an expired
        access token.
        """
        now = self._clock()
        granted_at = granted_at or refresh_token_issued_at or now
        issued_at = refresh_token_issued_at or granted_at
        access_issued_at = access_token_issued_at or issued_at
        if not granted_at <= issued_at <= access_issued_at <= now:
            raise ValueError(
                "need granted_at <= refresh_token_issued_at <= access_token_issued_at <= now"
            )
        return self._open_grant(realm_id, granted_at, issued_at, now, access_issued_at)[1]

    def authorize(self, realm_id: str | None = None, *, redirect_uri: str | None = None) -> str:
        """Issue a single-use authorization code for ``realm_id`` (or a new realm).

        When ``redirect_uri`` is given, the exchange must present the same one.
        """
        now = self._clock()
        self._forget_expired_codes(now)
        code = "sim-code-" + secrets.token_urlsafe(24)
        realm = realm_id or self._new_realm_id()
        self._codes[code] = _AuthorizationCode(realm, redirect_uri, now + AUTHORIZATION_CODE_TTL)
        return code

    def exchange_code(self, code: str, redirect_uri: str) -> TokenResponse:
        now = self._clock()
        self._forget_expired_codes(now)
        entry = self._codes.get(code)
        if entry is None:
            raise self._invalid_grant(None, "authorization code is invalid or expired")
        if entry.grant is not None:
            if entry.grant.alive:
                self._close_grant(entry.grant)
            raise self._invalid_grant(entry.realm_id, "authorization code was already used")
        if entry.redirect_uri is not None and redirect_uri != entry.redirect_uri:
            raise self._invalid_grant(entry.realm_id, "redirect_uri does not match")
        grant, response = self._open_grant(entry.realm_id, now, now, now)
        entry.grant = grant
        self.stats.code_exchanges += 1
        return response

    def refresh(self, refresh_token: str) -> TokenResponse:
        now = self._clock()
        self.stats.refresh_calls += 1
        presented = self._refresh_tokens.get(refresh_token)
        if presented is None:
            realm = self._dead_refresh_tokens.get(refresh_token)
            if realm is not None:
                self.stats.refresh_calls_by_realm[realm] += 1
            raise self._invalid_grant(realm, "refresh token is invalid, revoked or rotated away")
        grant = presented.grant
        self.stats.refresh_calls_by_realm[grant.realm_id] += 1
        if presented is not grant.current:
            # Superseded: dead once its grace is over, else it stands in for the current token.
            assert presented.dies_at is not None
            if now >= presented.dies_at:
                grant.superseded.remove(presented)
                self._bury(presented)
                raise self._invalid_grant(grant.realm_id, "refresh token was rotated away")
        if now >= grant.hard_expires_at or now >= grant.current.expires_at:
            self._close_grant(grant)
            raise self._invalid_grant(grant.realm_id, "refresh token has expired")
        age = now - grant.current.issued_at
        if self._config.strict_rotation or age >= self._config.rotation_after:
            self._rotate(grant, now)
        self._new_access_token(grant, now)
        return self._response(grant, now)

    def revoke(self, token: str) -> bool:
        """Revoke the grant that ``token`` (refresh or access) belongs to.

        Returns whether a live grant was revoked; an unknown or already-dead
        token is a no-op, so revocation is idempotent for callers.
        """
        grant = self._live_grant_of(token)
        if grant is None:
            return False
        self._close_grant(grant)
        self.stats.revocations += 1
        return True

    def access_token_valid(self, access_token: str, realm_id: str) -> bool:
        record = self._access_tokens.get(access_token)
        return (
            record is not None
            and record.grant.alive
            and record.grant.realm_id == realm_id
            and self._clock() < record.expires_at
        )

    # -- inspection helpers for tests, servers and the dev demo ---------------

    def current_refresh_token(self, realm_id: str) -> str | None:
        """The refresh token a well-behaved client should hold for the realm, if any."""
        grant = self._grants.get(realm_id)
        return grant.current.value if grant is not None else None

    def is_refresh_token_alive(self, refresh_token: str) -> bool:
        """Whether a refresh with this token would succeed now (without doing it)."""
        record = self._refresh_tokens.get(refresh_token)
        if record is None:
            return False
        now = self._clock()
        grant = record.grant
        if record.dies_at is not None and now >= record.dies_at:
            return False
        return grant.alive and now < grant.hard_expires_at and now < grant.current.expires_at

    def realm_for_token(self, value: str) -> str | None:
        """The realm a refresh token, access token or authorization code belongs to."""
        if (refresh := self._refresh_tokens.get(value)) is not None:
            return refresh.grant.realm_id
        if (access := self._access_tokens.get(value)) is not None:
            return access.grant.realm_id
        if (code := self._codes.get(value)) is not None:
            return code.realm_id
        return self._dead_refresh_tokens.get(value)

    def realm_ids(self) -> list[str]:
        """Realms with a live grant."""
        return list(self._grants)

    def footprint(self) -> dict[str, int]:
        """How many objects the model holds, to check that memory stays bounded."""
        return {
            "grants": len(self._grants),
            "refresh_tokens": len(self._refresh_tokens),
            "access_tokens": len(self._access_tokens),
            "codes": len(self._codes),
            "dead_refresh_tokens": len(self._dead_refresh_tokens),
        }

    # -- internals -----------------------------------------------------------

    def _open_grant(
        self,
        realm_id: str,
        granted_at: datetime,
        issued_at: datetime,
        now: datetime,
        access_issued_at: datetime | None = None,
    ) -> tuple[_Grant, TokenResponse]:
        if (previous := self._grants.get(realm_id)) is not None:
            self._close_grant(previous)
        grant = _Grant(realm_id, granted_at, granted_at + self._config.hard_limit)
        grant.current = self._new_refresh_token(grant, issued_at)
        self._grants[realm_id] = grant
        self._new_access_token(grant, access_issued_at or issued_at)
        return grant, self._response(grant, now)

    def _close_grant(self, grant: _Grant) -> None:
        grant.alive = False
        for token in (grant.current, *grant.superseded):
            self._bury(token)
        grant.superseded.clear()
        for value in grant.access_tokens:
            self._access_tokens.pop(value, None)
        grant.access_tokens.clear()
        if self._grants.get(grant.realm_id) is grant:
            del self._grants[grant.realm_id]

    def _rotate(self, grant: _Grant, now: datetime) -> None:
        old = grant.current
        grant.current = self._new_refresh_token(grant, now)
        grace = timedelta(0) if self._config.strict_rotation else self._config.old_token_grace
        if grace > timedelta(0):
            old.dies_at = now + grace
            grant.superseded.append(old)
        else:
            self._bury(old)
        while grant.superseded and now >= (grant.superseded[0].dies_at or now):
            self._bury(grant.superseded.popleft())
        self.stats.rotations += 1
        self.stats.rotations_by_realm[grant.realm_id] += 1

    def _new_refresh_token(self, grant: _Grant, issued_at: datetime) -> _RefreshToken:
        expires_at = min(issued_at + self._config.refresh_token_ttl, grant.hard_expires_at)
        token = _RefreshToken(self._token_value("sim-rt-"), grant, issued_at, expires_at)
        self._refresh_tokens[token.value] = token
        return token

    def _new_access_token(self, grant: _Grant, issued_at: datetime) -> None:
        value = self._token_value("sim-at-")
        expires_at = issued_at + self._config.access_token_ttl
        self._access_tokens[value] = _AccessToken(grant, expires_at)
        kept = grant.access_tokens
        kept.append(value)
        # Forget the oldest once too many, and any expired ones at the front.
        while len(kept) > ACCESS_TOKENS_KEPT_PER_GRANT or (
            len(kept) > 1 and self._access_tokens[kept[0]].expires_at <= issued_at
        ):
            del self._access_tokens[kept.popleft()]

    def _token_value(self, prefix: str) -> str:
        if self._config.sequential_tokens:
            return f"{prefix}{next(self._serial)}"
        return prefix + secrets.token_urlsafe(32)

    def _response(self, grant: _Grant, now: datetime) -> TokenResponse:
        access_value = grant.access_tokens[-1]
        access = self._access_tokens[access_value]
        return TokenResponse(
            realm_id=grant.realm_id,
            access_token=access_value,
            refresh_token=grant.current.value,
            expires_in=_seconds_until(access.expires_at, now),
            x_refresh_token_expires_in=_seconds_until(grant.current.expires_at, now),
            x_refresh_token_hard_expires_in=_seconds_until(grant.hard_expires_at, now),
        )

    def _bury(self, token: _RefreshToken) -> None:
        self._refresh_tokens.pop(token.value, None)
        self._dead_refresh_tokens[token.value] = token.grant.realm_id
        if len(self._dead_refresh_tokens) > DEAD_TOKENS_REMEMBERED:
            self._dead_refresh_tokens.popitem(last=False)

    def _live_grant_of(self, token: str) -> _Grant | None:
        record = self._refresh_tokens.get(token) or self._access_tokens.get(token)
        if record is None or not record.grant.alive:
            return None
        return record.grant

    def _forget_expired_codes(self, now: datetime) -> None:
        while self._codes:
            oldest = next(iter(self._codes.values()))
            if oldest.expires_at > now:
                return
            self._codes.popitem(last=False)

    def _invalid_grant(self, realm_id: str | None, description: str) -> OAuthError:
        self.stats.invalid_grants += 1
        if realm_id is not None:
            self.stats.invalid_grants_by_realm[realm_id] += 1
        return OAuthError("invalid_grant", description, realm_id=realm_id)

    def _new_realm_id(self) -> str:
        while True:
            # 16 to 19 digits, like Intuit's company ids.
            realm = str(10**15 + secrets.randbelow(10**19 - 10**15))
            if realm not in self._grants:
                return realm


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(0, int((moment - now).total_seconds()))
