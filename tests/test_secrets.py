"""No token and no client secret ever reaches a log line."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest

from broker import logs
from broker._proto import broker_pb2 as pb
from broker.devtools.fake_intuit import Fault, FaultKind
from tests.support import RunningBroker


@pytest.fixture
def captured_logs(broker: RunningBroker) -> Iterator[io.StringIO]:
    """Everything any logger prints, through the broker's own JSON formatter, at DEBUG.

    Without the formatter's scrubbing of known secrets: what is tested is that no
    code path hands a secret to a logger in the first place.
    """
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure("DEBUG", "json", secrets=[])
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


async def test_a_busy_day_logs_no_secret(broker: RunningBroker, captured_logs: io.StringIO) -> None:
    realms = [f"91303500000000{n:02d}" for n in range(6)]
    for realm in realms:
        await broker.seed(realm, access_token_left=None, refresh_token_age=timedelta(days=40))
    await broker.get_token(realms[0])  # access expiry + rotation
    broker.intuit.faults.add(Fault(FaultKind.SERVER_ERROR, status=503))
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(realms[1])
    broker.intuit.faults.add(Fault(FaultKind.GARBAGE, body='{"access_token": "x"}'))
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(realms[2])
    broker.intuit.faults.add(Fault(FaultKind.INVALID_CLIENT))
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(realms[3])
    broker.intuit.model.revoke(broker.intuit.model.current_refresh_token(realms[4]) or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await broker.get_token(realms[4])
    await broker.admin.RefreshConnection(pb.RefreshConnectionRequest(realm_id=realms[5]))
    with pytest.raises(grpc.aio.AioRpcError):  # a malformed import that carries a token
        await broker.admin.ImportConnection(
            pb.ImportConnectionRequest(realm_id="bad realm", user_id="u", refresh_token="RT-x")
        )

    text = captured_logs.getvalue()
    model = broker.intuit.model
    issued = [*model._refresh_tokens, *model._access_tokens, *model._dead_refresh_tokens]
    assert len(issued) > 12
    assert "tokens refreshed" in text  # the logs did capture the work
    assert "intuit_tid" in text
    leaked = [token[:12] for token in issued if token in text]
    assert leaked == []
    settings = broker.broker.settings
    assert settings.client_secret.value not in text
    basic = base64.b64encode(f"{settings.client_id}:{settings.client_secret.value}".encode())
    assert basic.decode() not in text
    assert "***" not in text  # nothing needed scrubbing
    assert "RT-x" not in text
