"""Two broker replicas on one database never race each other at Intuit.

The simulator runs in strict rotation: every refresh issues a new refresh
token and kills the old one at once, harsher than Intuit. Any refresh sent
with a stale token shows up as an ``invalid_grant``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import timedelta

import grpc
import pytest

from broker.devtools.fake_intuit import SimulatorConfig
from tests.conftest import StartBroker
from tests.support import RunningBroker

CONNECTIONS = 40
WORKERS = 24
DURATION = 4.0
EXPIRE_EVERY = 0.15


@pytest.fixture
def simulator_config() -> SimulatorConfig:
    return SimulatorConfig(strict_rotation=True)


async def test_two_replicas_under_sustained_load_never_lose_a_token(
    start_broker: StartBroker,
) -> None:
    first = await start_broker()
    second = await start_broker()
    realms = [f"93000000000{n:05d}" for n in range(CONNECTIONS)]
    for realm in realms:
        await first.seed(realm, access_token_left=None)

    replies: Counter[str] = Counter()
    failures: list[grpc.StatusCode] = []
    expiries = 0
    deadline = time.monotonic() + DURATION

    async def caller(seed: int) -> None:
        pick = random.Random(seed)
        while time.monotonic() < deadline:
            replica = pick.choice((first, second))
            realm = pick.choice(realms)
            try:
                reply = await replica.get_token(realm)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc.code())
                continue
            assert reply.realm_id == realm
            replies[realm] += 1

    async def expire_tokens() -> None:
        nonlocal expiries
        while time.monotonic() < deadline:
            await asyncio.sleep(EXPIRE_EVERY)
            first.clock.advance(timedelta(minutes=61))  # every access token is now expired
            expiries += 1

    await asyncio.gather(expire_tokens(), *(caller(n) for n in range(WORKERS)))

    stats = first.intuit.model.stats
    assert failures == []
    assert stats.invalid_grants == 0
    assert sum(replies.values()) > 1000
    assert stats.rotations > CONNECTIONS * 3  # the race was really run, many times over
    # Each expiry is refreshed once at most, whichever replica noticed it.
    for realm in realms:
        assert stats.refresh_calls_by_realm[realm] <= expiries + 1
    for replica in (first, second):
        for realm in realms:
            connection = await replica.connection(realm)
            assert connection.status == 1  # ACTIVE
    # And both replicas hand out a token that works right now.
    for replica in (first, second):
        for realm in realms[:5]:
            reply = await replica.get_token(realm)
            assert replica.token_works(realm, reply.access_token)


async def test_a_waiting_replica_reuses_the_token_its_sibling_stored(
    start_broker: StartBroker,
) -> None:
    first: RunningBroker = await start_broker()
    second: RunningBroker = await start_broker()
    realm = "9300000000099999"
    await first.seed(realm, access_token_left=None)

    replies = await asyncio.gather(
        *(replica.get_token(realm) for replica in (first, second) for _ in range(50))
    )

    assert first.refreshes(realm) == 1
    assert len({reply.access_token for reply in replies}) == 1
