"""Requests are checked here before the core sees them.

Limits from the contract: ``realm_id`` is 1 to 64 letters, digits, '-' and '_';
``user_id`` 1 to 255 printable characters; ``min_validity`` between zero and
55 minutes. Error messages name the field and the rule, and never echo more
than a short prefix of what was sent.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from broker._proto import broker_pb2 as pb
from broker.domain.model import ConnectionFilter, ConnectionStatus, ImportRequest
from broker.errors import InvalidRequest

DEFAULT_MIN_VALIDITY = timedelta(minutes=5)
MAX_MIN_VALIDITY = timedelta(minutes=55)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_LENGTH = 4096

_REALM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what OAuth tokens are made of
_MAX_NANOS = 999_999_999
_MIN_TIMESTAMP = -62135596800  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
_PAGE_TOKEN_PREFIX = "after:"  # noqa: S105 - a page cursor, not a credential

_STATUS_FROM_PROTO = {
    pb.CONNECTION_STATUS_ACTIVE: ConnectionStatus.ACTIVE,
    pb.CONNECTION_STATUS_REAUTHORIZATION_REQUIRED: ConnectionStatus.REAUTHORIZATION_REQUIRED,
    pb.CONNECTION_STATUS_REVOKED: ConnectionStatus.REVOKED,
}


@dataclass(frozen=True, slots=True)
class TokenQuery:
    realm_id: str | None
    user_id: str | None
    min_validity: timedelta


def token_query(request: pb.GetAccessTokenRequest) -> TokenQuery:
    which = request.WhichOneof("connection")
    if which == "realm_id":
        realm_id, user_id = realm(request.realm_id), None
    elif which == "user_id":
        realm_id, user_id = None, user(request.user_id)
    else:
        raise InvalidRequest("connection", "set realm_id or user_id")
    min_validity = DEFAULT_MIN_VALIDITY
    if request.HasField("min_validity"):
        min_validity = _duration(request.min_validity, "min_validity")
        exact_nanos = request.min_validity.seconds * 10**9 + request.min_validity.nanos
        if exact_nanos < 0:
            raise InvalidRequest("min_validity", "must not be negative")
        if exact_nanos > MAX_MIN_VALIDITY // timedelta(microseconds=1) * 1000:
            raise InvalidRequest("min_validity", "must be at most 55 minutes")
    return TokenQuery(realm_id, user_id, min_validity)


def realm(value: str, field: str = "realm_id") -> str:
    if not _REALM_ID.fullmatch(value):
        raise InvalidRequest(field, _why("1 to 64 letters, digits, '-' or '_'", value))
    return value


def user(value: str, field: str = "user_id") -> str:
    if not value or len(value) > 255 or not value.isprintable():
        raise InvalidRequest(field, _why("1 to 255 printable characters", value))
    return value


def return_url(value: str) -> str:
    if len(value) > 2048 or not value.isprintable():
        raise InvalidRequest(
            "return_url", _why("an absolute URL of at most 2048 characters", value)
        )
    return value


def import_request(request: pb.ImportConnectionRequest, now: datetime) -> ImportRequest:
    access_token = _token(request.access_token, "access_token") if request.access_token else None
    access_expires = _timestamp(request, "access_token_expires_at")
    if access_token is not None and access_expires is None:
        raise InvalidRequest("access_token_expires_at", "required when access_token is set")
    if access_token is None and access_expires is not None:
        raise InvalidRequest("access_token", "required when access_token_expires_at is set")
    created = _timestamp(request, "refresh_token_created_at")
    if created is not None and created > now + timedelta(minutes=5):
        raise InvalidRequest("refresh_token_created_at", "must not be in the future")
    expires = _timestamp(request, "refresh_token_expires_at")
    if expires is not None and created is not None and expires <= created:
        raise InvalidRequest("refresh_token_expires_at", "must be after refresh_token_created_at")
    return ImportRequest(
        realm_id=realm(request.realm_id),
        user_id=user(request.user_id),
        refresh_token=_token(request.refresh_token, "refresh_token"),
        access_token=access_token,
        access_token_expires_at=access_expires,
        refresh_token_created_at=created,
        refresh_token_expires_at=expires,
        replace_active=request.replace_active,
    )


@dataclass(frozen=True, slots=True)
class ListQuery:
    where: ConnectionFilter
    limit: int
    after: str | None


def list_query(request: pb.ListConnectionsRequest) -> ListQuery:
    if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
        raise InvalidRequest("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    status = None
    if request.status != pb.CONNECTION_STATUS_UNSPECIFIED:
        if request.status not in _STATUS_FROM_PROTO:
            raise InvalidRequest("status", "unknown connection status")
        status = _STATUS_FROM_PROTO[request.status]
    return ListQuery(
        where=ConnectionFilter(
            status=status, user_id=user(request.user_id) if request.user_id else None
        ),
        limit=request.page_size or DEFAULT_PAGE_SIZE,
        after=_page_after(request.page_token) if request.page_token else None,
    )


def page_token(after_realm: str | None) -> str:
    if after_realm is None:
        return ""
    return base64.urlsafe_b64encode((_PAGE_TOKEN_PREFIX + after_realm).encode()).decode()


def _page_after(token: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidRequest("page_token", "not a token this broker issued") from None
    if not decoded.startswith(_PAGE_TOKEN_PREFIX):
        raise InvalidRequest("page_token", "not a token this broker issued")
    return realm(decoded.removeprefix(_PAGE_TOKEN_PREFIX), "page_token")


def _token(value: str, field: str) -> str:
    if not value:
        raise InvalidRequest(field, "required")
    if len(value) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(value):
        # Never echo a token, not even a prefix of one.
        raise InvalidRequest(field, f"must be 1 to {MAX_TOKEN_LENGTH} printable ASCII characters")
    return value


def _duration(value: duration_pb2.Duration, field: str) -> timedelta:
    if (
        abs(value.nanos) > _MAX_NANOS
        or (value.seconds > 0 > value.nanos)
        or (value.seconds < 0 < value.nanos)
    ):
        raise InvalidRequest(field, "not a valid duration")
    if abs(value.seconds) > 10 * 365 * 24 * 3600:
        raise InvalidRequest(field, "out of range")
    return timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def _timestamp(message: pb.ImportConnectionRequest, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    if not 0 <= value.nanos <= _MAX_NANOS or not _MIN_TIMESTAMP <= value.seconds <= _MAX_TIMESTAMP:
        raise InvalidRequest(field, "not a valid timestamp")
    return datetime.fromtimestamp(value.seconds, UTC) + timedelta(microseconds=value.nanos // 1000)


def _why(rule: str, value: str) -> str:
    if not value:
        return f"required ({rule})"
    shown = value[:16].encode("unicode_escape").decode()
    more = f"… ({len(value)} characters)" if len(value) > 16 else ""
    return f"must be {rule}; got {shown!r}{more}"
