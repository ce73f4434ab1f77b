"""The Intuit OAuth client against the simulated Intuit over real HTTP on loopback.

What the token service relies on: every field of a good answer is parsed, every
bad answer is classified (dead grant, wrong app credentials, or "Intuit is in
trouble, keep the token"), nothing is ever retried (a lost answer may have
rotated the token), and no token or secret reaches a log line.

Every test puts a no-op fault behind the ones it injects (``watch``), so
``intuit.faults.served`` counts every request that reached the simulator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web

from broker.clock import FakeClock
from broker.devtools.fake_intuit import Fault, FaultKind, IntuitSimulator, TokenResponse
from broker.errors import ClientRejected, InvalidGrant, UpstreamUnavailable
from broker.intuit.endpoints import TID_HEADER
from broker.intuit.oauth import IntuitOAuthClient
from broker.settings import Secret

CLIENT_TIMEOUT_S = 1.0
REDIRECT_URI = "http://127.0.0.1:9/oauth/callback"
REALM = "9130355000000001"
TID = re.compile(r"1-[0-9a-f]{8}-[0-9a-f]{24}")
ACCESS_TTL = timedelta(hours=1)
REFRESH_TTL = timedelta(seconds=8_726_400)  # 101 days
HARD_LIMIT = timedelta(days=5 * 365)
MAX_BODY = 64 * 1024


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def client_for(
    session: aiohttp.ClientSession,
    target: IntuitSimulator,
    *,
    secret: str | None = None,
    token_url: str | None = None,
) -> IntuitOAuthClient:
    config = target.model.config
    return IntuitOAuthClient(
        session,
        client_id=config.client_id,
        client_secret=Secret(config.client_secret if secret is None else secret),
        token_url=token_url or target.token_url,
        revoke_url=target.revoke_url,
        redirect_uri=REDIRECT_URI,
        api_url=target.api_base_url,
    )


@pytest.fixture
def client(session: aiohttp.ClientSession, intuit: IntuitSimulator) -> IntuitOAuthClient:
    return client_for(session, intuit)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def watch(intuit: IntuitSimulator, *faults: Fault) -> None:
    """Serve ``faults`` once each, in order, then count every later request as a no-op fault."""
    for fault in faults:
        intuit.faults.add(fault)
    intuit.faults.add_forever(Fault(FaultKind.DELAY, seconds=0, endpoint="any"))


def requests_seen(intuit: IntuitSimulator) -> int:
    return intuit.faults.served


def grant(intuit: IntuitSimulator, clock: FakeClock, age: timedelta) -> TokenResponse:
    """A live grant at the simulator whose refresh token (and grant) is ``age`` old."""
    return intuit.model.create_grant(REALM, refresh_token_issued_at=clock() - age)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything the captured records say, structured ``extra`` fields included."""
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(vars(record)))
    return "\n".join(parts)


# -- success -------------------------------------------------------------------------------


async def test_refresh_parses_every_field_intuit_sends(
    client: IntuitOAuthClient,
    intuit: IntuitSimulator,
    clock: FakeClock,
    logs: pytest.LogCaptureFixture,
) -> None:
    age = timedelta(hours=10)  # inside the 24 h window: Intuit returns the same refresh token
    seeded = grant(intuit, clock, age)
    watch(intuit)

    issued = await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert issued.refresh_token == seeded.refresh_token == intuit.model.current_refresh_token(REALM)
    assert issued.access_token is not None
    assert issued.access_token != seeded.access_token
    assert intuit.model.access_token_valid(issued.access_token, REALM)
    assert issued.expires_in == ACCESS_TTL
    # The same refresh token keeps counting down: the client must not assume 101 days.
    assert issued.refresh_token_expires_in == REFRESH_TTL - age
    # Only present because the client sent x-include-refresh-token-hard-expires-in: true.
    assert issued.hard_expires_in == HARD_LIMIT - age
    assert issued.intuit_tid is not None
    assert TID.fullmatch(issued.intuit_tid)
    assert issued.intuit_tid in logs.text  # the same tid the simulator stamped and logged
    assert requests_seen(intuit) == 1
    assert intuit.stats.refresh_calls == 1


async def test_refresh_after_the_rotation_window_returns_the_new_refresh_token(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=2))

    issued = await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert issued.refresh_token != seeded.refresh_token
    assert issued.refresh_token == intuit.model.current_refresh_token(REALM)
    assert not intuit.model.is_refresh_token_alive(seeded.refresh_token)
    assert issued.refresh_token_expires_in == REFRESH_TTL
    assert issued.hard_expires_in == HARD_LIMIT - timedelta(days=2)


