"""Intuit's OAuth endpoints over aiohttp: code exchange, refresh, revoke.

How answers are read and failures classified lives in ``broker.intuit.answers``;
this module only moves bytes. Nothing here retries: a refresh whose answer was
lost may have rotated the token at Intuit, and the caller (the token service)
decides what happens next. Log lines carry ``realm_id`` and Intuit's
``intuit_tid``, never a token.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar
from urllib.parse import quote

import aiohttp

from broker.domain.model import IssuedTokens
from broker.errors import UpstreamError, UpstreamUnavailable
from broker.intuit import answers
from broker.intuit.endpoints import HARD_EXPIRY_HEADER, TID_HEADER
from broker.settings import Secret

log = logging.getLogger("broker.intuit")

_MAX_BODY = 64 * 1024
T = TypeVar("T")


class IntuitObserver(Protocol):
    def intuit_answered(self, endpoint: str, outcome: str, seconds: float) -> None: ...


_SECONDS = re.compile(r"[0-9]{1,32}")
_MAX_RETRY_AFTER = timedelta(minutes=5)


class IntuitOAuthClient:
    """Implements ``broker.domain.ports.IntuitClient`` over HTTP."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: Secret,
        token_url: str,
        revoke_url: str,
        redirect_uri: str,
        api_url: str = "",
        observer: IntuitObserver | None = None,
    ) -> None:
        self._observer = observer
        self._session = session
        credentials = f"{client_id}:{client_secret.value}".encode()
        self._authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
        self._token_url = token_url
        self._revoke_url = revoke_url
        self._api_url = api_url.rstrip("/")
        self._redirect_uri = redirect_uri

    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._observed("refresh", self._token_request(form, realm_id, "refresh"))

    async def exchange_code(self, code: str, *, realm_id: str) -> IssuedTokens:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri,
        }
        exchange = self._token_request(form, realm_id, "code_exchange")
        return await self._observed("code_exchange", exchange)

    async def revoke(self, token: str, *, realm_id: str) -> None:
        await self._observed("revoke", self._revoke(token, realm_id))

    async def opens_company(self, access_token: str, *, realm_id: str) -> bool:
        return await self._observed("company_info", self._company_info(access_token, realm_id))

    async def _company_info(self, access_token: str, realm_id: str) -> bool:
        """Whether ``access_token`` opens ``realm_id``'s books: the accounting API's
        CompanyInfo answers 200 naming that company, or 401/403 for another company's token."""
        company = quote(realm_id, safe="")
        url = f"{self._api_url}/v3/company/{company}/companyinfo/{company}"
        answer = await self._send("GET", url, realm_id, "company_info", bearer=access_token)
        if answer.status in (401, 403):
            return False
        if answer.status != 200:
            raise self._failure(answer, realm_id)
        return answers.company_id(answer.body) == realm_id

    async def _observed(self, endpoint: str, request: Awaitable[T]) -> T:
        """Count the request and time it, by how it ended."""
        started = time.monotonic()
        outcome = "success"
        try:
            return await request
        except UpstreamError as exc:
            outcome = exc.kind
            raise
        finally:
            if self._observer is not None:
                self._observer.intuit_answered(endpoint, outcome, time.monotonic() - started)

    async def _revoke(self, token: str, realm_id: str) -> None:
        answer = await self._send(
            "POST", self._revoke_url, realm_id, "revoke", json_body={"token": token}
        )
        # RFC 7009: revoking a token the server no longer knows is a 200 too. The one other
        # answer that means "already dead" is invalid_grant; anything else (a 400 for a
        # malformed request, an HTML error page) leaves the grant alive: keep the tokens.
        if answer.status == 200:
            return
        if answer.status == 400 and answers.error_code(answer.body) == "invalid_grant":
            log.info(
                "Intuit no longer knew the revoked token",
                extra=answers.fields(realm_id, answer.tid),
            )
            return
        raise self._failure(answer, realm_id)

    async def _token_request(
        self, form: dict[str, str], realm_id: str, operation: str
    ) -> IssuedTokens:
        answer = await self._send("POST", self._token_url, realm_id, operation, form=form)
        if answer.status != 200:
            raise self._failure(answer, realm_id)
        return answers.read_tokens(answer.body, answer.tid, realm_id)

    @staticmethod
    def _failure(answer: _Answer, realm_id: str) -> Exception:
        return answers.failure(
            answer.status,
            answers.error_code(answer.body),
            realm_id=realm_id,
            intuit_tid=answer.tid,
            retry_after=answer.retry_after,
        )

    async def _send(
        self,
        method: str,
        url: str,
        realm_id: str,
        operation: str,
        *,
        form: dict[str, str] | None = None,
        json_body: dict[str, str] | None = None,
        bearer: str | None = None,
    ) -> _Answer:
        started = time.monotonic()
        headers = {"Accept": "application/json"}
        if bearer is None:
            headers |= {"Authorization": self._authorization, HARD_EXPIRY_HEADER: "true"}
        else:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            # Never follow a redirect: it would re-send a token to another origin.
            async with self._session.request(
                method, url, data=form, json=json_body, headers=headers, allow_redirects=False
            ) as response:
                answer = _Answer(
                    status=response.status,
                    body=await _read_capped(response),
                    tid=response.headers.get(TID_HEADER),
                    retry_after=_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            log.warning("Intuit timed out", extra={"realm_id": realm_id, "operation": operation})
            raise UpstreamUnavailable(
                "Intuit did not answer in time", answer_lost=True, kind="timeout"
            ) from None
        except aiohttp.ClientError as exc:
            log.warning(
                "Intuit unreachable",
                extra={"realm_id": realm_id, "operation": operation, "error": type(exc).__name__},
            )
            never_sent = isinstance(exc, aiohttp.ClientConnectorError)
            raise UpstreamUnavailable(
                f"Intuit unreachable ({type(exc).__name__})",
                answer_lost=not never_sent,
                may_have_rotated=not never_sent,
                kind="network_error",
            ) from exc
        troubled = answer.status >= 500 or answer.status == 429
        log.log(
            logging.WARNING if troubled else logging.INFO,
            "Intuit answered",
            extra={
                **answers.fields(realm_id, answer.tid),
                "operation": operation,
                "status": answer.status,
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        if len(answer.body) > _MAX_BODY:
            raise UpstreamUnavailable("Intuit's answer was too large", intuit_tid=answer.tid)
        return answer


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, however many pieces it arrives in, up to one byte past the cap."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > _MAX_BODY:
            break
    return bytes(body)


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    tid: str | None
    retry_after: timedelta | None


def _retry_after(header: str | None) -> timedelta | None:
    """Retry-After in whole seconds (ASCII digits), capped; anything else is ignored.

    Read on every answer, including a 200 that carries a rotated token: nothing in
    this header may raise."""
    if header is None or not _SECONDS.fullmatch(header.strip()):
        return None
    seconds = min(int(header.strip()), int(_MAX_RETRY_AFTER.total_seconds()))
    return timedelta(seconds=seconds)
