"""Never lose a token when a process, a database or the network dies.

Each test reproduces a window in which a rotated refresh token used to be
lost (or a loss misattributed) and holds the broker to keeping it, or to
saying plainly whose loss it was.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.devtools.fake_intuit import Fault, FaultKind, SimulatorConfig
from broker.domain import rescue
from broker.domain.sweep import SweepKind, SweepOutcome
from broker.storage.embedded import EmbeddedPostgres, ensure_database
from tests.conftest import StartBroker
from tests.support import (
    SWEEP_BY_HAND,
    RunningBroker,
    error_info,
    eventually,
    restart_postgres,
    start_postgres,
    stop_postgres,
)

REALM = "9130350000000001"
OTHER_REALM = "9130350000000002"
DAYS = timedelta(days=1)


def lost(broker: RunningBroker, cause: str) -> float:
    value = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_connections_lost_total", {"cause": cause}
    )
    return value or 0.0


async def stored_refresh_token(broker: RunningBroker, db: asyncpg.Connection) -> str:
    row = await db.fetchrow(
        "SELECT refresh_token, encryption_key_id FROM quickbooks_connections WHERE realm_id = $1",
        REALM,
    )
    assert row is not None
    keys = broker.broker.settings.encryption_keys
    assert keys is not None
    return keys.decrypt(row["refresh_token"], row["encryption_key_id"], f"{REALM}:refresh_token")


async def expect_reauthorization(broker: RunningBroker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "REAUTHORIZATION_REQUIRED"


# -- whose loss it was ------------------------------------------------------------------------


async def test_a_rotation_whose_answer_was_lost_is_counted_lost_in_flight(
    broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    broker.intuit.faults.add(Fault(FaultKind.ROTATE_THEN_RESET))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)  # Intuit rotated; the answer never arrived
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert broker.intuit.model.stats.rotations_by_realm[REALM] == 1

    broker.clock.advance(timedelta(minutes=3))  # past the backoff
    with caplog.at_level(logging.ERROR, logger="broker"):
        await expect_reauthorization(broker)  # the stored token was the one rotated away

    connection = await broker.connection(REALM)
    assert connection.status == pb.CONNECTION_STATUS_REAUTHORIZATION_REQUIRED
    assert connection.lost_cause == pb.LOST_CAUSE_LOST_IN_FLIGHT
    assert lost(broker, "lost_in_flight") == 1
    assert lost(broker, "revoked_at_intuit") == 0
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR and "rotated" in r.msg]
    assert getattr(record, "realm_id", None) == REALM
    assert getattr(record, "intuit_tid", None)  # Intuit's trace id, for its support


async def test_invalid_grant_with_nothing_in_doubt_is_revoked_at_intuit(
    broker: RunningBroker,
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(REALM) or "")

    await expect_reauthorization(broker)

    assert (await broker.connection(REALM)).lost_cause == pb.LOST_CAUSE_REVOKED_AT_INTUIT
    assert lost(broker, "revoked_at_intuit") == 1
    assert lost(broker, "lost_in_flight") == 0


async def test_an_expired_refresh_token_is_lost_as_expired(broker: RunningBroker) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=102 * DAYS)

    await expect_reauthorization(broker)

    assert (await broker.connection(REALM)).lost_cause == pb.LOST_CAUSE_EXPIRED
    assert lost(broker, "expired") == 1


async def test_a_later_success_settles_a_refresh_in_doubt(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    broker.intuit.faults.add(Fault(FaultKind.RESET))  # dropped before Intuit did anything

    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(REALM)
    assert await db.fetchval("SELECT count(*) FROM broker_refresh_intents") == 1

    broker.clock.advance(timedelta(minutes=3))
    reply = await broker.get_token(REALM)

    assert broker.token_works(REALM, reply.access_token)
    assert await db.fetchval("SELECT count(*) FROM broker_refresh_intents") == 0
    assert await stored_refresh_token(broker, db) == broker.intuit.model.current_refresh_token(
        REALM
    )


# -- a sibling's answer still on its way --------------------------------------------------------


@pytest.fixture
def simulator_config() -> SimulatorConfig:
    return SimulatorConfig(strict_rotation=True)


async def test_two_replicas_and_a_database_restart_give_no_false_reauthorization(
    start_broker: StartBroker,
    postgres: EmbeddedPostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replica A rotated the token while PostgreSQL died; B must not send the dead one."""
    monkeypatch.setattr(rescue, "RETRY_EVERY", 3600.0)  # A's rescue lands only when we say
    first = await start_broker(**SWEEP_BY_HAND)
    second = await start_broker(**SWEEP_BY_HAND)
    # 61 days old, so B's sweep will find it due too.
    await first.seed(REALM, access_token_left=None, refresh_token_age=61 * DAYS)
    await first.seed(OTHER_REALM, access_token_left=None, refresh_token_age=61 * DAYS)
    first.intuit.faults.add(Fault(FaultKind.HOLD))

    call = asyncio.create_task(first.get_token(REALM))
    await asyncio.wait_for(first.intuit.faults.wait_held(), 10)  # A's refresh is at Intuit
    await asyncio.to_thread(stop_postgres, postgres)
    first.intuit.faults.release()  # Intuit rotates; A cannot store the answer
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    await eventually(lambda: len(first.components.tokens.unstored) == 1, what="A keeps it")
    await asyncio.to_thread(start_postgres, postgres)

    # B, right after the database is back and before A's answer lands: not the old token.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second.get_token(REALM)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "REFRESH_PENDING"
    assert first.intuit.model.stats.invalid_grants == 0

    # B's sweep leaves that connection to A and goes on with the rest.
    report = await second.components.sweeper.run(SweepKind.MANUAL)
    assert report.outcome is SweepOutcome.COMPLETED
    assert (report.examined, report.refreshed, report.skipped) == (2, 1, 1)
    assert first.intuit.model.stats.invalid_grants == 0

    await first.components.tokens.unstored.write_all()  # A's rescue lands
    await eventually(lambda: second.components.cache.get(REALM) is None, within=15)
    reply = await second.get_token(REALM)

    assert second.token_works(REALM, reply.access_token)
    assert first.intuit.model.stats.invalid_grants == 0
    assert (await second.connection(REALM)).status == pb.CONNECTION_STATUS_ACTIVE


