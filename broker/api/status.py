"""The one place where the broker's errors become gRPC statuses.

A ``BrokerError`` becomes the status its class declares (``broker.errors``:
code and ``ErrorInfo`` reason), with ``RetryInfo`` when the error knows a
delay and ``BadRequest`` for a malformed field. ``broker.api.guard`` calls
this for every servicer method; anything that is not a ``BrokerError`` is an
INTERNAL error whose details stay in the log.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import ERROR_DOMAIN, BrokerError, Code, InvalidRequest

log = logging.getLogger("broker.api")

_MIN_RETRY = timedelta(milliseconds=100)


def to_status(exc: BrokerError) -> grpc.Status:
    """The status for ``exc``: its own message only where that is meant for callers."""
    if exc.code is Code.INTERNAL:
        log.error("broker error", extra={"error": str(exc), "error_type": type(exc).__name__})
    text = str(exc) if exc.public is None else exc.public
    message = status_pb2.Status(code=grpc.StatusCode[exc.code].value[0], message=text)
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