async def test_code_exchange_opens_a_grant_and_a_reused_code_is_invalid_grant(
    client: IntuitOAuthClient, intuit: IntuitSimulator
) -> None:
    code = intuit.model.authorize(REALM, redirect_uri=REDIRECT_URI)
    watch(intuit)

    issued = await client.exchange_code(code, realm_id=REALM)

    assert intuit.stats.code_exchanges == 1
    assert requests_seen(intuit) == 1
    assert issued.access_token is not None
    assert intuit.model.access_token_valid(issued.access_token, REALM)
    assert issued.refresh_token == intuit.model.current_refresh_token(REALM)
    assert issued.expires_in == ACCESS_TTL
    assert issued.refresh_token_expires_in == REFRESH_TTL
    assert issued.hard_expires_in == HARD_LIMIT
    assert issued.intuit_tid is not None

    with pytest.raises(InvalidGrant):
        await client.exchange_code(code, realm_id=REALM)
    # Intuit kills the grant of a reused code; the first exchange's tokens are dead too.
    assert not intuit.model.is_refresh_token_alive(issued.refresh_token)


async def test_revoke_kills_the_whole_grant_at_intuit(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit)

    await client.revoke(seeded.refresh_token, realm_id=REALM)

    assert requests_seen(intuit) == 1
    assert intuit.stats.revocations == 1
    assert not intuit.model.is_refresh_token_alive(seeded.refresh_token)
    assert not intuit.model.access_token_valid(seeded.access_token, REALM)
    with pytest.raises(InvalidGrant):
        await client.refresh(seeded.refresh_token, realm_id=REALM)


async def test_revoking_a_token_intuit_does_not_know_is_not_an_error(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit)

    await client.revoke("sim-rt-nobody-knows-this-one", realm_id=REALM)

    assert requests_seen(intuit) == 1
    assert intuit.stats.revocations == 0
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)


async def test_revoke_with_wrong_app_credentials_is_client_rejected_not_success(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    client = client_for(session, intuit, secret="not-the-registered-secret")

    with pytest.raises(ClientRejected):
        await client.revoke(seeded.refresh_token, realm_id=REALM)
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)


async def test_revoke_while_intuit_fails_is_upstream_unavailable(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.SERVER_ERROR, status=503, endpoint="revoke"))

    with pytest.raises(UpstreamUnavailable):
        await client.revoke(seeded.refresh_token, realm_id=REALM)
    assert requests_seen(intuit) == 1
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)


# -- a dead grant, a wrong app --------------------------------------------------------------


async def test_an_unknown_refresh_token_is_invalid_grant(
    client: IntuitOAuthClient, intuit: IntuitSimulator
) -> None:
    watch(intuit)

    with pytest.raises(InvalidGrant) as caught:
        await client.refresh("sim-rt-never-issued", realm_id=REALM)

    assert caught.value.intuit_tid is not None
    assert requests_seen(intuit) == 1
    assert intuit.stats.invalid_grants == 1


async def test_a_rotated_away_refresh_token_is_invalid_grant(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=2))
    await client.refresh(seeded.refresh_token, realm_id=REALM)  # rotates

    with pytest.raises(InvalidGrant):
        await client.refresh(seeded.refresh_token, realm_id=REALM)


async def test_a_wrong_client_secret_is_client_rejected_and_logged_loudly_without_the_secret(
    session: aiohttp.ClientSession,
    intuit: IntuitSimulator,
    clock: FakeClock,
    logs: pytest.LogCaptureFixture,
) -> None:
    wrong_secret = "wrong-secret-Zq8vX3pL"
    seeded = grant(intuit, clock, timedelta(days=3))
    client = client_for(session, intuit, secret=wrong_secret)
    watch(intuit)

    with pytest.raises(ClientRejected) as caught:
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert not isinstance(caught.value, InvalidGrant)
    assert requests_seen(intuit) == 1
    # The grant is fine: it is the broker's configuration that is wrong.
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)
    errors = [r for r in logs.records if r.levelno >= logging.ERROR]
    assert any("QB_CLIENT_SECRET" in r.getMessage() for r in errors)
    assert all(getattr(r, "realm_id", None) == REALM for r in errors)
    assert wrong_secret not in log_text(logs)
    assert wrong_secret not in str(caught.value)


# -- Intuit in trouble: keep the token, try later ---------------------------------------------

