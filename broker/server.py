"""The broker process: HTTP and gRPC listeners around the components, signals, the scheduler.

Start-up order, so that probes tell the truth at every step:

1. the key ring is checked (a bad one stops us before anything listens);
2. the HTTP listener: ``/healthz`` alive, ``/readyz`` 503 "starting";
3. PostgreSQL: the embedded server, or wait for the configured one;
4. the components (``broker.wiring``): migrations, the key-ring check against
   stored tokens, the pool, the change feed, the token service, the sweeper;
5. the gRPC server, with every servicer wired to its components from the
   first call, health SERVING, ``/readyz`` 200;
6. the scheduler thread (unless ``QB_DISABLE_BACKGROUND_REFRESH``), the
   start-up sweep (``QB_REFRESH_JOB_ON_STARTUP``) and a catch-up check.

Shutdown reverses it within one budget (``Settings.shutdown_budget``): health
NOT_SERVING, nothing new is sent to Intuit, the scheduler thread stops, a
running sweep ends at its next connection, ``server.stop(grace)`` lets
in-flight calls finish, every refresh already sent to Intuit is answered and
stored, tokens the database would not take are retried, then the change feed,
the HTTP session and the pool close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.access.loader import PolicyFile
from broker.api.guard import Guard, ReflectionGate
from broker.api.servicers import ConnectionAdminServicer, TokenBrokerServicer
from broker.api.tls import ReloadingServerCredentials
from broker.clock import Clock, system_clock
from broker.domain.ports import IntuitClient
from broker.domain.sweep import SweepKind
from broker.errors import ConfigurationError, StorageError
from broker.metrics import BrokerMetrics
from broker.scheduler import SweepScheduler
from broker.settings import Settings
from broker.storage import schema
from broker.storage.database import Database, key_ring_for
from broker.storage.errors import translate_storage_errors
from broker.version import package_version
from broker.web.oauth import ConnectEndpoints
from broker.web.routes import build_app
from broker.wiring import Components, assemble

log = logging.getLogger("broker")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["TokenBrokerService"].full_name,
    pb.DESCRIPTOR.services_by_name["ConnectionAdminService"].full_name,
)
STARTUP_SWEEP_DELAY = 1.0
CATCH_UP_DELAY = (10.0, 30.0)
"""A catch-up check this many seconds after ready (jittered: replicas spread out)."""
CLOSE_RESERVE = 1.0
"""Seconds of the shutdown budget kept for closing the pool, the listeners and the process."""
_READINESS_CACHE_SECONDS = 1.0
_MAX_MESSAGE_BYTES = 64 * 1024


class BrokerServer:
    """One running broker: HTTP + gRPC + the components, on one event loop."""

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
        self.metrics = BrokerMetrics(CollectorRegistry(), version=package_version())
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self.database: Database | None = None
        self.components: Components | None = None
        self.scheduler: SweepScheduler | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._ready = False
        self._stopped = False
        self._credentials: ReloadingServerCredentials | None = None
        self._readiness: tuple[float, str | None] = (0.0, "starting")

    @property
    def background_work(self) -> int:
        """Sweeps waiting to start (start-up, first catch-up)."""
        return len(self._background)

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        # Everything that can be wrong with the configuration is found before anything
        # listens: the key ring, the TLS files, the policy.
        keys = key_ring_for(self.settings)
        credentials = _tls_credentials(self.settings)
        policy = _policy_file(self.settings)
        if self.settings.insecure and not self.settings.access_controlled:
            log.warning(
                "BROKER_INSECURE: serving every caller without mutual TLS or an authorization "
                "policy on a non-loopback address",
                extra={"grpc_addr": self.settings.grpc_addr},
            )
        await self._start_http()
        self.database = await Database.open(self.settings)
        self.components = await assemble(
            self.settings,
            keys=keys,
            database=self.database,
            clock=self.clock,
            metrics=self.metrics,
            intuit=self._intuit_override,
            policy=policy,
        )
        self._credentials = credentials
        await self._start_grpc(self.components)
        self._ready = True
        # Everything built so far lives as long as the process: keep it out of the
        # cyclic collector's way (shorter pauses on the GetAccessToken path).
        gc.freeze()
        log.info("broker ready", extra={"grpc_port": self.grpc_port, "http_port": self.http_port})
        self._start_background_sweeps(self.components)

    def _start_background_sweeps(self, components: Components) -> None:
        if self.settings.disable_background_refresh:
            log.info("background refresh disabled: connections are renewed on use only")
            return
        sweeper = components.sweeper
        loop = asyncio.get_running_loop()
        self.scheduler = SweepScheduler(
            self.settings.refresh_job_schedule, loop, sweeper.run_quietly, clock=self.clock
        )
        self.scheduler.start()
        if self.settings.refresh_job_on_startup:
            self._later(STARTUP_SWEEP_DELAY, lambda: sweeper.run_quietly(SweepKind.STARTUP))
        catch_up = random.uniform(*CATCH_UP_DELAY)  # noqa: S311 - spreading, not secrecy
        self._later(catch_up, lambda: sweeper.run_quietly(SweepKind.CATCH_UP))

    def _later(self, delay: float, work: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            await work()

        task: asyncio.Task[object] = asyncio.create_task(run(), name="sweep-soon")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_http(self) -> None:
        app = build_app(self.metrics.registry, self._readiness_check, self._connect_endpoints)
        runner = web.AppRunner(app, access_log=None)
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

    async def _start_grpc(self, components: Components) -> None:
        policy = components.policy
        current = (lambda: policy.current) if policy is not None else None
        guard = Guard(
            audit=components.audit,
            calls=self.metrics,
            policy=current,
            tls=self._credentials is not None,
        )
        server = grpc.aio.server(
            interceptors=[ReflectionGate(guard)] if current is not None else [],
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        pb_grpc.add_TokenBrokerServiceServicer_to_server(
            TokenBrokerServicer(components.tokens, guard), server
        )
        pb_grpc.add_ConnectionAdminServiceServicer_to_server(
            ConnectionAdminServicer(
                admin=components.admin,
                sweeper=components.sweeper,
                connect=components.connect,
                watch=components.watch,
                clock=self.clock,
                guard=guard,
                heartbeat=self.settings.watch_heartbeat,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self._credentials is None:
            self.grpc_port = server.add_insecure_port(self.settings.grpc_addr)
        else:
            self.grpc_port = server.add_secure_port(
                self.settings.grpc_addr, self._credentials.credentials()
            )
        if self.grpc_port == 0:
            raise ConfigurationError(f"cannot listen on BROKER_GRPC_ADDR {self.settings.grpc_addr}")
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._grpc = server

    def _connect_endpoints(self) -> ConnectEndpoints | None:
        components = self.components
        if components is None or not self._ready:
            return None
        return ConnectEndpoints(
            flow=components.connect,
            audit=components.audit,
            secure_cookie=self.settings.redirect_uri.startswith("https:"),
        )

    async def _readiness_check(self) -> str | None:
        components = self.components
        if not self._ready or components is None:
            return "shutting down" if self._stopped else "starting"
        checked_at, problem = self._readiness
        if time.monotonic() - checked_at < _READINESS_CACHE_SECONDS:
            return problem
        try:
            async with translate_storage_errors(), components.pool.acquire(timeout=2) as connection:
                pending = await schema.pending_migrations(connection)
            problem = f"migrations not applied: {', '.join(pending)}" if pending else None
        except StorageError as exc:
            log.warning("readiness: the database is unreachable", extra={"error": str(exc)})
            problem = "database unreachable"  # the details are in the log, not on the wire
        self._readiness = (time.monotonic(), problem)
        return problem

    # -- stop -------------------------------------------------------------------------

    async def stop(self) -> None:
        """Shut down within ``Settings.shutdown_budget``, losing no refresh already sent.

        Calls get ``BROKER_SHUTDOWN_GRACE_SECONDS`` to finish; nothing new is sent
        to Intuit from the signal on; a refresh already sent runs to its end and
        is stored (within the Intuit timeout); then everything closes.
        """
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        began = time.monotonic()
        grace_ends = began + self.settings.shutdown_grace.total_seconds()
        deadline = began + self.settings.shutdown_budget.total_seconds() - CLOSE_RESERVE
        try:
            for name in ("", *SERVICE_NAMES):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.components is not None:
                self.components.sweeper.stop()  # a running sweep ends at its next connection
                self.components.tokens.stop_refreshing()
            if self.scheduler is not None:
                await asyncio.to_thread(self.scheduler.stop)
            if self._grpc is not None:
                await self._grpc.stop(max(0.0, grace_ends - time.monotonic()))
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if self.components is not None:
                await self.components.close(deadline)
        finally:
            if self._http is not None:
                await self._http.cleanup()
            if self.database is not None:
                await self.database.close()
        log.info("broker stopped", extra={"seconds": round(time.monotonic() - began, 1)})

    async def serve_until_signalled(
        self, on_ready: Callable[[BrokerServer], Awaitable[None]] | None = None
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


def _tls_credentials(settings: Settings) -> ReloadingServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return ReloadingServerCredentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )


def _policy_file(settings: Settings) -> PolicyFile | None:
    if settings.authz_policy_file is None:
        return None
    return PolicyFile(settings.authz_policy_file)
