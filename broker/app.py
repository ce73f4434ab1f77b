"""The composition root: builds the broker from one ``Settings`` and runs it.

Start-up order, so that probes tell the truth at every step:

1. the HTTP listener (``/healthz`` alive, ``/readyz`` 503) and the gRPC server
   (health NOT_SERVING, broker RPCs UNAVAILABLE);
2. PostgreSQL: the embedded server, or wait for the configured one;
3. migrations (advisory-locked), the key-ring check, the pool, the change feed;
4. the token service; health SERVING.

Shutdown reverses it: NOT_SERVING, ``server.stop(grace)`` lets in-flight calls
finish, refreshes in flight complete, then the change feed, the HTTP session
and the pool close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api.servicers import ConnectionAdminServicer, TokenBrokerServicer
from broker.clock import Clock, system_clock
from broker.crypto import KeyRing
from broker.domain.admin import ConnectionAdmin
from broker.domain.cache import TokenCache
from broker.domain.policy import RefreshPolicy
from broker.domain.ports import IntuitClient
from broker.domain.tokens import TokenService
from broker.errors import ConfigurationError, StorageError
from broker.intuit.client import HttpIntuitClient
from broker.metrics import BrokerMetrics
from broker.settings import Settings
from broker.storage import schema
from broker.storage.connections import PostgresConnectionStore, verify_key_ring, wait_for_database
from broker.storage.embedded import DATABASE, EmbeddedPostgres, ensure_database
from broker.storage.errors import translate_storage_errors
from broker.storage.notifications import ChangeFeed
from broker.web.app import build_app

log = logging.getLogger("broker")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name,
    pb.DESCRIPTOR.services_by_name["ConnectionAdminService"].full_name,
)
_READINESS_CACHE_SECONDS = 1.0
_MAX_MESSAGE_BYTES = 64 * 1024


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


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    async with translate_storage_errors():
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            command_timeout=30,
            server_settings={
                "application_name": "qbo-broker",
                # A replica that hangs while holding a row lock must not stall the others.
                "lock_timeout": "15s",
                "idle_in_transaction_session_timeout": "60s",
            },
        )
    assert pool is not None
    return pool


class Broker:
    """One running broker: gRPC + HTTP + the core, on one event loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = system_clock,
        intuit: IntuitClient | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._intuit_override = intuit
        self.registry = CollectorRegistry()
        self.metrics = BrokerMetrics(self.registry)
        self.health = health.aio.HealthServicer()
        self.token_servicer = TokenBrokerServicer(None)
        self.admin_servicer = ConnectionAdminServicer(None, clock)
        self.grpc_port = 0
        self.http_port = 0
        self.database: Database | None = None
        self.pool: asyncpg.Pool | None = None
        self.tokens: TokenService | None = None
        self.admin: ConnectionAdmin | None = None
        self.cache = TokenCache()
        self._feed: ChangeFeed | None = None
        self._session: aiohttp.ClientSession | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._ready = False
        self._readiness: tuple[float, str | None] = (0.0, "starting")

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        keys = key_ring_for(self.settings)
        if self.settings.embedded_database:
            # Local and quick; started first so that pg_ctl forks before gRPC starts threads.
            self.database = await Database.open(self.settings)
            await self._start_listeners()
        else:
            # Possibly a long wait beside a database pod: probes answer meanwhile.
            await self._start_listeners()
            self.database = await Database.open(self.settings)
        async with translate_storage_errors():
            connection = await asyncpg.connect(self.database.dsn)
            try:
                await schema.migrate(connection)
                await verify_key_ring(connection, keys)
            finally:
                await connection.close()
        self.pool = await create_pool(self.database.dsn, self.settings.db_pool_size)
        self._feed = ChangeFeed(self._listen_connection, self.cache)
        self._feed.start()
        await self._feed.wait_connected(within=5.0)
        store = PostgresConnectionStore(self.pool, keys)
        self.tokens = TokenService(
            store=store,
            intuit=self._intuit_override or self._intuit_client(),
            policy=RefreshPolicy(self.settings.proactive_age, self.settings.background_age),
            clock=self.clock,
            cache=self.cache,
            observer=self.metrics,
        )
        self.tokens.start()
        self.admin = ConnectionAdmin(store=store, tokens=self.tokens)
        self.token_servicer.attach(self.tokens)
        self.admin_servicer.attach(self.admin)
        self._ready = True
        # Everything built so far lives as long as the process: keep it out of the
        # cyclic collector's way (shorter pauses on the GetAccessToken path).
        gc.freeze()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "broker ready",
            extra={"grpc_port": self.grpc_port, "http_port": self.http_port},
        )

    async def _start_listeners(self) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_TokenBrokerServiceServicer_to_server(self.token_servicer, server)
        pb_grpc.add_ConnectionAdminServiceServicer_to_server(self.admin_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.grpc_port = server.add_insecure_port(self.settings.grpc_addr)
        if self.grpc_port == 0:
            raise ConfigurationError(f"cannot listen on BROKER_GRPC_ADDR {self.settings.grpc_addr}")
        await server.start()
        self._grpc = server

        runner = web.AppRunner(build_app(self.registry, self._readiness_check), access_log=None)
        await runner.setup()
        host, _, port = self.settings.http_addr.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigurationError(
                f"cannot listen on BROKER_HTTP_ADDR {self.settings.http_addr}: {exc.strerror}"
            ) from None
        self._http = runner
        self.http_port = int(runner.addresses[0][1])

    def _intuit_client(self) -> HttpIntuitClient:
        timeout = self.settings.intuit_timeout.total_seconds()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout)),
            headers={"User-Agent": "qbo-token-broker"},
        )
        return HttpIntuitClient(
            self._session,
            client_id=self.settings.client_id,
            client_secret=self.settings.client_secret,
            token_url=self.settings.token_url,
            revoke_url=self.settings.revoke_url,
            redirect_uri=self.settings.redirect_uri,
        )

    async def _listen_connection(self) -> asyncpg.Connection:
        assert self.database is not None
        connection: asyncpg.Connection = await asyncpg.connect(
            self.database.dsn, timeout=5, server_settings={"application_name": "qbo-broker-feed"}
        )
        return connection

    async def _readiness_check(self) -> str | None:
        if not self._ready or self.pool is None:
            return "starting" if self.pool is None else "shutting down"
        checked_at, problem = self._readiness
        if time.monotonic() - checked_at < _READINESS_CACHE_SECONDS:
            return problem
        try:
            async with translate_storage_errors():
                await self.pool.fetchval("SELECT 1", timeout=2)
            problem = None
        except StorageError as exc:
            problem = f"database unreachable: {exc}"
        self._readiness = (time.monotonic(), problem)
        return problem

    # -- stop -------------------------------------------------------------------------

    async def stop(self) -> None:
        self._ready = False
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._grpc is not None:
            await self._grpc.stop(self.settings.shutdown_grace.total_seconds())
        if self.tokens is not None:
            await self.tokens.close()
        if self._feed is not None:
            await self._feed.close()
        if self._http is not None:
            await self._http.cleanup()
        if self._session is not None:
            await self._session.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        if self.database is not None:
            await self.database.close()
        log.info("broker stopped")

    async def serve_until_signalled(
        self, on_ready: Callable[[Broker], Awaitable[None]] | None = None
    ) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting in done:
                starting.result()
                if on_ready is not None:
                    await on_ready(self)
                await stopping
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
            log.info("shutting down")
        finally:
            stopping.cancel()
            await self.stop()
