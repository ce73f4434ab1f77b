"""``broker.client.BrokerClient``, the library internal services use, against a running broker."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status

from broker import errors
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.api import validation
from broker.api.status import to_status
from broker.client import (
    DEFAULT_MIN_VALIDITY,
    MAX_MIN_VALIDITY,
    AccessToken,
    AmbiguousUser,
    BrokerClient,
    BrokerError,
    BrokerUnavailable,
    ClientTls,
    ConnectionNotFound,
    InvalidRequest,
    PermissionDenied,
    ReauthorizationRequired,
    SyncBrokerClient,
    _translate,
)
from broker.devtools.fake_intuit import Fault, FaultKind
from broker.errors import Reason
from tests.conftest import StartBroker
from tests.pki import Authority, Issued
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


# -- the cache ----------------------------------------------------------------------------

OTHER = "9130350000000002"


class Counting(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the calls that leave the client: the broker's view of how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        self.calls += 1
        return await continuation(client_call_details, request)


class SyncCounting(grpc.UnaryUnaryClientInterceptor):
    """The same for the blocking client; with a gate, each call waits for it to open."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._gate = gate

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        with self._lock:
            self.calls += 1
        if self._gate is not None and not self._gate.wait(10):
            raise AssertionError("the test never opened the gate")
        return continuation(client_call_details, request)


def target(broker: RunningBroker) -> str:
    return f"127.0.0.1:{broker.broker.grpc_port}"


@asynccontextmanager
async def counted(
    broker: RunningBroker, **options: Any
) -> AsyncIterator[tuple[BrokerClient, Counting]]:
    """A client on the broker's clock whose calls to the broker are counted."""
    counting = Counting()
    channel = grpc.aio.insecure_channel(target(broker), interceptors=[counting])
    client = BrokerClient(channel=channel, clock=broker.clock, timeout=5, **options)
    try:
        yield client, counting
    finally:
        await client.close()
        await channel.close()


def sync_counted(
    broker: RunningBroker, counting: SyncCounting, **options: Any
) -> tuple[SyncBrokerClient, grpc.Channel]:
    channel = grpc.intercept_channel(grpc.insecure_channel(target(broker)), counting)
    return SyncBrokerClient(channel=channel, clock=broker.clock, timeout=5, **options), channel


def test_the_clients_defaults_are_the_brokers() -> None:
    assert DEFAULT_MIN_VALIDITY == validation.DEFAULT_MIN_VALIDITY
    assert MAX_MIN_VALIDITY == validation.MAX_MIN_VALIDITY


async def test_a_cached_token_is_served_without_a_call(broker: RunningBroker) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=timedelta(minutes=40))

    async with counted(broker) as (client, counting):
        first = await client.get_access_token(realm_id=REALM)
        again = [await client.get_access_token(realm_id=REALM) for _ in range(50)]
        assert counting.calls == 1
        assert all(token is first for token in again)

        # A user's first ask goes to the broker (which realm is it?), then it is known.
        by_user = await client.get_access_token(user_id="alice@example.com")
        assert await client.get_access_token(user_id="alice@example.com") is by_user
        assert by_user.realm_id == REALM
        assert counting.calls == 2
        assert (client.cache_hits, client.cache_misses, client.cache_shared) == (51, 2, 0)

        # A token QuickBooks refused is dropped on request, with the user's mapping.
        client.invalidate(user_id="alice@example.com")
        await client.get_access_token(realm_id=REALM)
        await client.get_access_token(user_id="alice@example.com")
        assert counting.calls == 4
    assert broker.refreshes(REALM) == 0


