"""The client internal services use to get QuickBooks access tokens.

Async (asyncio services)::

    async with BrokerClient("qbo-broker:50051") as broker:
        token = await broker.get_access_token(realm_id="9130350000000001")
    # token.access_token, token.expires_at, token.realm_id

Sync (a Flask/Django worker, a Celery task; grpc's blocking channel, thread-safe)::

    with SyncBrokerClient("qbo-broker:50051") as broker:
        token = broker.get_access_token(user_id="alice@example.com")

Mutual TLS (plaintext stays the default, for loopback and dev)::

    tls = ClientTls.from_files("ca.pem", "me.crt", "me.key", server_name="qbo-broker")
    broker = BrokerClient("qbo-broker:50051", tls=tls)  # SyncBrokerClient(..., tls=tls) alike

Cache: each client keeps the tokens it was given (per realm, and which realm a
user_id was answered for) and answers from memory while a token's
``expires_at`` is later than now + ``min_validity`` (default 5 minutes, as the
broker's); concurrent callers asking the same thing share one call. Keep one
client per process; ``cache=False`` asks the broker every time;
``cache_hits``/``cache_misses``/``cache_shared`` count for your metrics;
``invalidate(realm_id=...)`` drops a token QuickBooks refused. A revocation
reaches a process that holds the token when it runs out (within the hour).

Errors arrive as the broker's own exceptions: ``ReauthorizationRequired``
(send the customer through the connect flow), ``ConnectionNotFound``,
``InvalidRequest``, ``PermissionDenied`` (the broker's policy does not let this
caller have this realm), ``AmbiguousUser`` (ask by realm_id), and
``BrokerUnavailable`` (retry later; ``retry_after`` says when, if the broker
knows; ``kind`` says why, when the broker said). UNAVAILABLE answers that carry
a retry delay are retried within ``timeout`` before giving up.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.clock import Clock, system_clock
from broker.errors import (
    ERROR_DOMAIN,
    AmbiguousUser,
    BrokerError,
    Code,
    ConnectionNotFound,
    InvalidRequest,
    PermissionDenied,
    Reason,
    ReauthorizationRequired,
)

__all__ = [
    "AccessToken",
    "AmbiguousUser",
    "BrokerClient",
    "BrokerError",
    "BrokerUnavailable",
    "ClientTls",
    "ConnectionNotFound",
    "InvalidRequest",
    "PermissionDenied",
    "ReauthorizationRequired",
    "SyncBrokerClient",
]

DEFAULT_MIN_VALIDITY = timedelta(minutes=5)
"""The broker's default (``broker.api.validation``), used when a caller gives none."""
MAX_MIN_VALIDITY = timedelta(minutes=55)
"""The broker's limit: a longer ``min_validity`` goes to the broker, which refuses it."""
DEFAULT_CACHE_SIZE = 10_000
_MIN_CALL_TIMEOUT = 0.05
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_UNAVAILABLE_REASONS = {
    Reason.REFRESH_PENDING,
    Reason.SHUTTING_DOWN,
    Reason.INTUIT_UNAVAILABLE,
    Reason.STORAGE_UNAVAILABLE,
}
_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,  # the call was cut short (the broker stopping, a client closed)
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the broker's max_concurrent_rpcs
}


