"""Helpers the tests share: seeding connections, reading rich gRPC errors."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.clock import FakeClock
from broker.devtools.fake_intuit import IntuitSimulator
from broker.server import BrokerServer
from broker.storage.embedded import EmbeddedPostgres
from broker.wiring import Components

SWEEP_BY_HAND: dict[str, Any] = {
    "refresh_job_rate_limit": timedelta(0),
    "disable_background_refresh": True,
}
"""start_broker(**SWEEP_BY_HAND): no scheduler, no pacing; tests run the sweep themselves."""


@dataclass
class RunningBroker:
    broker: BrokerServer
    channel: grpc.aio.Channel
    tokens: pb_grpc.TokenBrokerServiceAsyncStub
    admin: pb_grpc.ConnectionAdminServiceAsyncStub
    intuit: IntuitSimulator
    clock: FakeClock

    @property
    def components(self) -> Components:
        assert self.broker.components is not None, "the broker is not started"
        return self.broker.components

    async def get_token(
        self, realm_id: str, min_validity: timedelta | None = None
    ) -> pb.GetAccessTokenResponse:
        request = pb.GetAccessTokenRequest(realm_id=realm_id)
        if min_validity is not None:
            request.min_validity.FromTimedelta(min_validity)
        reply: pb.GetAccessTokenResponse = await self.tokens.GetAccessToken(request, timeout=10)
        return reply

    async def get_token_expecting_error(self, realm_id: str) -> grpc.StatusCode:
        try:
            await self.get_token(realm_id)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        raise AssertionError(f"GetAccessToken({realm_id}) succeeded")

    async def seed(
        self,
        realm_id: str,
        user_id: str | None = None,
        *,
        refresh_token_age: timedelta = timedelta(hours=1),
        access_token_left: timedelta | None = timedelta(minutes=50),
    ) -> pb.Connection:
        """A grant at the simulator, imported into the broker as an existing connection.

        ``access_token_left`` None: the imported access token has expired.
        """
        now = self.clock()
        issued = now - refresh_token_age
        access_issued = issued
        if access_token_left is not None:
            access_issued = max(issued, now - (timedelta(hours=1) - access_token_left))
        grant = self.intuit.model.create_grant(
            realm_id, refresh_token_issued_at=issued, access_token_issued_at=access_issued
        )
        request = pb.ImportConnectionRequest(
            realm_id=realm_id,
            user_id=user_id or f"user-{realm_id}",
            refresh_token=grant.refresh_token,
            access_token=grant.access_token,
        )
        request.access_token_expires_at.CopyFrom(timestamp_of(access_issued + timedelta(hours=1)))
        request.refresh_token_created_at.CopyFrom(timestamp_of(issued))
        reply = await self.admin.ImportConnection(request, timeout=10)
        return reply.connection

    async def connection(self, realm_id: str) -> pb.Connection:
        reply = await self.admin.GetConnection(pb.GetConnectionRequest(realm_id=realm_id))
        return reply.connection

    def refreshes(self, realm_id: str) -> int:
        return self.intuit.model.stats.refresh_calls_by_realm[realm_id]

    def token_works(self, realm_id: str, access_token: str) -> bool:
        return self.intuit.model.access_token_valid(access_token, realm_id)


def timestamp_of(moment: object) -> Timestamp:
    proto = Timestamp()
    proto.FromDatetime(moment)  # type: ignore[arg-type]
    return proto


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def retry_delay(error: grpc.aio.AioRpcError) -> timedelta | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay: timedelta = info.retry_delay.ToTimedelta()
            return delay
    return None


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            info = error_details_pb2.BadRequest()
            detail.Unpack(info)
            fields.extend(v.field for v in info.field_violations)
    return fields


def stop_postgres(server: EmbeddedPostgres) -> None:
    """Fast shutdown: every client connection dies at once."""
    server.pg_ctl(["-w", "-m", "fast", "stop"])


def start_postgres(server: EmbeddedPostgres) -> None:
    socket_dir = server.socket_dir
    log = str(server.pgdata / "log")
    server.pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", log, "start"])


def restart_postgres(server: EmbeddedPostgres) -> None:
    server.pg_ctl(["-w", "-m", "fast", "-l", str(server.pgdata / "log"), "restart"])


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    """grpc.health.v1 Check (called by method path: the health stub's types lack it)."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    reply: health_pb2.HealthCheckResponse = await check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return reply.status


async def eventually(
    check: Callable[[], object | Awaitable[object]], *, within: float = 10.0, what: str = ""
) -> None:
    """Wait until ``check()`` (sync or async) is truthy: for events the test cannot hook.

    ``within`` is generous on purpose: it bounds a failure, it is not a timing
    the test relies on (a busy machine only makes the wait longer).
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s: {what or check}")
        await asyncio.sleep(0.01)


class ClockGate:
    """Moves a shared fake clock only between calls, never under one.

    Calls run inside ``async with gate.call():``; ``advance`` closes the gate to
    new calls, waits until the running ones have finished, moves the clock and
    opens again. So a token the broker was issued during a call is never
    "already expired" because the test jumped time under it.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def advance(self, delta: timedelta) -> None:
        self._open.clear()
        try:
            await self._idle.wait()
            self._clock.advance(delta)
        finally:
            self._open.set()
