"""The one place where the broker's errors become gRPC statuses.

Servicer methods are wrapped in ``@grpc_errors``: a ``BrokerError`` becomes the
status its class declares (``broker.errors``: code and ``ErrorInfo`` reason),
with ``RetryInfo`` when the error knows a delay and ``BadRequest`` for a
malformed field; anything else is an INTERNAL error whose details stay in the
log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import ERROR_DOMAIN, BrokerError, Code, InvalidRequest

log = logging.getLogger("broker.api")

_MIN_RETRY = timedelta(milliseconds=100)

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
    if exc.code is Code.INTERNAL:
        log.error("broker error", extra={"error": str(exc), "error_type": type(exc).__name__})
    message = status_pb2.Status(code=grpc.StatusCode[exc.code].value[0], message=str(exc))
    for detail in _details(exc):
        packed = any_pb2.Any()
        packed.Pack(detail)
        message.details.append(packed)
    status: grpc.Status = rpc_status.to_status(message)
    return status


def _details(exc: BrokerError) -> list[Message]:
    details: list[Message] = []
    if isinstance(exc, InvalidRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.why
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if exc.reason is not None:
        details.append(
            error_details_pb2.ErrorInfo(
                reason=exc.reason.value, domain=ERROR_DOMAIN, metadata=exc.metadata()
            )
        )
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(max(exc.retry_after, _MIN_RETRY))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details