async def test_a_token_is_served_until_min_validity_before_it_expires(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=40))

    async with counted(broker) as (client, counting):
        first = await client.get_access_token(realm_id=REALM)
        broker.clock.set(first.expires_at - timedelta(minutes=5, seconds=1))
        assert await client.get_access_token(realm_id=REALM) is first
        assert counting.calls == 1

        # Five minutes left is not "later than now + 5 minutes": the client asks (the broker,
        # whose rule is "at least", still hands out the same token); a second less, it renews.
        broker.clock.set(first.expires_at - timedelta(minutes=5))
        same = await client.get_access_token(realm_id=REALM)
        assert same.access_token == first.access_token
        assert counting.calls == 2
        broker.clock.set(first.expires_at - timedelta(minutes=4, seconds=59))
        second = await client.get_access_token(realm_id=REALM)
        assert counting.calls == 3
        assert second.access_token != first.access_token
        assert broker.token_works(REALM, second.access_token)
        assert broker.refreshes(REALM) == 1

        # Each caller's own min_validity.
        broker.clock.set(second.expires_at - timedelta(minutes=30))
        assert await client.get_access_token(realm_id=REALM, min_validity=timedelta(0)) is second
        longest = timedelta(minutes=29, seconds=59)
        assert await client.get_access_token(realm_id=REALM, min_validity=longest) is second
        assert counting.calls == 3
        more = timedelta(minutes=30, seconds=1)
        third = await client.get_access_token(realm_id=REALM, min_validity=more)
        assert counting.calls == 4
        assert broker.refreshes(REALM) == 2
        assert third.expires_at > broker.clock() + more

        # Once expired, the token is gone for good; the next ask is a call.
        broker.clock.set(third.expires_at)
        assert await client.get_access_token(realm_id=REALM, min_validity=timedelta(0)) != third
        assert counting.calls == 5
    assert (client.cache_hits, client.cache_misses) == (3, 5)


async def test_the_cache_is_bounded_and_a_users_mapping_goes_with_its_token(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, "alice@example.com")
    await broker.seed(OTHER, "bob@example.com")

    async with counted(broker, cache_size=1) as (client, counting):
        alice = await client.get_access_token(user_id="alice@example.com")  # call 1
        assert await client.get_access_token(realm_id=REALM) is alice  # the same realm: kept
        await client.get_access_token(realm_id=OTHER)  # call 2: evicts REALM, and alice's entry
        await client.get_access_token(realm_id=REALM)  # call 3: REALM again (OTHER evicted)
        assert counting.calls == 3
        # REALM's token is back, but the way from alice to it went with the old one.
        await client.get_access_token(user_id="alice@example.com")  # call 4
        await client.get_access_token(user_id="alice@example.com")
        assert counting.calls == 4
        assert client.cache_hits == 2


async def test_concurrent_callers_of_one_realm_share_one_call(broker: RunningBroker) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))  # the refresh waits at Intuit until released

    async with counted(broker) as (client, counting):
        callers = [asyncio.create_task(client.get_access_token(realm_id=REALM)) for _ in range(200)]
        async with asyncio.timeout(10):
            await broker.intuit.faults.wait_held()
        assert (client.cache_misses, client.cache_shared) == (1, 199)
        broker.intuit.faults.release()
        tokens = await asyncio.gather(*callers)

        assert counting.calls == 1
        assert broker.refreshes(REALM) == 1
        assert {token.access_token for token in tokens} == {tokens[0].access_token}
        assert broker.token_works(REALM, tokens[0].access_token)

        # By user: the first ask of 200 goes out, the others wait for it.
        by_user = await asyncio.gather(
            *(client.get_access_token(user_id="alice@example.com") for _ in range(200))
        )
        assert counting.calls == 2
        assert {token.access_token for token in by_user} == {tokens[0].access_token}
        assert (client.cache_hits, client.cache_misses, client.cache_shared) == (0, 2, 398)


async def test_a_caller_that_gives_up_does_not_cancel_the_call_for_the_others(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))

    async with counted(broker) as (client, counting):
        leader = asyncio.create_task(client.get_access_token(realm_id=REALM))
        others = [asyncio.create_task(client.get_access_token(realm_id=REALM)) for _ in range(3)]
        async with asyncio.timeout(10):
            await broker.intuit.faults.wait_held()
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        broker.intuit.faults.release()
        tokens = await asyncio.gather(*others)

        assert broker.token_works(REALM, tokens[0].access_token)
        assert counting.calls == 1
        assert await client.get_access_token(realm_id=REALM) is tokens[0]  # and it was kept


