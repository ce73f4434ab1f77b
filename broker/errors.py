"""Every error the broker raises on purpose, in one tree, each with its wire meaning.

::

    BrokerError                                    INTERNAL             BROKER_ERROR
    ├── ConfigurationError   settings are wrong    INTERNAL             CONFIGURATION_ERROR
    ├── InvalidRequest       malformed request     INVALID_ARGUMENT     (BadRequest detail)
    ├── ConnectionNotFound   no such realm/user    NOT_FOUND
    ├── PermissionDenied     the policy says no    PERMISSION_DENIED
    ├── AmbiguousUser        user owns several     FAILED_PRECONDITION  AMBIGUOUS_USER
    ├── ReauthorizationRequired  must reconnect    FAILED_PRECONDITION  REAUTHORIZATION_REQUIRED
    ├── ConnectionActive     import over live one  FAILED_PRECONDITION  CONNECTION_ACTIVE
    ├── RealmOwnedByAnotherUser  company is taken  FAILED_PRECONDITION  REALM_OWNED_BY_ANOTHER_USER
    ├── SweepInProgress      another sweep runs    ABORTED              SWEEP_IN_PROGRESS
    ├── ShuttingDown         no new work           UNAVAILABLE          SHUTTING_DOWN
    ├── RefreshPending       a sibling's refresh   UNAVAILABLE          REFRESH_PENDING
    │                        is not stored yet
    ├── UpstreamError        Intuit gave no tokens UNAVAILABLE          INTUIT_UNAVAILABLE
    │   ├── InvalidGrant     the grant is dead     FAILED_PRECONDITION  REAUTHORIZATION_REQUIRED
    │   ├── ClientRejected   our client id/secret  INTERNAL             INTUIT_CLIENT_REJECTED
    │   └── UpstreamUnavailable  5xx, 429, timeout UNAVAILABLE          INTUIT_UNAVAILABLE
    └── StorageError         PostgreSQL failed     INTERNAL             STORAGE_ERROR
        ├── StorageUnavailable  cannot be reached  UNAVAILABLE          STORAGE_UNAVAILABLE
        └── DecryptionFailed    wrong key/tampered INTERNAL             DECRYPTION_FAILED

Each class states its ``code`` (a gRPC status code name) and ``reason`` (the
``google.rpc.ErrorInfo`` reason, part of the contract) explicitly: renaming a
class changes nothing on the wire. ``broker.api.status`` turns these into
statuses, and ``broker.client`` reads the same ``Reason`` values back.

Foreign exceptions (aiohttp, asyncpg, cryptography) are translated once, at the
module that talks to them, with ``raise ... from exc``. Messages never carry a
token or a secret.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import ClassVar


class Code(StrEnum):
    """The gRPC status codes the broker answers with, by name (no gRPC import here)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class Reason(StrEnum):
    """``ErrorInfo.reason`` values (domain ``qbo-broker``): callers branch on these."""

    REAUTHORIZATION_REQUIRED = "REAUTHORIZATION_REQUIRED"
    AMBIGUOUS_USER = "AMBIGUOUS_USER"
    INTUIT_UNAVAILABLE = "INTUIT_UNAVAILABLE"
    INTUIT_CLIENT_REJECTED = "INTUIT_CLIENT_REJECTED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    CONNECTION_ACTIVE = "CONNECTION_ACTIVE"
    CONNECT_NOT_CONFIGURED = "CONNECT_NOT_CONFIGURED"
    REALM_OWNED_BY_ANOTHER_USER = "REALM_OWNED_BY_ANOTHER_USER"
    SWEEP_IN_PROGRESS = "SWEEP_IN_PROGRESS"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    REFRESH_PENDING = "REFRESH_PENDING"
    STORAGE_ERROR = "STORAGE_ERROR"
    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    CONFIGURATION_ERROR = "CONFIGURATION_ERROR"
    BROKER_ERROR = "BROKER_ERROR"


ERROR_DOMAIN = "qbo-broker"


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    code: ClassVar[Code] = Code.INTERNAL
    reason: ClassVar[Reason | None] = Reason.BROKER_ERROR
    public: ClassVar[str | None] = "internal error; see the broker's log"
    """What the caller reads instead of the message (which may name key ids, database
    errors or Intuit's codes); None: the message itself is meant for the caller."""
    retry_after: timedelta | None = None
    """When the caller may usefully try again, if known (sent as ``RetryInfo``)."""

    def metadata(self) -> dict[str, str]:
        """``ErrorInfo.metadata``: identifiers that help the caller, never a secret."""
        return {}


class ConfigurationError(BrokerError):
    """The broker's own configuration is wrong; it must not start (or go on) like this."""

    reason = Reason.CONFIGURATION_ERROR
    public = "the broker is misconfigured; see its log"


class InvalidRequest(BrokerError):
    """A request field is malformed."""

    code = Code.INVALID_ARGUMENT
    reason = None  # the BadRequest detail names the field instead
    public = None

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class ConnectionNotFound(BrokerError):
    """No connection matches the realm or user asked for."""

    code = Code.NOT_FOUND
    reason = None
    public = None


