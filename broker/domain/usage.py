"""``last_used_at``, batched: a GetAccessToken call only notes the time in memory."""

from __future__ import annotations

import asyncio
from datetime import datetime

from broker.domain.ports import ConnectionStore
from broker.errors import StorageError

FLUSH_EVERY = 10.0
"""Seconds between two writes of the batch."""


class UsageTracker:
    def __init__(self, store: ConnectionStore) -> None:
        self._store = store
        self._last_used: dict[str, datetime] = {}

    def touch(self, realm_id: str, now: datetime) -> None:
        self._last_used[realm_id] = now

    async def flush(self) -> None:
        """Write the batch; on a database failure keep it for the next try."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        try:
            await self._store.record_usage(batch)
        except StorageError:
            for realm_id, moment in batch.items():
                self._last_used.setdefault(realm_id, moment)

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()
