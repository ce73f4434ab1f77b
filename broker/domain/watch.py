"""Connection changes, fanned out to every open ``WatchConnections`` stream.

The change feed tells this hub of every changed row (``ChangeListener``).
Each watcher keeps the realms that changed since it last looked, in order,
once each: a slow watcher coalesces a burst of changes to one realm into one
event and never holds more than one entry per realm. When the feed is lost,
changes may be missed: every open watch ends (``StorageUnavailable``) so the
application watches again and re-reads what it needs; at shutdown they end
with ``ShuttingDown``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from broker.domain.cache import ChangeNotice
from broker.errors import BrokerError, ShuttingDown, StorageUnavailable


@dataclass(frozen=True, slots=True)
class Change:
    realm_id: str
    deleted: bool


class Watcher:
    def __init__(self) -> None:
        self._pending: dict[str, bool] = {}
        self._ready = asyncio.Event()
        self._ended: BrokerError | None = None

    def notice(self, realm_id: str, deleted: bool) -> None:
        self._pending.pop(realm_id, None)  # keep the order of the latest change
        self._pending[realm_id] = deleted
        self._ready.set()

    def end(self, why: BrokerError) -> None:
        self._ended = why
        self._ready.set()

    async def next(self, within: float) -> Change | None:
        """The next change, or None if nothing changed for ``within`` seconds."""
        if not self._pending and self._ended is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), within)
        if self._ended is not None:
            raise self._ended
        if not self._pending:
            self._ready.clear()
            return None
        realm_id = next(iter(self._pending))
        deleted = self._pending.pop(realm_id)
        if not self._pending:
            self._ready.clear()
        return Change(realm_id, deleted)


class ConnectionWatch:
    """Implements ``broker.domain.cache.ChangeListener``."""

    def __init__(self) -> None:
        self._watchers: set[Watcher] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._watchers)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[Watcher]:
        if self._closed:
            raise ShuttingDown("the broker is shutting down; watch another replica")
        watcher = Watcher()
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)

    def apply(self, notice: ChangeNotice) -> None:
        for watcher in self._watchers:
            watcher.notice(notice.realm_id, notice.deleted)

    def feed_lost(self) -> None:
        self._end_all(
            StorageUnavailable("the broker lost its change feed; watch again to catch up")
        )

    def feed_restored(self) -> None:
        pass  # watchers that were open when the feed dropped have ended already

    def close(self) -> None:
        self._closed = True
        self._end_all(ShuttingDown("the broker is shutting down; watch another replica"))

    def _end_all(self, why: BrokerError) -> None:
        for watcher in self._watchers:
            watcher.end(why)