async def test_a_failure_reaches_every_waiter_and_is_not_kept(broker: RunningBroker) -> None:
    async with counted(broker) as (client, counting):
        outcomes = await asyncio.gather(
            *(client.get_access_token(realm_id=REALM) for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(outcome, ConnectionNotFound) for outcome in outcomes)
        assert counting.calls == 1
        assert (client.cache_misses, client.cache_shared) == (1, 49)

        await broker.seed(REALM)
        token = await client.get_access_token(realm_id=REALM)
        assert broker.token_works(REALM, token.access_token)
        assert counting.calls == 2


async def test_an_unavailable_broker_reaches_every_waiter_and_is_asked_again(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.THROTTLED, seconds=30), times=1)

    async with counted(broker) as (client, counting):
        outcomes = await asyncio.gather(
            *(client.get_access_token(realm_id=REALM) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes)
        first = outcomes[0]
        assert isinstance(first, BrokerUnavailable)
        assert first.retry_after == timedelta(seconds=30)
        assert first.kind is Reason.INTUIT_UNAVAILABLE
        assert counting.calls == 1
        assert broker.intuit.faults.served == 1

        broker.clock.advance(timedelta(seconds=31))
        token = await client.get_access_token(realm_id=REALM)
        assert broker.token_works(REALM, token.access_token)
        assert counting.calls == 2


async def test_a_connection_that_needs_reauthorization_loses_its_cached_token(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=timedelta(minutes=40))

    async with counted(broker) as (client, counting):
        await client.get_access_token(user_id="alice@example.com")
        revoke(broker, REALM)
        with pytest.raises(ReauthorizationRequired):
            await client.get_access_token(realm_id=REALM, min_validity=timedelta(minutes=45))
        # The cached token would still pass for 5 minutes, but the broker says the grant is
        # dead: both ways of asking go to the broker now, and hear the same.
        with pytest.raises(ReauthorizationRequired):
            await client.get_access_token(realm_id=REALM)
        with pytest.raises(ReauthorizationRequired):
            await client.get_access_token(user_id="alice@example.com")
        assert counting.calls == 4
    assert broker.refreshes(REALM) == 1


async def test_without_the_cache_every_call_asks_the_broker(broker: RunningBroker) -> None:
    await broker.seed(REALM)

    async with counted(broker, cache=False) as (client, counting):
        for _ in range(3):
            await client.get_access_token(realm_id=REALM)
        await asyncio.gather(*(client.get_access_token(realm_id=REALM) for _ in range(10)))
        assert counting.calls == 13
        assert (client.cache_hits, client.cache_misses, client.cache_shared) == (0, 13, 0)


async def test_a_min_validity_the_broker_refuses_is_not_answered_from_memory(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM)
    async with counted(broker) as (client, counting):
        await client.get_access_token(realm_id=REALM)
        with pytest.raises(InvalidRequest) as negative:
            await client.get_access_token(realm_id=REALM, min_validity=timedelta(seconds=-1))
        assert negative.value.field == "min_validity"
        assert counting.calls == 2


async def test_closing_the_client_ends_the_calls_in_flight(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))

    client = BrokerClient(target(broker), timeout=5)
    waiting = asyncio.create_task(client.get_access_token(realm_id=REALM))
    async with asyncio.timeout(10):
        await broker.intuit.faults.wait_held()
    await client.close()
    with pytest.raises(BrokerUnavailable):
        await waiting
    broker.intuit.faults.release()


# -- error translation --------------------------------------------------------------------


