"""What the core needs from the outside world, as protocols.

``broker.storage`` implements the store on PostgreSQL, ``broker.intuit`` the
client over HTTP; tests can plug in anything with the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from broker.domain.model import (
    ConnectionFilter,
    ConnectionInfo,
    ConnectionPage,
    ImportRequest,
    IssuedTokens,
    LockedConnection,
    LostCause,
    Outcome,
    RealmFilter,
    RefreshIntent,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)


class LockedRow(Protocol):
    """One connection's row, locked against every other refresher until the block ends.

    Leaving the block normally, or by a ``BrokerError`` that is not a
    ``StorageError`` (a failure recorded on the row, then raised), commits what
    was written; leaving it by any other exception rolls back.
    """

    @property
    def current(self) -> LockedConnection: ...

    async def reread(self) -> LockedConnection: ...

    async def intent(self) -> RefreshIntent | None:
        """The refresh of this connection announced and not settled, if any."""
        ...

    async def store_tokens(self, update: TokenUpdate) -> TokenSnapshot:
        """Write what Intuit issued and settle the intent; committed durably."""
        ...

    async def mark_reauthorization_required(self, reason: str, cause: LostCause) -> None:
        """The customer must reconnect; settles the intent."""
        ...

    async def mark_revoked(self) -> None:
        """Status ``revoked``, and every token erased."""
        ...

    async def delete(self) -> None:
        """The row and every token, gone."""
        ...

    async def record_error(self, message: str, *, settle_intent: bool) -> None:
        """Note a failed refresh; ``settle_intent`` when Intuit surely did not act on it.

        Otherwise the refresh stays announced (in doubt) and is marked as holding no
        answer, so siblings do not wait for one."""
        ...


class ConnectionStore(Protocol):
    async def load(self, *, realm_id: str | None, user_id: str | None) -> TokenSnapshot:
        """The connection by realm or by user; ConnectionNotFound or AmbiguousUser."""
        ...

    def locked(self, realm_id: str) -> AbstractAsyncContextManager[LockedRow]:
        """Lock the row (waiting for other holders); ConnectionNotFound if it is gone."""
        ...

    async def write_if_refresh_token_is(
        self, realm_id: str, expected_refresh_token: str, update: TokenUpdate
    ) -> bool:
        """Store ``update`` unless the row moved on to another refresh token meanwhile."""
        ...

    async def record_intent(self, realm_id: str, token_fingerprint: str, replica: str) -> None:
        """Announce, durably, a refresh about to be sent (see ``RefreshIntent``)."""
        ...

    async def record_usage(self, last_used: Mapping[str, datetime]) -> None: ...

    async def get_info(self, realm_id: str) -> ConnectionInfo: ...

    async def list_connections(
        self,
        where: ConnectionFilter,
        *,
        limit: int,
        after: str | None,
        realms: RealmFilter | None = None,
    ) -> ConnectionPage:
        """A page ordered by realm; ``realms``: only those the caller may see."""
        ...

    async def import_connection(
        self, request: ImportRequest, update: TokenUpdate
    ) -> ConnectionInfo: ...

    async def owner_of(self, realm_id: str) -> str | None: ...

    async def connect(self, realm_id: str, user_id: str, update: TokenUpdate) -> ConnectionInfo:
        """Store a grant just given (RealmOwnedByAnotherUser if the realm is another user's)."""
        ...


class IntuitClient(Protocol):
    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens: ...

    async def exchange_code(self, code: str, *, realm_id: str) -> IssuedTokens: ...

    async def revoke(self, token: str, *, realm_id: str) -> None: ...

    async def opens_company(self, access_token: str, *, realm_id: str) -> bool:
        """Whether ``access_token`` opens the books of ``realm_id`` (and no other company's)."""
        ...


class RefreshObserver(Protocol):
    """Told about every refresh that reached Intuit, and every connection lost (metrics)."""

    def refresh_finished(self, trigger: Trigger, outcome: Outcome) -> None: ...

    def connection_lost(self, cause: LostCause) -> None: ...

    def answer_stored(self, seconds: float) -> None:
        """How long Intuit's answer waited to be committed (the window a crash loses)."""
        ...
