"""Shared fixtures: a real PostgreSQL, the Intuit simulator on loopback, running brokers.

- One embedded PostgreSQL serves the whole session; each test gets a fresh
  database cloned from a migrated template (fast, isolated).
- ``clock`` is a FakeClock shared by the simulator and the brokers: "35 days
  later" is ``clock.advance(timedelta(days=35))``. It starts at the real time,
  so SQL written with ``NOW()`` (the runbook's queries) agrees with it.
- ``start_broker(...)`` starts a full broker (gRPC + HTTP + components) against that
  database and simulator, and stops it after the test.
"""

from __future__ import annotations

import os

# gRPC's fork handlers can crash a child forked while gRPC threads run, and the
# tests fork pg_ctl beside running brokers; the broker's own CLI does the same.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2_grpc as pb_grpc
from broker.clock import FakeClock
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import FaultPlan, IntuitModel, IntuitSimulator, SimulatorConfig
from broker.server import BrokerServer
from broker.settings import Secret, Settings
from broker.storage import schema
from broker.storage.embedded import EmbeddedPostgres
from tests.support import RunningBroker

TEMPLATE = "broker_template"


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's tmp_path: a concurrent pytest run resets that tree to
    # mode 0700, locking out the unprivileged user the server runs as.
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-tests-"))
    server = EmbeddedPostgres(folder)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_database(postgres: EmbeddedPostgres) -> str:
    admin = await asyncpg.connect(postgres.dsn("postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    connection = await asyncpg.connect(postgres.dsn(TEMPLATE))
    try:
        await schema.migrate(connection)
    finally:
        await connection.close()
    return TEMPLATE


@asynccontextmanager
async def throwaway_database(
    postgres: EmbeddedPostgres, template: str | None = None
) -> AsyncIterator[str]:
    """A database of its own (cloned from ``template`` if given), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    clause = f" TEMPLATE {template}" if template else ""
    admin = await asyncpg.connect(postgres.dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}{clause}")
    finally:
        await admin.close()
    try:
        yield postgres.dsn(name)
    finally:
        admin = await asyncpg.connect(postgres.dsn("postgres"))
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def database(postgres: EmbeddedPostgres, template_database: str) -> AsyncIterator[str]:
    """The DSN of a fresh, migrated database for this test."""
    async with throwaway_database(postgres, template_database) as dsn:
        yield dsn


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, for looking at rows the way an operator would."""
    connection = await asyncpg.connect(database)
    yield connection
    await connection.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def simulator_config() -> SimulatorConfig:
    return SimulatorConfig()


@pytest.fixture
async def intuit(
    clock: FakeClock, simulator_config: SimulatorConfig
) -> AsyncIterator[IntuitSimulator]:
    model = IntuitModel(simulator_config, clock)
    async with IntuitSimulator(model, FaultPlan()) as simulator:
        yield simulator


@pytest.fixture
def key_spec() -> str:
    """This test's BROKER_ENCRYPTION_KEYS value."""
    return KeyRing.generate_spec("test1")


@pytest.fixture
def keys(key_spec: str) -> KeyRing:
    return KeyRing.parse(key_spec)


@pytest.fixture
def settings(database: str, intuit: IntuitSimulator, keys: KeyRing, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database,
        data_dir=tmp_path / "data",
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        encryption_keys=keys,
        client_id=intuit.model.config.client_id,
        client_secret=Secret(intuit.model.config.client_secret),
        redirect_uri="http://127.0.0.1:1/oauth/callback",
        auth_url=intuit.auth_url,
        token_url=intuit.token_url,
        revoke_url=intuit.revoke_url,
        api_url=intuit.api_base_url,
        intuit_timeout=timedelta(seconds=2),
        shutdown_grace=timedelta(seconds=2),
        db_pool_size=10,
        log_format="text",
    )


StartBroker = Callable[..., Awaitable[RunningBroker]]


@pytest.fixture
async def start_broker(
    settings: Settings, clock: FakeClock, intuit: IntuitSimulator
) -> AsyncIterator[StartBroker]:
    """Start a broker; keyword arguments override settings fields."""
    running: list[RunningBroker] = []

    async def start(**overrides: Any) -> RunningBroker:
        broker = BrokerServer(replace(settings, **overrides), clock=clock)
        await broker.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.grpc_port}")
        handle = RunningBroker(
            broker=broker,
            channel=channel,
            tokens=pb_grpc.TokenBrokerServiceStub(channel),
            admin=pb_grpc.ConnectionAdminServiceStub(channel),
            intuit=intuit,
            clock=clock,
        )
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.channel.close()
        await handle.broker.stop()


@pytest.fixture
async def broker(start_broker: StartBroker) -> RunningBroker:
    return await start_broker()
