"""Let no one in: mutual TLS, the authorization policy, the audit trail, end to end.

Certificates are made per test (``tests.pki``); the broker listens on
loopback with TLS, and callers connect with their own client certificates.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from broker import logs
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.access.audit import AuditTrail
from broker.errors import ConfigurationError
from broker.settings import Settings
from tests.conftest import StartBroker
from tests.pki import Authority, Issued
from tests.support import SWEEP_BY_HAND, RunningBroker, eventually, health_status

ALLOWED = "9130350000000001"
OTHER = "9130350000000002"
MISSING = "9130350000009999"
TOKENS = "/qbo.broker.v1.TokenBrokerService"
ADMIN = "/qbo.broker.v1.ConnectionAdminService"

POLICY: dict[str, Any] = {
    "name": "broker-test",
    "allow_rules": [
        {
            "name": "billing-reads-its-realms",
            "source": {"principals": ["spiffe://platform/billing"]},
            "request": {"paths": [f"{TOKENS}/GetAccessToken"]},
            "realms": [ALLOWED, "9130351*"],
        },
        {
            "name": "operators-do-everything",
            "source": {"principals": ["*.ops.internal"]},
            "request": {"paths": [f"{TOKENS}/*", f"{ADMIN}/*", "/grpc.reflection.*"]},
        },
    ],
    "deny_rules": [
        {
            "name": "nobody-revokes-the-demo",
            "request": {"paths": [f"{ADMIN}/RevokeConnection"]},
            "realms": [OTHER],
        }
    ],
}


@dataclass
class Pki:
    folder: Path
    authority: Authority
    server: Issued
    billing: Issued
    operator: Issued
    stranger: Issued  # signed by the right CA, named in no rule

    @property
    def files(self) -> dict[str, Path]:
        cert, key = self.server.write(self.folder, "server")
        ca = self.folder / "clients-ca.pem"
        if not ca.exists():
            ca.write_bytes(self.authority.pem)
        return {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": ca}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    authority = Authority("qbo-broker test CA")
    return Pki(
        folder=tmp_path,
        authority=authority,
        server=authority.server("localhost", "127.0.0.1"),
        billing=authority.client("billing", uris=("spiffe://platform/billing",)),
        operator=authority.client("alice", dns=("alice.ops.internal",)),
        stranger=authority.client("mallory", uris=("spiffe://elsewhere/mallory",)),
    )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


@pytest.fixture
async def secured(
    start_broker: StartBroker, pki: Pki, policy_file: Path
) -> AsyncIterator[RunningBroker]:
    broker = await start_broker(authz_policy_file=policy_file, **pki.files, **SWEEP_BY_HAND)
    # Seeding goes through the operator's own channel: the fixture's is plaintext.
    async with caller(broker, pki.authority.pem, pki.operator) as operator:
        broker.admin = pb_grpc.ConnectionAdminServiceStub(operator)
        for realm in (ALLOWED, OTHER, "9130351000000007"):
            await broker.seed(realm)
        yield broker


def caller(broker: RunningBroker, trusted_ca: bytes, identity: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted_ca,
        private_key=identity.key_pem if identity else None,
        certificate_chain=identity.cert_pem if identity else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{broker.broker.grpc_port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def token(channel: grpc.aio.Channel, realm_id: str) -> pb.GetAccessTokenResponse:
    stub = pb_grpc.TokenBrokerServiceStub(channel)
    reply: pb.GetAccessTokenResponse = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(realm_id=realm_id), timeout=10
    )
    return reply


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- the handshake ------------------------------------------------------------------------------


async def test_a_caller_without_a_client_certificate_is_not_let_in(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, None) as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_an_unknown_ca_is_not_let_in(
    secured: RunningBroker, pki: Pki
) -> None:
    forger = Authority("someone else").client("billing", uris=("spiffe://platform/billing",))
    async with caller(secured, pki.authority.pem, forger) as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.UNAVAILABLE


async def test_plaintext_is_not_let_in(secured: RunningBroker) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.broker.grpc_port}") as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.UNAVAILABLE


# -- the policy ---------------------------------------------------------------------------------


async def test_an_allowed_caller_gets_its_token(secured: RunningBroker, pki: Pki) -> None:
    async with caller(secured, pki.authority.pem, pki.billing) as channel:
        reply = await token(channel, ALLOWED)
    assert secured.token_works(ALLOWED, reply.access_token)


async def test_a_realm_the_caller_may_not_read_is_denied_whether_or_not_it_exists(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, pki.billing) as channel:
        assert await code_of(token(channel, OTHER)) is grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(token(channel, MISSING)) is grpc.StatusCode.PERMISSION_DENIED
        by_user = pb_grpc.TokenBrokerServiceStub(channel).GetAccessToken(
            pb.GetAccessTokenRequest(user_id=f"user-{OTHER}"), timeout=10
        )
        assert await code_of(by_user) is grpc.StatusCode.PERMISSION_DENIED
        nobody = pb_grpc.TokenBrokerServiceStub(channel).GetAccessToken(
            pb.GetAccessTokenRequest(user_id="nobody@example.com"), timeout=10
        )
        assert await code_of(nobody) is grpc.StatusCode.PERMISSION_DENIED  # not NOT_FOUND


async def test_a_prefix_realm_rule_covers_the_realms_it_names(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, pki.billing) as channel:
        reply = await token(channel, "9130351000000007")
    assert secured.token_works("9130351000000007", reply.access_token)


async def test_an_admin_call_the_caller_may_not_make_is_denied(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, pki.billing) as channel:
        admin = pb_grpc.ConnectionAdminServiceStub(channel)
        get = admin.GetConnection(pb.GetConnectionRequest(realm_id=ALLOWED), timeout=10)
        assert await code_of(get) is grpc.StatusCode.PERMISSION_DENIED
        sweep = admin.RunSweep(pb.RunSweepRequest(), timeout=10)
        assert await code_of(sweep) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_stranger_with_a_valid_certificate_gets_nothing(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, pki.stranger) as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_deny_rule_wins_over_an_allow_rule(secured: RunningBroker, pki: Pki) -> None:
    async with caller(secured, pki.authority.pem, pki.operator) as channel:
        admin = pb_grpc.ConnectionAdminServiceStub(channel)
        revoke = admin.RevokeConnection(pb.RevokeConnectionRequest(realm_id=OTHER), timeout=10)
        assert await code_of(revoke) is grpc.StatusCode.PERMISSION_DENIED
        assert (await secured.connection(OTHER)).status == pb.CONNECTION_STATUS_ACTIVE
        allowed = admin.RevokeConnection(pb.RevokeConnectionRequest(realm_id=ALLOWED), timeout=10)
        assert await code_of(allowed) is grpc.StatusCode.OK


async def test_list_connections_shows_only_the_realms_the_caller_may_read(
    secured: RunningBroker, pki: Pki, policy_file: Path
) -> None:
    narrowed = json.loads(json.dumps(POLICY))
    narrowed["allow_rules"][1]["realms"] = ["91303510*", ALLOWED]
    policy_file.write_text(json.dumps(narrowed))
    assert secured.components.policy is not None
    secured.components.policy.check()  # now, rather than at the watcher's next look

    async with caller(secured, pki.authority.pem, pki.operator) as channel:
        admin = pb_grpc.ConnectionAdminServiceStub(channel)
        listed = await admin.ListConnections(pb.ListConnectionsRequest(page_size=1), timeout=10)
        realms = [c.realm_id for c in listed.connections]
        while listed.next_page_token:
            listed = await admin.ListConnections(
                pb.ListConnectionsRequest(page_size=1, page_token=listed.next_page_token),
                timeout=10,
            )
            realms += [c.realm_id for c in listed.connections]
    assert realms == [ALLOWED, "9130351000000007"]


async def test_health_is_open_and_reflection_only_where_allowed(
    secured: RunningBroker, pki: Pki
) -> None:
    async with caller(secured, pki.authority.pem, pki.stranger) as channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await code_of(list_services(channel)) is grpc.StatusCode.PERMISSION_DENIED
    async with caller(secured, pki.authority.pem, pki.operator) as channel:
        assert await code_of(list_services(channel)) is grpc.StatusCode.OK


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    info = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    stream = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names: list[str] = []
    async for reply in stream:
        names += [service.name for service in reply.list_services_response.service]
    return names


# -- reloading ----------------------------------------------------------------------------------


async def test_a_new_policy_takes_effect_without_a_restart_and_a_broken_one_is_ignored(
    secured: RunningBroker, pki: Pki, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with caller(secured, pki.authority.pem, pki.stranger) as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.PERMISSION_DENIED

        opened = json.loads(json.dumps(POLICY))
        opened["allow_rules"].append(
            {
                "name": "mallory-too",
                "source": {"principals": ["spiffe://elsewhere/*"]},
                "request": {"paths": [f"{TOKENS}/GetAccessToken"]},
            }
        )
        policy_file.write_text(json.dumps(opened))

        async def lets_mallory_in() -> bool:
            return await code_of(token(channel, ALLOWED)) is grpc.StatusCode.OK

        await eventually(lets_mallory_in, what="the new policy")

        with caplog.at_level(logging.ERROR, logger="broker.access"):
            policy_file.write_text('{"name": "broken", "allow_rules": [')
            os.utime(policy_file, ns=(2, 2))
            await eventually(
                lambda: any("does not parse" in r.getMessage() for r in caplog.records),
                what="the error about the broken file",
            )
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.OK  # the last good one


async def test_an_open_watch_ends_when_the_policy_takes_its_access_away(
    start_broker: StartBroker, pki: Pki, policy_file: Path
) -> None:
    broker = await start_broker(
        authz_policy_file=policy_file,
        watch_heartbeat=timedelta(seconds=1),
        **pki.files,
        **SWEEP_BY_HAND,
    )
    async with caller(broker, pki.authority.pem, pki.operator) as channel:
        admin = pb_grpc.ConnectionAdminServiceStub(channel)
        stream = admin.WatchConnections(pb.WatchConnectionsRequest(), timeout=60)
        first = await stream.read()
        assert isinstance(first, pb.WatchConnectionsResponse)
        assert first.HasField("heartbeat")  # open, and allowed

        closed = json.loads(json.dumps(POLICY))
        closed["allow_rules"] = [
            rule for rule in closed["allow_rules"] if rule["name"] != "operators-do-everything"
        ]
        policy_file.write_text(json.dumps(closed))

        async def read_until_it_ends() -> object:
            while True:
                message = await stream.read()
                if message is grpc.aio.EOF:
                    return message

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(read_until_it_ends(), 30)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_new_certificates_are_picked_up_without_dropping_the_listener(
    secured: RunningBroker, pki: Pki
) -> None:
    renewed_ca = Authority("rotated server CA")
    renewed_client_ca = Authority("rotated client CA")
    newcomer = renewed_client_ca.client("bob", dns=("bob.ops.internal",))
    async with caller(secured, renewed_ca.pem, newcomer) as channel:
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.UNAVAILABLE

    files = pki.files
    renewed_ca.server("localhost", "127.0.0.1").write(pki.folder, "server")
    files["tls_client_ca_file"].write_bytes(renewed_client_ca.pem)

    async def newcomer_gets_in() -> bool:
        async with caller(secured, renewed_ca.pem, newcomer) as channel:
            return await code_of(token(channel, ALLOWED)) is grpc.StatusCode.OK

    await eventually(newcomer_gets_in, what="the new certificates")
    async with caller(secured, pki.authority.pem, pki.operator) as channel:
        # the old server certificate is gone: a client that trusts only the old CA is refused
        assert await code_of(token(channel, ALLOWED)) is grpc.StatusCode.UNAVAILABLE


# -- the audit trail ----------------------------------------------------------------------------


async def test_every_token_and_every_admin_call_is_audited_allowed_or_denied(
    secured: RunningBroker, pki: Pki, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        async with caller(secured, pki.authority.pem, pki.billing) as channel:
            handed = await token(channel, ALLOWED)
            await code_of(token(channel, OTHER))
            admin = pb_grpc.ConnectionAdminServiceStub(channel)
            await code_of(admin.GetConnection(pb.GetConnectionRequest(realm_id=ALLOWED)))
        await secured.components.audit.flush()

    events = [
        (r.principal, r.method, r.realm_id, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "audit"
    ]
    billing = "spiffe://platform/billing"
    assert (billing, f"{TOKENS}/GetAccessToken", ALLOWED, "OK") in events
    assert (billing, f"{TOKENS}/GetAccessToken", OTHER, "PERMISSION_DENIED") in events
    assert (billing, f"{ADMIN}/GetConnection", None, "PERMISSION_DENIED") in events
    assert handed.access_token not in caplog.text
    rows = await db.fetch(
        "SELECT principal, method, realm_id, outcome FROM broker_audit_events ORDER BY id"
    )
    stored = [tuple(row) for row in rows]
    assert (billing, f"{ADMIN}/GetConnection", None, "PERMISSION_DENIED") in stored
    assert ("alice.ops.internal", f"{ADMIN}/ImportConnection", ALLOWED, "OK") in stored
    assert all(method.startswith(ADMIN) for _, method, _, _ in stored)  # tokens: log only


# -- refusing to start --------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"])
def test_a_non_loopback_address_needs_mutual_tls_and_a_policy(
    settings: Settings, address: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings(**{**vars_of(settings), "grpc_addr": address})
    for name in ("BROKER_TLS_CERT_FILE", "BROKER_TLS_CLIENT_CA_FILE", "BROKER_AUTHZ_POLICY_FILE"):
        assert name in str(caught.value)
    Settings(**{**vars_of(settings), "grpc_addr": address, "insecure": True})


def vars_of(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__dataclass_fields__}


async def test_a_broken_policy_file_stops_the_start(
    start_broker: StartBroker, pki: Pki, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", "allow_rules": []}')
    with pytest.raises(ConfigurationError, match="BROKER_AUTHZ_POLICY_FILE"):
        await start_broker(authz_policy_file=broken, **pki.files)


@contextmanager
def production_logging(
    monkeypatch: pytest.MonkeyPatch, level: str = "INFO", secrets: tuple[str, ...] = ()
) -> Iterator[io.StringIO]:
    """``logs.configure`` as ``serve`` calls it, writing JSON lines into the stream yielded;
    the test process's logging is put back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        logs.configure(level, "json", secrets=secrets)
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        yield stream
    finally:
        root.handlers[:], saved_level = saved
        root.setLevel(saved_level)
        logging.getLogger(logs.AUDIT_LOGGER).setLevel(logging.NOTSET)
        monkeypatch.setattr(logs, "_configured", None)