_GOOD_FIELDS = {
    "token_type": "bearer",
    "access_token": "sim-at-shape",
    "refresh_token": "sim-rt-shape",
    "expires_in": 3600,
    "x_refresh_token_expires_in": 8_726_400,
}


def _shaped(**changes: object) -> str:
    fields: dict[str, object] = {**_GOOD_FIELDS, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not None})


_DELETE = None  # a field set to None is left out of the body


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(FaultKind.SERVER_ERROR), id="500"),
        pytest.param(Fault(FaultKind.SERVER_ERROR, status=502), id="502"),
        pytest.param(Fault(FaultKind.SERVER_ERROR, status=503), id="503"),
        pytest.param(Fault(FaultKind.HTML_ERROR), id="html-502"),
        pytest.param(Fault(FaultKind.HTML_ERROR, status=504), id="html-504"),
        pytest.param(Fault(FaultKind.RESET), id="reset"),
        pytest.param(Fault(FaultKind.GARBAGE), id="not-json"),
        pytest.param(Fault(FaultKind.GARBAGE, body=""), id="empty-body"),
        pytest.param(Fault(FaultKind.GARBAGE, body="[]"), id="json-array"),
        pytest.param(Fault(FaultKind.GARBAGE, body="null"), id="json-null"),
        pytest.param(Fault(FaultKind.GARBAGE, body='{"access_token": 42}'), id="access-token-42"),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(refresh_token=_DELETE)), id="no-refresh-token"
        ),
        pytest.param(Fault(FaultKind.GARBAGE, body=_shaped(refresh_token="")), id="empty-refresh"),
        pytest.param(
            Fault(FaultKind.GARBAGE, status=404, body="<html>Not Found</html>"), id="html-404"
        ),
    ],
)
async def test_intuit_trouble_is_upstream_unavailable_after_exactly_one_request(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock, fault: Fault
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, fault)

    with pytest.raises(UpstreamUnavailable):
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert requests_seen(intuit) == 1, "the client must never retry on its own"
    assert intuit.stats.refresh_calls == 0
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)


@pytest.mark.parametrize(
    ("fault", "access_usable"),
    [
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(access_token=_DELETE)),
            False,
            id="no-access-token",
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(expires_in=-5)), False, id="negative-expiry"
        ),
        pytest.param(Fault(FaultKind.GARBAGE, body=_shaped(expires_in=0)), False, id="zero-expiry"),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(expires_in="soon")), False, id="word-expiry"
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(expires_in=True)), False, id="bool-expiry"
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(expires_in=3600.5)), False, id="float-expiry"
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(x_refresh_token_expires_in=_DELETE)),
            True,
            id="no-refresh-expiry",
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(x_refresh_token_hard_expires_in=-1)),
            True,
            id="negative-hard-expiry",
        ),
        pytest.param(
            Fault(FaultKind.GARBAGE, body=_shaped(access_token="a" * 10_000)),
            False,
            id="huge-token",
        ),
    ],
)
async def test_an_odd_answer_with_a_usable_refresh_token_keeps_the_refresh_token(
    client: IntuitOAuthClient,
    intuit: IntuitSimulator,
    clock: FakeClock,
    fault: Fault,
    access_usable: bool,
) -> None:
    """Intuit may already have rotated: the refresh token in the answer may be the only live one."""
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, fault)

    issued = await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert issued.refresh_token == "sim-rt-shape"
    assert (issued.access_token is not None) is access_usable
    assert timedelta(0) < issued.refresh_token_expires_in <= timedelta(days=101)
    assert requests_seen(intuit) == 1


async def test_throttling_is_upstream_unavailable_with_intuits_retry_after(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.THROTTLED, seconds=7))

    with pytest.raises(UpstreamUnavailable) as caught:
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert caught.value.retry_after == timedelta(seconds=7)
    assert caught.value.intuit_tid is not None
    assert requests_seen(intuit) == 1


async def test_an_answer_slower_than_the_timeout_is_upstream_unavailable(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.DELAY, seconds=CLIENT_TIMEOUT_S + 0.5))

    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable):
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert time.monotonic() - started < CLIENT_TIMEOUT_S + 0.4
    assert requests_seen(intuit) == 1


async def test_the_invalid_client_fault_is_client_rejected(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.INVALID_CLIENT))

    with pytest.raises(ClientRejected):
        await client.refresh(seeded.refresh_token, realm_id=REALM)
    assert requests_seen(intuit) == 1
    assert intuit.model.is_refresh_token_alive(seeded.refresh_token)


