"""What the fleet looks like right now, for the metrics: one aggregate query.

The age distribution of active refresh tokens is counted in one pass over the
partial index of active rows (``quickbooks_connections_active_created``); the
status counts come from the status index. Results are kept for a few seconds
and one computation is shared by every scrape that arrives meanwhile, so a
scrape stays cheap however many connections there are and however many
Prometheus servers ask.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from broker.clock import Clock
from broker.domain.model import ConnectionStatus
from broker.errors import StorageError
from broker.storage.errors import translate_storage_errors

log = logging.getLogger("broker.metrics")

AGE_BUCKETS = tuple(timedelta(days=days) for days in (1, 7, 14, 30, 45, 60, 75, 90, 101))


@dataclass(frozen=True)
class FleetStats:
    age_buckets: tuple[tuple[float, int], ...]
    """(upper bound in seconds, cumulative count), the last bound being +Inf."""
    age_sum_seconds: float
    by_status: dict[ConnectionStatus, int]
    last_sweep_success: datetime | None


def _age_query() -> str:
    filters = ",\n".join(
        f"count(*) FILTER (WHERE refresh_token_created_at >= $1::timestamptz - interval "
        f"'{int(bucket.total_seconds())} seconds')"
        for bucket in AGE_BUCKETS
    )
    return f"""
SELECT {filters},
       count(*) AS active,
       coalesce(sum(extract(epoch FROM $1::timestamptz - refresh_token_created_at)), 0) AS age_sum
FROM quickbooks_connections WHERE status = 'active'
"""


_AGE_QUERY = _age_query()
_STATUS_QUERY = "SELECT status, count(*) FROM quickbooks_connections GROUP BY status"
_LAST_SWEEP_QUERY = "SELECT max(finished_at) FROM broker_sweep_runs WHERE outcome = 'completed'"


async def read_fleet_stats(pool: asyncpg.Pool, now: datetime) -> FleetStats:
    async with translate_storage_errors(), pool.acquire(timeout=5) as connection:
        ages = await connection.fetchrow(_AGE_QUERY, now)
        statuses = await connection.fetch(_STATUS_QUERY)
        last_sweep = await connection.fetchval(_LAST_SWEEP_QUERY)
    assert ages is not None
    counts = [int(ages[index]) for index in range(len(AGE_BUCKETS))]
    bounds = [bucket.total_seconds() for bucket in AGE_BUCKETS]
    # Active rows of unknown age are older than any bucket can say: +Inf only.
    buckets = (*zip(bounds, counts, strict=True), (float("inf"), int(ages["active"])))
    return FleetStats(
        age_buckets=buckets,
        age_sum_seconds=float(ages["age_sum"]),
        by_status={ConnectionStatus(row["status"]): int(row["count"]) for row in statuses},
        last_sweep_success=last_sweep,
    )


class FleetStatsCache:
    """Computes ``FleetStats`` at most once per ``ttl``; concurrent callers share one query."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock, ttl: float = 5.0) -> None:
        self._pool = pool
        self._clock = clock
        self._ttl = ttl
        self._value: FleetStats | None = None
        self._computed_at = float("-inf")
        self._pending: asyncio.Task[FleetStats] | None = None

    @property
    def latest(self) -> FleetStats | None:
        return self._value

    def expire(self) -> None:
        """The next ``current`` reads the database again."""
        self._computed_at = float("-inf")

    async def current(self) -> FleetStats | None:
        """Fresh stats, or the last known ones if the database cannot answer."""
        if time.monotonic() - self._computed_at < self._ttl:
            return self._value
        if self._pending is None:
            self._pending = asyncio.create_task(read_fleet_stats(self._pool, self._clock()))
        pending = self._pending
        try:
            self._value = await asyncio.shield(pending)
            self._computed_at = time.monotonic()
        except StorageError as exc:
            log.warning(
                "fleet metrics unavailable; serving the last known", extra={"error": str(exc)}
            )
        finally:
            if self._pending is pending and pending.done():
                self._pending = None
        return self._value