@dataclass
class FailedCall:
    """A failed call as gRPC hands it to the client, made from the broker's own status."""

    status: grpc.Status

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str | None:
        return self.status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self.status.trailing_metadata)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.ReauthorizationRequired(REALM, "revoked at Intuit"), ReauthorizationRequired),
        (errors.InvalidGrant("invalid_grant"), ReauthorizationRequired),
        (errors.RefreshPending("stored answer pending"), BrokerUnavailable),
        (errors.ShuttingDown("stopping"), BrokerUnavailable),
        (errors.UpstreamUnavailable("503", retry_after=timedelta(seconds=7)), BrokerUnavailable),
        (errors.StorageUnavailable("no database"), BrokerUnavailable),
        (errors.PermissionDenied("this call on this realm"), PermissionDenied),
        (errors.ConnectionNotFound("no connection for this realm_id"), ConnectionNotFound),
        (errors.InvalidRequest("realm_id", "must be 1 to 64 letters"), InvalidRequest),
        (errors.AmbiguousUser(), AmbiguousUser),
        (errors.DecryptionFailed("key k1 does not open it"), BrokerError),
        (errors.SweepInProgress("another sweep"), BrokerError),
    ],
)
def test_every_broker_error_comes_back_as_the_clients_exception(
    error: errors.BrokerError, expected: type[BrokerError]
) -> None:
    translated = _translate(FailedCall(to_status(error)))

    assert type(translated) is expected
    if error.public is None:  # the broker's own words (a generic error names its code)
        assert str(translated) in (str(error), f"{error.code}: {error}")
    if isinstance(translated, BrokerUnavailable):
        assert translated.kind is error.reason
        if error.retry_after is not None:
            assert translated.retry_after == max(error.retry_after, timedelta(milliseconds=100))
    if isinstance(translated, ReauthorizationRequired) and isinstance(
        error, errors.ReauthorizationRequired
    ):
        assert (translated.realm_id, translated.detail) == (REALM, "revoked at Intuit")
    if isinstance(translated, InvalidRequest):
        assert (translated.field, translated.why) == ("realm_id", "must be 1 to 64 letters")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, BrokerUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, BrokerUnavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, BrokerUnavailable),
        (grpc.StatusCode.CANCELLED, BrokerUnavailable),
        (grpc.StatusCode.NOT_FOUND, ConnectionNotFound),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNKNOWN, BrokerError),
    ],
)
def test_a_status_without_details_is_translated_by_its_code(
    code: grpc.StatusCode, expected: type[BrokerError]
) -> None:
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message="as said"))
    translated = _translate(FailedCall(status))
    assert type(translated) is expected
    assert "as said" in str(translated)
    if isinstance(translated, BrokerUnavailable):
        assert (translated.retry_after, translated.kind) == (None, None)


# -- the blocking client ------------------------------------------------------------------


async def test_the_sync_client_against_the_running_broker(broker: RunningBroker) -> None:
    await broker.seed(REALM, "alice@example.com", access_token_left=timedelta(minutes=40))
    await broker.seed(OTHER, access_token_left=None)
    revoke(broker, OTHER)
    counting = SyncCounting()

    def use_it() -> None:
        with SyncBrokerClient(target(broker), timeout=5) as plain:
            assert broker.token_works(REALM, plain.get_access_token(realm_id=REALM).access_token)

        client, channel = sync_counted(broker, counting)
        with channel, client:
            first = client.get_access_token(realm_id=REALM)
            assert first.expires_at == broker.clock() + timedelta(minutes=40)
            assert client.get_access_token(realm_id=REALM) is first
            assert client.get_access_token(user_id="alice@example.com") is not None
            assert client.get_access_token(user_id="alice@example.com").realm_id == REALM
            assert counting.calls == 2

            broker.clock.set(first.expires_at - timedelta(minutes=4, seconds=59))
            renewed = client.get_access_token(realm_id=REALM)
            assert renewed.access_token != first.access_token
            assert counting.calls == 3

            with pytest.raises(ReauthorizationRequired) as dead:
                client.get_access_token(realm_id=OTHER)
            assert dead.value.realm_id == OTHER
            with pytest.raises(ConnectionNotFound):
                client.get_access_token(realm_id="9130350000000404")
            with pytest.raises(InvalidRequest) as bad:
                client.get_access_token(realm_id="9130/35")
            assert bad.value.field == "realm_id"
            with pytest.raises(InvalidRequest):
                client.get_access_token(realm_id=REALM, user_id="alice@example.com")
            assert (client.cache_hits, client.cache_misses) == (2, 6)

    await asyncio.to_thread(use_it)
    assert broker.refreshes(REALM) == 1


