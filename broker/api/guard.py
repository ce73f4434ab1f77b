"""Who is calling, may they, and what happened: every servicer method runs under the guard.

``@guarded`` wraps each servicer method. Before the method runs it takes the
caller's identity from the TLS handshake (none in plaintext), asks the
authorization policy what this caller may do with this method
(``RealmAccess``), and refuses at once a caller the policy gives nothing. The
method then checks each realm it touches (``current_call().require(realm)``:
the same PERMISSION_DENIED whether or not the realm exists). Whatever
happens, the call is audited once (principal, method, realm, outcome), and a
``BrokerError`` becomes its status in the one mapping of ``broker.api.status``.

Without a policy (loopback, dev, tests) every caller may call everything; the
audit trail is kept all the same.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from broker.access.audit import AuditTrail
from broker.access.policy import ALLOW_ALL, ANONYMOUS, Identity, Policy, RealmAccess
from broker.api.status import to_status
from broker.errors import BrokerError, Code, PermissionDenied

log = logging.getLogger("broker.api")

Context = grpc.aio.ServicerContext[Any, Any]
_INTERNAL = "internal error; see the broker's log"
_MAX_DECIDED = 10_000


class Guard:
    """What every guarded call needs: the policy in effect (if any) and the audit trail."""

    def __init__(
        self,
        *,
        audit: AuditTrail,
        calls: CallObserver | None = None,
        policy: Callable[[], Policy] | None = None,
        tls: bool = False,
    ) -> None:
        self.audit = audit
        self.calls = calls
        self._policy = policy
        self._tls = tls
        # The same client certificate calls the same methods all day: remember what the
        # policy in effect says of it, keyed by the certificate itself (never by the peer
        # address, which another client can reuse).
        self._decided: dict[tuple[bytes, str], tuple[Identity, RealmAccess]] = {}
        self._decided_by: Policy | None = None

    def authorize(self, context: Context, method: str) -> tuple[Identity, RealmAccess]:
        """The caller's identity and what the policy lets it do with ``method``."""
        if not self._tls:
            return ANONYMOUS, self.access(ANONYMOUS, method)
        auth = context.auth_context()
        if self._policy is None:
            return Identity.from_auth_context(auth), ALLOW_ALL
        policy = self._policy()
        if policy is not self._decided_by or len(self._decided) > _MAX_DECIDED:
            self._decided.clear()
            self._decided_by = policy
        certificate = b"".join(auth.get("x509_pem_cert", ()))
        key = (certificate, method)
        known = self._decided.get(key)
        if known is None:
            identity = Identity.from_auth_context(auth)
            known = self._decided[key] = (identity, policy.access(identity, method))
        return known

    def identity(self, context: Context) -> Identity:
        if not self._tls:
            return ANONYMOUS
        return Identity.from_auth_context(context.auth_context())

    def access(self, identity: Identity, method: str) -> RealmAccess:
        if self._policy is None:
            return ALLOW_ALL
        return self._policy().access(identity, method)


@dataclass(slots=True)
class Call:
    """The call being served: the servicer says here which realm it touched."""

    method: str
    identity: Identity
    access: RealmAccess
    guard: Guard
    realm_id: str | None = None

    def reauthorize(self) -> RealmAccess:
        """A long stream re-asks before each message: a policy change reaches it at once.
        PERMISSION_DENIED when the caller may no longer make this call at all."""
        self.access = self.guard.access(self.identity, self.method)
        if not self.access.any:
            raise PermissionDenied("this call, no longer allowed by the policy,")
        return self.access

    def require(self, realm_id: str) -> None:
        """This call touches ``realm_id``: PERMISSION_DENIED unless the policy allows it."""
        self.realm_id = realm_id
        if not self.access.allows(realm_id):
            raise PermissionDenied("this call on this realm")

    def require_everything(self) -> None:
        """This call touches every connection (a sweep)."""
        if not self.access.everything:
            raise PermissionDenied("this call, which touches every connection,")


_CALL: ContextVar[Call] = ContextVar("broker_call")


def current_call() -> Call:
    return _CALL.get()


class CallObserver(Protocol):
    def call_finished(self, path: str, code: str, seconds: float, *, streaming: bool) -> None: ...


class GuardedServicer(Protocol):
    SERVICE: str
    guard: Guard


S = TypeVar("S", bound=GuardedServicer)
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[S, Request, Context], Awaitable[Response]]
StreamHandler = Callable[[S, Request, Context], AsyncIterator[Response]]


