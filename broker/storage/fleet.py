"""What the fleet looks like, for the metrics: computed once a minute for every replica.

Every replica looks at ``broker_fleet_stats`` every 15 seconds. When the
stored figures are younger than a minute it takes them as they are; when they
are older, the replica that wins a transaction-scoped advisory lock computes
them (the age distribution from an index-only scan, the expiry and deadline
counts from partial indexes, the status counts) and stores them; the others
keep what they have. Scrapes read the figures from memory: a scrape costs no
query, and the database pays for one computation a minute however many
replicas and Prometheus servers there are.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from broker.clock import Clock
from broker.domain.model import ConnectionStatus
from broker.errors import StorageError
from broker.storage.errors import translate_storage_errors

log = logging.getLogger("broker.metrics")

AGE_BUCKETS = tuple(timedelta(days=days) for days in (1, 7, 14, 30, 45, 60, 75, 90, 101))
EXPIRING_WITHIN = timedelta(days=14)
DEADLINES_WITHIN = (timedelta(days=30), timedelta(days=90))
COMPUTE_EVERY = timedelta(minutes=1)
LOOK_EVERY = 15.0
_FLEET_LOCK = 0x5142_4F46_4C45_4554 & 0x7FFF_FFFF_FFFF_FFFF  # "QBOFLEET"
_ACQUIRE_TIMEOUT = 5.0


@dataclass(frozen=True)
class FleetStats:
    age_buckets: tuple[tuple[float, int], ...]
    """(upper bound in seconds, cumulative count), the last bound being +Inf."""
    age_sum_seconds: float
    by_status: dict[ConnectionStatus, int]
    last_sweep_success: datetime | None
    expiring_soon: int
    """Active connections whose refresh token expires within ``EXPIRING_WITHIN``."""
    deadlines_within: dict[int, int]
    """Days -> active connections whose reconnect deadline falls within that many days."""
    computed_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            # JSON has no infinity: the last bound is written as Prometheus writes it.
            "age_buckets": [[_bound(bound), count] for bound, count in self.age_buckets],
            "age_sum_seconds": self.age_sum_seconds,
            "by_status": {status.value: count for status, count in self.by_status.items()},
            "last_sweep_success": (
                self.last_sweep_success.isoformat() if self.last_sweep_success else None
            ),
            "expiring_soon": self.expiring_soon,
            "deadlines_within": {str(days): n for days, n in self.deadlines_within.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], computed_at: datetime) -> FleetStats:
        last = data.get("last_sweep_success")
        return cls(
            age_buckets=tuple((float(bound), int(count)) for bound, count in data["age_buckets"]),
            age_sum_seconds=float(data["age_sum_seconds"]),
            by_status={ConnectionStatus(k): int(v) for k, v in data["by_status"].items()},
            last_sweep_success=datetime.fromisoformat(last) if last else None,
            expiring_soon=int(data["expiring_soon"]),
            deadlines_within={int(k): int(v) for k, v in data["deadlines_within"].items()},
            computed_at=computed_at,
        )


def _bound(seconds: float) -> float | str:
    return "+Inf" if seconds == float("inf") else seconds


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
_EXPIRING_QUERY = """SELECT count(*) FROM quickbooks_connections
    WHERE status = 'active' AND refresh_token_expires_at <= $1"""
_DEADLINE_QUERY = """SELECT count(*) FROM quickbooks_connections
    WHERE status = 'active' AND reconnect_deadline <= $1"""


async def compute_fleet_stats(connection: asyncpg.Connection | Any, now: datetime) -> FleetStats:
    ages = await connection.fetchrow(_AGE_QUERY, now)
    statuses = await connection.fetch(_STATUS_QUERY)
    last_sweep = await connection.fetchval(_LAST_SWEEP_QUERY)
    expiring = await connection.fetchval(_EXPIRING_QUERY, now + EXPIRING_WITHIN)
    deadlines = {
        within.days: int(await connection.fetchval(_DEADLINE_QUERY, now + within))
        for within in DEADLINES_WITHIN
    }
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
        expiring_soon=int(expiring),
        deadlines_within=deadlines,
        computed_at=now,
    )


class FleetStatsKeeper:
    """The latest fleet figures in memory, kept fresh by ``run`` (one task per replica)."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock
        self.latest: FleetStats | None = None
        self.computations = 0
        """How many times this replica computed the figures (the rest it read)."""

    async def refresh(self, *, force: bool = False) -> FleetStats | None:
        """Read the stored figures; compute them if they are a minute old (or ``force``)."""
        now = self._clock()
        try:
            async with (
                translate_storage_errors(),
                self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as connection,
                connection.transaction(),
            ):
                stored = await connection.fetchrow(
                    "SELECT computed_at, stats FROM broker_fleet_stats WHERE id = 1"
                )
                fresh = stored is not None and now - stored["computed_at"] < COMPUTE_EVERY
                if fresh and not force:
                    assert stored is not None
                    self.latest = _read(stored)
                elif await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", _FLEET_LOCK):
                    stats = await compute_fleet_stats(connection, now)
                    await connection.execute(
                        """INSERT INTO broker_fleet_stats (id, computed_at, stats)
                           VALUES (1, $1, $2::jsonb)
                           ON CONFLICT (id) DO UPDATE SET computed_at = EXCLUDED.computed_at,
                                                         stats = EXCLUDED.stats""",
                        now,
                        json.dumps(stats.to_json()),
                    )
                    self.computations += 1
                    self.latest = stats
                elif stored is not None:
                    self.latest = _read(stored)  # a sibling is computing: last minute's will do
        except StorageError as exc:
            log.warning(
                "fleet metrics unavailable; serving the last known", extra={"error": str(exc)}
            )
        return self.latest

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(LOOK_EVERY)


def _read(row: asyncpg.Record) -> FleetStats:
    data = row["stats"]
    if isinstance(data, str):
        data = json.loads(data)
    return FleetStats.from_json(data, row["computed_at"])