def test_bulk_lines_carry_their_own_time_and_their_own_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = 1_764_000_000.123, 1_764_000_007.456
    with production_logging(monkeypatch) as stream:
        same = {"message": "audit", "principal": "@ts@", "realm_id": ALLOWED}
        logs.write_events(logs.AUDIT_LOGGER, [(first, same), (second, same)])
        logs.write_events(logs.AUDIT_LOGGER, [(second, {**same, "realm_id": OTHER})])

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["ts"], e["principal"], e["realm_id"]) for e in lines] == [
        ("2025-11-24T16:00:00.123+00:00", "@ts@", ALLOWED),
        ("2025-11-24T16:00:07.456+00:00", "@ts@", ALLOWED),
        ("2025-11-24T16:00:07.456+00:00", "@ts@", OTHER),
    ]


@pytest.mark.parametrize("level", ["INFO", "WARNING", "ERROR"])
async def test_audit_lines_in_production_are_one_json_object_each(
    monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    """The process's own log handler gets the audit batch in one write, formatted as any line,
    whatever BROKER_LOG_LEVEL says: the audit trail is not a diagnostic."""
    with production_logging(monkeypatch, level, ("intuit-secret-value",)) as stream:
        trail = AuditTrail(None)
        trail.record("spiffe://a/b", f"{TOKENS}/GetAccessToken", ALLOWED, "OK", admin=False)
        trail.record(None, f"{ADMIN}/RunSweep", None, "PERMISSION_DENIED", admin=True)
        await trail.flush()

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["principal"], e["realm_id"], e["outcome"]) for e in lines] == [
        ("spiffe://a/b", ALLOWED, "OK"),
        (None, None, "PERMISSION_DENIED"),
    ]
    assert all(e["event"] == "audit" and e["logger"] == "broker.audit" for e in lines)
    assert all(e["ts"].endswith("+00:00") and e["level"] == "info" for e in lines)
