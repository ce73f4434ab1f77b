"""``broker.client.BrokerClient``, the library internal services use, against a running broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, timedelta

import pytest

from broker.client import (
    AccessToken,
    BrokerClient,
    BrokerUnavailable,
    ConnectionNotFound,
    InvalidRequest,
    ReauthorizationRequired,
)
from broker.devtools.fake_intuit import Fault, FaultKind
from tests.support import RunningBroker, eventually

REALM = "9130350000000001"


@pytest.fixture
async def client(broker: RunningBroker) -> AsyncIterator[BrokerClient]:
    async with BrokerClient(f"127.0.0.1:{broker.broker.grpc_port}", timeout=5) as client:
        yield client


def revoke(broker: RunningBroker, realm_id: str) -> None:
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(realm_id) or "")


async def test_two_lines_get_a_working_token_with_aware_dates(broker: RunningBroker) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=timedelta(minutes=40))

    async with BrokerClient(f"127.0.0.1:{broker.broker.grpc_port}") as qbo:
        token = await qbo.get_access_token(realm_id=REALM)

    assert isinstance(token, AccessToken)
    assert broker.token_works(REALM, token.access_token)
    assert token.realm_id == REALM
    assert token.expires_at.utcoffset() == timedelta(0)
    assert token.expires_at == broker.clock() + timedelta(minutes=40)
    assert token.refresh_token_expires_at is not None
    assert token.refresh_token_expires_at.utcoffset() == timedelta(0)
    assert token.refresh_token_expires_at > token.expires_at
    assert token.reconnect_deadline is None  # not known until Intuit has said it


async def test_by_user_and_with_min_validity(broker: RunningBroker, client: BrokerClient) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=timedelta(minutes=40))

    kept = await client.get_access_token(user_id="alice@example.com")
    renewed = await client.get_access_token(
        user_id="alice@example.com", min_validity=timedelta(minutes=45)
    )

    assert kept.realm_id == renewed.realm_id == REALM
    assert broker.refreshes(REALM) == 1
    assert renewed.access_token != kept.access_token
    assert renewed.expires_at - broker.clock() >= timedelta(minutes=45)
    assert renewed.reconnect_deadline is not None
    assert renewed.reconnect_deadline.tzinfo is not None
    assert renewed.reconnect_deadline.astimezone(UTC) > broker.clock() + timedelta(days=4 * 365)


async def test_a_token_never_shows_in_its_repr(broker: RunningBroker, client: BrokerClient) -> None:
    await broker.seed(REALM)
    token = await client.get_access_token(realm_id=REALM)

    assert token.access_token
    for shown in (repr(token), str(token), f"{token}", f"{token!r}", repr([token])):
        assert token.access_token not in shown
        assert REALM in shown


async def test_a_revoked_grant_raises_reauthorization_required(
    broker: RunningBroker, client: BrokerClient
) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=None)
    revoke(broker, REALM)

    with pytest.raises(ReauthorizationRequired) as by_realm:
        await client.get_access_token(realm_id=REALM)
    assert by_realm.value.realm_id == REALM

    # Asked by user, the caller learns which company to send the customer back to.
    with pytest.raises(ReauthorizationRequired) as by_user:
        await client.get_access_token(user_id="alice@example.com")
    assert by_user.value.realm_id == REALM
    assert broker.refreshes(REALM) == 1


async def test_an_unknown_connection_raises_connection_not_found(
    broker: RunningBroker, client: BrokerClient
) -> None:
    await broker.seed(REALM, "alice@example.com")
    with pytest.raises(ConnectionNotFound):
        await client.get_access_token(realm_id="9130350000000404")
    with pytest.raises(ConnectionNotFound):
        await client.get_access_token(user_id="bob@example.com")


async def test_a_malformed_request_raises_invalid_request(
    broker: RunningBroker, client: BrokerClient
) -> None:
    with pytest.raises(InvalidRequest) as bad_realm:
        await client.get_access_token(realm_id="9130/35")
    assert "realm_id" in str(bad_realm.value)

    with pytest.raises(InvalidRequest) as too_long:
        await client.get_access_token(realm_id=REALM, min_validity=timedelta(hours=1))
    assert "min_validity" in str(too_long.value)


async def test_naming_both_or_neither_connection_fails_before_any_call() -> None:
    # Nothing listens on port 1: a call that went out would end in BrokerUnavailable.
    async with BrokerClient("127.0.0.1:1", timeout=0.5) as nowhere:
        with pytest.raises(InvalidRequest):
            await nowhere.get_access_token()
        with pytest.raises(InvalidRequest):
            await nowhere.get_access_token(realm_id=REALM, user_id="alice@example.com")
        with pytest.raises(BrokerUnavailable):
            await nowhere.get_access_token(realm_id=REALM)


async def test_broker_unavailable_while_intuit_fails_and_the_token_has_expired(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503), times=5)

    async with BrokerClient(f"127.0.0.1:{broker.broker.grpc_port}", timeout=0.5) as client:
        with pytest.raises(BrokerUnavailable):
            await client.get_access_token(realm_id=REALM)
        assert broker.intuit.faults.served == 1

        # The broker now backs off from Intuit for this realm and says for how long; that is
        # longer than this client will wait, so it gives up at once rather than sleep.
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            await client.get_access_token(realm_id=REALM)
        assert time.monotonic() - started < 0.4
        retry_after = caught.value.retry_after
        assert retry_after is not None
        assert timedelta(0) < retry_after <= timedelta(minutes=2)
        assert broker.intuit.faults.served == 1  # Intuit was not asked again meanwhile

        broker.intuit.faults.clear()
        broker.clock.advance(retry_after + timedelta(seconds=1))
        token = await client.get_access_token(realm_id=REALM)
    assert broker.token_works(REALM, token.access_token)


async def test_the_first_failure_already_says_when_to_retry(
    broker: RunningBroker, client: BrokerClient
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503), times=5)

    with pytest.raises(BrokerUnavailable) as caught:
        await client.get_access_token(realm_id=REALM)

    assert broker.intuit.faults.served == 1
    assert caught.value.retry_after is not None


async def test_the_client_retries_when_the_broker_says_when(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    # Intuit throttles the first refresh and asks for a second's patience.
    broker.intuit.faults.add(Fault(FaultKind.THROTTLED, seconds=1), times=1)

    async def time_passes() -> None:
        """The broker's backoff runs on the injected clock: move it once the 429 is in.

        (The backoff counts from the moment the refresh began, before Intuit saw it.)
        """
        await eventually(lambda: broker.intuit.faults.served, what="the 429")
        broker.clock.advance(timedelta(seconds=2))

    clock_task = asyncio.create_task(time_passes())
    started = time.monotonic()
    async with BrokerClient(f"127.0.0.1:{broker.broker.grpc_port}", timeout=5) as client:
        token = await client.get_access_token(realm_id=REALM)
    elapsed = time.monotonic() - started
    await clock_task

    assert broker.token_works(REALM, token.access_token)
    assert broker.intuit.faults.served == 1
    assert broker.refreshes(REALM) == 1
    assert 0.9 <= elapsed < 4  # it waited the second the broker asked for, once


async def test_the_client_gives_up_at_once_when_the_wait_is_beyond_its_timeout(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.THROTTLED, seconds=30), times=1)

    started = time.monotonic()
    async with BrokerClient(f"127.0.0.1:{broker.broker.grpc_port}", timeout=3) as client:
        with pytest.raises(BrokerUnavailable) as caught:
            await client.get_access_token(realm_id=REALM)
    assert time.monotonic() - started < 1
    assert caught.value.retry_after == timedelta(seconds=30)
