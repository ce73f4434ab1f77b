"""The composition root: everything behind the listeners, built from one ``Settings``.

``assemble`` is what ``serve`` and ``dev`` run behind gRPC and HTTP, and what
``qbo-broker sweep`` runs on its own: migrations and the key-ring check on the
database, one asyncpg pool, one aiohttp session, the change feed, the token
service, the admin operations, the sweeper and the fleet statistics.
``Components.close`` takes them down in reverse. Wiring only: no decisions
are taken here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from broker.access.audit import AuditTrail
from broker.access.loader import PolicyFile
from broker.clock import Clock
from broker.crypto import KeyRing
from broker.domain.admin import ConnectionAdmin
from broker.domain.cache import TokenCache
from broker.domain.connect import ConnectFlow, ConnectSettings
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import IntuitClient
from broker.domain.sweep import Sweeper
from broker.domain.tokens import TokenService
from broker.domain.watch import ConnectionWatch
from broker.intuit.oauth import IntuitOAuthClient
from broker.metrics import BrokerMetrics
from broker.settings import Settings
from broker.storage.audit import PostgresAuditSink
from broker.storage.connect import PostgresConnectSessions
from broker.storage.connections import PostgresConnectionStore
from broker.storage.database import Database, create_pool
from broker.storage.fleet import FleetStatsKeeper
from broker.storage.notifications import ChangeFeed
from broker.storage.sweep import PostgresSweepLedger

log = logging.getLogger("broker")

FEED_CONNECT_WITHIN = 5.0


@dataclass
class Components:
    settings: Settings
    keys: KeyRing
    database: Database
    pool: asyncpg.Pool
    session: aiohttp.ClientSession | None
    feed: ChangeFeed
    cache: TokenCache
    tokens: TokenService
    admin: ConnectionAdmin
    sweeper: Sweeper
    fleet: FleetStatsKeeper
    audit: AuditTrail
    policy: PolicyFile | None
    watch: ConnectionWatch
    connect: ConnectFlow
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self, deadline: float) -> None:
        """Finish sweeps and refreshes in flight until ``deadline`` (monotonic), then close.

        Nothing new is sent to Intuit from now on; a refresh already sent runs to
        its end and is stored; tokens the database would not take are retried
        until the deadline, then named in the log.
        """
        self.sweeper.stop()  # a running sweep ends at its next connection
        self.tokens.stop_refreshing()
        self.watch.close()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sweeper.finish(), _left(deadline))
            await self.tokens.drain(deadline)
        finally:
            await self.tokens.close()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.audit.close()  # after the calls: their events are in the batch
            await self.feed.close()
            if self.session is not None:
                await self.session.close()
            try:
                await asyncio.wait_for(self.pool.close(), 2)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def assemble(
    settings: Settings,
    *,
    keys: KeyRing,
    database: Database,
    clock: Clock,
    metrics: BrokerMetrics,
    intuit: IntuitClient | None = None,
    policy: PolicyFile | None = None,
) -> Components:
    """Build everything on an open ``database``; ``intuit`` replaces the HTTP client (tests)."""
    await database.prepare(keys)
    pool = await create_pool(database.dsn, settings.db_pool_size, settings.intuit_timeout)
    replica = replica_name()
    cache = TokenCache(max_entries=settings.token_cache_size)
    watch = ConnectionWatch()
    feed = ChangeFeed(lambda: database.connect("qbo-broker-feed"), (cache, watch), replica)
    feed.start()
    await feed.wait_connected(within=FEED_CONNECT_WITHIN)
    session = None
    if intuit is None:
        session, intuit = intuit_client(settings, metrics)
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
        replica=replica,
        # Each refresh holds two pooled connections at its peak (its row lock, its intent).
        max_concurrent_refreshes=settings.db_pool_size // 2,
    )
    tokens.start()
    sweeper = Sweeper(
        tokens=tokens,
        ledger=PostgresSweepLedger(pool, lambda: database.connect("qbo-broker-sweep")),
        clock=clock,
        replica=replica,
        rate_limit=settings.refresh_job_rate_limit,
        max_per_run=settings.refresh_job_max_per_run,
        observer=metrics,
    )
    fleet = FleetStatsKeeper(pool, clock)
    metrics.watch(
        fleet=lambda: fleet.latest,
        unstored=lambda: len(tokens.unstored),
        cache=lambda: (tokens.cache_hits, tokens.cache_misses),
        database_up=lambda: feed.connected,
    )
    background = [asyncio.create_task(fleet.run(), name="fleet-stats")]
    audit = AuditTrail(PostgresAuditSink(pool, replica))
    audit.start()
    connect = ConnectFlow(
        settings=ConnectSettings(
            client_id=settings.client_id,
            auth_url=settings.auth_url,
            redirect_uri=settings.redirect_uri,
            return_url_prefixes=settings.connect_return_urls,
            link_lifetime=settings.connect_link_lifetime,
        ),
        sessions=PostgresConnectSessions(pool),
        connections=store,
        intuit=intuit,
        clock=clock,
        on_connected=tokens.connection_replaced,
    )
    if policy is not None:
        background.append(asyncio.create_task(policy.watch(), name="watch-authz-policy"))
    return Components(
        settings=settings,
        keys=keys,
        database=database,
        pool=pool,
        session=session,
        feed=feed,
        cache=cache,
        tokens=tokens,
        admin=ConnectionAdmin(store=store, tokens=tokens),
        sweeper=sweeper,
        fleet=fleet,
        audit=audit,
        policy=policy,
        watch=watch,
        connect=connect,
        _background=background,
    )


def intuit_client(
    settings: Settings, metrics: BrokerMetrics
) -> tuple[aiohttp.ClientSession, IntuitOAuthClient]:
    timeout = settings.intuit_timeout.total_seconds()
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout)),
        headers={"User-Agent": "qbo-token-broker"},
    )
    client = IntuitOAuthClient(
        session,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        token_url=settings.token_url,
        revoke_url=settings.revoke_url,
        redirect_uri=settings.redirect_uri,
        api_url=settings.api_url,
        observer=metrics,
    )
    return session, client


def replica_name() -> str:
    """This broker's name among its siblings: host (the pod), process, and a nonce, so two
    brokers in one process (tests) or a restarted one on a reused pid never share it."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
