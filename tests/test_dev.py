"""`qbo-broker dev`'s demo companies do what the printed guide says they do."""

from __future__ import annotations

import grpc

from broker._proto import broker_pb2 as pb
from broker.devtools.dev import DEMO_COMPANIES, guide, seed
from tests.conftest import StartBroker


async def test_each_demo_company_behaves_as_its_story_says(start_broker: StartBroker) -> None:
    broker = await start_broker(disable_background_refresh=True)
    await seed(broker.broker, broker.intuit.model)
    realm = {company.user_id.split("@")[0]: company.realm_id for company in DEMO_COMPANIES}
    before = broker.broker.metrics.registry.get_sample_value

    def refreshed(trigger: str) -> float | None:
        return before(
            "qbo_broker_token_refreshes_total", {"trigger": trigger, "outcome": "success"}
        )

    reply = await broker.get_token(realm["alice"])  # expired access token: refreshed
    assert broker.token_works(realm["alice"], reply.access_token)
    assert refreshed("access_expiry") == 1
    await broker.get_token(realm["bob"])  # 35 days old: renewed proactively
    assert refreshed("proactive") == 1
    reply = await broker.get_token(realm["frank"])  # healthy: served as is
    assert broker.refreshes(realm["frank"]) == 0
    assert broker.token_works(realm["frank"], reply.access_token)
    assert await broker.get_token_expecting_error(realm["erin"]) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    swept = await broker.admin.RunSweep(pb.RunSweepRequest())  # carol and dave
    assert (swept.examined, swept.refreshed) == (2, 2)
    assert broker.refreshes(realm["carol"]) == broker.refreshes(realm["dave"]) == 1

    text = guide(broker.broker, broker.intuit.base_url)
    assert f"127.0.0.1:{broker.broker.grpc_port}" in text
    assert all(company.realm_id in text for company in DEMO_COMPANIES)
