"""Everything behind the listeners, built from one ``Settings``: database, Intuit, the core.

``Core.open`` is what ``serve`` and ``dev`` run behind gRPC and HTTP, and what
``qbo-broker sweep`` runs on its own: the database (embedded or configured,
migrated, key ring checked), one asyncpg pool, one aiohttp session, the change
feed, the token service, the admin operations, the sweeper and the fleet
statistics. ``close`` takes it down in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
import asyncpg

from broker.clock import Clock
from broker.crypto import KeyRing
from broker.domain.admin import ConnectionAdmin
from broker.domain.cache import TokenCache
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import IntuitClient
from broker.domain.sweep import Progress, Sweeper, SweepKind, SweepReport
from broker.domain.tokens import TokenService
from broker.errors import ConfigurationError
from broker.intuit.client import HttpIntuitClient
from broker.metrics import BrokerMetrics
from broker.settings import Settings
from broker.storage import schema
from broker.storage.connections import PostgresConnectionStore, verify_key_ring, wait_for_database
from broker.storage.embedded import DATABASE, EmbeddedPostgres, ensure_database
from broker.storage.errors import translate_storage_errors
from broker.storage.fleet import FleetStatsCache
from broker.storage.notifications import ChangeFeed
from broker.storage.sweep import PostgresSweepLedger

log = logging.getLogger("broker")


@dataclass
class Database:
    """Where the broker's PostgreSQL is, and the embedded server if we own one."""

    dsn: str
    embedded: EmbeddedPostgres | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        if settings.database_url is not None:
            await wait_for_database(settings.database_url, attempts=120)
            return cls(settings.database_url)
        embedded = EmbeddedPostgres(settings.data_dir)
        admin_dsn = await asyncio.to_thread(embedded.start)
        await ensure_database(admin_dsn, DATABASE)
        return cls(embedded.dsn(DATABASE), embedded)

    async def connect(self, application: str = "qbo-broker") -> asyncpg.Connection:
        connection: asyncpg.Connection = await asyncpg.connect(
            self.dsn, timeout=5, server_settings={"application_name": application}
        )
        return connection

    async def close(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def key_ring_for(settings: Settings) -> KeyRing:
    """The configured key ring, or (embedded database only) one kept in the data dir."""
    settings.require_key_ring_policy()
    if settings.encryption_keys is not None:
        return settings.encryption_keys
    path = settings.data_dir / "encryption-keys"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(KeyRing.generate_spec() + "\n")
        log.info("generated an encryption key for the embedded database", extra={"path": str(path)})
    try:
        return KeyRing.parse(path.read_text())
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


async def create_pool(dsn: str, size: int, intuit_timeout: timedelta) -> asyncpg.Pool:
    # A refresh holds its row lock while it waits on Intuit: a sibling waiting for
    # that lock must outlast the call, and PostgreSQL must never end the holder's
    # transaction (and its lock) while Intuit may still be rotating the token.
    call = int(intuit_timeout.total_seconds())
    async with translate_storage_errors():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=5,
            command_timeout=30,
            server_settings={
                "application_name": "qbo-broker",
                "lock_timeout": f"{call + 5}s",
                "idle_in_transaction_session_timeout": f"{max(60, 2 * call + 10)}s",
            },
        )
    assert pool is not None
    return pool


def replica_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class Core:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        pool: asyncpg.Pool,
        session: aiohttp.ClientSession | None,
        feed: ChangeFeed,
        tokens: TokenService,
        admin: ConnectionAdmin,
        sweeper: Sweeper,
        fleet: FleetStatsCache,
    ) -> None:
        self.settings = settings
        self.database = database
        self.pool = pool
        self.feed = feed
        self.tokens = tokens
        self.admin = admin
        self.sweeper = sweeper
        self.fleet = fleet
        self._session = session
        self._sweeps: set[asyncio.Task[SweepReport]] = set()

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        clock: Clock,
        metrics: BrokerMetrics,
        database: Database,
        intuit: IntuitClient | None = None,
    ) -> Core:
        keys = key_ring_for(settings)
        async with translate_storage_errors():
            connection = await database.connect()
            try:
                await schema.migrate(connection)
                await verify_key_ring(connection, keys)
            finally:
                await connection.close()
        pool = await create_pool(database.dsn, settings.db_pool_size, settings.intuit_timeout)
        cache = TokenCache()
        feed = ChangeFeed(lambda: database.connect("qbo-broker-feed"), cache)
        feed.start()
        await feed.wait_connected(within=5.0)
        session = None
        if intuit is None:
            session, intuit = _intuit_client(settings)
        store = PostgresConnectionStore(pool, keys)
        tokens = TokenService(
            store=store,
            intuit=intuit,
            policy=RefreshPolicy(
                proactive_age=settings.proactive_age,
                background_age=settings.background_age,
                sweep_interval=settings.refresh_job_schedule.interval,
            ),
            clock=clock,
            cache=cache,
            observer=metrics,
        )
        tokens.start()
        sweeper = Sweeper(
            tokens=tokens,
            ledger=PostgresSweepLedger(pool, lambda: database.connect("qbo-broker-sweep")),
            clock=clock,
            replica=replica_name(),
            rate_limit=settings.refresh_job_rate_limit,
            max_per_run=settings.refresh_job_max_per_run,
            observer=metrics,
        )
        fleet = FleetStatsCache(pool, clock)
        metrics.watch_fleet(lambda: fleet.latest)
        return cls(
            settings,
            database,
            pool,
            session,
            feed,
            tokens,
            ConnectionAdmin(store=store, tokens=tokens),
            sweeper,
            fleet,
        )

    async def run_sweep(self, kind: SweepKind, progress: Progress | None = None) -> SweepReport:
        """Run a sweep that outlives its caller's patience: it is stopped only by ``close``."""
        task = asyncio.create_task(self.sweeper.run(kind, progress), name=f"sweep-{kind.value}")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)
        return await asyncio.shield(task)

    async def close(self, within: float = 10.0) -> None:
        """Finish sweeps and refreshes in flight (for up to ``within`` s), close everything."""
        self.sweeper.stop()  # a running sweep ends at its next connection

        async def finish() -> None:
            await asyncio.gather(*self._sweeps, return_exceptions=True)
            await self.tokens.close()  # after the sweeps: they start refreshes too

        try:
            await asyncio.wait_for(finish(), timeout=within)
        except TimeoutError:
            log.critical(
                "shutdown grace ran out with refreshes still in flight; their results are lost",
                extra={"pending_writes": self.tokens.pending_writes},
            )
        finally:
            await self.feed.close()
            if self._session is not None:
                await self._session.close()
            try:
                await asyncio.wait_for(self.pool.close(), 2)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()


def _intuit_client(settings: Settings) -> tuple[aiohttp.ClientSession, HttpIntuitClient]:
    timeout = settings.intuit_timeout.total_seconds()
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout)),
        headers={"User-Agent": "qbo-token-broker"},
    )
    client = HttpIntuitClient(
        session,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        token_url=settings.token_url,
        revoke_url=settings.revoke_url,
        redirect_uri=settings.redirect_uri,
    )
    return session, client
