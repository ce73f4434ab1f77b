"""The one place where the broker's errors become gRPC statuses.

Servicer methods are wrapped in ``@grpc_errors``: a ``BrokerError`` becomes the
status code of ``../shared/spec/contract.md`` with its rich details
(``google.rpc.ErrorInfo``, ``RetryInfo``, ``BadRequest``); anything else is an
INTERNAL error whose details stay in the log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import (
    AmbiguousUser,
    BrokerError,
    ClientRejected,
    ConnectionNotFound,
    InvalidGrant,
    InvalidRequest,
    ReauthorizationRequired,
    ShuttingDown,
    StorageUnavailable,
    SweepInProgress,
    UpstreamError,
    UpstreamUnavailable,
)

log = logging.getLogger("broker.api")

DOMAIN = "qbo-broker"
_STORAGE_RETRY = timedelta(seconds=1)

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Handler = Callable[[Servicer, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


def grpc_errors(
    method: Handler[Servicer, Request, Response],
) -> Handler[Servicer, Request, Response]:
    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await method(self, request, context)
        except BrokerError as exc:
            await context.abort_with_status(to_status(exc))
        except Exception:
            log.exception("unexpected error", extra={"rpc": method.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the broker's log")
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    return wrapper


def to_status(exc: BrokerError) -> grpc.Status:
    code, details = _classify(exc)
    message = status_pb2.Status(code=code, message=str(exc))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        message.details.append(packed)
    status: grpc.Status = rpc_status.to_status(message)
    return status


def _classify(exc: BrokerError) -> tuple[int, list[Any]]:
    if isinstance(exc, InvalidRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.reason
        )
        return code_pb2.INVALID_ARGUMENT, [
            error_details_pb2.BadRequest(field_violations=[violation])
        ]
    if isinstance(exc, ConnectionNotFound):
        return code_pb2.NOT_FOUND, []
    if isinstance(exc, ReauthorizationRequired):
        return code_pb2.FAILED_PRECONDITION, [
            _info("REAUTHORIZATION_REQUIRED", realm_id=exc.realm_id, detail=exc.reason)
        ]
    if isinstance(exc, AmbiguousUser):
        return code_pb2.FAILED_PRECONDITION, [_info("AMBIGUOUS_USER")]
    if isinstance(exc, InvalidGrant):  # the token service turns these into the above
        return code_pb2.FAILED_PRECONDITION, [_info("REAUTHORIZATION_REQUIRED")]
    if isinstance(exc, UpstreamUnavailable):
        details: list[Any] = [_info("INTUIT_UNAVAILABLE", intuit_tid=exc.intuit_tid)]
        if exc.retry_after is not None:
            details.append(_retry(exc.retry_after))
        return code_pb2.UNAVAILABLE, details
    if isinstance(exc, ClientRejected):
        return code_pb2.INTERNAL, [_info("INTUIT_CLIENT_REJECTED", intuit_tid=exc.intuit_tid)]
    if isinstance(exc, UpstreamError):
        return code_pb2.UNAVAILABLE, [_info("INTUIT_UNAVAILABLE", intuit_tid=exc.intuit_tid)]
    if isinstance(exc, SweepInProgress):
        return code_pb2.ABORTED, [_info("SWEEP_IN_PROGRESS")]
    if isinstance(exc, ShuttingDown):
        return code_pb2.UNAVAILABLE, [_info("SHUTTING_DOWN")]
    if isinstance(exc, StorageUnavailable):
        return code_pb2.UNAVAILABLE, [_info("STORAGE_UNAVAILABLE"), _retry(_STORAGE_RETRY)]
    log.error("broker error", extra={"error": str(exc), "error_type": type(exc).__name__})
    return code_pb2.INTERNAL, [_info(_reason(exc))]


def _info(reason: str, **metadata: str | None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(
        reason=reason,
        domain=DOMAIN,
        metadata={key: value for key, value in metadata.items() if value},
    )


def _retry(delay: timedelta) -> error_details_pb2.RetryInfo:
    proto = duration_pb2.Duration()
    proto.FromTimedelta(max(delay, timedelta(milliseconds=100)))
    return error_details_pb2.RetryInfo(retry_delay=proto)


def _reason(exc: BrokerError) -> str:
    name = type(exc).__name__
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()
