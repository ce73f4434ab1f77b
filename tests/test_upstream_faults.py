"""When Intuit misbehaves, the broker keeps the stored token and tells callers the truth."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.devtools.fake_intuit import Fault, FaultKind
from tests.support import RunningBroker, error_info, retry_delay

REALM = "9130350000000001"

TRANSIENT = [
    pytest.param(Fault(FaultKind.SERVER_ERROR, status=500), id="500"),
    pytest.param(Fault(FaultKind.SERVER_ERROR, status=503), id="503"),
    pytest.param(Fault(FaultKind.HTML_ERROR), id="html-502"),
    pytest.param(Fault(FaultKind.THROTTLED, seconds=7), id="429"),
    pytest.param(Fault(FaultKind.GARBAGE), id="not-json"),
    pytest.param(Fault(FaultKind.GARBAGE, body='{"access_token": 42}'), id="wrong-shape"),
]


async def stored_refresh_token(db: asyncpg.Connection) -> bytes:
    value: bytes = await db.fetchval(
        "SELECT refresh_token FROM quickbooks_connections WHERE realm_id = $1", REALM
    )
    return value


@pytest.mark.parametrize("fault", TRANSIENT)
async def test_transient_failure_with_an_expired_token_is_unavailable_and_loses_nothing(
    broker: RunningBroker, db: asyncpg.Connection, fault: Fault
) -> None:
    await broker.seed(REALM, access_token_left=None)
    before = await stored_refresh_token(db)
    broker.intuit.faults.add(fault)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "INTUIT_UNAVAILABLE"
    connection = await broker.connection(REALM)
    assert connection.status == 1  # still ACTIVE: a 5xx never marks a connection dead
    assert connection.last_error
    assert await stored_refresh_token(db) == before

    # Once Intuit is back (and the backoff has passed), the same stored token works.
    broker.clock.advance(timedelta(minutes=3))
    reply = await broker.get_token(REALM)
    assert broker.token_works(REALM, reply.access_token)
    assert (await broker.connection(REALM)).last_error == ""


LOST_ANSWER = [
    pytest.param(Fault(FaultKind.DELAY, seconds=3), id="timeout"),
    pytest.param(Fault(FaultKind.RESET), id="reset"),
]


@pytest.mark.parametrize("fault", LOST_ANSWER)
async def test_a_lost_answer_for_a_token_too_young_to_rotate_is_asked_again_at_once(
    broker: RunningBroker, fault: Fault
) -> None:
    """Intuit hands a day-young refresh token back unchanged: asking again loses nothing."""
    await broker.seed(REALM, access_token_left=None, refresh_token_age=timedelta(hours=2))
    broker.intuit.faults.add(fault)

    reply = await broker.get_token(REALM)

    assert broker.token_works(REALM, reply.access_token)
    assert broker.intuit.faults.served == 1
    assert broker.intuit.model.stats.invalid_grants == 0
    assert (await broker.connection(REALM)).last_error == ""


@pytest.mark.parametrize("fault", LOST_ANSWER)
async def test_a_lost_answer_for_a_token_that_may_rotate_is_not_asked_again(
    broker: RunningBroker, db: asyncpg.Connection, fault: Fault
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=timedelta(days=2))
    before = await stored_refresh_token(db)
    broker.intuit.faults.add(fault)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert broker.refreshes(REALM) <= 1  # sent once; never twice with a token in doubt
    connection = await broker.connection(REALM)
    assert connection.status == pb.CONNECTION_STATUS_ACTIVE
    assert await stored_refresh_token(db) == before
    # The refresh stays announced: its outcome is in doubt until a later one settles it.
    assert await db.fetchval("SELECT count(*) FROM broker_refresh_intents") == 1


async def test_throttling_tells_the_caller_when_to_retry(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.THROTTLED, seconds=7))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)

    delay = retry_delay(caught.value)
    assert delay is not None
    assert timedelta(seconds=6) <= delay <= timedelta(seconds=7)


async def test_a_still_valid_token_is_served_while_intuit_fails(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=3))
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))

    # Three minutes left, ten asked for: the refresh fails, the working token is served anyway.
    reply = await broker.get_token(REALM, min_validity=timedelta(minutes=10))

    assert broker.token_works(REALM, reply.access_token)
    left = reply.expires_at.ToDatetime().timestamp() - broker.clock().timestamp()
    assert 170 <= left <= 181  # expires_at tells the truth about the short life left


async def test_a_failing_connection_is_not_hammered(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add_forever(Fault(FaultKind.SERVER_ERROR, status=503))

    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broker.get_token(REALM)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    assert broker.intuit.faults.served == 1  # the other four waited out the backoff
    assert retry_delay(caught.value) is not None


async def test_proactive_renewal_failing_still_serves_the_valid_token(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, refresh_token_age=timedelta(days=40))
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=502))

    reply = await broker.get_token(REALM)

    assert broker.token_works(REALM, reply.access_token)
    assert broker.refreshes(REALM) == 0  # the fault answered before the model saw it
    assert broker.intuit.faults.served == 1
    failures = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_token_refreshes_total", {"trigger": "proactive", "outcome": "upstream_error"}
    )
    assert failures == 1


async def test_invalid_client_is_our_fault_not_the_connections(
    broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.INVALID_CLIENT))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)

    assert caught.value.code() is grpc.StatusCode.INTERNAL
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "INTUIT_CLIENT_REJECTED"
    assert (await broker.connection(REALM)).status == 1  # ACTIVE
    assert any(
        record.levelname == "ERROR" and "QB_CLIENT_SECRET" in record.getMessage()
        for record in caplog.records
    )


async def test_an_answer_without_an_access_token_is_never_served_as_one(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    """Intuit's 200 carries the (same) refresh token but no usable access token."""
    await broker.seed(REALM, access_token_left=None)
    current = broker.intuit.model.current_refresh_token(REALM)
    body = json.dumps({"refresh_token": current, "x_refresh_token_expires_in": 8_000_000})
    broker.intuit.faults.add(Fault(FaultKind.GARBAGE, body=body))

    replies = await asyncio.gather(
        *(broker.get_token(REALM) for _ in range(20)), return_exceptions=True
    )

    for reply in replies:
        if isinstance(reply, grpc.aio.AioRpcError):
            assert reply.code() is grpc.StatusCode.UNAVAILABLE
        else:
            assert isinstance(reply, pb.GetAccessTokenResponse)
            assert broker.token_works(REALM, reply.access_token)
    assert broker.intuit.faults.served + broker.refreshes(REALM) <= 2  # no stampede
    assert (await broker.connection(REALM)).status == 1
    reply = await broker.get_token(REALM)
    assert broker.token_works(REALM, reply.access_token)
