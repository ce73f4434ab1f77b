"""The background sweep: what it renews, on how many replicas, and what stops it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import grpc
import pytest

from broker import server as broker_server
from broker._proto import broker_pb2 as pb
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import Fault, FaultKind
from broker.domain.policy import SweepCutoffs
from broker.domain.sweep import SweepKind, SweepOutcome
from broker.storage.connections import PostgresConnectionStore
from broker.storage.sweep import PostgresSweepLedger
from tests.conftest import StartBroker
from tests.support import SWEEP_BY_HAND, RunningBroker, error_info, eventually

DAYS = timedelta(days=1)


def keys_of(broker: RunningBroker) -> KeyRing:
    keys = broker.broker.settings.encryption_keys
    assert keys is not None
    return keys


def realm(n: int) -> str:
    return f"9200000000{n:06d}"


def renewed_among(broker: RunningBroker, count: int) -> int:
    """How many of realm(0) … realm(count - 1) Intuit has refreshed."""
    return sum(1 for n in range(count) if broker.refreshes(realm(n)))


async def sweep(broker: RunningBroker) -> pb.RunSweepResponse:
    reply: pb.RunSweepResponse = await broker.admin.RunSweep(pb.RunSweepRequest(), timeout=60)
    return reply


@pytest.fixture
async def broker(start_broker: StartBroker) -> RunningBroker:
    return await start_broker(**SWEEP_BY_HAND)


async def test_the_sweep_renews_exactly_the_due_connections(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    due_by_age = realm(1)
    await broker.seed(due_by_age, refresh_token_age=65 * DAYS)
    young = realm(2)
    await broker.seed(young, refresh_token_age=40 * DAYS)
    needs_customer = realm(3)
    await broker.seed(needs_customer, refresh_token_age=70 * DAYS)
    await db.execute(
        "UPDATE quickbooks_connections SET status = 'reauthorization_required' WHERE realm_id = $1",
        needs_customer,
    )
    unknown_age = realm(4)
    await broker.seed(unknown_age, refresh_token_age=3 * DAYS)
    await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_created_at = NULL WHERE realm_id = $1",
        unknown_age,
    )
    expiring_before_next_run = realm(5)  # young by age, but Intuit said it ends in 5 days
    await broker.seed(expiring_before_next_run, refresh_token_age=20 * DAYS)
    await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_expires_at = $2 WHERE realm_id = $1",
        expiring_before_next_run,
        broker.clock() + 5 * DAYS,
    )
    at_hard_limit = realm(6)  # expiring soon, but at the five-year limit: no refresh can help
    await broker.seed(at_hard_limit, refresh_token_age=20 * DAYS)
    await db.execute(
        """UPDATE quickbooks_connections
           SET refresh_token_expires_at = $2, reconnect_deadline = $2 WHERE realm_id = $1""",
        at_hard_limit,
        broker.clock() + 5 * DAYS,
    )

    reply = await sweep(broker)

    assert (reply.examined, reply.refreshed, reply.failed) == (3, 3, 0)
    renewed = {r for r in map(realm, range(1, 7)) if broker.refreshes(r)}
    assert renewed == {due_by_age, unknown_age, expiring_before_next_run}
    for renewed_realm in renewed:
        connection = await broker.connection(renewed_realm)
        assert connection.refresh_token_created_at.ToDatetime().timestamp() == pytest.approx(
            broker.clock().timestamp(), abs=1
        )
    assert (await sweep(broker)).examined == 0  # nothing left to do
    metric = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_token_refreshes_total", {"trigger": "sweep", "outcome": "success"}
    )
    assert metric == 3


async def test_a_run_has_no_cap_by_default(broker: RunningBroker) -> None:
    for n in range(250):
        await broker.seed(realm(n), refresh_token_age=(61 + n % 30) * DAYS)

    reply = await sweep(broker)

    assert (reply.examined, reply.refreshed, reply.failed) == (250, 250, 0)
    assert broker.intuit.model.stats.invalid_grants == 0


async def test_the_cap_leaves_the_rest_for_the_next_run_oldest_first(
    start_broker: StartBroker,
) -> None:
    capped = await start_broker(
        refresh_job_rate_limit=timedelta(0),
        refresh_job_max_per_run=3,
        disable_background_refresh=True,
    )
    for n in range(5):
        await capped.seed(realm(n), refresh_token_age=(61 + n) * DAYS)

    first = await sweep(capped)

    assert (first.examined, first.refreshed) == (3, 3)
    assert [capped.refreshes(realm(n)) for n in range(5)] == [0, 0, 1, 1, 1]  # oldest first
    second = await sweep(capped)
    assert (second.examined, second.refreshed) == (2, 2)


async def test_a_dead_grant_counts_as_failed_and_is_marked(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(realm(1), refresh_token_age=65 * DAYS)
    await broker.seed(realm(2), refresh_token_age=65 * DAYS)
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(realm(1)) or "")

    reply = await sweep(broker)

    assert (reply.examined, reply.refreshed, reply.failed) == (2, 1, 1)
    status = await db.fetchval(
        "SELECT status FROM quickbooks_connections WHERE realm_id = $1", realm(1)
    )
    assert status == "reauthorization_required"
    assert (await sweep(broker)).examined == 0  # never selected again


async def test_intuit_down_ends_the_run_and_the_next_one_finishes(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    for n in range(12):
        await broker.seed(realm(n), refresh_token_age=65 * DAYS)
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503), times=5)

    cut_short = await sweep(broker)

    assert (cut_short.examined, cut_short.refreshed, cut_short.failed) == (12, 0, 5)
    outcome = await db.fetchval("SELECT outcome FROM broker_sweep_runs ORDER BY id DESC LIMIT 1")
    assert outcome == "aborted"
    statuses = await db.fetch("SELECT DISTINCT status FROM quickbooks_connections")
    assert [row["status"] for row in statuses] == ["active"]  # nobody blamed for Intuit's outage

    broker.clock.advance(timedelta(minutes=5))  # past the per-connection backoff
    resumed = await sweep(broker)
    assert (resumed.examined, resumed.refreshed, resumed.failed) == (12, 12, 0)


async def test_an_interrupted_run_stops_at_the_next_connection_and_resumes(
    start_broker: StartBroker, db: asyncpg.Connection
) -> None:
    paced = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=200), disable_background_refresh=True
    )
    for n in range(40):
        await paced.seed(realm(n), refresh_token_age=65 * DAYS)

    running = asyncio.ensure_future(sweep(paced))
    await eventually(lambda: renewed_among(paced, 40) >= 3, what="three renewals")
    paced.components.sweeper.stop()  # what shutdown does
    interrupted = await running

    assert 0 < interrupted.refreshed < 40
    assert interrupted.failed == 0
    row = await db.fetchrow(
        "SELECT outcome, refreshed FROM broker_sweep_runs ORDER BY id DESC LIMIT 1"
    )
    assert row is not None
    assert (row["outcome"], row["refreshed"]) == ("interrupted", interrupted.refreshed)
    assert renewed_among(paced, 40) == interrupted.refreshed  # stored or untouched

    resumed = await start_broker(**SWEEP_BY_HAND)
    rest = await sweep(resumed)
    assert (rest.examined, rest.refreshed) == (
        40 - interrupted.refreshed,
        40 - interrupted.refreshed,
    )


async def test_two_replicas_sweeping_at_once_renew_each_connection_once(
    start_broker: StartBroker,
) -> None:
    first = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=5), disable_background_refresh=True
    )
    second = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=5), disable_background_refresh=True
    )
    for n in range(30):
        await first.seed(realm(n), refresh_token_age=65 * DAYS)

    reports = await asyncio.gather(
        first.components.sweeper.run(SweepKind.SCHEDULED),
        second.components.sweeper.run(SweepKind.SCHEDULED),
    )

    ran = [report for report in reports if report.outcome is not None]
    assert len(ran) == 1
    assert ran[0].outcome is SweepOutcome.COMPLETED
    assert ran[0].refreshed == 30
    assert [first.refreshes(realm(n)) for n in range(30)] == [1] * 30
    # A replica whose timer fires just after its sibling finished does nothing either.
    late = await second.components.sweeper.run(SweepKind.SCHEDULED)
    assert late.outcome is None
    assert late.reason is not None
    assert "sibling" in late.reason


async def test_a_manual_run_during_a_sweep_says_so(start_broker: StartBroker) -> None:
    first = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=300), disable_background_refresh=True
    )
    second = await start_broker(disable_background_refresh=True)
    for n in range(10):
        await first.seed(realm(n), refresh_token_age=65 * DAYS)
    running = asyncio.ensure_future(sweep(first))
    await eventually(lambda: renewed_among(first, 10) >= 1, what="the first sweep under way")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sweep(second)

    assert caught.value.code() is grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "SWEEP_IN_PROGRESS"
    assert (await running).refreshed == 10


async def test_a_missed_sweep_is_caught_up_but_a_recent_one_is_not(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed(realm(1), refresh_token_age=65 * DAYS)
    await db.execute(
        """INSERT INTO broker_sweep_runs (kind, replica, started_at, finished_at, outcome)
           VALUES ('scheduled', 'gone', $1, $1, 'completed')""",
        broker.clock() - 2 * DAYS,
    )

    recent = await broker.components.sweeper.run(SweepKind.CATCH_UP)
    assert recent.outcome is None  # two days ago is recent enough for a weekly schedule
    assert broker.refreshes(realm(1)) == 0

    broker.clock.advance(5 * DAYS + timedelta(hours=1))  # now the last run is 7 days 1 hour old
    missed = await broker.components.sweeper.run(SweepKind.CATCH_UP)
    assert missed.outcome is SweepOutcome.COMPLETED
    assert broker.refreshes(realm(1)) == 1


async def test_the_startup_sweep_runs_within_seconds_of_ready(
    start_broker: StartBroker, broker: RunningBroker
) -> None:
    await broker.seed(realm(1), refresh_token_age=65 * DAYS)

    await start_broker(refresh_job_on_startup=True, refresh_job_rate_limit=timedelta(0))

    await eventually(lambda: broker.refreshes(realm(1)), what="the start-up sweep")
    assert broker.refreshes(realm(1)) == 1


async def test_a_disabled_background_refresh_starts_nothing(
    start_broker: StartBroker, broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_server, "CATCH_UP_DELAY", (0.1, 0.2))
    await broker.seed(realm(1), refresh_token_age=65 * DAYS)

    disabled = await start_broker(disable_background_refresh=True, refresh_job_on_startup=True)

    assert disabled.broker.scheduler is None
    assert disabled.broker.background_work == 0  # no start-up sweep, no catch-up waiting
    assert broker.refreshes(realm(1)) == 0


async def test_the_sql_selection_and_the_policy_agree(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    """The simulation (and the re-check under the row lock) use the policy's own test."""
    now = broker.clock()
    variants: list[tuple[str, timedelta, datetime | None, datetime | None]] = [
        (realm(n), timedelta(days=age), None, None)
        for n, age in enumerate([1, 30, 59.9, 60, 60.1, 75, 100])
    ]
    variants += [
        (realm(20), 10 * DAYS, now + 3 * DAYS, None),  # expiring before the next run
        (realm(21), 10 * DAYS, now + 9 * DAYS + timedelta(hours=1), None),  # just after
        (realm(22), 10 * DAYS, now + 3 * DAYS, now + 3 * DAYS),  # at the hard limit
        (realm(23), 10 * DAYS, now + 3 * DAYS, now + 30 * DAYS),  # hard limit further off
    ]
    for realm_id, age, expires, deadline in variants:
        await broker.seed(realm_id, refresh_token_age=age)
        if expires is not None:
            await db.execute(
                """UPDATE quickbooks_connections
                   SET refresh_token_expires_at = $2, reconnect_deadline = $3
                   WHERE realm_id = $1""",
                realm_id,
                expires,
                deadline,
            )
    await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_created_at = NULL WHERE realm_id = $1",
        realm(6),
    )
    await db.execute(
        "UPDATE quickbooks_connections SET status = 'revoked' WHERE realm_id = $1", realm(5)
    )

    policy = broker.components.tokens.policy
    ledger = PostgresSweepLedger(broker.components.pool, broker.components.database.connect)
    cutoffs = policy.sweep_cutoffs(now)
    selected = await ledger.due_realms(cutoffs)
    store = PostgresConnectionStore(broker.components.pool, keys_of(broker))
    snapshots = [await store.load(realm_id=r, user_id=None) for r, *_ in variants]
    by_policy = sorted((s for s in snapshots if cutoffs.due(s)), key=SweepCutoffs.order)

    assert selected == [snapshot.realm_id for snapshot in by_policy]  # same set, same order
    assert set(selected) == {realm(3), realm(4), realm(6), realm(20), realm(23)}
    assert selected[0] == realm(6)  # unknown age first, then nearest to expiry


