"""The simulated Intuit over real HTTP on loopback.

The paths mirror Intuit's, so the broker only needs ``QB_TOKEN_URL``,
``QB_REVOKE_URL`` and ``QB_AUTH_URL`` pointed here::

    POST /oauth2/v1/tokens/bearer               code exchange and refresh (form, Basic auth)
    POST /v2/oauth2/tokens/revoke               revoke (JSON {"token": ...}, Basic auth)
    GET  /connect/oauth2                        consent, simulated: 302 back with code and realmId
    GET  /v3/company/{realm}/companyinfo/{realm}   needs a valid Bearer access token

    GET    /_simulator/stats                    counters (admin, for qbo-broker dev)
    GET    /_simulator/faults                   pending faults
    POST   /_simulator/faults                   {kind, status?, seconds?, endpoint?, realm_id?,
                                                 body?, times? | forever?}
    DELETE /_simulator/faults                   clear the plan

Every response carries an ``intuit_tid`` header. Logs carry the method, the
path, the status, the realm and the ``intuit_tid``; never a token or secret.
The admin endpoints have no authentication: the server listens on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, assert_never

import aiohttp
from aiohttp import web
from yarl import URL

from broker.devtools.fake_intuit.faults import (
    DEFAULT_GARBAGE_BODY,
    Endpoint,
    Fault,
    FaultKind,
    FaultPlan,
)
from broker.devtools.fake_intuit.model import IntuitModel, OAuthError, SimulatorStats, TokenResponse
from broker.intuit.endpoints import HARD_EXPIRY_HEADER, TID_HEADER

log = logging.getLogger(__name__)

TOKEN_PATH: Final = "/oauth2/v1/tokens/bearer"  # noqa: S105 (a path, not a secret)
REVOKE_PATH: Final = "/v2/oauth2/tokens/revoke"
AUTH_PATH: Final = "/connect/oauth2"
COMPANY_INFO_PATH: Final = "/v3/company/{realm_id}/companyinfo/{company_id}"

_REALM: Final = web.RequestKey("realm_id", str)
_FAULT: Final = web.RequestKey("fault", str)
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_HTML_ERROR_PAGE: Final = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center></body></html>"
)
_STOP_GRACE_SECONDS: Final = 2.0
_ROTATE_THEN: Final = (FaultKind.ROTATE_THEN_FAIL, FaultKind.ROTATE_THEN_RESET)

_Form = Mapping[str, object]


def create_app(
    model: IntuitModel, faults: FaultPlan, *, stopping: asyncio.Event | None = None
) -> web.Application:
    """The aiohttp application; ``stopping`` cuts DELAY faults short at shutdown."""
    handlers = _Handlers(model, faults, stopping or asyncio.Event())
    app = web.Application()
    app.on_response_prepare.append(_stamp_and_log)
    app.router.add_post(TOKEN_PATH, handlers.token)
    app.router.add_post(REVOKE_PATH, handlers.revoke)
    app.router.add_get(AUTH_PATH, handlers.authorize)
    app.router.add_get(COMPANY_INFO_PATH, handlers.company_info)
    app.router.add_get("/_simulator/stats", handlers.stats)
    app.router.add_get("/_simulator/faults", handlers.list_faults)
    app.router.add_post("/_simulator/faults", handlers.add_fault)
    app.router.add_delete("/_simulator/faults", handlers.clear_faults)
    return app


class IntuitSimulator:
    """Runs the simulated Intuit on ``host:port`` (port 0: any free port).

    ``async with IntuitSimulator(model) as sim: ...`` or ``start()``/``stop()``.
    """

    def __init__(
        self,
        model: IntuitModel,
        faults: FaultPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.model = model
        self.faults = faults if faults is not None else FaultPlan()
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping = asyncio.Event()
        app = create_app(self.model, self.faults, stopping=self._stopping)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_STOP_GRACE_SECONDS)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner
        log.info("intuit simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()
        await runner.cleanup()

    async def __aenter__(self) -> IntuitSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def revoke_url(self) -> str:
        return self.base_url + REVOKE_PATH

    @property
    def auth_url(self) -> str:
        return self.base_url + AUTH_PATH

    @property
    def api_base_url(self) -> str:
        """Like ``https://quickbooks.api.intuit.com``: paths start with ``/v3/company/``."""
        return self.base_url

    def company_info_url(self, realm_id: str) -> str:
        return self.api_base_url + COMPANY_INFO_PATH.format(realm_id=realm_id, company_id=realm_id)

    @property
    def stats(self) -> SimulatorStats:
        return self.model.stats