class BrokerUnavailable(BrokerError):
    """The broker (or Intuit behind it) cannot give a token right now.

    ``kind`` is the broker's ``ErrorInfo`` reason when it gave one
    (``SHUTTING_DOWN``, ``REFRESH_PENDING``, ``INTUIT_UNAVAILABLE``,
    ``STORAGE_UNAVAILABLE``); None for transport failures and timeouts.
    """

    code = Code.UNAVAILABLE

    def __init__(
        self, message: str, retry_after: timedelta | None, kind: Reason | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    realm_id: str
    refresh_token_expires_at: datetime | None
    reconnect_deadline: datetime | None

    def __repr__(self) -> str:  # never print the token
        return f"AccessToken(realm_id={self.realm_id!r}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class ClientTls:
    """TLS for the channel: the CA that signed the broker's certificate and, for mutual
    TLS, this service's own key and certificate chain (PEM bytes).

    ``root_certificates`` None trusts the system's roots. ``server_name`` is the name
    the broker's certificate is checked against when it differs from the target's host
    (``grpc.ssl_target_name_override``).
    """

    root_certificates: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("private_key and certificate_chain go together")

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str] | None,
        cert: str | os.PathLike[str] | None,
        key: str | os.PathLike[str] | None,
        server_name: str | None = None,
    ) -> ClientTls:
        """Read the CA bundle, the certificate chain and the private key from PEM files."""
        return cls(
            root_certificates=_read(ca),
            private_key=_read(key),
            certificate_chain=_read(cert),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


# -- the parts both clients share ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Query:
    """One ``get_access_token`` call's question; builds the request and names the flight."""

    realm_id: str | None
    user_id: str | None
    min_validity: timedelta | None

    @classmethod
    def of(
        cls, realm_id: str | None, user_id: str | None, min_validity: timedelta | None
    ) -> _Query:
        if (realm_id is None) == (user_id is None):
            raise InvalidRequest("connection", "pass exactly one of realm_id and user_id")
        return cls(realm_id, user_id, min_validity)

    @property
    def validity(self) -> timedelta:
        return DEFAULT_MIN_VALIDITY if self.min_validity is None else self.min_validity

    @property
    def cacheable(self) -> bool:
        """Within the broker's limits: anything else goes to the broker to be refused."""
        return timedelta(0) <= self.validity <= MAX_MIN_VALIDITY

    @property
    def key(self) -> tuple[str, str, timedelta]:
        """Concurrent calls with the same key share one call to the broker."""
        if self.realm_id is not None:
            return ("realm", self.realm_id, self.validity)
        return ("user", self.user_id or "", self.validity)

    def request(self) -> pb.GetAccessTokenRequest:
        request = pb.GetAccessTokenRequest()
        if self.realm_id is not None:
            request.realm_id = self.realm_id
        else:
            request.user_id = self.user_id or ""
        if self.min_validity is not None:
            request.min_validity.FromTimedelta(self.min_validity)
        return request


def _token_from_reply(reply: pb.GetAccessTokenResponse) -> AccessToken:
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


class _FailedCall(Protocol):
    """What both grpc.aio.AioRpcError and the blocking stubs' errors (a grpc.Call) offer."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


def _translate(call: _FailedCall) -> BrokerError:
    """The client's exception for a failed call: by the broker's ErrorInfo reason, then code."""
    code = call.code()
    message = call.details() or code.name
    info = error_details_pb2.ErrorInfo()
    retry: timedelta | None = None
    violation: tuple[str, str] | None = None
    for detail in _status(call, code).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                violation = (bad.field_violations[0].field, bad.field_violations[0].description)
    reason = info.reason if info.domain == ERROR_DOMAIN else ""
    if reason == Reason.REAUTHORIZATION_REQUIRED:
        detail_text = info.metadata.get("detail") or message
        return ReauthorizationRequired(info.metadata.get("realm_id", ""), detail_text)
    if reason in _UNAVAILABLE_REASONS:
        return BrokerUnavailable(message, retry, Reason(reason))
    if reason == Reason.AMBIGUOUS_USER:
        return _with_message(AmbiguousUser(), message)
    if code is grpc.StatusCode.NOT_FOUND:
        return ConnectionNotFound(message)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(*violation) if violation else InvalidRequest("request", message)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return _with_message(PermissionDenied(), message)
    if code in _UNAVAILABLE_CODES:
        return BrokerUnavailable(message, retry)
    return BrokerError(f"{code.name}: {message}")


def _status(call: _FailedCall, code: grpc.StatusCode) -> status_pb2.Status:
    """The rich status (``grpc-status-details-bin``) if it is this call's, or an empty one."""
    for key, value in call.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                break
            if status.code == code.value[0]:  # not details a proxy left from another status
                return status
    return status_pb2.Status()


def _with_message(error: BrokerError, message: str) -> BrokerError:
    """``error``, saying what the broker said (its classes compose their own messages)."""
    error.args = (message,)
    return error


class _Deadline:
    """One call's time budget, retries included."""

    def __init__(self, timeout: float) -> None:
        self._at = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(_MIN_CALL_TIMEOUT, self._at - time.monotonic())

    def retry_wait(self, error: BrokerError) -> float | None:
        """Seconds to wait before trying again, or None: raise ``error`` now."""
        wait = error.retry_after if isinstance(error, BrokerUnavailable) else None
        if wait is None or time.monotonic() + wait.total_seconds() >= self._at:
            return None
        return wait.total_seconds()


class _TokenCache:
    """Tokens by realm (LRU-bounded), user_id → realm, and the counters; thread-safe.

    A user's mapping lives as long as its realm's token: it goes when that token
    expires, is evicted, or is dropped after an error.
    """

    def __init__(self, *, enabled: bool, max_size: int, clock: Clock) -> None:
        if max_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.enabled = enabled
        self._max_size = max_size
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: OrderedDict[str, AccessToken] = OrderedDict()
        self._users: OrderedDict[str, str] = OrderedDict()
        self._users_of: dict[str, set[str]] = {}
        self.hits = 0
        self.misses = 0
        self.shared = 0

    def lookup(self, query: _Query) -> AccessToken | None:
        """The cached token if it is good for ``query`` (counted as a hit)."""
        if not self.enabled or not query.cacheable:
            return None
        now = self._clock()
        with self._lock:
            realm_id = query.realm_id
            if realm_id is None:
                realm_id = self._users.get(query.user_id or "")
            token = self._tokens.get(realm_id) if realm_id is not None else None
            if token is None or realm_id is None:
                return None
            if token.expires_at <= now:
                self._drop(realm_id)
                return None
            if token.expires_at <= now + query.validity:
                return None
            self._tokens.move_to_end(realm_id)
            if query.user_id is not None:
                self._users.move_to_end(query.user_id)
            self.hits += 1
            return token

    def store(self, query: _Query, token: AccessToken) -> None:
        if not self.enabled:
            return
        realm_id = token.realm_id
        with self._lock:
            current = self._tokens.get(realm_id)
            if current is None or token.expires_at >= current.expires_at:
                self._tokens[realm_id] = token
            self._tokens.move_to_end(realm_id)
            if query.user_id is not None:
                self._map_user(query.user_id, realm_id)
            while len(self._tokens) > self._max_size:
                self._drop(next(iter(self._tokens)))

    def forget(self, *, realm_id: str | None = None, user_id: str | None = None) -> None:
        with self._lock:
            if user_id is not None:
                mapped = self._users.get(user_id)
                if mapped is not None:
                    self._drop(mapped)
            if realm_id is not None:
                self._drop(realm_id)

    def forget_after(self, query: _Query, error: BrokerError) -> None:
        """The broker says this connection gives no token (to this caller): drop ours."""
        if isinstance(error, ReauthorizationRequired):
            self.forget(realm_id=error.realm_id or query.realm_id, user_id=query.user_id)
        elif isinstance(error, ConnectionNotFound | PermissionDenied | AmbiguousUser):
            self.forget(realm_id=query.realm_id, user_id=query.user_id)

    def count_miss(self) -> None:
        with self._lock:
            self.misses += 1

    def count_shared(self) -> None:
        with self._lock:
            self.shared += 1

    def _map_user(self, user_id: str, realm_id: str) -> None:
        previous = self._users.get(user_id)
        if previous is not None and previous != realm_id:
            self._users_of.get(previous, set()).discard(user_id)
        self._users[user_id] = realm_id
        self._users.move_to_end(user_id)
        self._users_of.setdefault(realm_id, set()).add(user_id)
        while len(self._users) > self._max_size:
            oldest, its_realm = self._users.popitem(last=False)
            self._users_of.get(its_realm, set()).discard(oldest)

    def _drop(self, realm_id: str) -> None:
        self._tokens.pop(realm_id, None)
        for user_id in self._users_of.pop(realm_id, ()):
            self._users.pop(user_id, None)


class _CachingClient:
    """What both clients hold: the timeout, the cache and its counters."""

    def __init__(self, *, timeout: float, cache: bool, cache_size: int, clock: Clock) -> None:
        self._timeout = timeout
        self._cache = _TokenCache(enabled=cache, max_size=cache_size, clock=clock)

    @property
    def cache_hits(self) -> int:
        """Calls answered from memory."""
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        """Calls that went to the broker (every call, with ``cache=False``)."""
        return self._cache.misses

    @property
    def cache_shared(self) -> int:
        """Calls that waited for another caller's identical call instead of making one."""
        return self._cache.shared

    def invalidate(self, *, realm_id: str | None = None, user_id: str | None = None) -> None:
        """Forget the cached token (e.g. QuickBooks answered 401 to it): the next call asks."""
        self._cache.forget(realm_id=realm_id, user_id=user_id)


def _check_channel_arguments(channel: object, tls: ClientTls | None) -> None:
    if channel is not None and tls is not None:
        raise ValueError("pass tls or a ready channel, not both")


_C = TypeVar("_C")


def _open(
    insecure: Callable[[str], _C],
    secure: Callable[..., _C],
    target: str,
    tls: ClientTls | None,
) -> _C:
    """A channel to ``target`` (grpc's or grpc.aio's, by the functions given)."""
    if tls is None:
        return insecure(target)
    return secure(target, tls.credentials(), options=tls.options())


# -- asyncio ------------------------------------------------------------------------------


class BrokerClient(_CachingClient):
    """The asyncio client (one per process and event loop)."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float = 10.0,
        tls: ClientTls | None = None,
        cache: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Clock = system_clock,
    ) -> None:
        _check_channel_arguments(channel, tls)
        super().__init__(timeout=timeout, cache=cache, cache_size=cache_size, clock=clock)
        self._owns_channel = channel is None
        if channel is None:
            channel = _open(grpc.aio.insecure_channel, grpc.aio.secure_channel, target, tls)
        self._channel = channel
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)
        self._flights: dict[tuple[str, str, timedelta], asyncio.Task[AccessToken]] = {}

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
        """Stop the calls in flight (their callers get BrokerUnavailable) and the channel."""
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel()
        if flights:
            await asyncio.gather(*flights, return_exceptions=True)
        if self._owns_channel:
            await self._channel.close()

    async def get_access_token(
        self,
        *,
        realm_id: str | None = None,
        user_id: str | None = None,
        min_validity: timedelta | None = None,
    ) -> AccessToken:
        query = _Query.of(realm_id, user_id, min_validity)
        if not self._cache.enabled or not query.cacheable:
            self._cache.count_miss()
            return await self._call(query)
        token = self._cache.lookup(query)
        if token is not None:
            return token
        flight = self._flights.get(query.key)
        if flight is None:
            self._cache.count_miss()
            flight = asyncio.get_running_loop().create_task(
                self._call(query), name="broker-client-get-access-token"
            )
            self._flights[query.key] = flight
            flight.add_done_callback(functools.partial(self._landed, query.key))
        else:
            self._cache.count_shared()
        try:
            # Shielded: a caller that gives up does not take the call from the others.
            return await asyncio.shield(flight)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if flight.cancelled() and caller is not None and not caller.cancelling():
                raise BrokerUnavailable("the client was closed during the call", None) from None
            raise

    def _landed(self, key: tuple[str, str, timedelta], flight: asyncio.Task[AccessToken]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # seen, even if every caller gave up waiting

    async def _call(self, query: _Query) -> AccessToken:
        """One GetAccessToken, retried while the broker names a delay that fits the timeout."""
        request = query.request()
        deadline = _Deadline(self._timeout)
        while True:
            try:
                reply = await self._stub.GetAccessToken(request, timeout=deadline.remaining())
            except grpc.aio.AioRpcError as exc:
                error = _translate(exc)
                wait = deadline.retry_wait(error)
                if wait is None:
                    self._cache.forget_after(query, error)
                    raise error from None
                await asyncio.sleep(wait)
                continue
            token = _token_from_reply(reply)
            self._cache.store(query, token)
            return token


# -- blocking -----------------------------------------------------------------------------


class _Flight:
    """One call in flight for a key, in the blocking client: its lock is held by the thread
    making the call until the outcome is in; the others wait on it and read the outcome."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.token: AccessToken | None = None
        self.error: BaseException | None = None

    def land(self, token: AccessToken | None, error: BaseException | None) -> None:
        self.token, self.error = token, error
        self.lock.release()

    def outcome(self, timeout: float) -> AccessToken:
        if not self.lock.acquire(timeout=timeout):
            raise BrokerUnavailable("gave up waiting for another thread's call", None)
        self.lock.release()
        if self.token is not None:
            return self.token
        if isinstance(self.error, Exception):
            raise self.error
        raise BrokerUnavailable("the call this one waited for was interrupted", None)


class SyncBrokerClient(_CachingClient):
    """The blocking client, for code without an event loop; share one across threads."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.Channel | None = None,
        timeout: float = 10.0,
        tls: ClientTls | None = None,
        cache: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Clock = system_clock,
    ) -> None:
        _check_channel_arguments(channel, tls)
        super().__init__(timeout=timeout, cache=cache, cache_size=cache_size, clock=clock)
        self._owns_channel = channel is None
        if channel is None:
            channel = _open(grpc.insecure_channel, grpc.secure_channel, target, tls)
        self._channel = channel
        self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)
        self._flights: dict[tuple[str, str, timedelta], _Flight] = {}
        self._flights_lock = threading.Lock()

    def __enter__(self) -> SyncBrokerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def get_access_token(
        self,
        *,
        realm_id: str | None = None,
        user_id: str | None = None,
        min_validity: timedelta | None = None,
    ) -> AccessToken:
        query = _Query.of(realm_id, user_id, min_validity)
        if not self._cache.enabled or not query.cacheable:
            self._cache.count_miss()
            return self._call(query)
        token = self._cache.lookup(query)
        if token is not None:
            return token
        with self._flights_lock:
            # A call may have landed since the look above: it stores before it leaves.
            token = self._cache.lookup(query)
            if token is not None:
                return token
            flight = self._flights.get(query.key)
            leading = flight is None
            if flight is None:
                flight = self._flights[query.key] = _Flight()
        if not leading:
            self._cache.count_shared()
            return flight.outcome(self._timeout)
        self._cache.count_miss()
        try:
            token = self._call(query)
        except BaseException as exc:
            self._land(query, flight, None, exc)
            raise
        self._land(query, flight, token, None)
        return token

    def _land(
        self, query: _Query, flight: _Flight, token: AccessToken | None, error: BaseException | None
    ) -> None:
        with self._flights_lock:
            del self._flights[query.key]
        flight.land(token, error)

    def _call(self, query: _Query) -> AccessToken:
        """One GetAccessToken, retried while the broker names a delay that fits the timeout."""
        request = query.request()
        deadline = _Deadline(self._timeout)
        while True:
            try:
                reply = self._stub.GetAccessToken(request, timeout=deadline.remaining())
            except grpc.RpcError as exc:
                if not isinstance(exc, grpc.Call):
                    raise
                error = _translate(exc)
                wait = deadline.retry_wait(error)
                if wait is None:
                    self._cache.forget_after(query, error)
                    raise error from None
                time.sleep(wait)
                continue
            token = _token_from_reply(reply)
            self._cache.store(query, token)
            return token
