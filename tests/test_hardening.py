"""The smaller holes a security review found, each closed and held shut."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
from aiohttp import web

from broker._proto import broker_pb2 as pb
from broker.crypto import KeyRing
from broker.devtools.dev import refuse_anything_real
from broker.devtools.fake_intuit import Fault, FaultKind, IntuitSimulator
from broker.domain.model import (
    ConnectionStatus,
    ImportRequest,
    IssuedTokens,
    LockedConnection,
    TokenSnapshot,
    TokenUpdate,
)
from broker.domain.rescue import UnstoredWrite
from broker.errors import ConfigurationError, StorageUnavailable, UpstreamUnavailable
from broker.intuit.oauth import IntuitOAuthClient
from broker.settings import Secret, Settings, is_loopback
from broker.storage import connections
from broker.storage.embedded import EmbeddedPostgres
from tests.conftest import StartBroker
from tests.support import RunningBroker, error_info, eventually

REALM = "9130350000000001"


# -- dev stays away from real things ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "simulator", "named"),
    [
        ({"database_url": "postgresql://broker@db.internal/broker"}, "127.0.0.1:8090", "DATABASE"),
        ({"grpc_addr": "0.0.0.0:50051", "insecure": True}, "127.0.0.1:8090", "BROKER_GRPC_ADDR"),
        ({"http_addr": "0.0.0.0:8080"}, "127.0.0.1:8090", "BROKER_HTTP_ADDR"),
        ({}, "0.0.0.0:8090", "--simulator-addr"),
    ],
)
def test_dev_refuses_an_external_database_and_non_loopback_addresses(
    overrides: dict[str, object], simulator: str, named: str
) -> None:
    settings = Settings(**overrides)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=named):
        refuse_anything_real(settings, simulator)
    refuse_anything_real(Settings(), "127.0.0.1:8090")


# -- the Intuit client follows no redirect -----------------------------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[str, list[bytes]]]:
    """Another origin that records whatever is posted to it."""
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"access_token": "a", "refresh_token": "r", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/steal", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/steal", seen
    await runner.cleanup()


async def test_a_redirect_never_carries_the_refresh_token_elsewhere(
    elsewhere: tuple[str, list[bytes]],
) -> None:
    target, seen = elsewhere

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    app = web.Application()
    app.router.add_post("/token", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession() as session:
            client = IntuitOAuthClient(
                session,
                client_id="id",
                client_secret=Secret("secret"),
                token_url=f"http://127.0.0.1:{runner.addresses[0][1]}/token",
                revoke_url=target,
                redirect_uri="",
            )
            with pytest.raises(UpstreamUnavailable):
                await client.refresh("RT-the-only-live-one", realm_id=REALM)
    finally:
        await runner.cleanup()
    assert seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://oauth.example.com/token",
        "http://127.0.0.1@token.example.com/token",  # user info: the host is elsewhere
        "http://127.0.0.1.nip.io/token",  # a name that only starts like a loopback address
        "http://localhost.example.com/token",
        "http://[::ffff:10.0.0.1]:8090/token",
    ],
)
def test_intuit_endpoints_must_be_https_off_loopback(url: str) -> None:
    with pytest.raises(ConfigurationError, match="QB_TOKEN_URL"):
        Settings(token_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8090/token",  # the fake Intuit in tests and dev
        "http://127.8.9.10/token",
        "http://localhost:8090/token",
        "http://[::1]:8090/token",
    ],
)
def test_plain_http_is_allowed_on_loopback(url: str) -> None:
    Settings(token_url=url)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("127.0.0.1.example:50051", False),
        ("10.0.0.1:50051", False),
    ],
)
def test_what_counts_as_a_loopback_listen_address(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


# -- revoke: only "already invalid" counts as revoked --------------------------------------------


@pytest.mark.parametrize(
    ("fault", "revoked"),
    [
        pytest.param(Fault(FaultKind.GARBAGE, status=400, body="", endpoint="revoke"), False),
        pytest.param(
            Fault(
                FaultKind.GARBAGE,
                status=400,
                body='{"error": "invalid_request"}',
                endpoint="revoke",
            ),
            False,
        ),
        pytest.param(
            Fault(
                FaultKind.GARBAGE, status=400, body='{"error": "invalid_grant"}', endpoint="revoke"
            ),
            True,
        ),
    ],
)
async def test_a_revoke_that_intuit_refused_keeps_the_tokens(
    broker: RunningBroker, db: asyncpg.Connection, fault: Fault, revoked: bool
) -> None:
    await broker.seed(REALM)
    broker.intuit.faults.add(fault)

    revoke = broker.admin.RevokeConnection(pb.RevokeConnectionRequest(realm_id=REALM), timeout=10)
    if revoked:
        await revoke
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await revoke
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    row = await db.fetchrow(
        "SELECT status, refresh_token FROM quickbooks_connections WHERE realm_id = $1", REALM
    )
    assert row is not None
    assert (row["status"] == "revoked") is revoked
    assert (row["refresh_token"] is None) is revoked


# -- the embedded server sees no secret -----------------------------------------------------


@pytest.fixture
def scratch_postgres() -> Iterator[EmbeddedPostgres]:
    folder = Path(tempfile.mkdtemp(prefix="qbo-broker-env-"))
    server = EmbeddedPostgres(folder)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


async def test_the_embedded_server_does_not_inherit_the_brokers_secrets(
    scratch_postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_spec = KeyRing.generate_spec("k1")
    monkeypatch.setenv("BROKER_ENCRYPTION_KEYS", key_spec)
    monkeypatch.setenv("QB_CLIENT_SECRET", "intuit-app-secret-x9")
    monkeypatch.setenv("BROKER_DATABASE_URL", "postgresql://broker:db-pa55@db/broker")
    await asyncio.to_thread(scratch_postgres.start)

    connection = await asyncpg.connect(scratch_postgres.dsn("postgres"))
    try:
        await connection.execute("CREATE TEMP TABLE seen (line text)")
        await connection.execute("COPY seen FROM PROGRAM 'env'")
        environment = "\n".join(r["line"] for r in await connection.fetch("SELECT * FROM seen"))
    finally:
        await connection.close()
    assert "PATH=" in environment  # the probe did read the server's environment
    for secret in (key_spec.partition(":")[2], "intuit-app-secret-x9", "db-pa55"):
        assert secret not in environment


# -- no token in a repr -----------------------------------------------------------------------


def test_values_that_hold_tokens_never_show_them() -> None:
    now = datetime.now(UTC)
    snapshot = TokenSnapshot(REALM, "u", ConnectionStatus.ACTIVE, "AT-1", now, now, now, None, 1)
    update = TokenUpdate("AT-2", now, "RT-2", now, now, None, now)
    values: list[object] = [
        snapshot,
        LockedConnection(snapshot, "RT-1"),
        IssuedTokens("AT-3", "RT-3", timedelta(hours=1), timedelta(days=101), None, "tid"),
        update,
        ImportRequest(REALM, "u", "RT-4", "AT-4", now, now, None),
        UnstoredWrite("RT-5", update),
    ]
    for value in values:
        shown = repr(value) + str(value)
        for token in ("AT-1", "AT-2", "AT-3", "AT-4", "RT-1", "RT-2", "RT-3", "RT-4", "RT-5"):
            assert token not in shown, (type(value).__name__, token)


# -- internal details stay in the log ---------------------------------------------------------


async def test_callers_are_not_told_intuits_codes_or_database_errors(
    broker: RunningBroker, intuit: IntuitSimulator
) -> None:
    await broker.seed(REALM, access_token_left=None, refresh_token_age=timedelta(days=2))
    intuit.faults.add(Fault(FaultKind.GARBAGE, status=400, body='{"error": "invalid_request"}'))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(REALM)

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "invalid_request" not in (caught.value.details() or "")
    assert "HTTP" not in (caught.value.details() or "")
    info = error_info(caught.value)
    assert info is not None
    assert info.metadata["intuit_tid"]  # what the caller needs to ask about it


async def test_readyz_says_unreachable_without_the_databases_words(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.storage import schema

    async def down(_: object) -> list[str]:
        raise StorageUnavailable("database unavailable: ConnectionRefusedError: db.internal:5432")

    monkeypatch.setattr(schema, "pending_migrations", down)
    answers: list[dict[str, str]] = []

    async def not_ready() -> bool:  # once the readiness cache (one second) has run out
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{broker.broker.http_port}/readyz"
            async with session.get(url) as answer:
                answers.append(await answer.json())
                return answer.status == 503

    await eventually(not_ready, what="readiness noticing the database")
    assert answers[-1]["reason"] == "database unreachable"


# -- limits ----------------------------------------------------------------------------------


async def test_refresh_connection_respects_the_backoff(
    broker: RunningBroker, intuit: IntuitSimulator
) -> None:
    await broker.seed(REALM, refresh_token_age=timedelta(days=2))
    intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))
    codes = []
    for _ in range(10):
        try:
            await broker.admin.RefreshConnection(
                pb.RefreshConnectionRequest(realm_id=REALM), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    assert intuit.faults.served == 1  # one reached Intuit; nine waited out the backoff
    assert intuit.stats.refresh_calls == 0
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 10


async def test_calls_beyond_the_concurrency_bound_are_refused(
    start_broker: StartBroker, intuit: IntuitSimulator
) -> None:
    broker = await start_broker(max_concurrent_rpcs=2)
    realms = [f"91303500000000{n:02d}" for n in range(3)]
    for realm in realms:
        await broker.seed(realm, access_token_left=None)
    intuit.faults.add_forever(Fault(FaultKind.HOLD))

    held = [asyncio.ensure_future(broker.get_token(realm)) for realm in realms[:2]]
    await asyncio.wait_for(intuit.faults.wait_held(2), 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await broker.get_token(realms[2])
    intuit.faults.clear()
    intuit.faults.release()
    await asyncio.gather(*held)

    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_waiting_for_a_database_connection_is_bounded(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "_ACQUIRE_TIMEOUT", 0.5)
    broker = await start_broker(db_pool_size=2, disable_background_refresh=True)
    realm = "9130350000000001"
    await broker.seed(realm, access_token_left=None)
    components = broker.broker.components
    assert components is not None

    async with components.pool.acquire(), components.pool.acquire():  # the pool is taken
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broker.connection(realm)

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
