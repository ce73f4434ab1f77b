"""Rotated tokens the database would not take: kept in memory until it does.

When the commit of a refresh fails (PostgreSQL died mid-refresh), the tokens
Intuit just issued may be the only live copy of the grant: Intuit has already
rotated. They are kept here and written as soon as PostgreSQL answers, before
any other refresh of that realm (which would otherwise send the dead token),
unless the row has moved on to another refresh token meanwhile (a newer grant
was imported or connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from broker.domain.model import TokenUpdate
from broker.domain.ports import ConnectionStore
from broker.errors import ConnectionNotFound, StorageError

log = logging.getLogger("broker.tokens")

RETRY_EVERY = 1.0
"""Seconds between two attempts to write what is kept."""


@dataclass(frozen=True)
class UnstoredWrite:
    """Tokens Intuit issued whose commit failed, and the refresh token they replace."""

    sent_refresh_token: str
    update: TokenUpdate

    def __repr__(self) -> str:  # the fields are tokens
        return "UnstoredWrite(…)"


class UnstoredTokens:
    def __init__(self, store: ConnectionStore) -> None:
        self._store = store
        self._kept: dict[str, UnstoredWrite] = {}
        self._retrying: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def realms(self) -> list[str]:
        return sorted(self._kept)

    def keep(self, realm_id: str, write: UnstoredWrite) -> None:
        log.error(
            "could not store refreshed tokens; keeping them in memory until the database answers",
            extra={"realm_id": realm_id},
        )
        self._kept[realm_id] = write
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry(), name="write-unstored-tokens")

    async def write(self, realm_id: str) -> None:
        """Write what is kept for ``realm_id`` (StorageError if the database still fails)."""
        write = self._kept.get(realm_id)
        if write is None:
            return
        try:
            written = await self._store.write_if_refresh_token_is(
                realm_id, write.sent_refresh_token, write.update
            )
        except ConnectionNotFound:
            written = False  # the connection was deleted meanwhile: nothing to keep alive
        if self._kept.get(realm_id) is write:
            del self._kept[realm_id]
        if written:
            log.info("stored refreshed tokens kept in memory", extra={"realm_id": realm_id})
        else:
            log.warning(
                "tokens kept in memory were superseded by a newer grant; dropped",
                extra={"realm_id": realm_id},
            )

    async def write_all(self) -> None:
        """One attempt at every realm; what still fails stays kept."""
        for realm_id in list(self._kept):
            with contextlib.suppress(StorageError):
                await self.write(realm_id)

    async def _retry(self) -> None:
        while self._kept:
            await self.write_all()
            if self._kept:
                await asyncio.sleep(RETRY_EVERY)

    async def close(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
