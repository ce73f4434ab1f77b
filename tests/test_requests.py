"""Malformed requests over real gRPC: INVALID_ARGUMENT naming the field, short, never a token.

The limits come from the contract: ``realm_id`` 1 to 64 letters, digits, '-' and
'_'; ``user_id`` 1 to 255 printable characters; ``min_validity`` from zero to 55
minutes; messages above 64 KiB are refused before anyone reads them.

Cases of one kind share a broker and run as subtests, so each is reported on
its own without paying for a broker each.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_status import rpc_status

from broker._proto import broker_pb2 as pb
from tests.support import RunningBroker, bad_request_fields, timestamp_of

REALM = "9130350000000001"
SHORT = 300
"""An error message a person can read in a log line; longer means something was echoed."""
MARKER = "LEAKMARKER"


async def rejected(call: Awaitable[Any]) -> tuple[list[str], str]:
    """Await a call that must be INVALID_ARGUMENT; the fields named and the message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert len(details) < SHORT, details
    return bad_request_fields(error), details


async def not_found(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND, caught.value.details()


def token_request(
    min_validity: Duration | None = None,
    *,
    realm_id: str | None = None,
    user_id: str | None = None,
) -> pb.GetAccessTokenRequest:
    request = pb.GetAccessTokenRequest()
    if realm_id is not None:
        request.realm_id = realm_id
    if user_id is not None:
        request.user_id = user_id
    if min_validity is not None:
        request.min_validity.CopyFrom(min_validity)
    return request


def duration(seconds: int, nanos: int = 0) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


# -- GetAccessToken: which connection -------------------------------------------------

BAD_REALM_IDS = {
    "empty": "",
    "65 characters": "9" * 65,
    "slash": "91303/50000",
    "space": "9130 3500",
    "trailing newline": "9130350000000001\n",
    "unicode letter": "realm-Ω",
    "arabic-indic digits": "١٢٣٤",
    "full-width digits": "\uff11\uff12\uff13",
    "NUL": "9130\x00350",
    "path": "../../etc/passwd",
    "60 kB": "9" * 60_000,
}

BAD_USER_IDS = {
    "empty": "",
    "256 characters": "u" * 256,
    "newline": "alice@example.com\n",
    "bell": "alice\x07@example.com",
    "NUL": "alice\x00",
    "zero-width space": "alice\u200b",
    "60 kB": "u" * 60_000,
}


async def test_neither_realm_nor_user(broker: RunningBroker) -> None:
    fields, _ = await rejected(broker.tokens.GetAccessToken(pb.GetAccessTokenRequest()))
    assert fields == ["connection"]


async def test_a_malformed_realm_id_is_invalid(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    for case, realm_id in BAD_REALM_IDS.items():
        with subtests.test(case):
            call = broker.tokens.GetAccessToken(token_request(realm_id=realm_id))
            fields, details = await rejected(call)
            assert fields == ["realm_id"]
            assert details.startswith("realm_id")


async def test_a_malformed_user_id_is_invalid(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    for case, user_id in BAD_USER_IDS.items():
        with subtests.test(case):
            call = broker.tokens.GetAccessToken(token_request(user_id=user_id))
            fields, details = await rejected(call)
            assert fields == ["user_id"]
            assert details.startswith("user_id")


async def test_ids_right_at_the_limits_are_accepted(broker: RunningBroker) -> None:
    """The request is fine; there is just no such connection."""
    await not_found(broker.tokens.GetAccessToken(token_request(realm_id="Az09-_" * 10 + "zzzz")))
    await not_found(broker.tokens.GetAccessToken(token_request(user_id="ü ~" * 85)))


async def test_a_message_above_64_kib_is_refused_and_the_server_goes_on(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.tokens.GetAccessToken(token_request(realm_id="9" * 1_000_000), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(caught.value.details() or "") < SHORT

    reply = await broker.get_token(REALM)
    assert broker.token_works(REALM, reply.access_token)


# -- GetAccessToken: min_validity ----------------------------------------------------

BAD_MIN_VALIDITIES = {
    "minus one second": duration(-1),
    "minus one nanosecond": duration(0, -1),
    "55 minutes and a microsecond": duration(55 * 60, 1000),
    "56 minutes": duration(56 * 60),
    "ten thousand years": duration(10**11),
    "minus ten thousand years": duration(-(10**11)),
    "nanos too large": duration(60, 1_000_000_000),
    "nanos too small": duration(60, -1_000_000_000),
    "positive seconds, negative nanos": duration(60, -5),
    "negative seconds, positive nanos": duration(-60, 5),
}


async def test_a_bad_min_validity_is_invalid(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=10))
    for case, value in BAD_MIN_VALIDITIES.items():
        with subtests.test(case):
            call = broker.tokens.GetAccessToken(token_request(value, realm_id=REALM))
            fields, details = await rejected(call)
            assert fields == ["min_validity"]
            assert details.startswith("min_validity")
    assert broker.refreshes(REALM) == 0


async def test_55_minutes_and_a_nanosecond_is_invalid(broker: RunningBroker) -> None:
    await broker.seed(REALM)
    call = broker.tokens.GetAccessToken(token_request(duration(55 * 60, 1), realm_id=REALM))
    fields, _ = await rejected(call)
    assert fields == ["min_validity"]


async def test_exactly_55_minutes_is_accepted(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=50))

    reply = await broker.get_token(REALM, min_validity=timedelta(minutes=55))

    assert broker.refreshes(REALM) == 1  # 50 minutes left was not enough: refreshed
    left = reply.expires_at.ToDatetime().timestamp() - broker.clock().timestamp()
    assert left >= 55 * 60


async def test_zero_min_validity_takes_any_unexpired_token(broker: RunningBroker) -> None:
    seeded = await broker.seed(REALM, access_token_left=timedelta(seconds=30))

    reply = await broker.get_token(REALM, min_validity=timedelta(0))

    assert broker.refreshes(REALM) == 0
    assert reply.expires_at == seeded.access_token_expires_at
    assert broker.token_works(REALM, reply.access_token)

    # Unset means five minutes: the same token is no longer good enough.
    renewed = await broker.tokens.GetAccessToken(token_request(realm_id=REALM))
    assert broker.refreshes(REALM) == 1
    assert renewed.access_token != reply.access_token


# -- ImportConnection ------------------------------------------------------------------


def import_request(**overrides: Any) -> pb.ImportConnectionRequest:
    fields: dict[str, Any] = {
        "realm_id": REALM,
        "user_id": "alice@example.com",
        "refresh_token": "AB11-sim-refresh-token",
    }
    fields.update(overrides)
    return pb.ImportConnectionRequest(**fields)


def with_times(
    request: pb.ImportConnectionRequest, broker: RunningBroker, **offsets: timedelta
) -> pb.ImportConnectionRequest:
    """Set the named timestamp fields to the broker's now plus an offset."""
    for field, offset in offsets.items():
        getattr(request, field).CopyFrom(timestamp_of(broker.clock() + offset))
    return request


async def test_a_bad_import_is_invalid_and_stores_nothing(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    hour, day = timedelta(hours=1), timedelta(days=1)
    cases: dict[str, tuple[pb.ImportConnectionRequest, str]] = {
        "no refresh token": (import_request(refresh_token=""), "refresh_token"),
        "space in refresh token": (import_request(refresh_token="AB11 sim"), "refresh_token"),
        "tab in refresh token": (import_request(refresh_token="AB11\tsim"), "refresh_token"),
        "non-ASCII refresh token": (import_request(refresh_token="AB11-é"), "refresh_token"),
        "4097-character refresh token": (
            import_request(refresh_token="R" * 4097),
            "refresh_token",
        ),
        "access token without expiry": (
            import_request(access_token="eyJ-access"),
            "access_token_expires_at",
        ),
        "expiry without access token": (
            with_times(import_request(), broker, access_token_expires_at=hour),
            "access_token",
        ),
        "refresh token created tomorrow": (
            with_times(import_request(), broker, refresh_token_created_at=day),
            "refresh_token_created_at",
        ),
        "refresh token expiring before its creation": (
            with_times(
                import_request(),
                broker,
                refresh_token_created_at=-10 * day,
                refresh_token_expires_at=-11 * day,
            ),
            "refresh_token_expires_at",
        ),
        "no realm": (import_request(realm_id=""), "realm_id"),
        "bad realm": (import_request(realm_id="9130/1"), "realm_id"),
        "no user": (import_request(user_id=""), "user_id"),
        "bad user": (import_request(user_id="alice\n"), "user_id"),
    }
    for case, (request, field) in cases.items():
        with subtests.test(case):
            fields, details = await rejected(broker.admin.ImportConnection(request))
            assert fields == [field]
            assert details.startswith(field)

    listed = await broker.admin.ListConnections(pb.ListConnectionsRequest())
    assert list(listed.connections) == []
    # The same request with every field right is stored: the cases above broke one field each.
    good = with_times(
        import_request(access_token="eyJ-access"),
        broker,
        access_token_expires_at=hour,
        refresh_token_created_at=-day,
        refresh_token_expires_at=100 * day,
    )
    reply = await broker.admin.ImportConnection(good)
    assert reply.connection.realm_id == REALM


async def test_an_invalid_token_is_never_echoed(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    cases: dict[str, tuple[pb.ImportConnectionRequest, str]] = {
        "5000-character refresh token": (
            import_request(refresh_token=MARKER * 500),
            "refresh_token",
        ),
        "refresh token with a space": (
            import_request(refresh_token=f"{MARKER} {MARKER}"),
            "refresh_token",
        ),
        "access token with a space": (
            with_times(
                import_request(access_token=f"{MARKER} {MARKER}"),
                broker,
                access_token_expires_at=timedelta(hours=1),
            ),
            "access_token",
        ),
    }
    for case, (request, field) in cases.items():
        with subtests.test(case):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await broker.admin.ImportConnection(request)
            error = caught.value
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert bad_request_fields(error) == [field]
            assert MARKER not in (error.details() or "")
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            assert MARKER.encode() not in status.SerializeToString()


# -- the other admin RPCs --------------------------------------------------------------


async def test_get_and_refresh_connection_check_the_realm(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    for case, realm_id in BAD_REALM_IDS.items():
        with subtests.test(case):
            call = broker.admin.GetConnection(pb.GetConnectionRequest(realm_id=realm_id))
            fields, _ = await rejected(call)
            assert fields == ["realm_id"]
            refresh = pb.RefreshConnectionRequest(realm_id=realm_id)
            fields, _ = await rejected(broker.admin.RefreshConnection(refresh))
            assert fields == ["realm_id"]
    assert broker.intuit.model.stats.refresh_calls == 0


async def test_a_bad_list_request_is_invalid(
    broker: RunningBroker, subtests: pytest.Subtests
) -> None:
    cases: dict[str, tuple[pb.ListConnectionsRequest, str]] = {
        "page_size -1": (pb.ListConnectionsRequest(page_size=-1), "page_size"),
        "page_size 1001": (pb.ListConnectionsRequest(page_size=1001), "page_size"),
        "garbage page_token": (pb.ListConnectionsRequest(page_token="not a token"), "page_token"),
        "base64 garbage page_token": (
            pb.ListConnectionsRequest(page_token="bm90IGEgdG9rZW4="),  # "not a token"
            "page_token",
        ),
        "forged page_token": (
            pb.ListConnectionsRequest(page_token="YWZ0ZXI6Li4vZXRj"),  # "after:../etc"
            "page_token",
        ),
        "non-ASCII page_token": (pb.ListConnectionsRequest(page_token="ñ" * 100), "page_token"),
        "60 kB page_token": (pb.ListConnectionsRequest(page_token="x" * 60_000), "page_token"),
        "unknown status 7": (
            pb.ListConnectionsRequest(status=pb.ConnectionStatus.ValueType(7)),
            "status",
        ),
        "bad user_id": (pb.ListConnectionsRequest(user_id="alice\n"), "user_id"),
    }
    for case, (request, field) in cases.items():
        with subtests.test(case):
            fields, details = await rejected(broker.admin.ListConnections(request))
            assert fields == [field]
            assert details.startswith(field)


async def test_page_sizes_at_the_limits_are_accepted(broker: RunningBroker) -> None:
    await broker.seed(REALM)
    for size in (0, 1, 1000):
        reply = await broker.admin.ListConnections(pb.ListConnectionsRequest(page_size=size))
        assert [c.realm_id for c in reply.connections] == [REALM]
