"""GET /metrics: the contract's four metrics, with the numbers an operator would expect."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aiohttp
import asyncpg
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from broker._proto import broker_pb2 as pb
from broker.devtools.fake_intuit import Fault, FaultKind
from broker.domain.sweep import SweepKind
from tests.conftest import StartBroker
from tests.support import SWEEP_BY_HAND, RunningBroker

DAYS = timedelta(days=1)
BUCKET_DAYS = (1, 7, 14, 30, 45, 60, 75, 90, 101)


async def scrape(broker: RunningBroker, accept: str = "", *, recompute: bool = True) -> str:
    """GET /metrics; ``recompute``: first bring the fleet gauges up to date, as a minute would."""
    if recompute:
        await broker.components.fleet.refresh(force=True)
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{broker.broker.http_port}/metrics"
        async with session.get(url, headers={"Accept": accept} if accept else {}) as response:
            assert response.status == 200
            return await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
async def broker(start_broker: StartBroker) -> RunningBroker:
    return await start_broker(**SWEEP_BY_HAND)


async def test_refresh_token_ages_land_in_exactly_the_expected_buckets(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    ages = [0.5, 3, 7, 10, 20, 35, 50, 65, 80, 95, 100, 120]  # days; 7 sits on a boundary
    for n, age in enumerate(ages):
        await broker.seed(f"9300000000{n:06d}", refresh_token_age=age * DAYS)
    await broker.seed("9300000000000098")  # unknown age: only in +Inf
    await db.execute(
        "UPDATE quickbooks_connections SET refresh_token_created_at = NULL "
        "WHERE realm_id = '9300000000000098'"
    )
    await broker.seed("9300000000000099", refresh_token_age=2 * DAYS)  # not active: not counted
    await db.execute(
        "UPDATE quickbooks_connections SET status = 'reauthorization_required' "
        "WHERE realm_id = '9300000000000099'"
    )

    found = samples(await scrape(broker))

    name = "qbo_broker_refresh_token_age_seconds_bucket"
    for days in BUCKET_DAYS:
        expected = sum(1 for age in ages if age <= days)
        assert found[(name, (("le", str(days * 86400)),))] == expected, days
    assert found[(name, (("le", "+Inf"),))] == len(ages) + 1
    assert found[("qbo_broker_refresh_token_age_seconds_gcount", ())] == len(ages) + 1
    assert found[("qbo_broker_refresh_token_age_seconds_gsum", ())] == pytest.approx(
        sum(ages) * 86400, rel=1e-6
    )
    by_status = {
        labels[0][1]: value
        for (metric, labels), value in found.items()
        if metric == "qbo_broker_connections"
    }
    assert by_status == {"active": 13, "reauthorization_required": 1, "revoked": 0}


async def test_prometheus_gets_a_real_gauge_histogram(broker: RunningBroker) -> None:
    await broker.seed("9300000000000001", refresh_token_age=3 * DAYS)
    text = await scrape(broker, accept="application/openmetrics-text; version=1.0.0")
    parsed = openmetrics_families(text)  # type: ignore[no-untyped-call]
    families = {family.name: family for family in parsed}
    assert families["qbo_broker_refresh_token_age_seconds"].type == "gaugehistogram"


async def test_each_refresh_path_moves_its_counter(
    broker: RunningBroker, db: asyncpg.Connection
) -> None:
    await broker.seed("9300000000000001", access_token_left=None)  # access_expiry
    await broker.get_token("9300000000000001")
    await broker.seed("9300000000000002", refresh_token_age=40 * DAYS)  # proactive
    await broker.get_token("9300000000000002")
    await broker.seed("9300000000000003", refresh_token_age=70 * DAYS)  # sweep
    await broker.admin.RunSweep(pb.RunSweepRequest())
    await broker.seed("9300000000000004")  # manual
    await broker.admin.RefreshConnection(pb.RefreshConnectionRequest(realm_id="9300000000000004"))
    await broker.seed("9300000000000005", access_token_left=None)  # upstream_error
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))
    await broker.get_token_expecting_error("9300000000000005")
    await broker.seed("9300000000000006", access_token_left=None)  # invalid_grant
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token("9300000000000006") or "")
    await broker.get_token_expecting_error("9300000000000006")

    found = samples(await scrape(broker))

    def refreshes(trigger: str, outcome: str) -> float:
        key = (
            "qbo_broker_token_refreshes_total",
            (("outcome", outcome), ("trigger", trigger)),
        )
        return found[key]

    assert refreshes("access_expiry", "success") == 1
    assert refreshes("proactive", "success") == 1
    assert refreshes("sweep", "success") == 1
    assert refreshes("manual", "success") == 1
    assert refreshes("access_expiry", "upstream_error") == 1
    assert refreshes("access_expiry", "invalid_grant") == 1
    assert (
        found[("qbo_broker_sweep_runs_total", (("kind", "manual"), ("outcome", "completed")))] == 1
    )


async def test_last_sweep_success_is_the_databases_on_every_replica(
    start_broker: StartBroker, broker: RunningBroker
) -> None:
    other = await start_broker(disable_background_refresh=True)
    never = samples(await scrape(other))[("qbo_broker_sweep_last_success_timestamp_seconds", ())]
    assert never == 0  # no sweep ever completed: the age alert fires until one does

    report = await broker.components.sweeper.run(SweepKind.MANUAL)
    assert report.outcome is not None

    on_other = samples(await scrape(other))
    assert on_other[("qbo_broker_sweep_last_success_timestamp_seconds", ())] == pytest.approx(
        broker.clock().timestamp(), abs=2
    )


async def test_no_realm_user_or_token_in_any_label(broker: RunningBroker) -> None:
    await broker.seed("9300000000000001", "alice@example.com", access_token_left=None)
    reply = await broker.get_token("9300000000000001")

    text = await scrape(broker)

    for secret in ("9300000000000001", "alice@example.com", reply.access_token):
        assert secret not in text
    labels = {
        key
        for family in text_string_to_metric_families(text)
        if family.name.startswith("qbo_broker_")
        for sample in family.samples
        for key in sample.labels
    }
    assert labels <= {
        "le",
        "status",
        "trigger",
        "outcome",
        "kind",
        "cause",
        "within",
        "result",
        "endpoint",
        "version",
        "python_version",
    }


async def test_a_scrape_runs_no_query(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.storage import fleet

    await broker.seed("9300000000000001")
    await broker.components.fleet.refresh(force=True)
    computed = 0
    real = fleet.compute_fleet_stats

    async def counting(connection: object, now: object) -> fleet.FleetStats:
        nonlocal computed
        computed += 1
        return await real(connection, now)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet, "compute_fleet_stats", counting)

    texts = await asyncio.gather(*(scrape(broker, recompute=False) for _ in range(20)))

    assert computed == 0
    assert all("qbo_broker_connections" in text for text in texts)


async def test_one_replica_computes_the_fleet_gauges_once_a_minute(
    start_broker: StartBroker, broker: RunningBroker
) -> None:
    replicas = [broker, *[await start_broker(**SWEEP_BY_HAND) for _ in range(2)]]
    keepers = [replica.components.fleet for replica in replicas]
    await broker.seed("9300000000000001")
    for keeper in keepers:  # a minute later: the first to look computes, the others read it
        await keeper.refresh(force=True)
    before = sum(keeper.computations for keeper in keepers)

    for _ in range(5):
        for keeper in keepers:
            await keeper.refresh()
    assert sum(keeper.computations for keeper in keepers) == before  # fresh: all read it

    broker.clock.advance(timedelta(seconds=61))
    for keeper in keepers:
        await keeper.refresh()
    assert sum(keeper.computations for keeper in keepers) == before + 1
    latest = {keeper.latest.computed_at for keeper in keepers if keeper.latest}
    assert latest == {broker.clock()}  # every replica serves the same figures


async def test_the_gauges_an_sre_expects(broker: RunningBroker, db: asyncpg.Connection) -> None:
    await broker.seed("9300000000000001", refresh_token_age=95 * DAYS)  # expires in 6 days
    await broker.seed("9300000000000002", access_token_left=None)
    await broker.get_token("9300000000000002")  # a refresh: learns the reconnect deadline
    await db.execute(
        "UPDATE quickbooks_connections SET reconnect_deadline = $2 WHERE realm_id = $1",
        "9300000000000002",
        broker.clock() + 20 * DAYS,
    )
    await broker.get_token("9300000000000002")  # warm again (after the notice): a hit or a miss
    await broker.get_token("9300000000000002")
    await broker.get_token_expecting_error("9300000000000777")

    found = samples(await scrape(broker))

    assert found[("qbo_broker_refresh_tokens_expiring", (("within", "14d"),))] == 1
    assert found[("qbo_broker_reconnect_deadlines_approaching", (("within", "30d"),))] == 1
    assert found[("qbo_broker_reconnect_deadlines_approaching", (("within", "90d"),))] == 1
    assert found[("qbo_broker_database_up", ())] == 1
    assert found[("qbo_broker_fleet_stats_timestamp_seconds", ())] == pytest.approx(
        broker.clock().timestamp()
    )
    assert found[("qbo_broker_token_cache_lookups_total", (("result", "hit"),))] >= 1
    assert found[("qbo_broker_token_cache_lookups_total", (("result", "miss"),))] >= 2
    assert (
        found[
            ("qbo_broker_intuit_requests_total", (("endpoint", "refresh"), ("outcome", "success")))
        ]
        == 1
    )
    assert (
        found[("qbo_broker_intuit_request_duration_seconds_count", (("endpoint", "refresh"),))] == 1
    )
    handled = (
        "grpc_server_handled_total",
        (
            ("grpc_code", "NOT_FOUND"),
            ("grpc_method", "GetAccessToken"),
            ("grpc_service", "qbo.broker.v1.TokenBrokerService"),
            ("grpc_type", "unary"),
        ),
    )
    assert found[handled] == 1
    assert any(name == "grpc_server_handling_seconds_count" for name, _ in found)
    assert any(name == "qbo_broker_build_info" for name, _ in found)
    assert ("process_resident_memory_bytes", ()) in found
