"""Two broker replicas on one database never race each other at Intuit.

The simulator runs in strict rotation: every refresh issues a new refresh
token and kills the old one at once, harsher than Intuit. Any refresh sent
with a stale token shows up as an ``invalid_grant``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import timedelta

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.devtools.fake_intuit import SimulatorConfig
from tests.conftest import StartBroker
from tests.support import ClockGate, RunningBroker

CONNECTIONS = 40
WORKERS = 24
ROUNDS = 25
CALLS_PER_WORKER_AND_ROUND = 5


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

    gate = ClockGate(first.clock)
    replies: Counter[str] = Counter()
    failures: list[tuple[grpc.StatusCode, str]] = []

    async def caller(pick: random.Random) -> None:
        for _ in range(CALLS_PER_WORKER_AND_ROUND):
            replica = pick.choice((first, second))
            realm = pick.choice(realms)
            async with gate.call():
                try:
                    reply = await replica.get_token(realm)
                except grpc.aio.AioRpcError as exc:
                    failures.append((exc.code(), exc.details() or ""))
                    continue
            assert reply.realm_id == realm
            replies[realm] += 1

    picks = [random.Random(seed) for seed in range(WORKERS)]
    for _ in range(ROUNDS):
        # Every worker calls while the others do, on both replicas at once; then time
        # jumps past every access token's life, between calls, never under one.
        round_of_calls = asyncio.gather(*(caller(pick) for pick in picks))
        await asyncio.gather(round_of_calls, gate.advance(timedelta(minutes=61)))

    stats = first.intuit.model.stats
    assert failures == []
    assert stats.invalid_grants == 0
    assert sum(replies.values()) == ROUNDS * WORKERS * CALLS_PER_WORKER_AND_ROUND
    assert stats.rotations > CONNECTIONS * 3  # the race was really run, many times over
    # Each expiry is refreshed once at most, whichever replica noticed it.
    for realm in realms:
        assert stats.refresh_calls_by_realm[realm] <= ROUNDS + 1
    for replica in (first, second):
        for realm in realms:
            connection = await replica.connection(realm)
            assert connection.status == pb.CONNECTION_STATUS_ACTIVE
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
