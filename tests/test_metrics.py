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
from tests.support import SWEEP_BY_HAND, RunningBroker, eventually

DAYS = timedelta(days=1)
BUCKET_DAYS = (1, 7, 14, 30, 45, 60, 75, 90, 101)


async def scrape(broker: RunningBroker, accept: str = "") -> str:
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
    assert ("qbo_broker_sweep_last_success_timestamp_seconds", ()) not in samples(
        await scrape(other)
    )

    report = await broker.components.sweeper.run(SweepKind.MANUAL)
    assert report.outcome is not None
    other.components.fleet.expire()  # as five seconds later

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
    assert labels <= {"le", "status", "trigger", "outcome", "kind", "cause"}


async def test_concurrent_scrapes_share_one_query(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.storage import fleet

    calls = 0
    real = fleet.read_fleet_stats

    slow_query_done = asyncio.Event()

    async def counting(pool: asyncpg.Pool, now: object) -> fleet.FleetStats:
        nonlocal calls
        calls += 1
        await slow_query_done.wait()  # a slow aggregate over a big table
        return await real(pool, now)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet, "read_fleet_stats", counting)
    broker.components.fleet.expire()

    scrapes = asyncio.gather(*(broker.components.fleet.current() for _ in range(20)))
    await eventually(lambda: calls, what="the first scrape's query")
    slow_query_done.set()  # every scrape is waiting by now: none could finish before this
    results = await scrapes

    assert calls == 1
    assert all(result is results[0] is not None for result in results)
    assert "qbo_broker_connections" in await scrape(broker)
    assert calls == 1  # served from what the shared query found