async def test_a_sibling_whose_refresh_got_no_answer_does_not_hold_the_others_back(
    start_broker: StartBroker, db: asyncpg.Connection
) -> None:
    """A's refresh was cut off (Intuit never answered): A holds nothing, so B refreshes."""
    first = await start_broker(**SWEEP_BY_HAND)
    second = await start_broker(**SWEEP_BY_HAND)
    await first.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    first.intuit.faults.add(Fault(FaultKind.RESET))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first.get_token(REALM)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # Still in doubt (a later invalid_grant would be ours), but no answer is held.
    assert await db.fetchval("SELECT answer_held FROM broker_refresh_intents") is False

    reply = await second.get_token(REALM)

    assert second.token_works(REALM, reply.access_token)
    assert await db.fetchval("SELECT count(*) FROM broker_refresh_intents") == 0


# -- tokens only in memory ----------------------------------------------------------------------


async def rotate_while_the_database_is_down(
    broker: RunningBroker, postgres: EmbeddedPostgres
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    broker.intuit.faults.add(Fault(FaultKind.HOLD))
    call = asyncio.create_task(broker.get_token(REALM))
    await asyncio.wait_for(broker.intuit.faults.wait_held(), 10)
    await asyncio.to_thread(stop_postgres, postgres)
    broker.intuit.faults.release()
    with pytest.raises(grpc.aio.AioRpcError):
        await call


def unstored_gauge(broker: RunningBroker) -> float:
    value = broker.broker.metrics.registry.get_sample_value("qbo_broker_unstored_tokens")
    return value if value is not None else -1.0


async def test_tokens_held_in_memory_are_visible_and_written_before_shutdown_ends(
    broker: RunningBroker, postgres: EmbeddedPostgres, db_dsn: str
) -> None:
    try:
        await rotate_while_the_database_is_down(broker, postgres)
        assert unstored_gauge(broker) == 1
    finally:
        stopping = asyncio.create_task(broker.broker.stop())
        await asyncio.to_thread(start_postgres, postgres)  # back while shutdown waits
    await asyncio.wait_for(stopping, 20)

    connection = await asyncpg.connect(db_dsn)
    try:
        row = await connection.fetchrow(
            "SELECT refresh_token, encryption_key_id FROM quickbooks_connections "
            "WHERE realm_id = $1",
            REALM,
        )
    finally:
        await connection.close()
    assert row is not None
    keys = broker.broker.settings.encryption_keys
    assert keys is not None
    stored = keys.decrypt(row["refresh_token"], row["encryption_key_id"], f"{REALM}:refresh_token")
    assert stored == broker.intuit.model.current_refresh_token(REALM)


async def test_tokens_that_cannot_be_written_by_the_end_of_shutdown_are_named_in_the_log(
    broker: RunningBroker, postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        await rotate_while_the_database_is_down(broker, postgres)
        began = asyncio.get_running_loop().time()
        with caplog.at_level(logging.ERROR, logger="broker"):
            await broker.broker.stop()
        took = asyncio.get_running_loop().time() - began
    finally:
        await asyncio.to_thread(start_postgres, postgres)

    assert took < broker.broker.settings.shutdown_budget.total_seconds()
    named = [r for r in caplog.records if getattr(r, "realm_id", None) == REALM]
    assert any(r.levelno == logging.ERROR and "never took" in r.msg for r in named)
    token = broker.intuit.model.current_refresh_token(REALM) or "?"
    assert token not in caplog.text


@pytest.fixture
def db_dsn(database: str) -> str:
    return database


# -- sweeps that die ----------------------------------------------------------------------------


async def test_a_run_left_running_by_a_dead_replica_is_closed_as_abandoned(
    start_broker: StartBroker, db: asyncpg.Connection
) -> None:
    broker = await start_broker(**SWEEP_BY_HAND)
    await db.execute(
        "INSERT INTO broker_sweep_runs (kind, replica, started_at) "
        "VALUES ('scheduled', 'gone', $1)",
        broker.clock() - DAYS,
    )

    await broker.admin.RunSweep(pb.RunSweepRequest(), timeout=30)

    rows = await db.fetch("SELECT replica, outcome FROM broker_sweep_runs ORDER BY id")
    assert (rows[0]["replica"], rows[0]["outcome"]) == ("gone", "abandoned")
    assert rows[1]["outcome"] == "completed"


async def test_a_sweeper_that_lost_its_lock_stops_before_the_next_connection(
    start_broker: StartBroker, db: asyncpg.Connection
) -> None:
    paced = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=300), disable_background_refresh=True
    )
    realms = [f"92000000000{n:05d}" for n in range(20)]
    for realm in realms:
        await paced.seed(realm, refresh_token_age=65 * DAYS)

    def renewed() -> int:
        return sum(1 for realm in realms if paced.refreshes(realm))

    running = asyncio.ensure_future(paced.components.sweeper.run(SweepKind.MANUAL))
    await eventually(lambda: renewed() >= 2, what="two renewals")
    await db.execute(  # what a quick database restart does to the lock's session
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'qbo-broker-sweep' AND datname = current_database()"
    )
    at_kill = renewed()
    report = await running

    assert report.outcome is SweepOutcome.ABORTED
    assert renewed() <= at_kill + 1  # the renewal in flight, and not one more
    second = await start_broker(**SWEEP_BY_HAND)  # the lock is free for a sibling
    rest = await second.components.sweeper.run(SweepKind.MANUAL)
    assert rest.outcome is SweepOutcome.COMPLETED
    assert renewed() == len(realms)