async def test_sync_threads_asking_at_once_share_one_call(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))
    counting = SyncCounting()
    client, channel = sync_counted(broker, counting)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=16)
    calls = [
        loop.run_in_executor(pool, functools.partial(client.get_access_token, realm_id=REALM))
        for _ in range(16)
    ]
    try:
        async with asyncio.timeout(10):
            await broker.intuit.faults.wait_held()
        await eventually(lambda: client.cache_shared == 15, what="15 threads waiting")
        assert client.cache_misses == 1
        broker.intuit.faults.release()
        tokens = await asyncio.gather(*calls)
    finally:
        broker.intuit.faults.release()
        await asyncio.gather(*calls, return_exceptions=True)
        pool.shutdown()
        client.close()
        channel.close()

    assert counting.calls == 1
    assert broker.refreshes(REALM) == 1
    assert {token.access_token for token in tokens} == {tokens[0].access_token}
    assert broker.token_works(REALM, tokens[0].access_token)


async def test_a_failure_reaches_every_waiting_thread_and_is_not_kept(
    broker: RunningBroker,
) -> None:
    gate = threading.Event()
    counting = SyncCounting(gate)
    client, channel = sync_counted(broker, counting)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=8)

    def ask() -> BaseException | None:
        try:
            client.get_access_token(realm_id=REALM)
        except BrokerError as exc:
            return exc
        return None

    calls = [loop.run_in_executor(pool, ask) for _ in range(8)]
    try:
        await eventually(lambda: client.cache_shared == 7, what="7 threads waiting")
        gate.set()
        outcomes = await asyncio.gather(*calls)
        assert all(isinstance(outcome, ConnectionNotFound) for outcome in outcomes)
        assert counting.calls == 1

        await broker.seed(REALM)
        token = await asyncio.to_thread(client.get_access_token, realm_id=REALM)
        assert broker.token_works(REALM, token.access_token)
        assert counting.calls == 2
    finally:
        gate.set()
        await asyncio.gather(*calls, return_exceptions=True)
        pool.shutdown()
        client.close()
        channel.close()