class _Handlers:
    def __init__(self, model: IntuitModel, faults: FaultPlan, stopping: asyncio.Event) -> None:
        self._model = model
        self._faults = faults
        self._stopping = stopping

    # -- OAuth endpoints -----------------------------------------------------

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        grant_type = _form_str(form, "grant_type")
        subject = _form_str(form, "refresh_token" if grant_type == "refresh_token" else "code")
        include_hard = request.headers.get(HARD_EXPIRY_HEADER, "").strip().lower() == "true"

        def process() -> web.StreamResponse:
            issued = self._grant(grant_type, form)
            return web.json_response(issued.to_json(include_hard), headers=_NO_STORE)

        return await self._serve(request, "token", subject, process)

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        try:
            body: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        token = token if isinstance(token, str) and token else None

        def process() -> web.StreamResponse:
            if token is None:
                raise OAuthError("invalid_request", "a JSON body with a token is required")
            self._model.revoke(token)
            return web.Response(status=200)

        return await self._serve(request, "revoke", token, process)

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if query.get("client_id") != self._model.config.client_id:
            return _consent_error("Unknown client_id.")
        if query.get("response_type") != "code":
            return _consent_error("response_type must be code.")
        redirect_uri = query.get("redirect_uri", "")
        try:
            target = URL(redirect_uri)
        except ValueError:
            target = URL()
        if not target.absolute or target.scheme not in ("http", "https"):
            return _consent_error("redirect_uri must be an absolute http(s) URL.")
        code = self._model.authorize(query.get("realm_id") or None, redirect_uri=redirect_uri)
        realm_id = self._model.realm_for_token(code)
        assert realm_id is not None
        request[_REALM] = realm_id
        params = {"code": code, "realmId": realm_id}
        if "state" in query:
            params["state"] = query["state"]
        raise web.HTTPFound(target.update_query(params))

    async def company_info(self, request: web.Request) -> web.StreamResponse:
        realm_id = request.match_info["realm_id"]
        request[_REALM] = realm_id
        fault = self._faults.take("company_info", realm_id)
        if fault is not None:
            request[_FAULT] = fault.kind.value
            answer = await self._act_out(fault, request)
            if answer is not None:
                return answer
        scheme, _, token = request.headers.get(aiohttp.hdrs.AUTHORIZATION, "").partition(" ")
        if (
            scheme.lower() != "bearer"
            or request.match_info["company_id"] != realm_id
            or not self._model.access_token_valid(token.strip(), realm_id)
        ):
            return web.json_response(
                {
                    "fault": {
                        "error": [
                            {
                                "message": "message=AuthenticationFailed; errorCode=003200; "
                                "statusCode=401",
                                "code": "3200",
                            }
                        ],
                        "type": "AUTHENTICATION",
                    },
                    "time": self._model.now().isoformat(),
                },
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="Intuit"'},
            )
        return web.json_response(
            {
                "CompanyInfo": {"Id": realm_id, "CompanyName": f"Simulated Company {realm_id}"},
                "time": self._model.now().isoformat(),
            }
        )

    # -- admin endpoints -----------------------------------------------------

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                **self._model.stats.to_json(),
                "faults": self._faults.to_json(),
                "footprint": self._model.footprint(),
            }
        )

    async def list_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._faults.to_json())

    async def add_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            data: Any = await request.json()
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            times, forever = data.pop("times", 1), data.pop("forever", False)
            if not isinstance(times, int) or isinstance(times, bool) or times < 1:
                raise ValueError("times must be an integer >= 1")
            if not isinstance(forever, bool):
                raise ValueError("forever must be a boolean")
            fault = Fault.from_json(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return web.json_response(
                {"error": "invalid_request", "error_description": str(exc)}, status=400
            )
        if forever:
            self._faults.add_forever(fault)
        else:
            self._faults.add(fault, times)
        return web.json_response(
            {**fault.to_json(), "times": None if forever else times}, status=201
        )

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        cleared = len(self._faults)
        self._faults.clear()
        return web.json_response({"cleared": cleared})

    # -- the shared path of token and revoke requests ------------------------

    async def _serve(
        self,
        request: web.Request,
        endpoint: Endpoint,
        subject: str | None,
        process: Callable[[], web.StreamResponse],
    ) -> web.StreamResponse:
        """Faults first, then client authentication, then the model's answer."""
        realm_id = self._model.realm_for_token(subject) if subject else None
        if realm_id is not None:
            request[_REALM] = realm_id
        fault = self._faults.take(endpoint, realm_id)
        if fault is not None:
            request[_FAULT] = fault.kind.value
            log.info(
                "intuit simulator fault %s on %s realm_id=%s", fault.kind, request.path, realm_id
            )
            if fault.kind not in _ROTATE_THEN:
                answer = await self._act_out(fault, request)
                if answer is not None:
                    return answer
        try:
            self._authenticate(request)
            answer = process()
        except OAuthError as exc:
            answer = _oauth_error(exc)
        if fault is not None and fault.kind is FaultKind.ROTATE_THEN_FAIL:
            return _server_error(fault.response_status or 500)
        if fault is not None and fault.kind is FaultKind.ROTATE_THEN_RESET:
            return _reset(request)
        return answer

    async def _act_out(self, fault: Fault, request: web.Request) -> web.StreamResponse | None:
        """The answer a fault replaces the real one with; None to answer normally."""
        status = fault.response_status or 500
        match fault.kind:
            case FaultKind.SERVER_ERROR | FaultKind.ROTATE_THEN_FAIL:
                return _server_error(status)
            case FaultKind.HTML_ERROR:
                return web.Response(text=_HTML_ERROR_PAGE, content_type="text/html", status=status)
            case FaultKind.THROTTLED:
                return web.json_response(
                    {"error": "throttled", "error_description": "too many requests"},
                    status=status,
                    headers={"Retry-After": str(math.ceil(fault.seconds))},
                )
            case FaultKind.DELAY:
                if await self._sleep(fault.seconds):
                    return None
                return _reset(request)
            case FaultKind.HOLD:
                if await self._faults.hold(self._stopping):
                    return None
                return _reset(request)
            case FaultKind.RESET | FaultKind.ROTATE_THEN_RESET:
                return _reset(request)
            case FaultKind.GARBAGE:
                return web.Response(
                    text=fault.body if fault.body is not None else DEFAULT_GARBAGE_BODY,
                    content_type="application/json",
                    status=status,
                )
            case FaultKind.INVALID_CLIENT:
                return _oauth_error(OAuthError("invalid_client", "client authentication failed"))
            case _:
                assert_never(fault.kind)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep; False if the server began stopping meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    def _authenticate(self, request: web.Request) -> None:
        presented = _basic_credentials(request.headers.get(aiohttp.hdrs.AUTHORIZATION, ""))
        if presented is None:
            raise OAuthError("invalid_client", "client authentication is required")
        config = self._model.config
        id_ok = hmac.compare_digest(presented[0].encode(), config.client_id.encode())
        secret_ok = hmac.compare_digest(presented[1].encode(), config.client_secret.encode())
        if not (id_ok and secret_ok):
            raise OAuthError("invalid_client", "client authentication failed")

    def _grant(self, grant_type: str | None, form: _Form) -> TokenResponse:
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type == "refresh_token":
            refresh_token = _form_str(form, "refresh_token")
            if refresh_token is None:
                raise OAuthError("invalid_request", "refresh_token is required")
            return self._model.refresh(refresh_token)
        if grant_type == "authorization_code":
            code, redirect_uri = _form_str(form, "code"), _form_str(form, "redirect_uri")
            if code is None or redirect_uri is None:
                raise OAuthError("invalid_request", "code and redirect_uri are required")
            return self._model.exchange_code(code, redirect_uri)
        raise OAuthError("unsupported_grant_type", "grant_type is not supported")


async def _stamp_and_log(request: web.Request, response: web.StreamResponse) -> None:
    tid = f"1-{secrets.token_hex(4)}-{secrets.token_hex(12)}"
    response.headers[TID_HEADER] = tid
    dropped = request.transport is None or request.transport.is_closing()
    log.info(
        "intuit simulator %s %s -> %s realm_id=%s fault=%s intuit_tid=%s",
        request.method,
        request.path,
        "connection dropped" if dropped else response.status,
        request.get(_REALM),
        request.get(_FAULT),
        tid,
    )


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(client_id, client_secret) from ``Basic base64(id:secret)``, or None if malformed."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, secret = decoded.partition(":")
    return (client_id, secret) if colon else None


def _form_str(form: _Form, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value else None


def _oauth_error(exc: OAuthError) -> web.Response:
    return web.json_response(
        {"error": exc.error, "error_description": exc.description},
        status=exc.status,
        headers=_NO_STORE,
    )


def _server_error(status: int) -> web.Response:
    return web.json_response(
        {"error": "server_error", "error_description": "simulated upstream failure"},
        status=status,
    )


def _consent_error(message: str) -> web.Response:
    page = f"<html><body><h1>Something went wrong</h1><p>{message}</p></body></html>"
    return web.Response(text=page, content_type="text/html", status=400)


def _reset(request: web.Request) -> web.StreamResponse:
    """Drop the connection; the response returned is never written."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)
