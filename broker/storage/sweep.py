"""The sweep's storage: which connections are due, one sweeper at a time, run history."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolAcquireContext

from broker.domain.policy import SweepCutoffs
from broker.domain.sweep import SweepKind, SweepOutcome
from broker.storage.errors import translate_storage_errors

# pg_try_advisory_lock key: "QBOSWEEP". Held on a session of its own for the
# whole run; if the replica dies, PostgreSQL drops the session and the lock.
_SWEEP_LOCK = 0x5142_4F53_5745_4550 & 0x7FFF_FFFF_FFFF_FFFF
_LOCK_CHECK_SECONDS = 2.0
_ACQUIRE_TIMEOUT = 10.0

# SweepCutoffs.due and SweepCutoffs.order, in SQL, written for the two partial
# indexes of migration 0002 (a BitmapOr of range scans, never a scan of every row).
DUE_QUERY = """
SELECT realm_id FROM quickbooks_connections
WHERE status = 'active'
  AND (refresh_token_created_at IS NULL
       OR refresh_token_created_at <= $1
       OR (refresh_token_expires_at <= $2
           AND (reconnect_deadline IS NULL
                OR refresh_token_expires_at < reconnect_deadline - $3::interval)))
ORDER BY refresh_token_expires_at NULLS FIRST, refresh_token_created_at NULLS FIRST, realm_id
"""


class PostgresSweepLedger:
    """Implements ``broker.domain.sweep.SweepLedger``."""

    def __init__(
        self, pool: asyncpg.Pool, connect: Callable[[], Awaitable[asyncpg.Connection]]
    ) -> None:
        self._pool = pool
        self._connect = connect

    def _acquire(self) -> PoolAcquireContext:
        return self._pool.acquire(timeout=_ACQUIRE_TIMEOUT)

    async def due_realms(self, cutoffs: SweepCutoffs) -> list[str]:
        async with translate_storage_errors(), self._acquire() as connection:
            rows = await connection.fetch(
                DUE_QUERY, cutoffs.created_by, cutoffs.expires_by, cutoffs.hard_limit_slack
            )
        return [row["realm_id"] for row in rows]

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[_AdvisoryLock | None]:
        async with translate_storage_errors():
            connection = await self._connect()
        try:
            async with translate_storage_errors():
                mine = bool(
                    await connection.fetchval("SELECT pg_try_advisory_lock($1)", _SWEEP_LOCK)
                )
            yield _AdvisoryLock(connection) if mine else None
        finally:
            # Closing the session releases the lock, whatever happened in between.
            try:
                await connection.close(timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                connection.terminate()

    async def close_abandoned(self, now: datetime) -> int:
        async with translate_storage_errors(), self._acquire() as connection:
            closed: str = await connection.execute(
                """UPDATE broker_sweep_runs SET outcome = 'abandoned', finished_at = $1
                   WHERE finished_at IS NULL""",
                now,
            )
        return int(closed.split()[-1])

    async def last_completed(self) -> datetime | None:
        async with translate_storage_errors(), self._acquire() as connection:
            value: datetime | None = await connection.fetchval(
                "SELECT max(started_at) FROM broker_sweep_runs WHERE outcome = 'completed'"
            )
        return value

    async def start_run(self, kind: SweepKind, replica: str, now: datetime) -> int:
        async with translate_storage_errors(), self._acquire() as connection:
            run_id: int = await connection.fetchval(
                "INSERT INTO broker_sweep_runs (kind, replica, started_at) VALUES ($1, $2, $3) "
                "RETURNING id",
                kind.value,
                replica,
                now,
            )
        return run_id

    async def finish_run(
        self,
        run_id: int,
        outcome: SweepOutcome,
        now: datetime,
        *,
        examined: int,
        refreshed: int,
        failed: int,
    ) -> None:
        async with translate_storage_errors(), self._acquire() as connection:
            await connection.execute(
                """UPDATE broker_sweep_runs SET finished_at = $2, outcome = $3,
                       examined = $4, refreshed = $5, failed = $6
                   WHERE id = $1""",
                run_id,
                now,
                outcome.value,
                examined,
                refreshed,
                failed,
            )


class _AdvisoryLock:
    """The sweep lock, held by the session of ``connection``."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def held(self) -> bool:
        if self._connection.is_closed():
            return False
        try:
            await self._connection.fetchval("SELECT 1", timeout=_LOCK_CHECK_SECONDS)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        return True  # the session is alive, so its session-level lock is still held
