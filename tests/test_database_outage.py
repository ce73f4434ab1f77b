"""PostgreSQL going away under a running broker: serve what can be served, lose nothing."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import aiohttp
import grpc
import pytest

from broker.clock import FakeClock
from broker.devtools.fake_intuit import Fault, FaultKind, SimulatorConfig
from broker.server import BrokerServer
from broker.settings import Settings
from broker.storage.embedded import EmbeddedPostgres
from tests.support import (
    RunningBroker,
    eventually,
    restart_postgres,
    start_postgres,
    stop_postgres,
)

REALM = "9130350000000001"


async def readyz(broker: RunningBroker) -> int:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{broker.broker.http_port}/readyz"
        async with session.get(url) as response:
            return response.status


async def test_the_broker_rides_out_a_database_restart(
    broker: RunningBroker, postgres: EmbeddedPostgres
) -> None:
    await broker.seed(REALM)
    warm = await broker.get_token(REALM)

    await asyncio.to_thread(stop_postgres, postgres)
    try:
        # A warm token is still served from memory while PostgreSQL is down...
        assert (await broker.get_token(REALM)).access_token == warm.access_token
        # ... and readiness says the database is gone.
        assert await readyz(broker) == 503
    finally:
        await asyncio.to_thread(start_postgres, postgres)

    # Back without a restart of the broker.
    async def ready() -> bool:
        return await readyz(broker) == 200

    await eventually(ready)
    broker.clock.advance(timedelta(hours=1))  # expired: needs the pool and Intuit again
    fresh = await broker.get_token(REALM)
    assert fresh.access_token != warm.access_token
    assert broker.token_works(REALM, fresh.access_token)

    # The change feed is back too: a hand edit still reaches the warm cache.
    async def feed_back() -> bool:
        return broker.components.feed.connected

    await eventually(feed_back)
    await broker.get_token(REALM)
    async with broker.components.pool.acquire() as connection:
        await connection.execute(
            "UPDATE quickbooks_connections SET refresh_token_created_at = $2 WHERE realm_id = $1",
            REALM,
            broker.clock() - timedelta(days=35),
        )
    await eventually(lambda: broker.components.cache.get(REALM) is None, what="the notice")
    before = broker.refreshes(REALM)
    await broker.get_token(REALM)
    assert broker.refreshes(REALM) == before + 1


@pytest.fixture
def simulator_config() -> SimulatorConfig:
    return SimulatorConfig(strict_rotation=True)


async def test_tokens_rotated_while_the_database_died_are_stored_when_it_returns(
    broker: RunningBroker, postgres: EmbeddedPostgres
) -> None:
    """Intuit rotated the token (the old one is dead) but the commit failed: keep the new one."""
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))

    call = asyncio.create_task(broker.get_token(REALM))
    await asyncio.wait_for(broker.intuit.faults.wait_held(), 10)  # the refresh holds the lock
    await asyncio.to_thread(restart_postgres, postgres)
    broker.intuit.faults.release()  # Intuit rotates and answers; the commit cannot happen

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert broker.intuit.model.stats.rotations_by_realm[REALM] == 1  # Intuit did rotate

    tokens = broker.components.tokens

    async def rescued() -> bool:
        return len(tokens.unstored) == 0

    await eventually(rescued)
    reply = await broker.get_token(REALM)  # the rescued tokens, from the database
    assert broker.token_works(REALM, reply.access_token)
    broker.clock.advance(timedelta(hours=2))
    reply = await broker.get_token(REALM)  # and the rescued refresh token works at Intuit
    assert broker.token_works(REALM, reply.access_token)
    assert broker.intuit.model.stats.invalid_grants == 0


async def test_not_ready_until_the_database_is_there(settings: Settings, clock: FakeClock) -> None:
    unreachable = replace(settings, database_url="postgresql://nobody@127.0.0.1:9/none")
    broker = BrokerServer(unreachable, clock=clock)
    starting = asyncio.create_task(broker.start())
    try:
        await eventually(lambda: broker.http_port != 0, what="the HTTP listener")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{broker.http_port}"
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 503
                assert (await response.json())["reason"] == "starting"
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
        # gRPC listens only once every servicer has what it needs: no half-built answers.
        assert broker.grpc_port == 0
        assert not starting.done()
    finally:
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await broker.stop()
