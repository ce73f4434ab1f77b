"""The connect flow's sessions on PostgreSQL: each step a single conditional UPDATE.

``begin`` and ``finish`` each change a row only if it is in the right state
(unexpired, not begun / begun and not finished), in one statement, so two
browsers racing with one link or one state get one success between them.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from broker.access.policy import RealmAccess
from broker.domain.connect import Session
from broker.storage.errors import translate_storage_errors

_ACQUIRE_TIMEOUT = 10.0


class PostgresConnectSessions:
    """Implements ``broker.domain.connect.ConnectSessions``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self,
        token_hash: str,
        user_id: str,
        return_url: str | None,
        expires_at: datetime,
        realm_access: RealmAccess | None,
    ) -> None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            await connection.execute(
                "DELETE FROM broker_connect_sessions WHERE expires_at < now() - interval '1 day'"
            )
            await connection.execute(
                """INSERT INTO broker_connect_sessions
                       (token_hash, user_id, return_url, expires_at, realm_access)
                   VALUES ($1, $2, $3, $4, $5::jsonb)""",
                token_hash,
                user_id,
                return_url,
                expires_at,
                None if realm_access is None else realm_access.to_json(),
            )

    async def begin(
        self, token_hash: str, now: datetime, state_hash: str, browser_hash: str
    ) -> Session | None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            row = await connection.fetchrow(
                """UPDATE broker_connect_sessions
                   SET begun_at = $2, state_hash = $3, browser_hash = $4
                   WHERE token_hash = $1 AND begun_at IS NULL AND expires_at > $2
                   RETURNING user_id, return_url, expires_at, browser_hash, realm_access::text""",
                token_hash,
                now,
                state_hash,
                browser_hash,
            )
        return _session(row)

    async def finish(self, state_hash: str, now: datetime, outcome: str) -> Session | None:
        async with (
            translate_storage_errors(),
            self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
        ):
            row = await connection.fetchrow(
                """UPDATE broker_connect_sessions
                   SET finished_at = $2, outcome = $3
                   WHERE state_hash = $1 AND finished_at IS NULL AND expires_at > $2
                   RETURNING user_id, return_url, expires_at, browser_hash, realm_access::text""",
                state_hash,
                now,
                outcome,
            )
        return _session(row)


def _session(row: asyncpg.Record | None) -> Session | None:
    if row is None:
        return None
    stored = row["realm_access"]
    try:
        access = None if stored is None else RealmAccess.from_json(stored)
    except ValueError:
        # Not what this broker wrote: allow nothing rather than everything.
        access = RealmAccess()
    return Session(
        row["user_id"], row["return_url"], row["expires_at"], row["browser_hash"], access
    )