async def test_a_lost_answer_after_rotation_is_not_retried(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    # Intuit rotated the token but the answer was a 500: a retry with the old token would
    # get invalid_grant and make the connection look dead. The caller decides what next.
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.ROTATE_THEN_FAIL))

    with pytest.raises(UpstreamUnavailable):
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert requests_seen(intuit) == 1
    assert intuit.stats.rotations == 1
    assert intuit.stats.invalid_grants == 0


@pytest.mark.parametrize("status", [500, 503])
async def test_a_5xx_is_upstream_unavailable_whatever_its_body_says(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock, status: int
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.GARBAGE, status=status, body='{"error": "invalid_grant"}'))

    with pytest.raises(UpstreamUnavailable):
        await client.refresh(seeded.refresh_token, realm_id=REALM)


# -- oversized answers ------------------------------------------------------------------------


def _padded_answer(size: int) -> str:
    """A well-formed token answer, padded with whitespace to ``size`` bytes."""
    body = _shaped()
    return body[:-1] + " " * (size - len(body)) + "}"


async def test_an_answer_over_64_kib_is_refused(
    client: IntuitOAuthClient, intuit: IntuitSimulator
) -> None:
    watch(intuit, Fault(FaultKind.GARBAGE, body=_padded_answer(MAX_BODY + 2048)))

    with pytest.raises(UpstreamUnavailable, match="too large"):
        await client.refresh("sim-rt-any", realm_id=REALM)
    assert requests_seen(intuit) == 1


async def test_an_answer_just_under_64_kib_is_accepted(
    client: IntuitOAuthClient, intuit: IntuitSimulator
) -> None:
    watch(intuit, Fault(FaultKind.GARBAGE, body=_padded_answer(MAX_BODY - 64)))

    issued = await client.refresh("sim-rt-any", realm_id=REALM)

    assert issued.refresh_token == _GOOD_FIELDS["refresh_token"]