async def test_shutdown_during_a_sweep_ends_it_cleanly(
    start_broker: StartBroker, db: asyncpg.Connection
) -> None:
    paced = await start_broker(
        refresh_job_rate_limit=timedelta(milliseconds=500),
        disable_background_refresh=True,
        shutdown_grace=timedelta(seconds=10),
    )
    for n in range(30):
        await paced.seed(realm(n), refresh_token_age=65 * DAYS)
    running = asyncio.ensure_future(sweep(paced))
    await eventually(lambda: renewed_among(paced, 30) >= 2, what="two renewals")

    began = asyncio.get_running_loop().time()
    await paced.broker.stop()
    report = await running  # the caller still hears what was done

    # Neither the rest of the run (14 s) nor the grace (10 s): it ends at the next connection.
    assert asyncio.get_running_loop().time() - began < 5
    assert 0 < report.refreshed < 30
    outcome = await db.fetchval("SELECT outcome FROM broker_sweep_runs ORDER BY id DESC LIMIT 1")
    assert outcome == "interrupted"
    assert sum(1 for n in range(30) if paced.refreshes(realm(n))) == report.refreshed


async def test_one_row_that_does_not_decrypt_does_not_stop_the_sweep(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    for n in range(4):
        await broker.seed(realm(n), refresh_token_age=(70 - n) * DAYS)
    await db.execute(  # oldest first: this row comes first in every run
        "UPDATE quickbooks_connections SET refresh_token = $2 WHERE realm_id = $1",
        realm(0),
        b"\x00" * 64,
    )

    reply = await sweep(broker)

    assert (reply.examined, reply.refreshed, reply.failed) == (4, 3, 1)
    outcome = await db.fetchval("SELECT outcome FROM broker_sweep_runs ORDER BY id DESC LIMIT 1")
    assert outcome == "completed"


async def test_skipped_runs_are_counted_and_shutdown_refuses_new_runs(
    broker: RunningBroker,
) -> None:
    await broker.components.sweeper.run(SweepKind.MANUAL)
    skipped = await broker.components.sweeper.run(SweepKind.SCHEDULED)  # a run completed just now
    assert skipped.outcome is None
    metric = broker.broker.metrics.registry.get_sample_value(
        "qbo_broker_sweep_runs_total", {"kind": "scheduled", "outcome": "skipped"}
    )
    assert metric == 1

    broker.components.sweeper.stop()  # what shutdown does first
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sweep(broker)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