class Decorator(Protocol):
    def __call__(self, method: Handler[S, Request, Response]) -> Handler[S, Request, Response]: ...


class StreamDecorator(Protocol):
    def __call__(
        self, method: StreamHandler[S, Request, Response]
    ) -> StreamHandler[S, Request, Response]: ...


def guarded(*, admin: bool) -> Decorator:
    """Authorize, audit and map errors for one servicer method (``admin``: also in the table)."""

    def decorate(method: Handler[S, Request, Response]) -> Handler[S, Request, Response]:
        name = method.__name__

        @functools.wraps(method)
        async def wrapper(self: S, request: Request, context: Context) -> Response:
            # Inline rather than an async context manager: this runs on every
            # GetAccessToken, and the warm path is a few microseconds of its own.
            call, token, started = _begin(self, context, name)
            outcome = Code.OK
            try:
                if not call.access.any:
                    raise PermissionDenied("this call")
                return await method(self, request, context)
            except BaseException as exc:
                outcome = _outcome_of(exc)
                await _abort(context, exc, name)  # raises for broker errors and bugs
                raise
            finally:
                _end(call, token, started, outcome, admin=admin, streaming=False)

        return wrapper

    return decorate


def guarded_stream(*, admin: bool) -> StreamDecorator:
    """``guarded`` for a server-streaming method: one audit event when the stream ends."""

    def decorate(
        method: StreamHandler[S, Request, Response],
    ) -> StreamHandler[S, Request, Response]:
        name = method.__name__

        @functools.wraps(method)
        async def wrapper(self: S, request: Request, context: Context) -> AsyncIterator[Response]:
            call, token, started = _begin(self, context, name)
            outcome = Code.OK
            try:
                if not call.access.any:
                    raise PermissionDenied("this call")
                async for response in method(self, request, context):
                    yield response
            except BaseException as exc:
                outcome = _outcome_of(exc)
                await _abort(context, exc, name)
                raise
            finally:
                _end(call, token, started, outcome, admin=admin, streaming=True)

        return wrapper

    return decorate


_Begun = tuple["Call", Token["Call"], float]


def _begin(servicer: GuardedServicer, context: Context, name: str) -> _Begun:
    """Who calls and what the policy lets it do (the wrapper refuses a caller given nothing)."""
    started = time.perf_counter()
    guard = servicer.guard
    path = f"/{servicer.SERVICE}/{name}"
    identity, access = guard.authorize(context, path)
    call = Call(path, identity, access, guard)
    return call, _CALL.set(call), started


def _outcome_of(exc: BaseException) -> Code:
    if isinstance(exc, BrokerError):
        return exc.code
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return Code.CANCELLED  # the caller went away (a stream it stopped reading, say)
    return Code.INTERNAL


async def _abort(context: Context, exc: BaseException, name: str) -> None:
    """End the call with ``exc``'s status (raises): a broker error's own, a bug's INTERNAL
    (logged). Anything else (a cancellation, an abort already under way) is left to go on."""
    if isinstance(exc, BrokerError):
        await context.abort_with_status(to_status(exc))
    elif isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        log.exception("unexpected error", extra={"rpc": name})
        await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)


def _end(
    call: Call, token: Token[Call], started: float, outcome: Code, *, admin: bool, streaming: bool
) -> None:
    _CALL.reset(token)
    guard = call.guard
    # ``Code`` is a StrEnum: the member is its own text (``.value`` costs an enum lookup).
    guard.audit.record(call.identity.principal, call.method, call.realm_id, outcome, admin=admin)
    if guard.calls is not None:
        elapsed = time.perf_counter() - started
        guard.calls.call_finished(call.method, outcome, elapsed, streaming=streaming)


REFLECTION_PREFIX = "/grpc.reflection."


class ReflectionGate(grpc.aio.ServerInterceptor):
    """Server reflection only for callers whose policy allows its path (health stays open).

    Installed only when a policy is in effect; the broker's own services are
    guarded by ``@guarded`` instead, which sees the realm too.
    """

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(REFLECTION_PREFIX):
            return handler
        inner: Any = handler.stream_stream  # an async generator function in grpc.aio
        guard = self._guard

        async def gated(requests: Any, context: Context) -> Any:
            if not guard.access(guard.identity(context), method).any:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "the authorization policy does not allow reflection for this caller",
                )
            async for response in inner(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            gated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