async def test_the_sync_client_retries_when_the_broker_says_when(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.faults.add(Fault(FaultKind.THROTTLED, seconds=1), times=1)

    async def time_passes() -> None:
        await eventually(lambda: broker.intuit.faults.served, what="the 429")
        broker.clock.advance(timedelta(seconds=2))

    def ask() -> AccessToken:
        with SyncBrokerClient(target(broker), timeout=5) as client:
            return client.get_access_token(realm_id=REALM)

    clock_task = asyncio.create_task(time_passes())
    started = time.monotonic()
    token = await asyncio.to_thread(ask)
    elapsed = time.monotonic() - started
    await clock_task

    assert broker.token_works(REALM, token.access_token)
    assert broker.refreshes(REALM) == 1
    assert 0.9 <= elapsed < 4  # it waited the second the broker asked for, once


# -- TLS ----------------------------------------------------------------------------------

SERVER_NAME = "qbo-broker.internal"  # not the address dialled: only server_name makes it match


@dataclass
class Mtls:
    broker: RunningBroker
    folder: Path
    authority: Authority
    app: Issued

    def tls(self, identity: Issued | None) -> ClientTls:
        return ClientTls(
            root_certificates=self.authority.pem,
            private_key=identity.key_pem if identity else None,
            certificate_chain=identity.cert_pem if identity else None,
            server_name=SERVER_NAME,
        )


@pytest.fixture
async def mtls(start_broker: StartBroker, tmp_path: Path) -> AsyncIterator[Mtls]:
    authority = Authority("client tests CA")
    cert, key = authority.server(SERVER_NAME).write(tmp_path, "server")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(authority.pem)
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "name": "client-tests",
                "allow_rules": [
                    {
                        "name": "the-app-reads-one-realm",
                        "source": {"principals": ["spiffe://tests/app"]},
                        "request": {"paths": ["/qbo.broker.v1.TokenBrokerService/*"]},
                        "realms": [REALM],
                    },
                    {
                        "name": "ops-does-everything",
                        "source": {"principals": ["spiffe://tests/ops"]},
                    },
                ],
            }
        )
    )
    broker = await start_broker(
        tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca, authz_policy_file=policy
    )
    setup = Mtls(broker, tmp_path, authority, authority.client("app", uris=("spiffe://tests/app",)))
    operator = setup.tls(authority.client("ops", uris=("spiffe://tests/ops",)))
    # Seeding goes through a TLS channel of its own: the fixture's is plaintext.
    channel = grpc.aio.secure_channel(
        target(broker), operator.credentials(), options=operator.options()
    )
    broker.admin = pb_grpc.ConnectionAdminServiceStub(channel)
    await broker.seed(REALM, "alice@example.com")
    await broker.seed(OTHER)
    yield setup
    await channel.close()


async def test_both_clients_present_a_client_certificate(mtls: Mtls) -> None:
    tls = mtls.tls(mtls.app)
    assert b"PRIVATE KEY" not in repr(tls).encode()
    assert SERVER_NAME in repr(tls)
    broker = mtls.broker

    async with BrokerClient(target(broker), tls=tls, timeout=5) as client:
        token = await client.get_access_token(realm_id=REALM)
        assert await client.get_access_token(user_id="alice@example.com") == token
        with pytest.raises(PermissionDenied):
            await client.get_access_token(realm_id=OTHER)
    assert broker.token_works(REALM, token.access_token)

    cert, key = mtls.app.write(mtls.folder, "app")
    from_files = ClientTls.from_files(mtls.folder / "ca.pem", cert, key, server_name=SERVER_NAME)
    assert from_files == tls

    def use_it() -> AccessToken:
        with SyncBrokerClient(target(broker), tls=from_files, timeout=5) as client:
            with pytest.raises(PermissionDenied):
                client.get_access_token(realm_id=OTHER)
            return client.get_access_token(realm_id=REALM)

    assert broker.token_works(REALM, (await asyncio.to_thread(use_it)).access_token)


async def test_without_a_client_certificate_the_broker_is_not_reached(mtls: Mtls) -> None:
    tls = mtls.tls(None)
    broker = mtls.broker
    async with BrokerClient(target(broker), tls=tls, timeout=1) as client:
        with pytest.raises(BrokerUnavailable):
            await client.get_access_token(realm_id=REALM)

    def use_it() -> None:
        with (
            SyncBrokerClient(target(broker), tls=tls, timeout=1) as client,
            pytest.raises(BrokerUnavailable),
        ):
            client.get_access_token(realm_id=REALM)

    await asyncio.to_thread(use_it)

    # Plaintext against TLS fails the same way, and a key without its chain is refused early.
    async with BrokerClient(target(broker), timeout=1) as plaintext:
        with pytest.raises(BrokerUnavailable):
            await plaintext.get_access_token(realm_id=REALM)
    with pytest.raises(ValueError, match="together"):
        ClientTls(root_certificates=mtls.authority.pem, private_key=mtls.app.key_pem)
    with pytest.raises(ValueError, match="not both"):
        BrokerClient(channel=broker.channel, tls=tls)
