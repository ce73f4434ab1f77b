"""The simulated Intuit, exercised the way the broker will use it: real HTTP on
loopback, a FakeClock for the days and years, real sleeps only for DELAY."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from broker.clock import FakeClock
from broker.devtools.fake_intuit import (
    Fault,
    FaultKind,
    FaultPlan,
    IntuitModel,
    IntuitSimulator,
    SimulatorConfig,
)
from broker.devtools.fake_intuit.model import ACCESS_TOKENS_KEPT_PER_GRANT
from broker.intuit.endpoints import HARD_EXPIRY_HEADER, TID_HEADER
from tests.support import eventually

REDIRECT_URI = "http://127.0.0.1:9/callback"
REFRESH_TTL_S = 8_726_400
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def error(self) -> Any:
        return self.json()["error"]


@dataclass
class Caller:
    """A client of the simulator; checks the intuit_tid of every answer it gets."""

    session: aiohttp.ClientSession
    sim: IntuitSimulator
    basic: str = aiohttp.encode_basic_auth("sim-client-id", "sim-client-secret")

    async def request(self, method: str, url: str | URL, **kwargs: Any) -> Answer:
        async with self.session.request(method, url, allow_redirects=False, **kwargs) as resp:
            answer = Answer(resp.status, resp.headers, await resp.text())
        assert answer.headers.get(TID_HEADER), f"no intuit_tid on {method} {url}"
        return answer

    async def token(self, form: dict[str, str], **headers: str) -> Answer:
        headers.setdefault("Authorization", self.basic)
        return await self.request("POST", self.sim.token_url, data=form, headers=headers)

    async def refresh(self, refresh_token: str, *, hard: bool = False) -> Answer:
        extra = {HARD_EXPIRY_HEADER: "true"} if hard else {}
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self.request(
            "POST", self.sim.token_url, data=form, headers={"Authorization": self.basic, **extra}
        )

    async def exchange(self, code: str, redirect_uri: str = REDIRECT_URI) -> Answer:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        return await self.token(form)

    async def revoke(self, token: str, *, basic: str | None = None) -> Answer:
        headers = {"Authorization": basic or self.basic}
        return await self.request(
            "POST", self.sim.revoke_url, json={"token": token}, headers=headers
        )

    async def company_info(self, realm_id: str, access_token: str) -> Answer:
        url = self.sim.company_info_url(realm_id)
        return await self.request("GET", url, headers={"Authorization": f"Bearer {access_token}"})

    async def consent(self, **params: str) -> Answer:
        query = {
            "client_id": "sim-client-id",
            "response_type": "code",
            "scope": "com.intuit.quickbooks.accounting",
            "redirect_uri": REDIRECT_URI,
            "state": "s-123",
            **params,
        }
        return await self.request("GET", self.sim.auth_url, params=query)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def config() -> SimulatorConfig:
    return SimulatorConfig()


@pytest.fixture
def model(config: SimulatorConfig, clock: FakeClock) -> IntuitModel:
    return IntuitModel(config, clock)


@pytest.fixture
async def sim(model: IntuitModel) -> AsyncIterator[IntuitSimulator]:
    async with IntuitSimulator(model, FaultPlan()) as running:
        yield running


@pytest.fixture
async def intuit(sim: IntuitSimulator) -> AsyncIterator[Caller]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield Caller(session, sim)


# -- authorization codes -----------------------------------------------------


async def test_consent_then_code_exchange_gives_working_tokens(
    intuit: Caller, model: IntuitModel
) -> None:
    consent = await intuit.consent()
    assert consent.status == 302
    callback = URL(consent.headers["Location"])
    assert callback.with_query(None) == URL(REDIRECT_URI)
    assert callback.query["state"] == "s-123"
    realm_id = callback.query["realmId"]
    assert realm_id.isdigit()
    assert 16 <= len(realm_id) <= 19

    answer = await intuit.exchange(callback.query["code"])
    assert answer.status == 200
    body = answer.json()
    assert set(body) == {
        "token_type",
        "access_token",
        "refresh_token",
        "expires_in",
        "x_refresh_token_expires_in",
    }
    assert (body["token_type"], body["expires_in"]) == ("bearer", 3600)
    assert body["x_refresh_token_expires_in"] == REFRESH_TTL_S
    assert model.current_refresh_token(realm_id) == body["refresh_token"]
    info = await intuit.company_info(realm_id, body["access_token"])
    assert info.status == 200
    assert info.json()["CompanyInfo"]["CompanyName"]
    assert model.stats.code_exchanges == 1


async def test_consent_keeps_a_chosen_realm_and_rejects_a_bad_request(intuit: Caller) -> None:
    chosen = await intuit.consent(realm_id="4620816365212345678")
    assert URL(chosen.headers["Location"]).query["realmId"] == "4620816365212345678"
    for bad in ({"client_id": "someone-else"}, {"response_type": "token"}, {"redirect_uri": ""}):
        page = await intuit.consent(**bad)
        assert page.status == 400
        assert page.headers["Content-Type"].startswith("text/html")


async def test_reusing_a_code_fails_and_kills_the_tokens_it_gave(
    intuit: Caller, model: IntuitModel
) -> None:
    code = model.authorize("111", redirect_uri=REDIRECT_URI)
    first = (await intuit.exchange(code)).json()
    reuse = await intuit.exchange(code)
    assert (reuse.status, reuse.error) == (400, "invalid_grant")
    assert (await intuit.refresh(first["refresh_token"])).error == "invalid_grant"
    assert (await intuit.company_info("111", first["access_token"])).status == 401


async def test_code_expires_after_ten_minutes_and_needs_its_redirect_uri(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    code = model.authorize("111", redirect_uri=REDIRECT_URI)
    assert (await intuit.exchange(code, "http://127.0.0.1:9/elsewhere")).error == "invalid_grant"
    clock.advance(timedelta(minutes=10))
    assert (await intuit.exchange(code)).error == "invalid_grant"
    assert model.stats.invalid_grants == 2


# -- refresh and rotation ----------------------------------------------------


async def test_refresh_within_24h_returns_the_same_token_counting_down(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    seeded = model.create_grant("111")
    clock.advance(timedelta(hours=2))
    first = await intuit.refresh(seeded.refresh_token)
    assert first.status == 200
    assert first.json()["refresh_token"] == seeded.refresh_token
    assert first.json()["x_refresh_token_expires_in"] == REFRESH_TTL_S - 2 * 3600
    assert first.json()["access_token"] != seeded.access_token
    clock.advance(timedelta(hours=21, minutes=59))
    second = (await intuit.refresh(seeded.refresh_token)).json()
    assert second["refresh_token"] == seeded.refresh_token
    assert second["x_refresh_token_expires_in"] == REFRESH_TTL_S - (24 * 3600 - 60)
    assert model.stats.refresh_calls_by_realm["111"] == 2
    assert model.stats.rotations == 0


async def test_refresh_after_24h_rotates_and_the_old_token_dies_at_once(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    old = model.create_grant("111").refresh_token
    clock.advance(DAY)
    rotated = (await intuit.refresh(old)).json()
    assert rotated["refresh_token"] != old
    assert rotated["x_refresh_token_expires_in"] == REFRESH_TTL_S
    stale = await intuit.refresh(old)
    assert (stale.status, stale.error) == (400, "invalid_grant")
    assert (await intuit.refresh(rotated["refresh_token"])).status == 200
    assert (model.stats.rotations, model.stats.invalid_grants_by_realm["111"]) == (1, 1)
    assert not model.is_refresh_token_alive(old)


@pytest.mark.parametrize(
    "config", [SimulatorConfig(strict_rotation=True, old_token_grace=timedelta(hours=1))]
)
async def test_strict_rotation_issues_a_new_token_every_time(
    intuit: Caller, model: IntuitModel
) -> None:
    token = model.create_grant("111").refresh_token
    for _ in range(3):
        fresh = (await intuit.refresh(token)).json()["refresh_token"]
        assert fresh != token
        assert (await intuit.refresh(token)).error == "invalid_grant"
        token = fresh
    assert model.stats.rotations == 3


@pytest.mark.parametrize("config", [SimulatorConfig(old_token_grace=timedelta(hours=1))])
def test_a_rotated_token_works_during_the_grace_period(
    model: IntuitModel, clock: FakeClock
) -> None:
    old = model.create_grant("111").refresh_token
    clock.advance(DAY)
    new = model.refresh(old).refresh_token
    clock.advance(timedelta(minutes=59))
    assert model.refresh(old).refresh_token == new
    clock.advance(timedelta(minutes=1))
    assert not model.is_refresh_token_alive(old)
    assert model.is_refresh_token_alive(new)


async def test_refresh_token_dies_101_days_after_issue(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    now = clock()
    almost = model.create_grant(
        "111", refresh_token_issued_at=now - 101 * DAY + timedelta(seconds=1)
    )
    dead = model.create_grant("222", refresh_token_issued_at=now - 101 * DAY)
    assert almost.x_refresh_token_expires_in == 1
    renewed = (await intuit.refresh(almost.refresh_token)).json()
    assert renewed["x_refresh_token_expires_in"] == REFRESH_TTL_S
    assert (await intuit.refresh(dead.refresh_token)).error == "invalid_grant"
    assert model.current_refresh_token("222") is None


async def test_hard_limit_caps_rotation_and_is_reported_only_on_request(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    granted_at = clock() - model.config.hard_limit + 2 * DAY
    seeded = model.create_grant(
        "111", granted_at=granted_at, refresh_token_issued_at=clock() - 30 * DAY
    )
    plain = (await intuit.refresh(seeded.refresh_token)).json()
    assert "x_refresh_token_hard_expires_in" not in plain
    assert plain["x_refresh_token_expires_in"] == 2 * 86400  # rotated, but capped
    clock.advance(timedelta(hours=1))
    told = (await intuit.refresh(plain["refresh_token"], hard=True)).json()
    assert told["x_refresh_token_hard_expires_in"] == 2 * 86400 - 3600
    clock.advance(2 * DAY - timedelta(hours=1))
    assert (await intuit.refresh(told["refresh_token"], hard=True)).error == "invalid_grant"


# -- revocation and client authentication ------------------------------------


@pytest.mark.parametrize("which", ["refresh_token", "access_token"])
async def test_revoke_kills_the_whole_grant(intuit: Caller, model: IntuitModel, which: str) -> None:
    seeded = model.create_grant("111")
    assert (await intuit.revoke(getattr(seeded, which))).status == 200
    assert (await intuit.refresh(seeded.refresh_token)).error == "invalid_grant"
    assert (await intuit.company_info("111", seeded.access_token)).status == 401
    assert (await intuit.revoke(seeded.refresh_token)).status == 200  # idempotent
    assert (await intuit.revoke("never-issued")).status == 200
    assert model.stats.revocations == 1


async def test_revoke_needs_client_credentials_and_a_token(intuit: Caller) -> None:
    wrong = aiohttp.encode_basic_auth("sim-client-id", "nope")
    assert (await intuit.revoke("x", basic=wrong)).status == 401
    missing = await intuit.request(
        "POST", intuit.sim.revoke_url, json={}, headers={"Authorization": intuit.basic}
    )
    assert (missing.status, missing.error) == (400, "invalid_request")


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        aiohttp.encode_basic_auth("sim-client-id", "wrong-secret"),
        aiohttp.encode_basic_auth("other-client", "sim-client-secret"),
        "Basic not-base64!",
        "Bearer sim-client-secret",
    ],
)
async def test_bad_client_credentials_are_invalid_client(
    intuit: Caller, model: IntuitModel, authorization: str
) -> None:
    token = model.create_grant("111").refresh_token
    answer = await intuit.token(
        {"grant_type": "refresh_token", "refresh_token": token}, Authorization=authorization
    )
    assert (answer.status, answer.error) == (401, "invalid_client")
    assert model.stats.refresh_calls == 0


async def test_malformed_token_requests(intuit: Caller) -> None:
    assert (await intuit.token({})).error == "invalid_request"
    assert (await intuit.token({"grant_type": "refresh_token"})).error == "invalid_request"
    assert (await intuit.token({"grant_type": "password"})).error == "unsupported_grant_type"
    assert (await intuit.refresh("sim-rt-unknown")).error == "invalid_grant"


# -- faults, as a client sees them -------------------------------------------


async def test_error_faults(intuit: Caller, sim: IntuitSimulator, model: IntuitModel) -> None:
    token = model.create_grant("111").refresh_token
    sim.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))
    sim.faults.add(Fault(FaultKind.HTML_ERROR))
    sim.faults.add(Fault(FaultKind.THROTTLED, seconds=2.5))
    sim.faults.add(Fault(FaultKind.INVALID_CLIENT))
    sim.faults.add(Fault(FaultKind.GARBAGE))
    sim.faults.add(Fault(FaultKind.GARBAGE, body='{"access_token": 42}'))

    unavailable = await intuit.refresh(token)
    assert (unavailable.status, unavailable.error) == (503, "server_error")
    html = await intuit.refresh(token)
    assert html.status == 502
    assert html.headers["Content-Type"].startswith("text/html")
    throttled = await intuit.refresh(token)
    assert (throttled.status, throttled.headers["Retry-After"]) == (429, "3")
    assert (await intuit.refresh(token)).error == "invalid_client"
    garbage = await intuit.refresh(token)
    assert garbage.status == 200
    with pytest.raises(json.JSONDecodeError):
        garbage.json()
    assert (await intuit.refresh(token)).json() == {"access_token": 42}

    assert (await intuit.refresh(token)).status == 200  # the plan is used up
    assert (sim.faults.served, model.stats.refresh_calls) == (6, 1)


async def test_delay_fault_answers_late(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel
) -> None:
    token = model.create_grant("111").refresh_token
    sim.faults.add(Fault(FaultKind.DELAY, seconds=0.3))
    started = time.monotonic()
    assert (await intuit.refresh(token)).status == 200
    assert time.monotonic() - started >= 0.3


async def test_delay_fault_trips_a_client_timeout(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel
) -> None:
    token = model.create_grant("111").refresh_token
    sim.faults.add(Fault(FaultKind.DELAY, seconds=5))
    with pytest.raises(TimeoutError):
        await intuit.request(
            "POST",
            sim.token_url,
            data={"grant_type": "refresh_token", "refresh_token": token},
            headers={"Authorization": intuit.basic},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    # The fixture then stops the simulator while the handler still sleeps.


async def test_reset_fault_drops_the_connection(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel
) -> None:
    token = model.create_grant("111").refresh_token
    sim.faults.add(Fault(FaultKind.RESET))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await intuit.refresh(token)
    assert (await intuit.refresh(token)).status == 200


async def test_rotate_then_fail_rotates_server_side_and_loses_the_answer(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel, clock: FakeClock
) -> None:
    old = model.create_grant("111").refresh_token
    clock.advance(DAY)
    sim.faults.add(Fault(FaultKind.ROTATE_THEN_FAIL))
    assert (await intuit.refresh(old)).status == 500
    assert model.current_refresh_token("111") not in (None, old)
    assert (await intuit.refresh(old)).error == "invalid_grant"


async def test_fault_matching_by_realm_endpoint_count_and_order(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel
) -> None:
    mine, other = model.create_grant("111"), model.create_grant("222")
    sim.faults.add(Fault(FaultKind.SERVER_ERROR, status=500, realm_id="111"), times=2)
    sim.faults.add(Fault(FaultKind.SERVER_ERROR, status=502))
    sim.faults.add(Fault(FaultKind.SERVER_ERROR, endpoint="revoke"))
    assert (await intuit.refresh(other.refresh_token)).status == 502
    assert (await intuit.refresh(other.refresh_token)).status == 200
    assert [(await intuit.refresh(mine.refresh_token)).status for _ in range(3)] == [500, 500, 200]
    assert (await intuit.revoke(other.refresh_token)).status == 500
    assert model.is_refresh_token_alive(other.refresh_token)

    sim.faults.add_forever(Fault(FaultKind.THROTTLED, endpoint="any"))
    assert (await intuit.revoke(other.refresh_token)).status == 429
    assert (await intuit.refresh(mine.refresh_token)).status == 429
    sim.faults.clear()
    assert (await intuit.refresh(mine.refresh_token)).status == 200


async def test_a_delay_fault_does_not_hold_up_shutdown(model: IntuitModel) -> None:
    token = model.create_grant("111").refresh_token
    faults = FaultPlan()
    faults.add(Fault(FaultKind.DELAY, seconds=30))
    async with aiohttp.ClientSession() as session:
        sim = IntuitSimulator(model, faults)
        await sim.start()
        caller = Caller(session, sim)
        request = asyncio.create_task(caller.refresh(token))
        await eventually(lambda: faults.served == 1, what="the request in its delay")
        started = time.monotonic()
        await sim.stop()
        assert time.monotonic() - started < 1
        with pytest.raises(aiohttp.ClientConnectionError):
            await request


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="5xx"):
        Fault(FaultKind.SERVER_ERROR, status=404)
    with pytest.raises(ValueError, match="seconds"):
        Fault(FaultKind.DELAY, seconds=-1)
    with pytest.raises(ValueError, match="times"):
        FaultPlan().add(Fault(FaultKind.RESET), times=0)
    assert Fault.from_json({"kind": "delay", "seconds": 2}) == Fault(FaultKind.DELAY, seconds=2)
    with pytest.raises(ValueError, match="kind"):
        Fault.from_json({"kind": "meteor"})


# -- the accounting API stand-in, intuit_tid, admin ---------------------------


async def test_company_info_takes_only_a_live_access_token_for_its_realm(
    intuit: Caller, model: IntuitModel, clock: FakeClock
) -> None:
    mine, other = model.create_grant("111"), model.create_grant("222")
    assert (await intuit.company_info("111", mine.access_token)).status == 200
    assert (await intuit.company_info("111", other.access_token)).status == 401
    missing = await intuit.request("GET", intuit.sim.company_info_url("111"))
    assert missing.status == 401
    clock.advance(timedelta(hours=1))
    assert (await intuit.company_info("111", mine.access_token)).status == 401


async def test_every_response_has_its_own_intuit_tid(
    intuit: Caller, sim: IntuitSimulator, model: IntuitModel
) -> None:
    token = model.create_grant("111").refresh_token
    sim.faults.add(Fault(FaultKind.HTML_ERROR))
    answers = [
        await intuit.refresh(token),
        await intuit.refresh(token),
        await intuit.refresh("unknown"),
        await intuit.consent(),
        await intuit.consent(client_id="x"),
        await intuit.company_info("111", "unknown"),
        await intuit.revoke("unknown"),
        await intuit.request("GET", sim.base_url + "/_simulator/stats"),
        await intuit.request("GET", sim.base_url + "/no/such/path"),
    ]
    assert [a.status for a in answers] == [502, 200, 400, 302, 400, 401, 200, 200, 404]
    assert len({a.headers[TID_HEADER] for a in answers}) == len(answers)


async def test_admin_endpoints(intuit: Caller, sim: IntuitSimulator, model: IntuitModel) -> None:
    faults_url = sim.base_url + "/_simulator/faults"
    token = model.create_grant("111").refresh_token
    added = await intuit.request(
        "POST", faults_url, json={"kind": "server_error", "status": 503, "times": 2}
    )
    assert (added.status, added.json()["times"]) == (201, 2)
    assert (await intuit.refresh(token)).status == 503
    for bad in ({"kind": "meteor"}, {"kind": "reset", "times": 0}, {"kind": "delay", "x": 1}):
        assert (await intuit.request("POST", faults_url, json=bad)).status == 400
    cleared = await intuit.request("DELETE", faults_url)
    assert cleared.json() == {"cleared": 1}
    await intuit.request("POST", faults_url, json={"kind": "throttled", "forever": True})
    assert [(await intuit.refresh(token)).status for _ in range(2)] == [429, 429]
    await intuit.request("DELETE", faults_url)
    assert (await intuit.refresh(token)).status == 200

    stats = (await intuit.request("GET", sim.base_url + "/_simulator/stats")).json()
    assert stats["refresh_calls"] == 1
    assert stats["refresh_calls_by_realm"] == {"111": 1}
    assert stats["faults"]["served"] == 3
    assert (await intuit.request("GET", faults_url)).json()["pending"] == []


# -- the model on its own ----------------------------------------------------


def test_create_grant_replaces_the_previous_grant(model: IntuitModel) -> None:
    first = model.create_grant("111")
    second = model.create_grant("111")
    assert not model.is_refresh_token_alive(first.refresh_token)
    assert not model.access_token_valid(first.access_token, "111")
    assert model.access_token_valid(second.access_token, "111")
    assert second.refresh_token not in repr(second)


def test_memory_stays_bounded_over_a_long_simulation(clock: FakeClock) -> None:
    model = IntuitModel(SimulatorConfig(strict_rotation=True), clock)
    token = model.create_grant("111").refresh_token
    for _ in range(2_000):
        clock.advance(timedelta(minutes=5))
        token = model.refresh(token).refresh_token
    footprint = model.footprint()
    assert footprint["refresh_tokens"] == 1
    assert footprint["access_tokens"] <= ACCESS_TOKENS_KEPT_PER_GRANT
    for realm in range(10_000):
        model.create_grant(f"r{realm}")
    assert model.footprint()["grants"] == 10_001
    assert model.footprint()["access_tokens"] <= 10_000 + ACCESS_TOKENS_KEPT_PER_GRANT
