"""The sweep and the metrics on a big table: query plans, sweep time, scrape time.

    ./bin/bench-sweep               (or: python -m tests.benchmarks.sweep_and_metrics)
    ./bin/bench-sweep --connections 100000 --due 10000 --million

1. Loads ``--connections`` rows into quickbooks_connections (``--due`` of them
   with refresh tokens 61-100 days old and a live grant at the simulator, the
   rest 0-59 days old), ANALYZEs, and prints EXPLAIN ANALYZE of the sweep's
   due-selection query and of the metrics' age aggregate.
2. Runs one sweep with QB_REFRESH_JOB_RATE_LIMIT_MS=0 against the QuickBooks
   simulator over HTTP on loopback (same process, same event loop) and prints
   its wall time and rate.
3. Times GET /metrics: the first scrape (runs the aggregate) and a cached one.
4. With ``--million``: grows the table to 1,000,000 rows and repeats 1 and 3.
"""

from __future__ import annotations

import os

# Before gRPC loads: its fork handlers can crash pg_ctl children (see broker/entry.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

from broker.clock import system_clock
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import IntuitModel, IntuitSimulator, SimulatorConfig
from broker.domain.sweep import SweepKind
from broker.server import BrokerServer
from broker.settings import Secret, Settings
from broker.storage import schema
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from broker.storage.fleet import _AGE_QUERY, compute_fleet_stats
from broker.storage.sweep import DUE_QUERY

DAY = timedelta(days=1)
COLUMNS = (
    "realm_id",
    "user_id",
    "status",
    "access_token",
    "access_token_expires_at",
    "refresh_token",
    "encryption_key_id",
    "refresh_token_created_at",
    "refresh_token_expires_at",
)


async def load(
    connection: asyncpg.Connection,
    keys: KeyRing,
    model: IntuitModel,
    *,
    first: int,
    count: int,
    due: int,
    now: datetime,
    rng: random.Random,
) -> None:
    """Rows ``first`` .. ``first+count``; the first ``due`` of them due, with real grants."""
    rows = []
    for n in range(first, first + count):
        realm_id = f"{9_000_000_000_000_000 + n}"
        is_due = n - first < due
        age = timedelta(days=rng.uniform(61, 100) if is_due else rng.uniform(0, 59))
        created = now - age
        if is_due:  # a grant the sweep can really renew, sealed as the broker would
            grant = model.create_grant(realm_id, refresh_token_issued_at=created)
            refresh, key_id = keys.encrypt(grant.refresh_token, f"{realm_id}:refresh_token")
            access, _ = keys.encrypt(grant.access_token, f"{realm_id}:access_token")
        else:  # never decrypted by the sweep or the metrics: realistic width is enough
            refresh, access, key_id = os.urandom(128), os.urandom(960), keys.primary_id
        status = "active" if n % 50 else "reauthorization_required"
        rows.append(
            (
                realm_id,
                f"user-{n}",
                "active" if is_due else status,
                access,
                created + timedelta(hours=1),
                refresh,
                key_id,
                created,
                created + 101 * DAY,
            )
        )
    # Fixture rows no replica has cached: without the change trigger, so the replicas'
    # change feeds are not flooded with a notice per row while the figures are taken.
    await connection.execute("SET session_replication_role = replica")
    try:
        await connection.copy_records_to_table(
            "quickbooks_connections", records=rows, columns=COLUMNS
        )
    finally:
        await connection.execute("RESET session_replication_role")
    # Autovacuum would have run on a live table; without it the visibility map is empty.
    await connection.execute("VACUUM ANALYZE quickbooks_connections")


async def explain(connection: asyncpg.Connection, query: str, *args: object) -> str:
    rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}", *args)
    return "\n".join("    " + row[0] for row in rows)


async def scrape_percentiles(ports: list[int], scrapes: int = 300) -> tuple[float, float]:
    """p50 and p99 (ms) of GET /metrics, every replica scraped at once, ``scrapes`` times."""
    timings: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(port: int) -> None:
            began = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                await response.read()
            timings.append(time.perf_counter() - began)

        for _ in range(scrapes):
            await asyncio.gather(*(one(port) for port in ports))
    quantiles = statistics.quantiles(timings, n=100)
    return quantiles[49] * 1e3, quantiles[98] * 1e3