class PermissionDenied(BrokerError):
    """The authorization policy does not let this caller do this (to this realm).

    Said the same way whether or not the realm exists: no existence oracle.
    """

    code = Code.PERMISSION_DENIED
    reason = None
    public = None

    def __init__(self, what: str = "this call") -> None:
        super().__init__(f"the authorization policy does not allow {what} for this caller")


class AmbiguousUser(BrokerError):
    """A user_id names more than one connection; the caller must say which realm."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.AMBIGUOUS_USER
    public = None

    def __init__(self) -> None:
        super().__init__("this user_id owns several connections; ask by realm_id instead")


class ReauthorizationRequired(BrokerError):
    """The connection cannot give tokens until the customer connects again."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.REAUTHORIZATION_REQUIRED
    public = None

    def __init__(self, realm_id: str, detail: str) -> None:
        super().__init__(f"realm {realm_id} needs the customer to reconnect: {detail}")
        self.realm_id = realm_id
        self.detail = detail

    def metadata(self) -> dict[str, str]:
        return {"realm_id": self.realm_id, "detail": self.detail}


class ConnectionActive(BrokerError):
    """An import would overwrite a live refresh token with a possibly older copy."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.CONNECTION_ACTIVE
    public = None

    def __init__(self, realm_id: str) -> None:
        super().__init__(
            f"realm {realm_id} is active; importing over it could replace its live refresh "
            "token with an older copy (set replace_active to do it anyway)"
        )
        self.realm_id = realm_id

    def metadata(self) -> dict[str, str]:
        return {"realm_id": self.realm_id}


class RealmOwnedByAnotherUser(BrokerError):
    """The company is connected to another application user: never silently moved."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.REALM_OWNED_BY_ANOTHER_USER
    public = None


class SweepInProgress(BrokerError):
    """Another replica (or another call) is sweeping right now."""

    code = Code.ABORTED
    reason = Reason.SWEEP_IN_PROGRESS
    public = None


class ShuttingDown(BrokerError):
    """The broker is stopping and starts no new work."""

    code = Code.UNAVAILABLE
    reason = Reason.SHUTTING_DOWN
    public = None


class RefreshPending(BrokerError):
    """Another replica refreshed this connection and has not stored Intuit's answer yet
    (the database was away); refreshing with the stored token now would send a dead one."""

    code = Code.UNAVAILABLE
    reason = Reason.REFRESH_PENDING
    retry_after = timedelta(seconds=1)
    public = None


class UpstreamError(BrokerError):
    """Intuit's OAuth endpoint did not give us what we asked for.

    ``may_have_rotated``: Intuit may have acted on the request (a 5xx, a timeout,
    a reset, an unreadable 200), so the refresh token sent may be dead now.
    ``answer_lost``: no answer arrived at all (timeout, reset).
    """

    code = Code.UNAVAILABLE
    reason = Reason.INTUIT_UNAVAILABLE
    public = (
        "Intuit did not give the broker tokens; retry later (the broker's log has the "
        "details under the intuit_tid)"
    )

    def __init__(
        self,
        message: str,
        *,
        intuit_tid: str | None = None,
        retry_after: timedelta | None = None,
        may_have_rotated: bool = True,
        answer_lost: bool = False,
        kind: str = "bad_response",
    ) -> None:
        super().__init__(message)
        self.intuit_tid = intuit_tid
        self.retry_after = retry_after
        self.may_have_rotated = may_have_rotated
        self.answer_lost = answer_lost
        self.kind = kind
        """How it ended, as ``qbo_broker_intuit_requests_total`` counts it."""

    def metadata(self) -> dict[str, str]:
        return {"intuit_tid": self.intuit_tid} if self.intuit_tid else {}


class InvalidGrant(UpstreamError):
    """Intuit answered ``invalid_grant``: the refresh token (or code) is dead."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.REAUTHORIZATION_REQUIRED
    public = "Intuit no longer accepts this grant; the customer must reconnect"


class ClientRejected(UpstreamError):
    """Intuit answered ``invalid_client``: our client id or secret is wrong.

    This is the broker's fault, never the connection's: nothing is marked dead.
    """

    code = Code.INTERNAL
    reason = Reason.INTUIT_CLIENT_REJECTED
    public = "Intuit rejected the broker's own client credentials; see the broker's log"


class UpstreamUnavailable(UpstreamError):
    """Intuit is down, slow, throttling or answering garbage: keep the token, retry later."""


class StorageError(BrokerError):
    """PostgreSQL did not do what we asked."""

    reason = Reason.STORAGE_ERROR
    public = "the broker's database failed; see the broker's log"


class StorageUnavailable(StorageError):
    """PostgreSQL cannot be reached right now."""

    code = Code.UNAVAILABLE
    reason = Reason.STORAGE_UNAVAILABLE
    retry_after = timedelta(seconds=1)
    public = "the broker's database is unavailable; retry later"


class DecryptionFailed(StorageError):
    """A stored token does not decrypt with the key ring: wrong key or tampered row."""

    reason = Reason.DECRYPTION_FAILED
    public = "a stored token could not be decrypted; see the broker's log"
