"""GetAccessToken end to end: gRPC -> token service -> PostgreSQL -> the simulated Intuit."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from tests.support import RunningBroker, error_info, eventually

REALM = "9130350000000001"


async def test_a_valid_token_is_served_without_asking_intuit(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=40))

    first = await broker.get_token(REALM)
    second = await broker.get_token(REALM)

    assert broker.refreshes(REALM) == 0
    assert first.access_token == second.access_token
    assert broker.token_works(REALM, first.access_token)


async def test_an_expired_token_is_refreshed_once_and_the_new_one_reused(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None)

    first = await broker.get_token(REALM)
    second = await broker.get_token(REALM)

    assert broker.refreshes(REALM) == 1
    assert first.access_token == second.access_token
    assert broker.token_works(REALM, first.access_token)
    assert first.expires_at.ToDatetime().timestamp() == pytest.approx(
        (broker.clock() + timedelta(hours=1)).timestamp(), abs=1
    )


async def test_min_validity_decides_whether_a_token_is_good_enough(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=timedelta(minutes=10))

    kept = await broker.get_token(REALM, min_validity=timedelta(minutes=9))
    assert broker.refreshes(REALM) == 0

    renewed = await broker.get_token(REALM, min_validity=timedelta(minutes=11))
    assert broker.refreshes(REALM) == 1
    assert renewed.access_token != kept.access_token

    broker.clock.advance(timedelta(minutes=50))  # ten minutes left on the new token
    assert (await broker.get_token(REALM, min_validity=timedelta(0))).access_token == (
        renewed.access_token
    )
    assert broker.refreshes(REALM) == 1


async def test_five_hundred_concurrent_callers_share_one_refresh(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)

    replies = await asyncio.gather(*(broker.get_token(REALM) for _ in range(500)))

    assert broker.refreshes(REALM) == 1
    tokens = {reply.access_token for reply in replies}
    assert len(tokens) == 1
    assert broker.token_works(REALM, tokens.pop())


async def test_lookup_by_user_id(broker: RunningBroker) -> None:
    await broker.seed(REALM, "alice@example.com")
    reply = await broker.tokens.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="alice@example.com")
    )
    assert reply.realm_id == REALM

    await broker.seed("9130350000000002", "alice@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.tokens.GetAccessToken(pb.GetAccessTokenRequest(user_id="alice@example.com"))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "AMBIGUOUS_USER"


async def test_unknown_realm_is_not_found(broker: RunningBroker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token("404")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_rotation_is_tracked_truthfully(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    """refresh_token_created_at moves only when Intuit hands out a new value."""
    await broker.seed(REALM, refresh_token_age=timedelta(hours=2), access_token_left=None)
    seeded = await broker.connection(REALM)

    await broker.get_token(REALM)  # within Intuit's 24 hours: the same refresh token comes back
    same = await broker.connection(REALM)
    assert same.refresh_token_created_at == seeded.refresh_token_created_at
    assert broker.intuit.model.stats.rotations_by_realm[REALM] == 0
    # ... and its expiry keeps counting down from the original issue
    assert same.refresh_token_expires_at.ToDatetime().timestamp() == pytest.approx(
        (broker.clock() - timedelta(hours=2) + timedelta(days=101)).timestamp(), abs=2
    )

    broker.clock.advance(timedelta(days=1, hours=1))
    await broker.get_token(REALM)  # now Intuit rotates
    rotated = await broker.connection(REALM)
    assert broker.intuit.model.stats.rotations_by_realm[REALM] == 1
    assert rotated.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
        broker.clock().timestamp(), abs=1
    )
    assert rotated.refresh_token_expires_at.ToDatetime().timestamp() == pytest.approx(
        (broker.clock() + timedelta(days=101)).timestamp(), abs=2
    )
    # The hard five-year limit comes from x_refresh_token_hard_expires_in.
    assert rotated.HasField("reconnect_deadline")
    deadline = await db.fetchval(
        "SELECT reconnect_deadline FROM quickbooks_connections WHERE realm_id = $1", REALM
    )
    assert deadline.timestamp() == pytest.approx(
        (broker.clock() - timedelta(days=1, hours=3) + timedelta(days=5 * 365)).timestamp(),
        abs=2,
    )


async def test_the_runbook_procedure_renews_a_35_day_old_refresh_token(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    """The original design's test: age the token with SQL, use the connection, see it renewed."""
    await broker.seed(REALM, "your-user-id", refresh_token_age=timedelta(days=2))
    old_refresh = broker.intuit.model.current_refresh_token(REALM)
    await broker.get_token(REALM)  # warm: served from memory from now on
    assert broker.refreshes(REALM) == 0

    await db.execute(
        """UPDATE quickbooks_connections
           SET refresh_token_created_at = NOW() - INTERVAL '35 days'
           WHERE user_id = 'your-user-id'"""
    )
    await eventually(lambda: broker.components.cache.get(REALM) is None, what="the notice")

    reply = await broker.get_token(REALM)

    assert broker.refreshes(REALM) == 1
    assert broker.intuit.model.current_refresh_token(REALM) != old_refresh
    assert broker.token_works(REALM, reply.access_token)
    renewed = await broker.connection(REALM)
    assert renewed.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
        broker.clock().timestamp(), abs=1
    )
    metric = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_token_refreshes_total", {"trigger": "proactive", "outcome": "success"}
    )
    assert metric == 1


