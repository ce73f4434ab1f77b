"""Domain values to protobuf messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto import broker_pb2 as pb
from broker.domain.model import ConnectionInfo, ConnectionStatus, LostCause, TokenSnapshot

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)

_STATUS_TO_PROTO = {
    ConnectionStatus.ACTIVE: pb.CONNECTION_STATUS_ACTIVE,
    ConnectionStatus.REAUTHORIZATION_REQUIRED: pb.CONNECTION_STATUS_REAUTHORIZATION_REQUIRED,
    ConnectionStatus.REVOKED: pb.CONNECTION_STATUS_REVOKED,
}


_CAUSE_TO_PROTO = {
    None: pb.LOST_CAUSE_UNSPECIFIED,
    LostCause.REVOKED_AT_INTUIT: pb.LOST_CAUSE_REVOKED_AT_INTUIT,
    LostCause.LOST_IN_FLIGHT: pb.LOST_CAUSE_LOST_IN_FLIGHT,
    LostCause.EXPIRED: pb.LOST_CAUSE_EXPIRED,
    LostCause.HARD_LIMIT: pb.LOST_CAUSE_HARD_LIMIT,
}


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    since = moment - _EPOCH
    seconds = since // _SECOND
    return Timestamp(seconds=seconds, nanos=(since - seconds * _SECOND).microseconds * 1000)


def token_response(snapshot: TokenSnapshot) -> pb.GetAccessTokenResponse:
    return pb.GetAccessTokenResponse(
        access_token=snapshot.access_token or "",
        expires_at=timestamp(snapshot.access_token_expires_at),
        realm_id=snapshot.realm_id,
        refresh_token_expires_at=timestamp(snapshot.refresh_token_expires_at),
        reconnect_deadline=timestamp(snapshot.reconnect_deadline),
    )


def connection(info: ConnectionInfo) -> pb.Connection:
    return pb.Connection(
        realm_id=info.realm_id,
        user_id=info.user_id,
        status=_STATUS_TO_PROTO[info.status],
        access_token_expires_at=timestamp(info.access_token_expires_at),
        refresh_token_created_at=timestamp(info.refresh_token_created_at),
        refresh_token_expires_at=timestamp(info.refresh_token_expires_at),
        reconnect_deadline=timestamp(info.reconnect_deadline),
        last_refreshed_at=timestamp(info.last_refreshed_at),
        last_used_at=timestamp(info.last_used_at),
        last_error=info.last_error or "",
        lost_cause=_CAUSE_TO_PROTO[info.lost_cause],
    )
