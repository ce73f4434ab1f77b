"""Every error has its wire meaning written down; the API and the client read the same table."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from broker import errors
from broker.api.status import to_status
from broker.errors import BrokerError, Code, Reason

CONTRACT_REASONS = {
    "REAUTHORIZATION_REQUIRED",
    "AMBIGUOUS_USER",
    "INTUIT_UNAVAILABLE",
    "INTUIT_CLIENT_REJECTED",
    "STORAGE_UNAVAILABLE",
    "SWEEP_IN_PROGRESS",
}


def every_error() -> list[type[BrokerError]]:
    found: list[type[BrokerError]] = []
    pending: list[type[BrokerError]] = [BrokerError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == errors.__name__]


def sample(cls: type[BrokerError]) -> BrokerError:
    if cls is errors.InvalidRequest:
        return cls("realm_id", "too long")
    if cls is errors.ReauthorizationRequired:
        return cls("123", "revoked")
    if cls is errors.AmbiguousUser:
        return cls()
    return cls("what happened")


@pytest.mark.parametrize("cls", every_error(), ids=lambda cls: cls.__name__)
def test_each_error_declares_its_code_and_reason_itself(cls: type[BrokerError]) -> None:
    # Declared on the class (or deliberately inherited), never derived from its name.
    assert isinstance(cls.code, Code)
    assert cls.reason is None or isinstance(cls.reason, Reason)
    status = to_status(sample(cls))
    assert status.code is grpc.StatusCode[cls.code]


def test_the_contract_reasons_are_all_in_the_table() -> None:
    assert {reason.value for reason in Reason} >= CONTRACT_REASONS


def test_a_renamed_class_keeps_its_wire_reason() -> None:
    class SomethingElseEntirely(errors.UpstreamUnavailable):
        pass

    status = to_status(SomethingElseEntirely("down", retry_after=timedelta(seconds=3)))
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    (key, details), *_ = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    for detail in status_pb2.Status.FromString(details).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            detail.Unpack(retry)
    assert status.code is grpc.StatusCode.UNAVAILABLE
    assert info.reason == "INTUIT_UNAVAILABLE"
    assert info.domain == "qbo-broker"
    assert retry.retry_delay.seconds == 3