Respond = Callable[[web.Request, int, bytes, str], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def token_proxy(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, respond: Respond
) -> AsyncIterator[str]:
    """A loopback proxy in front of the simulator's token endpoint; ``respond(request,
    status, body, intuit_tid)`` shapes each answer on its way back. Yields its token URL."""

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with session.post(
            intuit.token_url, data=await request.read(), headers=headers
        ) as upstream:
            status, payload = upstream.status, await upstream.read()
            tid = upstream.headers.get(TID_HEADER, "")
        return await respond(request, status, payload, tid)

    app = web.Application()
    app.router.add_post("/oauth2/v1/tokens/bearer", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/oauth2/v1/tokens/bearer"
    finally:
        await runner.cleanup()


@pytest.fixture
async def slow_network(
    session: aiohttp.ClientSession, intuit: IntuitSimulator
) -> AsyncIterator[str]:
    """Each answer delivered in two TCP segments 50 ms apart, as a real network often does.
    Yields the token URL."""

    async def in_pieces(
        request: web.Request, status: int, payload: bytes, tid: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=status,
            headers={
                "Content-Type": "application/json",
                "Content-Length": str(len(payload)),
                TID_HEADER: tid,
            },
        )
        await response.prepare(request)
        await response.write(payload[:16])
        await asyncio.sleep(0.05)
        await response.write(payload[16:])
        await response.write_eof()
        return response

    async with token_proxy(session, intuit, in_pieces) as url:
        yield url


async def test_an_answer_that_arrives_in_pieces_is_read_whole(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, clock: FakeClock, slow_network: str
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    client = client_for(session, intuit, token_url=slow_network)

    issued = await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert issued.refresh_token == intuit.model.current_refresh_token(REALM)


# -- which company a token opens (the connect flow's check) ------------------------------------


async def test_a_token_opens_its_own_company_and_no_other(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    mine = intuit.model.create_grant(REALM)  # fresh: its access token works
    other = intuit.model.create_grant("9130350000000099")

    assert await client.opens_company(mine.access_token, realm_id=REALM)
    assert not await client.opens_company(mine.access_token, realm_id="9130350000000099")
    assert not await client.opens_company(other.access_token, realm_id=REALM)
    assert not await client.opens_company("not-a-token", realm_id=REALM)


async def test_a_company_check_intuit_cannot_answer_is_upstream_unavailable(
    client: IntuitOAuthClient, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    mine = intuit.model.create_grant(REALM)
    watch(intuit, Fault(FaultKind.SERVER_ERROR, status=503, endpoint="company_info"))

    with pytest.raises(UpstreamUnavailable):
        await client.opens_company(mine.access_token, realm_id=REALM)


def retry_after_added(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, value: str
) -> contextlib.AbstractAsyncContextManager[str]:
    """Every answer with ``Retry-After: value`` added (as a proxy or a confused gateway
    might). Yields the token URL."""

    async def with_header(
        request: web.Request, status: int, payload: bytes, tid: str
    ) -> web.StreamResponse:
        return web.Response(
            status=status,
            body=payload,
            headers={"Content-Type": "application/json", "Retry-After": value, TID_HEADER: tid},
        )

    return token_proxy(session, intuit, with_header)


@pytest.mark.parametrize("value", ["99999999999999999999", "\u00b2", "-1", "1e9", "soon"])
async def test_an_odd_retry_after_on_a_rotating_answer_never_loses_the_token(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, clock: FakeClock, value: str
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))  # old enough: this refresh rotates
    async with retry_after_added(session, intuit, value) as token_url:
        client = client_for(session, intuit, token_url=token_url)
        issued = await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert issued.refresh_token != seeded.refresh_token
    assert issued.refresh_token == intuit.model.current_refresh_token(REALM)


async def test_a_huge_retry_after_is_capped(
    session: aiohttp.ClientSession, intuit: IntuitSimulator, clock: FakeClock
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    watch(intuit, Fault(FaultKind.SERVER_ERROR, status=503))
    async with retry_after_added(session, intuit, "99999999999999999999") as token_url:
        client = client_for(session, intuit, token_url=token_url)
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.refresh(seeded.refresh_token, realm_id=REALM)

    assert caught.value.retry_after == timedelta(minutes=5)


# -- logs ---------------------------------------------------------------------------------


async def test_no_token_or_secret_reaches_any_log_line(
    session: aiohttp.ClientSession,
    client: IntuitOAuthClient,
    intuit: IntuitSimulator,
    clock: FakeClock,
    logs: pytest.LogCaptureFixture,
) -> None:
    config = intuit.model.config
    seeded = grant(intuit, clock, timedelta(days=3))
    issued = await client.refresh(seeded.refresh_token, realm_id=REALM)
    with pytest.raises(InvalidGrant):
        await client.refresh(seeded.refresh_token, realm_id=REALM)  # rotated away
    # An answer that echoes the token back with odd fields must not be logged either.
    echo = json.dumps({"access_token": 42, "refresh_token": issued.refresh_token})
    watch(intuit, Fault(FaultKind.GARBAGE, body=echo), Fault(FaultKind.SERVER_ERROR))
    kept = await client.refresh(issued.refresh_token, realm_id=REALM)
    assert kept.access_token is None
    with pytest.raises(UpstreamUnavailable):
        await client.refresh(issued.refresh_token, realm_id=REALM)
    with pytest.raises(ClientRejected):
        await client_for(session, intuit, secret="wrong-secret-Zq8vX3pL").refresh(
            issued.refresh_token, realm_id=REALM
        )
    code = intuit.model.authorize(REALM, redirect_uri=REDIRECT_URI)
    exchanged = await client.exchange_code(code, realm_id=REALM)
    await client.revoke(exchanged.refresh_token, realm_id=REALM)

    text = log_text(logs)
    assert len(logs.records) >= 8  # the client and the simulator did log
    basic = base64.b64encode(f"{config.client_id}:{config.client_secret}".encode()).decode()
    for secret in (
        seeded.refresh_token,
        seeded.access_token,
        issued.refresh_token,
        issued.access_token,
        exchanged.refresh_token,
        exchanged.access_token,
        code,
        config.client_secret,
        "wrong-secret-Zq8vX3pL",
        basic,
    ):
        assert secret is None or secret not in text


@pytest.mark.parametrize(
    ("fault", "level"),
    [
        pytest.param(None, logging.INFO, id="200"),
        pytest.param(Fault(FaultKind.SERVER_ERROR, status=503), logging.WARNING, id="503"),
        pytest.param(Fault(FaultKind.THROTTLED, seconds=1), logging.WARNING, id="429"),
    ],
)
async def test_intuit_in_trouble_is_logged_as_a_warning(
    client: IntuitOAuthClient,
    intuit: IntuitSimulator,
    clock: FakeClock,
    logs: pytest.LogCaptureFixture,
    fault: Fault | None,
    level: int,
) -> None:
    seeded = grant(intuit, clock, timedelta(days=3))
    if fault is not None:
        intuit.faults.add(fault)

    with contextlib.suppress(UpstreamUnavailable):
        await client.refresh(seeded.refresh_token, realm_id=REALM)

    (answered,) = [r for r in logs.records if r.getMessage() == "Intuit answered"]
    assert answered.levelno == level
