"""The client internal services use to get QuickBooks access tokens.

::

    async with BrokerClient("qbo-broker:50051") as broker:
        token = await broker.get_access_token(realm_id="9130350000000001")
    # token.access_token, token.expires_at, token.realm_id

Errors arrive as the broker's own exceptions: ``ReauthorizationRequired``
(send the customer through the connect flow), ``ConnectionNotFound``,
``InvalidRequest``, and ``BrokerUnavailable`` (retry later; ``retry_after``
says when, if the broker knows). UNAVAILABLE answers that carry a retry delay
are retried within ``timeout`` before giving up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.errors import (
    ERROR_DOMAIN,
    BrokerError,
    Code,
    ConnectionNotFound,
    InvalidRequest,
    Reason,
    ReauthorizationRequired,
)

__all__ = [
    "AccessToken",
    "BrokerClient",
    "BrokerUnavailable",
    "ConnectionNotFound",
    "InvalidRequest",
    "ReauthorizationRequired",
]


class BrokerUnavailable(BrokerError):
    """The broker (or Intuit behind it) cannot give a token right now."""

    code = Code.UNAVAILABLE

    def __init__(self, message: str, retry_after: timedelta | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    realm_id: str
    refresh_token_expires_at: datetime | None
    reconnect_deadline: datetime | None

    def __repr__(self) -> str:  # never print the token
        return f"AccessToken(realm_id={self.realm_id!r}, expires_at={self.expires_at.isoformat()})"


class BrokerClient:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._owns_channel = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)
        self._timeout = timeout

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def get_access_token(
        self,
        *,
        realm_id: str | None = None,
        user_id: str | None = None,
        min_validity: timedelta | None = None,
    ) -> AccessToken:
        if (realm_id is None) == (user_id is None):
            raise InvalidRequest("connection", "pass exactly one of realm_id and user_id")
        request = pb.GetAccessTokenRequest()
        if realm_id is not None:
            request.realm_id = realm_id
        else:
            request.user_id = user_id or ""
        if min_validity is not None:
            request.min_validity.CopyFrom(_duration(min_validity))
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                reply = await self._stub.GetAccessToken(
                    request, timeout=max(0.05, deadline - time.monotonic())
                )
            except grpc.aio.AioRpcError as exc:
                error = _translate(exc)
                wait = error.retry_after if isinstance(error, BrokerUnavailable) else None
                if wait is None or time.monotonic() + wait.total_seconds() >= deadline:
                    raise error from None
                await asyncio.sleep(wait.total_seconds())
                continue
            return AccessToken(
                access_token=reply.access_token,
                expires_at=reply.expires_at.ToDatetime(UTC),
                realm_id=reply.realm_id,
                refresh_token_expires_at=(
                    reply.refresh_token_expires_at.ToDatetime(UTC)
                    if reply.HasField("refresh_token_expires_at")
                    else None
                ),
                reconnect_deadline=(
                    reply.reconnect_deadline.ToDatetime(UTC)
                    if reply.HasField("reconnect_deadline")
                    else None
                ),
            )


def _duration(value: timedelta) -> duration_pb2.Duration:
    proto = duration_pb2.Duration()
    proto.FromTimedelta(value)
    return proto


def _translate(exc: grpc.aio.AioRpcError) -> BrokerError:
    code = exc.code()
    message = exc.details() or code.name
    info = error_details_pb2.ErrorInfo()
    retry: timedelta | None = None
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToTimedelta()
    reason = info.reason if info.domain == ERROR_DOMAIN else ""
    if reason == Reason.REAUTHORIZATION_REQUIRED:
        detail = info.metadata.get("detail") or message
        return ReauthorizationRequired(info.metadata.get("realm_id", ""), detail)
    if code is grpc.StatusCode.NOT_FOUND:
        return ConnectionNotFound(message)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest("request", message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return BrokerUnavailable(message, retry)
    return BrokerError(f"{code.name}: {message}")
