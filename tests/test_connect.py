"""Connect, reconnect, watch, disconnect: the lifecycle the applications need, end to end.

A customer's browser is an aiohttp session with a cookie jar that follows no
redirect by itself: each hop (the broker's link, Intuit's consent page, the
callback) is checked on the way.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.devtools.fake_intuit import Fault, FaultKind, IntuitSimulator
from tests.conftest import StartBroker
from tests.pki import Authority
from tests.support import RunningBroker, error_info
from tests.test_access import caller

APP = "https://app.example.com/quickbooks/connected"
REALM = "9130359000000001"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def broker(start_broker: StartBroker) -> RunningBroker:
    port = free_port()
    return await start_broker(
        http_addr=f"127.0.0.1:{port}",
        redirect_uri=f"http://127.0.0.1:{port}/oauth/callback",
        connect_return_urls=(APP, "https://app.example.com/other/"),
        watch_heartbeat=timedelta(seconds=1),
        disable_background_refresh=True,
    )


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    jar = aiohttp.CookieJar(unsafe=True)  # the broker listens on an IP address
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        yield session


async def link(broker: RunningBroker, user_id: str, return_url: str = APP) -> str:
    reply = await broker.admin.CreateConnectLink(
        pb.CreateConnectLinkRequest(user_id=user_id, return_url=return_url), timeout=10
    )
    return reply.url


@dataclass
class Hop:
    status: int
    location: str | None
    body: str
    headers: dict[str, str]


async def get(browser: aiohttp.ClientSession, url: str) -> Hop:
    async with browser.get(url, allow_redirects=False) as answer:
        return Hop(
            answer.status, answer.headers.get("Location"), await answer.text(), dict(answer.headers)
        )


async def to_intuit(browser: aiohttp.ClientSession, url: str) -> str:
    """Open the broker's link; returns the Intuit consent URL it sent the browser to."""
    hop = await get(browser, url)
    assert hop.status == 302, hop.body
    assert hop.location is not None
    return hop.location


async def consent(browser: aiohttp.ClientSession, intuit_url: str, realm_id: str) -> str:
    """The customer picks a company and allows: returns the callback URL Intuit sends back."""
    hop = await get(browser, f"{intuit_url}&realm_id={realm_id}")
    assert hop.status == 302, hop.body
    assert hop.location is not None
    return hop.location


async def connect(
    broker: RunningBroker, browser: aiohttp.ClientSession, user_id: str, realm_id: str
) -> Hop:
    callback = await consent(
        browser, await to_intuit(browser, await link(broker, user_id)), realm_id
    )
    return await get(browser, callback)


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


# -- the happy path -----------------------------------------------------------------------------


async def test_a_customer_connects_a_company_end_to_end(
    broker: RunningBroker, browser: aiohttp.ClientSession, intuit: IntuitSimulator
) -> None:
    started = time.monotonic()
    url = await link(broker, "alice@example.com", APP + "?from=settings")
    assert url.startswith(f"http://127.0.0.1:{broker.broker.http_port}/oauth/connect?session=")

    intuit_url = await to_intuit(browser, url)
    asked = query_of(intuit_url)
    assert intuit_url.startswith(intuit.auth_url)
    assert asked["response_type"] == "code"
    assert asked["scope"] == "com.intuit.quickbooks.accounting"
    assert asked["redirect_uri"] == broker.broker.settings.redirect_uri
    assert len(asked["state"]) >= 40  # 256 random bits
    finished = await get(browser, await consent(browser, intuit_url, REALM))
    took = time.monotonic() - started

    assert finished.status == 302
    assert finished.location is not None
    back = query_of(finished.location)
    assert finished.location.startswith(APP + "?")
    assert back == {"from": "settings", "outcome": "connected", "realm_id": REALM}
    reply = await broker.tokens.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="alice@example.com"), timeout=10
    )
    assert reply.realm_id == REALM
    assert broker.token_works(REALM, reply.access_token)
    connection = await broker.connection(REALM)
    assert connection.user_id == "alice@example.com"
    assert connection.status == pb.CONNECTION_STATUS_ACTIVE
    assert connection.reconnect_deadline.seconds > 0  # Intuit's five-year limit, from day one
    assert intuit.stats.code_exchanges == 1
    print(f"connect flow end to end: {took * 1000:.1f} ms")


