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
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
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
    realm_id: str | None = None
    ask_again: Callable[[], RealmAccess] | None = None
    """The policy in effect now, for this caller and method (streams that outlive a
    policy change)."""

    def reauthorize(self) -> RealmAccess:
        """A long stream re-asks before each message: a policy change reaches it at once.
        PERMISSION_DENIED when the caller may no longer make this call at all."""
        if self.ask_again is not None:
            self.access = self.ask_again()
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
            async with _serving(self, context, name, admin=admin, streaming=False):
                return await method(self, request, context)
            raise AssertionError("abort returned")  # pragma: no cover - abort always raises

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
            async with _serving(self, context, name, admin=admin, streaming=True):
                async for response in method(self, request, context):
                    yield response

        return wrapper

    return decorate


@contextlib.asynccontextmanager
async def _serving(
    servicer: GuardedServicer, context: Context, name: str, *, admin: bool, streaming: bool
) -> AsyncIterator[Call]:
    started = time.perf_counter()
    guard = servicer.guard
    path = f"/{servicer.SERVICE}/{name}"
    identity, access = guard.authorize(context, path)
    call = Call(path, identity, access, ask_again=lambda: guard.access(identity, path))
    token = _CALL.set(call)
    outcome = Code.OK
    try:
        if not access.any:
            raise PermissionDenied("this call")
        yield call
    except BrokerError as exc:
        outcome = exc.code
        await context.abort_with_status(to_status(exc))
    except asyncio.CancelledError:
        outcome = Code.CANCELLED
        raise
    except Exception:
        outcome = Code.INTERNAL
        log.exception("unexpected error", extra={"rpc": name})
        await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)
    finally:
        _CALL.reset(token)
        guard.audit.record(identity.principal, path, call.realm_id, outcome.value, admin=admin)
        if guard.calls is not None:
            elapsed = time.perf_counter() - started
            guard.calls.call_finished(path, outcome.value, elapsed, streaming=streaming)


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