async def timed(work: Callable[[], Awaitable[object]], rounds: int = 3) -> float:
    """The median of ``rounds`` runs, in milliseconds."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        await work()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


async def report_table(
    connection: asyncpg.Connection, brokers: list[BrokerServer], now: datetime, total: int
) -> None:
    broker = brokers[0]
    policy = broker.components.tokens.policy  # type: ignore[union-attr]
    print(f"\n## {total:,} connections\n")
    print("Due-selection query (broker/storage/sweep.py):\n")
    print(
        await explain(
            connection,
            DUE_QUERY,
            now - policy.background_age,
            now + policy.sweep_horizon,
            timedelta(days=1),
        )
    )
    print("\nAge aggregate (broker/storage/fleet.py):\n")
    print(await explain(connection, _AGE_QUERY, now))
    compute_ms = await timed(lambda: compute_fleet_stats(connection, now))
    read_ms = await timed(
        lambda: connection.fetchrow("SELECT computed_at, stats FROM broker_fleet_stats"), 20
    )
    for replica in brokers:
        assert replica.components is not None
        await replica.components.fleet.refresh(force=True)
    print(
        f"\nFleet gauges: computed in {compute_ms:.1f} ms (all of them, once a minute for the "
        f"fleet); a replica's look at the stored figures {read_ms:.2f} ms (every 15 s)"
    )
    for count in (1, len(brokers)):
        p50, p99 = await scrape_percentiles([b.http_port for b in brokers[:count]])
        print(
            f"GET /metrics, {count} replica(s) scraped at once: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )
    for count in (1, len(brokers)):
        # Before: every replica ran the aggregate whenever its 5 s cache was stale, i.e. at
        # every 15 s scrape. Now: one computation a minute, and four small reads per replica.
        before = count * 4 * compute_ms
        after = compute_ms + count * 4 * read_ms
        print(
            f"database time on fleet gauges per minute, {count} replica(s), 15 s scrapes: "
            f"before {before:.0f} ms, now {after:.1f} ms"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--million", action="store_true", help="then grow to 1,000,000 rows")
    options = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-bench-"))
    postgres = EmbeddedPostgres(folder)
    rng = random.Random(7)
    try:
        admin_dsn = await asyncio.to_thread(postgres.start)
        await ensure_database(admin_dsn, "bench")
        dsn = postgres.dsn("bench")
        keys = KeyRing.parse(KeyRing.generate_spec())
        model = IntuitModel(SimulatorConfig(), system_clock)
        connection = await asyncpg.connect(dsn)
        await schema.migrate(connection)
        now = datetime.now(UTC)
        began = time.perf_counter()
        await load(
            connection,
            keys,
            model,
            first=0,
            count=options.connections,
            due=options.due,
            now=now,
            rng=rng,
        )
        print(f"loaded {options.connections:,} rows in {time.perf_counter() - began:.1f} s")
        async with IntuitSimulator(model) as simulator:
            settings = Settings(
                database_url=dsn,
                data_dir=folder / "data",
                grpc_addr="127.0.0.1:0",
                http_addr="127.0.0.1:0",
                encryption_keys=keys,
                client_id=model.config.client_id,
                client_secret=Secret(model.config.client_secret),
                token_url=simulator.token_url,
                revoke_url=simulator.revoke_url,
                auth_url=simulator.auth_url,
                refresh_job_rate_limit=timedelta(0),
                disable_background_refresh=True,
                log_level="WARNING",
            )
            brokers = [BrokerServer(settings) for _ in range(3)]
            for replica in brokers:
                await replica.start()
            broker = brokers[0]
            try:
                await report_table(connection, brokers, now, options.connections)
                assert broker.components is not None
                began = time.perf_counter()
                report = await broker.components.sweeper.run(SweepKind.MANUAL)
                elapsed = time.perf_counter() - began
                print(
                    f"\nSweep, rate limit 0, simulator over HTTP: examined {report.examined:,}, "
                    f"refreshed {report.refreshed:,}, failed {report.failed} in {elapsed:.1f} s "
                    f"({report.refreshed / elapsed:,.0f} refreshes/s)"
                )
                print_store_window(broker)
                if options.million:
                    extra = 1_000_000 - options.connections
                    began = time.perf_counter()
                    await load(
                        connection,
                        keys,
                        model,
                        first=options.connections,
                        count=extra,
                        due=0,
                        now=now,
                        rng=rng,
                    )
                    print(f"\nloaded {extra:,} more rows in {time.perf_counter() - began:.1f} s")
                    await report_table(connection, brokers, datetime.now(UTC), 1_000_000)
            finally:
                for replica in brokers:
                    await replica.stop()
        await connection.close()
    finally:
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(folder, ignore_errors=True)


def print_store_window(broker: BrokerServer) -> None:
    """The window a crash loses a rotated token in: Intuit's answer to its commit."""
    registry = broker.metrics.registry
    name = "qbo_broker_refresh_store_seconds"
    count = registry.get_sample_value(f"{name}_count") or 0.0
    total = registry.get_sample_value(f"{name}_sum") or 0.0
    if not count:
        return
    cumulative = []
    for metric in registry.collect():
        if metric.name != name:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                cumulative.append((float(sample.labels["le"]), sample.value))
    shares = ", ".join(
        f"<= {bound * 1000:g} ms: {value / count:.1%}"
        for bound, value in cumulative
        if bound != float("inf") and value > 0
    )
    mean_ms = total / count * 1000
    print(f"\nAnswer-to-commit window over {count:,.0f} refreshes: mean {mean_ms:.2f} ms; {shares}")


if __name__ == "__main__":
    asyncio.run(main())
