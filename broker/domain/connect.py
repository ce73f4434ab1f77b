"""The connect flow: a customer connects a QuickBooks company to an application user.

Nobody starts a flow by typing a URL. The application's backend asks for a
link (``create_link``: a random session token, stored only as its hash,
short-lived, single-use); the customer's browser opens it (``begin``): the
session is used up, a random ``state`` bound to it goes to Intuit, and a
random browser-binding value goes into a cookie. Intuit sends the browser back
(``complete``): the state must name a live, begun, unfinished session, and the
cookie must be the one set in *that* browser, and the company the browser names
must be one the link's caller may connect (its policy's realms, kept with the
link); only then is the code exchanged, once. The company is then confirmed
with Intuit (the new access token must open *that* company's books: the
browser could have named another), and the connection stored. A grant the
broker does not keep (wrong company, taken by another user, not confirmed, not
stored) is revoked at once. Everything random is 256 bits from ``secrets``;
the database holds hashes only, so a leaked table starts no flow.

Outcomes, as the browser's return URL hears them: ``connected``, ``denied``
(the customer cancelled at Intuit), ``owned_by_another_user`` (the company is
connected to another user: never silently moved), ``not_permitted`` (the
link's caller may not connect that company), ``intuit_unavailable`` and
``error``. A forged, missing, expired or replayed state, or another browser,
is refused (``ConnectRefused``) and nothing is stored or exchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from broker.access.policy import RealmAccess
from broker.clock import Clock
from broker.domain.model import ConnectionInfo, IssuedTokens, TokenUpdate
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import IntuitClient
from broker.errors import (
    BrokerError,
    Code,
    InvalidRequest,
    RealmOwnedByAnotherUser,
    Reason,
    UpstreamError,
)

log = logging.getLogger("broker.connect")

LINK_LIFETIME = timedelta(minutes=10)
SCOPE = "com.intuit.quickbooks.accounting"
COOKIE = "qbo_broker_connect"
CONNECT_PATH = "/oauth/connect"


class Outcome(StrEnum):
    CONNECTED = "connected"
    DENIED = "denied"
    OWNED_BY_ANOTHER_USER = "owned_by_another_user"
    NOT_PERMITTED = "not_permitted"
    INTUIT_UNAVAILABLE = "intuit_unavailable"
    ERROR = "error"


class ConnectNotConfigured(BrokerError):
    """Connect links need ``QB_REDIRECT_URI`` (where Intuit sends the browser back)."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.CONNECT_NOT_CONFIGURED
    public = None


class ConnectRefused(BrokerError):
    """The browser's request does not belong to a live flow: answered 400, nothing done."""

    code = Code.INVALID_ARGUMENT
    reason = None
    public = None


@dataclass(frozen=True, slots=True)
class ConnectLink:
    url: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str
    return_url: str | None
    expires_at: datetime
    browser_hash: str | None = None
    realm_access: RealmAccess | None = None
    """The realms the link's caller may connect; None: every realm."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the browser to ``url`` with the binding cookie set for ``max_age``."""

    url: str
    browser_value: str
    max_age: timedelta