async def test_proactive_renewal_at_35_days_with_an_injected_clock(broker: RunningBroker) -> None:
    await broker.seed(REALM, refresh_token_age=timedelta(days=1, hours=1))
    await broker.get_token(REALM)
    assert broker.refreshes(REALM) == 0

    broker.clock.advance(timedelta(days=29))  # 30 days and 1 hour old: due on the next use
    await broker.get_token(REALM, min_validity=timedelta(0))
    assert broker.refreshes(REALM) == 1

    await broker.get_token(REALM)  # renewed: no second renewal
    assert broker.refreshes(REALM) == 1


async def test_invalid_grant_marks_the_connection_and_stops_calling_intuit(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(REALM) or "")

    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broker.get_token(REALM)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(caught.value)
        assert info is not None
        assert info.reason == "REAUTHORIZATION_REQUIRED"
        assert info.domain == "qbo-broker"
        assert info.metadata["realm_id"] == REALM

    assert broker.refreshes(REALM) == 1
    row = await db.fetchrow(
        "SELECT status, last_error FROM quickbooks_connections WHERE realm_id = $1", REALM
    )
    assert row is not None
    assert row["status"] == "reauthorization_required"
    assert "invalid_grant" in row["last_error"]
    connection = await broker.connection(REALM)
    assert connection.status == pb.CONNECTION_STATUS_REAUTHORIZATION_REQUIRED


async def test_past_the_hard_limit_the_connection_needs_the_customer(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, access_token_left=None)
    await db.execute(
        "UPDATE quickbooks_connections SET reconnect_deadline = $2 WHERE realm_id = $1",
        REALM,
        broker.clock() - timedelta(minutes=1),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "REAUTHORIZATION_REQUIRED"
    assert broker.refreshes(REALM) == 0  # Intuit is not asked: no refresh moves that date
    connection = await broker.connection(REALM)
    assert "five-year" in connection.last_error
    assert connection.lost_cause == pb.LOST_CAUSE_HARD_LIMIT
    lost = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_connections_lost_total", {"cause": "hard_limit"}
    )
    assert lost == 1


async def test_reimporting_a_connection_brings_it_back(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None)
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(REALM) or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(REALM)

    await broker.seed(REALM, access_token_left=None)  # the customer reconnected

    reply = await broker.get_token(REALM)
    assert broker.token_works(REALM, reply.access_token)


async def test_a_hand_aged_token_intuit_just_issued_is_corrected_not_renewed_again(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, refresh_token_age=timedelta(hours=3))
    await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_created_at = $2 WHERE realm_id = $1",
        REALM,
        broker.clock() - timedelta(days=35),
    )

    await asyncio.gather(*(broker.get_token(REALM) for _ in range(20)))

    # Intuit handed back the same token: its countdown dates it, for every replica.
    assert broker.refreshes(REALM) == 1
    corrected = await broker.connection(REALM)
    assert corrected.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
        (broker.clock() - timedelta(hours=3)).timestamp(), abs=2
    )
    broker.clock.advance(timedelta(hours=2))  # later uses refresh the expired access token...
    for _ in range(3):
        await broker.get_token(REALM)
    proactive = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_token_refreshes_total", {"trigger": "proactive", "outcome": "success"}
    )
    assert proactive == 1  # ... but never renew the refresh token "proactively" again
    assert broker.refreshes(REALM) == 2


async def test_an_import_without_an_issue_time_learns_it_from_intuit(
    broker: RunningBroker,
) -> None:
    grant = broker.intuit.model.create_grant(
        REALM, refresh_token_issued_at=broker.clock() - timedelta(days=3)
    )
    imported = await broker.admin.ImportConnection(
        pb.ImportConnectionRequest(realm_id=REALM, user_id="u", refresh_token=grant.refresh_token)
    )
    assert not imported.connection.HasField("refresh_token_created_at")  # unknown, not "now"

    await broker.get_token(REALM)  # unknown age counts as due: renewed at once
    renewed = await broker.connection(REALM)
    assert broker.refreshes(REALM) == 1
    assert renewed.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
        broker.clock().timestamp(),
        abs=1,  # 3 days old at Intuit: rotated, so issued now
    )


async def test_an_unknown_issue_time_is_read_off_intuits_countdown(broker: RunningBroker) -> None:
    grant = broker.intuit.model.create_grant(
        REALM, refresh_token_issued_at=broker.clock() - timedelta(hours=5)
    )
    await broker.admin.ImportConnection(
        pb.ImportConnectionRequest(realm_id=REALM, user_id="u", refresh_token=grant.refresh_token)
    )

    await broker.get_token(REALM)  # same value back: 5 hours old by Intuit's own countdown

    learnt = await broker.connection(REALM)
    assert broker.intuit.model.stats.rotations_by_realm[REALM] == 0
    assert learnt.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
        (broker.clock() - timedelta(hours=5)).timestamp(), abs=2
    )