async def test_pages_are_plain_and_never_cached(
    broker: RunningBroker, browser: aiohttp.ClientSession
) -> None:
    url = await link(broker, "alice@example.com")
    await to_intuit(browser, url)
    again = await get(browser, url)  # the link is used up: a page says so

    assert again.status == 400
    assert again.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in again.headers["Content-Security-Policy"]
    assert again.headers["Referrer-Policy"] == "no-referrer"
    assert "<script" not in again.body.lower()
    assert "style=" not in again.body.lower()


# -- links --------------------------------------------------------------------------------------


async def test_an_expired_or_reused_link_starts_nothing(
    broker: RunningBroker, browser: aiohttp.ClientSession
) -> None:
    used = await link(broker, "alice@example.com")
    await to_intuit(browser, used)
    assert (await get(browser, used)).status == 400

    stale = await link(broker, "alice@example.com")
    broker.clock.advance(timedelta(minutes=11))
    assert (await get(browser, stale)).status == 400
    assert (await get(browser, used.replace("session=", "session=x"))).status == 400


@pytest.mark.parametrize(
    "return_url",
    [
        "https://evil.example.com/quickbooks/connected",
        "https://app.example.com.evil.example/quickbooks/connected",
        "https://app.example.com/quickbooks",  # above the allowed path
        "http://app.example.com/quickbooks/connected",  # not https
        "https://user@app.example.com/quickbooks/connected",
        "javascript:alert(1)",
    ],
)
async def test_a_return_url_off_the_allow_list_gets_no_link(
    broker: RunningBroker, return_url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await link(broker, "alice@example.com", return_url)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# -- the callback, as an attacker or a hurried customer sends it -------------------------------


async def stored(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM quickbooks_connections")
    return count


async def test_a_forged_or_missing_state_stores_nothing_and_exchanges_nothing(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    parts = query_of(callback)
    base = f"http://127.0.0.1:{broker.broker.http_port}/oauth/callback"
    forged = {**parts, "state": "x" * 43}
    missing = {key: value for key, value in parts.items() if key != "state"}

    for query in (forged, missing):
        hop = await get(browser, f"{base}?{urlencode(query)}")
        assert hop.status == 400, query

    assert intuit.stats.code_exchanges == 0
    assert await stored(db) == 0


async def test_a_replayed_callback_is_refused(
    broker: RunningBroker, browser: aiohttp.ClientSession, intuit: IntuitSimulator
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    assert (await get(browser, callback)).status == 302
    assert (await get(browser, callback)).status == 400
    assert intuit.stats.code_exchanges == 1


async def test_a_callback_in_another_browser_is_refused(
    broker: RunningBroker, browser: aiohttp.ClientSession, intuit: IntuitSimulator
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        assert (await get(other, callback)).status == 400
    assert intuit.stats.code_exchanges == 0
    assert (await get(browser, callback)).status == 400  # the state is spent either way


async def test_a_customer_who_cancels_is_sent_back_with_nothing_stored(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    intuit_url = await to_intuit(browser, await link(broker, "a"))
    state = query_of(intuit_url)["state"]
    base = f"http://127.0.0.1:{broker.broker.http_port}/oauth/callback"
    hop = await get(browser, f"{base}?{urlencode({'error': 'access_denied', 'state': state})}")

    assert hop.status == 302
    assert hop.location is not None
    assert query_of(hop.location) == {"outcome": "denied"}
    assert intuit.stats.code_exchanges == 0
    assert await stored(db) == 0


async def test_intuit_down_during_the_exchange_stores_nothing(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))
    hop = await get(browser, callback)

    assert hop.status == 302
    assert hop.location is not None
    assert query_of(hop.location) == {"outcome": "intuit_unavailable", "realm_id": REALM}
    assert await stored(db) == 0


async def test_a_callback_naming_another_company_is_refused_and_the_grant_given_back(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    """Consent for company X, then edit the callback to name company Y: Y is not taken."""
    victim = "9130359000000077"
    callback = await consent(browser, await to_intuit(browser, await link(broker, "m")), REALM)
    tampered = callback.replace(f"realmId={REALM}", f"realmId={victim}")
    assert tampered != callback
    hop = await get(browser, tampered)

    assert hop.location is not None
    assert query_of(hop.location) == {"outcome": "error", "realm_id": victim}
    assert await stored(db) == 0
    assert intuit.stats.code_exchanges == 1
    assert intuit.stats.revocations == 1  # the grant for X nobody will hold is given back
    assert intuit.model.current_refresh_token(REALM) is None


async def test_a_company_intuit_cannot_confirm_is_not_stored_and_the_grant_given_back(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503, endpoint="company_info"))
    hop = await get(browser, callback)

    assert hop.location is not None
    assert query_of(hop.location) == {"outcome": "intuit_unavailable", "realm_id": REALM}
    assert await stored(db) == 0
    assert intuit.stats.revocations == 1


async def test_a_grant_the_database_will_not_take_is_given_back(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    db: asyncpg.Connection,
) -> None:
    callback = await consent(browser, await to_intuit(browser, await link(broker, "a")), REALM)
    # The row cannot be written (a constraint the broker did not expect stands in for a
    # database that fails at that moment).
    await db.execute(
        "ALTER TABLE quickbooks_connections ADD CONSTRAINT no_new_rows CHECK (realm_id <> $$"
        + REALM
        + "$$) NOT VALID"
    )
    hop = await get(browser, callback)

    assert hop.status >= 400
    assert await stored(db) == 0
    assert intuit.stats.code_exchanges == 1
    assert intuit.stats.revocations == 1
    assert intuit.model.current_refresh_token(REALM) is None


async def test_a_link_connects_only_the_companies_its_caller_may(
    start_broker: StartBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    tmp_path: Path,
) -> None:
    authority = Authority("connect test CA")
    cert, key = authority.server("localhost", "127.0.0.1").write(tmp_path, "server")
    clients_ca = tmp_path / "clients-ca.pem"
    clients_ca.write_bytes(authority.pem)
    onboarding = authority.client("onboarding", uris=("spiffe://platform/onboarding",))
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "name": "connect-test",
                "allow_rules": [
                    {
                        "name": "onboarding-connects-9130351",
                        "source": {"principals": ["spiffe://platform/onboarding"]},
                        "request": {
                            "paths": ["/qbo.broker.v1.ConnectionAdminService/CreateConnectLink"]
                        },
                        "realms": ["9130351*"],
                    }
                ],
            }
        )
    )
    port = free_port()
    broker = await start_broker(
        http_addr=f"127.0.0.1:{port}",
        redirect_uri=f"http://127.0.0.1:{port}/oauth/callback",
        connect_return_urls=(APP,),
        tls_cert_file=cert,
        tls_key_file=key,
        tls_client_ca_file=clients_ca,
        authz_policy_file=policy,
        disable_background_refresh=True,
    )
    async with caller(broker, authority.pem, onboarding) as channel:
        admin = pb_grpc.ConnectionAdminServiceStub(channel)

        async def its_link() -> str:
            request = pb.CreateConnectLinkRequest(user_id="onboarded", return_url=APP)
            return (await admin.CreateConnectLink(request, timeout=10)).url

        outside = await get(
            browser, await consent(browser, await to_intuit(browser, await its_link()), REALM)
        )
        browser.cookie_jar.clear()
        inside_realm = "9130351000000001"
        inside = await get(
            browser,
            await consent(browser, await to_intuit(browser, await its_link()), inside_realm),
        )

    assert outside.location is not None
    assert query_of(outside.location) == {"outcome": "not_permitted", "realm_id": REALM}
    assert inside.location is not None
    assert query_of(inside.location) == {"outcome": "connected", "realm_id": inside_realm}
    assert intuit.stats.code_exchanges == 1  # the refused company's code was never exchanged


async def test_a_company_connected_to_another_user_is_never_moved(
    broker: RunningBroker,
    browser: aiohttp.ClientSession,
    intuit: IntuitSimulator,
) -> None:
    assert (await connect(broker, browser, "alice", REALM)).status == 302
    browser.cookie_jar.clear()
    hop = await connect(broker, browser, "mallory", REALM)

    assert hop.location is not None
    assert query_of(hop.location)["outcome"] == "owned_by_another_user"
    assert (await broker.connection(REALM)).user_id == "alice"
    assert intuit.stats.code_exchanges == 1  # mallory's code was never exchanged


async def test_reconnecting_after_invalid_grant_makes_the_connection_active_again(
    broker: RunningBroker, browser: aiohttp.ClientSession, intuit: IntuitSimulator
) -> None:
    await connect(broker, browser, "alice", REALM)
    intuit.model.revoke(intuit.model.current_refresh_token(REALM) or "")
    broker.clock.advance(timedelta(hours=2))
    assert await broker.get_token_expecting_error(REALM) is grpc.StatusCode.FAILED_PRECONDITION
    assert (await broker.connection(REALM)).lost_cause == pb.LOST_CAUSE_REVOKED_AT_INTUIT

    browser.cookie_jar.clear()
    hop = await connect(broker, browser, "alice", REALM)

    assert hop.location is not None
    assert query_of(hop.location)["outcome"] == "connected"
    connection = await broker.connection(REALM)
    assert connection.status == pb.CONNECTION_STATUS_ACTIVE
    assert connection.lost_cause == pb.LOST_CAUSE_UNSPECIFIED
    reply = await broker.get_token(REALM)
    assert broker.token_works(REALM, reply.access_token)


async def test_a_link_needs_the_redirect_uri_configured(start_broker: StartBroker) -> None:
    broker = await start_broker(redirect_uri="")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await link(broker, "alice", "")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "CONNECT_NOT_CONFIGURED"


# -- watching -----------------------------------------------------------------------------------


async def test_watchers_hear_a_connection_lost_and_a_new_one_connected(
    broker: RunningBroker, browser: aiohttp.ClientSession, intuit: IntuitSimulator
) -> None:
    await broker.seed("9130350000000001", "bob", access_token_left=None)
    stream = broker.admin.WatchConnections(pb.WatchConnectionsRequest(), timeout=30)
    first = await next_event(stream)
    assert first.WhichOneof("event") == "heartbeat"  # nothing happened yet

    intuit.model.revoke(intuit.model.current_refresh_token("9130350000000001") or "")
    await broker.get_token_expecting_error("9130350000000001")
    lost = await next_connection(stream)
    assert lost.realm_id == "9130350000000001"
    assert lost.status == pb.CONNECTION_STATUS_REAUTHORIZATION_REQUIRED
    assert lost.lost_cause == pb.LOST_CAUSE_REVOKED_AT_INTUIT

    await connect(broker, browser, "alice", REALM)
    connected = await next_connection(stream)
    assert (connected.realm_id, connected.status) == (REALM, pb.CONNECTION_STATUS_ACTIVE)

    await broker.admin.DeleteConnection(pb.DeleteConnectionRequest(realm_id=REALM))
    while (event := await next_event(stream)).WhichOneof("event") != "deleted_realm_id":
        pass
    assert event.deleted_realm_id == REALM
    stream.cancel()


async def next_event(stream: Any) -> pb.WatchConnectionsResponse:
    event: pb.WatchConnectionsResponse = await asyncio.wait_for(stream.read(), 10)
    return event


async def next_connection(stream: Any) -> pb.Connection:
    while (event := await next_event(stream)).WhichOneof("event") != "connection":
        pass
    return event.connection


# -- deleting -----------------------------------------------------------------------------------


async def test_delete_revokes_at_intuit_and_forgets_everything(
    broker: RunningBroker, intuit: IntuitSimulator, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM)
    grant = intuit.model.current_refresh_token(REALM) or ""
    await broker.get_token(REALM)  # warm in memory too

    reply = await broker.admin.DeleteConnection(pb.DeleteConnectionRequest(realm_id=REALM))

    assert reply.realm_id == REALM
    assert not intuit.model.is_refresh_token_alive(grant)
    assert await stored(db) == 0
    assert await broker.get_token_expecting_error(REALM) is grpc.StatusCode.NOT_FOUND


async def test_delete_while_intuit_is_down_changes_nothing(
    broker: RunningBroker, intuit: IntuitSimulator, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM)
    intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503, endpoint="revoke"))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.admin.DeleteConnection(pb.DeleteConnectionRequest(realm_id=REALM))

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await stored(db) == 1
    assert broker.token_works(REALM, (await broker.get_token(REALM)).access_token)


async def test_a_connection_already_dead_at_intuit_is_deleted(
    broker: RunningBroker, intuit: IntuitSimulator, db: asyncpg.Connection
) -> None:
    await broker.seed(REALM, access_token_left=None)
    intuit.model.revoke(intuit.model.current_refresh_token(REALM) or "")
    await broker.get_token_expecting_error(REALM)  # now reauthorization_required

    await broker.admin.DeleteConnection(pb.DeleteConnectionRequest(realm_id=REALM))

    assert await stored(db) == 0
