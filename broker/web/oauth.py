"""``/oauth/connect`` and ``/oauth/callback``: the browser's side of the connect flow.

Every answer is a small plain HTML page (no script, no inline style) or a
redirect, never cached (``Cache-Control: no-store``), never framed, with no
referrer sent on: the query holds a session, a state or an authorization code.
Inputs are capped in length before anything looks them up. Each request is
audited (method ``GET /oauth/…``, the user the session belongs to, the realm,
the outcome); the logic is ``broker.domain.connect``.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from broker.access.audit import AuditTrail
from broker.domain.connect import (
    CONNECT_PATH,
    COOKIE,
    Completion,
    ConnectFlow,
    ConnectRefused,
    Outcome,
)
from broker.errors import BrokerError

log = logging.getLogger("broker.connect")

CALLBACK_PATH = "/oauth/callback"
_MAX_PARAMETER = 2048
_REALM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class ConnectEndpoints:
    flow: ConnectFlow
    audit: AuditTrail
    secure_cookie: bool


def add_routes(app: web.Application, endpoints: Callable[[], ConnectEndpoints | None]) -> None:
    """``endpoints`` answers None while the broker is still starting (503)."""

    async def connect(request: web.Request) -> web.StreamResponse:
        ready = endpoints()
        if ready is None:
            return _page(503, "Not ready", "The service is starting. Try again in a moment.")
        session = request.query.get("session", "")
        if not session or len(session) > _MAX_PARAMETER:
            return _refused(ready, "GET " + CONNECT_PATH, "this link is not valid")
        try:
            redirect = await ready.flow.begin(session)
        except ConnectRefused as exc:
            return _refused(ready, "GET " + CONNECT_PATH, str(exc))
        except BrokerError as exc:
            return _trouble(ready, "GET " + CONNECT_PATH, exc)
        ready.audit.record(None, "GET " + CONNECT_PATH, None, "OK", admin=True)
        response = _redirect(redirect.url)
        response.set_cookie(
            COOKIE,
            redirect.browser_value,
            max_age=max(1, int(redirect.max_age.total_seconds())),
            path="/oauth/",
            httponly=True,
            secure=ready.secure_cookie,
            samesite="Lax",  # sent back on Intuit's top-level redirect, not on cross-site posts
        )
        return response

    async def callback(request: web.Request) -> web.StreamResponse:
        ready = endpoints()
        if ready is None:
            return _page(503, "Not ready", "The service is starting. Try again in a moment.")
        query = request.query
        method = "GET " + CALLBACK_PATH
        if any(len(value) > _MAX_PARAMETER for value in query.values()):
            return _refused(ready, method, "the request is malformed")
        state = query.get("state", "")
        realm_id = query.get("realmId") or None
        if not state:
            return _refused(ready, method, "this sign-in has no state")
        if realm_id is not None and not _REALM_ID.fullmatch(realm_id):
            return _refused(ready, method, "Intuit's answer names no valid company")
        try:
            done = await ready.flow.complete(
                state=state,
                browser_value=request.cookies.get(COOKIE),
                code=query.get("code") or None,
                realm_id=realm_id,
                error=query.get("error") or None,
            )
        except ConnectRefused as exc:
            return _refused(ready, method, str(exc))
        except BrokerError as exc:
            return _trouble(ready, method, exc)
        ready.audit.record(
            f"user:{done.user_id}", method, done.realm_id, done.outcome.value, admin=True
        )
        return _finish(done)

    app.router.add_get(CONNECT_PATH, connect)
    app.router.add_get(CALLBACK_PATH, callback)


def _finish(done: Completion) -> web.StreamResponse:
    target = done.return_to()
    if target is not None:
        response = _redirect(target)
    else:
        title, text = _OUTCOME_PAGES[done.outcome]
        response = _page(200 if done.outcome is Outcome.CONNECTED else 409, title, text)
    response.del_cookie(COOKIE, path="/oauth/")
    return response


def _refused(endpoints: ConnectEndpoints, method: str, why: str) -> web.Response:
    endpoints.audit.record(None, method, None, "INVALID_ARGUMENT", admin=True)
    return _page(
        400,
        "This link cannot be used",
        f"{why.capitalize()}. Nothing was connected. Start again from the application.",
    )


def _trouble(endpoints: ConnectEndpoints, method: str, exc: BrokerError) -> web.Response:
    log.error("connect flow failed", extra={"error": str(exc)})
    endpoints.audit.record(None, method, None, exc.code.value, admin=True)
    return _page(
        503,
        "Something went wrong",
        "Nothing was connected. Start again from the application in a few minutes.",
    )


_OUTCOME_PAGES = {
    Outcome.CONNECTED: (
        "Connected",
        "Your QuickBooks company is connected. You may close this page.",
    ),
    Outcome.DENIED: ("Not connected", "You cancelled at QuickBooks; nothing was connected."),
    Outcome.NOT_PERMITTED: (
        "Not connected",
        "This application may not connect that QuickBooks company; nothing was connected.",
    ),
    Outcome.OWNED_BY_ANOTHER_USER: (
        "Already connected",
        "This QuickBooks company is connected to another account; nothing was changed.",
    ),
    Outcome.INTUIT_UNAVAILABLE: (
        "QuickBooks did not answer",
        "Nothing was connected. Start again from the application in a few minutes.",
    ),
    Outcome.ERROR: ("Not connected", "QuickBooks reported an error; nothing was connected."),
}


def _redirect(url: str) -> web.Response:
    return web.Response(status=302, headers={**_HEADERS, "Location": url})


def _page(status: int, title: str, text: str) -> web.Response:
    body = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html", headers=_HEADERS)