# -- the import guard ---------------------------------------------------------------------------


async def test_import_never_overwrites_an_active_connection_unless_asked(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)
    await broker.get_token(REALM)  # rotates: the stored token is now the only live one
    live = await stored_refresh_token(broker, db)
    old_copy = pb.ImportConnectionRequest(
        realm_id=REALM, user_id="someone", refresh_token="an-old-copy-of-the-grant"
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.ImportConnection(old_copy)

    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "CONNECTION_ACTIVE"
    assert await stored_refresh_token(broker, db) == live

    old_copy.replace_active = True
    await broker.admin.ImportConnection(old_copy)
    assert await stored_refresh_token(broker, db) == "an-old-copy-of-the-grant"


# -- durable commits ----------------------------------------------------------------------------


@pytest.fixture
def careless_postgres() -> Iterator[EmbeddedPostgres]:
    """A server of its own, tuned for throughput: commits return before they are on disk."""
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-careless-"))
    server = EmbeddedPostgres(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def careless_database(careless_postgres: EmbeddedPostgres) -> str:
    admin = await asyncpg.connect(careless_postgres.dsn("postgres"))
    try:
        await admin.execute("ALTER SYSTEM SET synchronous_commit = off")
        await admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    finally:
        await admin.close()
    await asyncio.to_thread(restart_postgres, careless_postgres)
    await ensure_database(careless_postgres.dsn("postgres"), "qbo_broker")
    return careless_postgres.dsn("qbo_broker")


async def test_a_rotated_token_survives_a_crash_right_after_the_refresh(
    start_broker: StartBroker,
    careless_postgres: EmbeddedPostgres,
    careless_database: str,
) -> None:
    broker = await start_broker(database_url=careless_database, **SWEEP_BY_HAND)
    check = await asyncpg.connect(careless_database)
    try:
        assert await check.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await check.close()
    await broker.seed(REALM, access_token_left=None, refresh_token_age=2 * DAYS)

    await broker.get_token(REALM)  # Intuit rotated; the broker answered, so it is stored
    await asyncio.to_thread(careless_postgres.pg_ctl, ["-w", "-m", "immediate", "stop"])
    await asyncio.to_thread(start_postgres, careless_postgres)

    after = await asyncpg.connect(careless_database)
    try:
        assert await stored_refresh_token(broker, after) == (
            broker.intuit.model.current_refresh_token(REALM)
        )
    finally:
        await after.close()