@dataclass(frozen=True, slots=True)
class Completion:
    outcome: Outcome
    user_id: str
    realm_id: str | None
    return_url: str | None

    def return_to(self) -> str | None:
        """``return_url`` with ``realm_id`` and ``outcome`` in its query."""
        if self.return_url is None:
            return None
        parts = urlsplit(self.return_url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        query += [("outcome", self.outcome.value)]
        if self.realm_id is not None:
            query += [("realm_id", self.realm_id)]
        return urlunsplit(parts._replace(query=urlencode(query)))


class ConnectSessions(Protocol):
    async def create(
        self,
        token_hash: str,
        user_id: str,
        return_url: str | None,
        expires_at: datetime,
        realm_access: RealmAccess | None,
    ) -> None: ...

    async def begin(
        self, token_hash: str, now: datetime, state_hash: str, browser_hash: str
    ) -> Session | None:
        """Use the session up (once, unexpired); None if it cannot be."""
        ...

    async def finish(self, state_hash: str, now: datetime, outcome: str) -> Session | None:
        """Close the begun, unexpired, unfinished session of this state; None otherwise."""
        ...


class ConnectionWriter(Protocol):
    async def owner_of(self, realm_id: str) -> str | None: ...

    async def connect(self, realm_id: str, user_id: str, update: TokenUpdate) -> ConnectionInfo:
        """Store a new grant (RealmOwnedByAnotherUser if the realm is another user's)."""
        ...


@dataclass(frozen=True)
class ConnectSettings:
    client_id: str
    auth_url: str
    redirect_uri: str
    return_url_prefixes: Sequence[str]
    link_lifetime: timedelta = LINK_LIFETIME


class ConnectFlow:
    def __init__(
        self,
        *,
        settings: ConnectSettings,
        sessions: ConnectSessions,
        connections: ConnectionWriter,
        intuit: IntuitClient,
        clock: Clock,
        on_connected: Callable[[str], None],
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._connections = connections
        self._intuit = intuit
        self._clock = clock
        self._on_connected = on_connected

    async def create_link(
        self, user_id: str, return_url: str | None, realm_access: RealmAccess | None = None
    ) -> ConnectLink:
        """A single-use link for ``user_id``; ``realm_access``: the realms the caller may
        connect (None: any)."""
        settings = self._settings
        if not settings.redirect_uri:
            raise ConnectNotConfigured(
                "connect links need QB_REDIRECT_URI (the broker's /oauth/callback as registered "
                "with Intuit)"
            )
        if return_url is not None and not allowed_return_url(
            return_url, settings.return_url_prefixes
        ):
            raise InvalidRequest("return_url", "not under any of BROKER_CONNECT_RETURN_URLS")
        token = secrets.token_urlsafe(32)
        expires_at = self._clock() + settings.link_lifetime
        await self._sessions.create(_hash(token), user_id, return_url, expires_at, realm_access)
        origin = urlsplit(settings.redirect_uri)
        url = urlunsplit(
            (origin.scheme, origin.netloc, CONNECT_PATH, urlencode({"session": token}), "")
        )
        return ConnectLink(url, expires_at)

    async def begin(self, session_token: str) -> Redirect:
        state = secrets.token_urlsafe(32)
        browser = secrets.token_urlsafe(32)
        now = self._clock()
        session = await self._sessions.begin(
            _hash(session_token), now, _hash(state), _hash(browser)
        )
        if session is None:
            raise ConnectRefused("this link is unknown, expired or already used")
        query = urlencode(
            {
                "client_id": self._settings.client_id,
                "response_type": "code",
                "scope": SCOPE,
                "redirect_uri": self._settings.redirect_uri,
                "state": state,
            }
        )
        return Redirect(f"{self._settings.auth_url}?{query}", browser, session.expires_at - now)

    async def complete(
        self,
        *,
        state: str,
        browser_value: str | None,
        code: str | None,
        realm_id: str | None,
        error: str | None,
    ) -> Completion:
        now = self._clock()
        session = await self._sessions.finish(_hash(state), now, "callback")
        if session is None:
            raise ConnectRefused("this sign-in is unknown, expired or already finished")
        if (
            browser_value is None
            or session.browser_hash is None
            or not hmac.compare_digest(_hash(browser_value), session.browser_hash)
        ):
            raise ConnectRefused("this sign-in was started in another browser")
        user_id = session.user_id
        if error is not None:
            outcome = Outcome.DENIED if error == "access_denied" else Outcome.ERROR
            return Completion(outcome, user_id, None, session.return_url)
        if code is None or realm_id is None:
            raise ConnectRefused("Intuit's answer lacks the code or the company")
        back = session.return_url
        if session.realm_access is not None and not session.realm_access.allows(realm_id):
            log.warning(
                "the link's caller may not connect this company; the code is not exchanged",
                extra={"realm_id": realm_id},
            )
            return Completion(Outcome.NOT_PERMITTED, user_id, realm_id, back)
        owner = await self._connections.owner_of(realm_id)
        if owner is not None and owner != user_id:
            return Completion(Outcome.OWNED_BY_ANOTHER_USER, user_id, realm_id, back)
        try:
            issued = await self._intuit.exchange_code(code, realm_id=realm_id)
        except UpstreamError as exc:
            log.warning(
                "the code exchange failed; nothing stored",
                extra={"realm_id": realm_id, "intuit_tid": exc.intuit_tid, "error": str(exc)},
            )
            return Completion(Outcome.INTUIT_UNAVAILABLE, user_id, realm_id, back)
        problem = await self._confirm_company(issued, realm_id)
        if problem is not None:
            await self._give_back(issued, realm_id)
            return Completion(problem, user_id, realm_id, back)
        try:
            await self._connections.connect(realm_id, user_id, grant(issued, now))
        except RealmOwnedByAnotherUser:
            # Another user's flow for this company finished in between: give the grant back.
            await self._give_back(issued, realm_id)
            return Completion(Outcome.OWNED_BY_ANOTHER_USER, user_id, realm_id, back)
        except BrokerError:
            # Not stored (the database failed): a live grant nobody holds must not stay.
            await self._give_back(issued, realm_id)
            raise
        self._on_connected(realm_id)
        log.info("company connected", extra={"realm_id": realm_id, "intuit_tid": issued.intuit_tid})
        return Completion(Outcome.CONNECTED, user_id, realm_id, back)

    async def _confirm_company(self, issued: IssuedTokens, realm_id: str) -> Outcome | None:
        """None if the new grant opens ``realm_id``'s books; else the outcome to report.

        The realm comes from the browser's query string, which its user controls: one
        could consent for company X and name company Y, taking Y's place in the broker.
        """
        if issued.access_token is None:
            log.warning(
                "Intuit's code exchange carried no usable access token; the company cannot "
                "be confirmed",
                extra={"realm_id": realm_id, "intuit_tid": issued.intuit_tid},
            )
            return Outcome.INTUIT_UNAVAILABLE
        try:
            opens = await self._intuit.opens_company(issued.access_token, realm_id=realm_id)
        except UpstreamError as exc:
            log.warning(
                "could not confirm the granted company with Intuit; nothing stored",
                extra={"realm_id": realm_id, "error": str(exc)},
            )
            return Outcome.INTUIT_UNAVAILABLE
        if not opens:
            log.error(
                "the browser named a company this grant does not open (a tampered callback?); "
                "nothing stored",
                extra={"realm_id": realm_id, "intuit_tid": issued.intuit_tid},
            )
            return Outcome.ERROR
        return None

    async def _give_back(self, issued: IssuedTokens, realm_id: str) -> None:
        try:
            await self._intuit.revoke(issued.refresh_token, realm_id=realm_id)
        except UpstreamError as exc:
            log.error(
                "could not revoke a grant the broker will not keep",
                extra={"realm_id": realm_id, "error": str(exc)},
            )


def grant(issued: IssuedTokens, now: datetime) -> TokenUpdate:
    """What a fresh grant stores: a refresh token issued now, with Intuit's dates."""
    return RefreshPolicy.new_grant(issued, now)


def allowed_return_url(url: str, prefixes: Sequence[str]) -> bool:
    """Same scheme and host as an allowed prefix, and a path under it (no open redirect)."""
    try:
        target = urlsplit(url)
    except ValueError:
        return False
    if target.scheme not in ("https", "http") or not target.hostname or target.username:
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        if (
            target.scheme == allowed.scheme
            and target.netloc.lower() == allowed.netloc.lower()
            and target.path.startswith(allowed.path or "/")
        ):
            return True
    return False


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
