"""`qbo-broker serve` as an operator runs it: a real process, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.crypto import KeyRing
from broker.devtools.fake_intuit import Fault, FaultKind, IntuitSimulator
from tests.support import eventually, health_status, timestamp_of

REALM = "9130350000000001"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    grpc_addr: str
    output: list[str]
    keys: KeyRing

    @property
    def log(self) -> str:
        return "".join(self.output)


@pytest.fixture
def serve_env() -> dict[str, str]:
    """Variables a test sets on top of the defaults below."""
    return {}


@pytest.fixture
async def serve(
    database: str, intuit: IntuitSimulator, serve_env: dict[str, str]
) -> AsyncIterator[ServeProcess]:
    grpc_addr = f"127.0.0.1:{free_port()}"
    key_spec = KeyRing.generate_spec()
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": database,
        "BROKER_ENCRYPTION_KEYS": key_spec,
        "BROKER_GRPC_ADDR": grpc_addr,
        "BROKER_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "BROKER_SHUTDOWN_GRACE_SECONDS": "8",
        "QB_CLIENT_ID": intuit.model.config.client_id,
        "QB_CLIENT_SECRET": intuit.model.config.client_secret,
        "QB_TOKEN_URL": intuit.token_url,
        "QB_REVOKE_URL": intuit.revoke_url,
        "QB_AUTH_URL": intuit.auth_url,
        **serve_env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    output: list[str] = []

    async def drain() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            output.append(line.decode(errors="replace"))

    draining = asyncio.create_task(drain())
    handle = ServeProcess(process, grpc_addr, output, KeyRing.parse(key_spec))
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        deadline = time.monotonic() + 30
        while True:
            try:
                if await health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert process.returncode is None, "".join(output)
            assert time.monotonic() < deadline, "broker did not become ready: " + "".join(output)
            await asyncio.sleep(0.1)
    yield handle
    if process.returncode is None:
        process.kill()
        await process.wait()
    await draining


async def test_sigterm_lets_in_flight_calls_finish_and_exits_zero(
    serve: ServeProcess, intuit: IntuitSimulator
) -> None:
    async with grpc.aio.insecure_channel(serve.grpc_addr) as channel:
        tokens = pb_grpc.TokenBrokerServiceStub(channel)
        admin = pb_grpc.ConnectionAdminServiceStub(channel)
        now = intuit.model.now()
        grant = intuit.model.create_grant(REALM, refresh_token_issued_at=now - timedelta(hours=2))
        request = pb.ImportConnectionRequest(
            realm_id=REALM, user_id="alice", refresh_token=grant.refresh_token
        )
        request.refresh_token_created_at.CopyFrom(timestamp_of(now - timedelta(hours=2)))
        await admin.ImportConnection(request)

        intuit.faults.add(Fault(FaultKind.DELAY, seconds=1.5))  # a slow Intuit keeps it in flight
        in_flight = asyncio.ensure_future(
            tokens.GetAccessToken(pb.GetAccessTokenRequest(realm_id=REALM), timeout=20)
        )
        await eventually(lambda: intuit.faults.served, what="the refresh at Intuit")
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)

        reply = await in_flight
        assert intuit.model.access_token_valid(reply.access_token, REALM)

        code = await asyncio.wait_for(serve.process.wait(), timeout=15)
        assert code == 0, "".join(serve.output)
        assert time.monotonic() - signalled < 15
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tokens.GetAccessToken(pb.GetAccessTokenRequest(realm_id=REALM), timeout=2)
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    log = "".join(serve.output)
    assert "shutting down" in log
    assert "broker stopped" in log


async def import_grant(channel: grpc.aio.Channel, intuit: IntuitSimulator, age: timedelta) -> None:
    admin = pb_grpc.ConnectionAdminServiceStub(channel)
    issued = intuit.model.now() - age
    grant = intuit.model.create_grant(REALM, refresh_token_issued_at=issued)
    request = pb.ImportConnectionRequest(
        realm_id=REALM, user_id="a", refresh_token=grant.refresh_token
    )
    request.refresh_token_created_at.CopyFrom(timestamp_of(issued))
    await admin.ImportConnection(request)


@pytest.mark.parametrize(
    "serve_env", [{"BROKER_SHUTDOWN_GRACE_SECONDS": "2", "QB_HTTP_TIMEOUT_SECONDS": "3"}]
)
async def test_a_refresh_stuck_on_intuit_ends_with_the_intuit_timeout(
    serve: ServeProcess, intuit: IntuitSimulator
) -> None:
    async with grpc.aio.insecure_channel(serve.grpc_addr) as channel:
        await import_grant(channel, intuit, timedelta(hours=2))
        intuit.faults.add(Fault(FaultKind.DELAY, seconds=30))  # Intuit hangs (3 s timeout)
        tokens = pb_grpc.TokenBrokerServiceStub(channel)
        stuck = asyncio.ensure_future(
            tokens.GetAccessToken(pb.GetAccessTokenRequest(realm_id=REALM), timeout=30)
        )
        await eventually(lambda: intuit.faults.served, what="the refresh at Intuit")
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)

        code = await asyncio.wait_for(serve.process.wait(), timeout=20)
        took = time.monotonic() - signalled
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stuck

    assert code == 0, serve.log
    assert took < 15  # the contract: max(15 s, the Intuit timeout + 5 s)
    assert "waiting for refreshes sent to Intuit" in serve.log


@pytest.mark.parametrize(
    "serve_env", [{"BROKER_SHUTDOWN_GRACE_SECONDS": "2", "QB_HTTP_TIMEOUT_SECONDS": "30"}]
)
async def test_sigterm_during_a_slow_refresh_waits_for_its_answer_and_stores_it(
    serve: ServeProcess, intuit: IntuitSimulator, db: asyncpg.Connection
) -> None:
    """The refresh was sent; Intuit rotates only after the grace: the new token is kept."""
    async with grpc.aio.insecure_channel(serve.grpc_addr) as channel:
        await import_grant(channel, intuit, timedelta(days=2))  # old enough to rotate
        intuit.faults.add(Fault(FaultKind.HOLD))
        tokens = pb_grpc.TokenBrokerServiceStub(channel)
        call = asyncio.ensure_future(
            tokens.GetAccessToken(pb.GetAccessTokenRequest(realm_id=REALM), timeout=60)
        )
        await asyncio.wait_for(intuit.faults.wait_held(), 20)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        # The grace (2 s) runs out with the refresh still at Intuit; the broker waits on.
        await eventually(
            lambda: "waiting for refreshes sent to Intuit" in serve.log, within=20, what="drain"
        )
        intuit.faults.release()  # Intuit rotates the token and answers

        code = await asyncio.wait_for(serve.process.wait(), timeout=40)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call

    assert code == 0, serve.log
    assert time.monotonic() - signalled < 35  # within the Intuit timeout + 5 s
    assert intuit.model.stats.rotations_by_realm[REALM] == 1
    row = await db.fetchrow(
        "SELECT refresh_token, encryption_key_id FROM quickbooks_connections WHERE realm_id = $1",
        REALM,
    )
    assert row is not None
    stored = serve.keys.decrypt(
        row["refresh_token"], row["encryption_key_id"], f"{REALM}:refresh_token"
    )
    assert stored == intuit.model.current_refresh_token(REALM)  # the rotated one, kept
    assert await db.fetchval("SELECT count(*) FROM broker_refresh_intents") == 0


async def test_sigint_also_stops_cleanly(serve: ServeProcess) -> None:
    serve.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(serve.process.wait(), timeout=15) == 0


async def test_serve_refuses_to_start_without_intuit_credentials(database: str) -> None:
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": database,
        "BROKER_ENCRYPTION_KEYS": KeyRing.generate_spec(),
    }
    env.pop("QB_CLIENT_ID", None)
    env.pop("QB_CLIENT_SECRET", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert b"QB_CLIENT_ID" in stderr


async def test_serve_refuses_an_external_database_without_keys(database: str) -> None:
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": database,
        "QB_CLIENT_ID": "a",
        "QB_CLIENT_SECRET": "b",
    }
    env.pop("BROKER_ENCRYPTION_KEYS", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert b"BROKER_ENCRYPTION_KEYS" in stderr
