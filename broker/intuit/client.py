"""Intuit's OAuth endpoints over aiohttp: code exchange, refresh, revoke.

Every answer is classified before it leaves this module (see
``../shared/spec/intuit-oauth.md``):

- ``invalid_grant``             -> InvalidGrant: the grant is dead
- 401 / ``invalid_client``      -> ClientRejected: our credentials are wrong (logged loudly)
- 429, 5xx, timeouts, resets,
  unreadable or odd answers     -> UpstreamUnavailable: keep the stored token, try later

Nothing here retries: a refresh whose answer was lost may have rotated the
token at Intuit, and the caller (the token service) decides what happens next.
Log lines carry ``realm_id`` and Intuit's ``intuit_tid``, never a token.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp

from broker.domain.model import INTUIT_REFRESH_TOKEN_LIFETIME, IssuedTokens
from broker.errors import ClientRejected, InvalidGrant, UpstreamUnavailable
from broker.settings import Secret

log = logging.getLogger("broker.intuit")

HARD_EXPIRY_HEADER = "x-include-refresh-token-hard-expires-in"
_MAX_BODY = 64 * 1024
_MAX_TOKEN_LENGTH = 8192
_MAX_RETRY_AFTER = timedelta(minutes=5)
_ERROR_CODE = re.compile(r"[A-Za-z_]{1,64}")


class HttpIntuitClient:
    """Implements ``broker.domain.ports.IntuitClient``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: Secret,
        token_url: str,
        revoke_url: str,
        redirect_uri: str,
    ) -> None:
        self._session = session
        credentials = f"{client_id}:{client_secret.value}".encode()
        self._authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
        self._token_url = token_url
        self._revoke_url = revoke_url
        self._redirect_uri = redirect_uri

    async def refresh(self, refresh_token: str, *, realm_id: str) -> IssuedTokens:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request(form, realm_id, "refresh")

    async def exchange_code(self, code: str, *, realm_id: str) -> IssuedTokens:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri,
        }
        return await self._token_request(form, realm_id, "code_exchange")

    async def revoke(self, token: str, *, realm_id: str) -> None:
        answer = await self._post(self._revoke_url, realm_id, "revoke", json_body={"token": token})
        if answer.status == 200:
            return
        # Intuit answers 400 for a token it no longer knows: the grant is gone either way.
        if answer.status == 400 and _error_code(answer.body) != "invalid_client":
            log.info("Intuit no longer knew the revoked token", extra=_fields(realm_id, answer.tid))
            return
        raise _failure(answer, realm_id)

    async def _token_request(
        self, form: dict[str, str], realm_id: str, operation: str
    ) -> IssuedTokens:
        answer = await self._post(self._token_url, realm_id, operation, form=form)
        if answer.status != 200:
            raise _failure(answer, realm_id)
        return _parse_tokens(answer.body, answer.tid, realm_id)

    async def _post(
        self,
        url: str,
        realm_id: str,
        operation: str,
        *,
        form: dict[str, str] | None = None,
        json_body: dict[str, str] | None = None,
    ) -> _Answer:
        started = time.monotonic()
        headers = {
            "Accept": "application/json",
            "Authorization": self._authorization,
            HARD_EXPIRY_HEADER: "true",
        }
        try:
            async with self._session.post(
                url, data=form, json=json_body, headers=headers
            ) as response:
                answer = _Answer(
                    status=response.status,
                    body=await _read_capped(response),
                    tid=response.headers.get("intuit_tid"),
                    retry_after=_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            log.warning("Intuit timed out", extra={"realm_id": realm_id, "operation": operation})
            raise UpstreamUnavailable("Intuit did not answer in time") from None
        except aiohttp.ClientError as exc:
            log.warning(
                "Intuit unreachable",
                extra={"realm_id": realm_id, "operation": operation, "error": type(exc).__name__},
            )
            raise UpstreamUnavailable(f"Intuit unreachable ({type(exc).__name__})") from exc
        log.info(
            "Intuit answered",
            extra={
                **_fields(realm_id, answer.tid),
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


def _failure(answer: _Answer, realm_id: str) -> Exception:
    code = _error_code(answer.body)
    tid = answer.tid
    if answer.status >= 500:
        # Whatever the body says: Intuit may have rotated server-side; keep the token.
        return UpstreamUnavailable(f"Intuit answered HTTP {answer.status}", intuit_tid=tid)
    if code == "invalid_grant" and answer.status == 400:
        return InvalidGrant("Intuit answered invalid_grant", intuit_tid=tid)
    if answer.status == 401 or code == "invalid_client":
        log.error(
            "Intuit rejected the broker's client credentials (invalid_client): "
            "check QB_CLIENT_ID and QB_CLIENT_SECRET",
            extra=_fields(realm_id, tid),
        )
        return ClientRejected("Intuit rejected the broker's client credentials", intuit_tid=tid)
    if answer.status == 429:
        return UpstreamUnavailable(
            "Intuit is throttling token requests (429)",
            intuit_tid=tid,
            retry_after=answer.retry_after,
        )
    described = f"HTTP {answer.status}" + (f" {code}" if code else "")
    if 400 <= answer.status < 500:
        log.error(
            "Intuit refused a token request",
            extra={**_fields(realm_id, tid), "status": answer.status},
        )
    return UpstreamUnavailable(f"Intuit answered {described}", intuit_tid=tid)


def _retry_after(header: str | None) -> timedelta | None:
    if header is None or not header.strip().isdigit():
        return None
    return min(timedelta(seconds=int(header.strip())), _MAX_RETRY_AFTER)


def _fields(realm_id: str, tid: str | None) -> dict[str, Any]:
    return {"realm_id": realm_id, "intuit_tid": tid}


def _error_code(body: bytes | None) -> str | None:
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def _parse_tokens(body: bytes, tid: str | None, realm_id: str) -> IssuedTokens:
    """Read a 200 answer; keep its refresh token whenever there is a usable one.

    Intuit may already have rotated: the refresh token in this answer can be the
    only live one. So only a missing or unusable ``refresh_token`` rejects the
    answer; an odd access token or expiry is noted and replaced by the safe
    reading (no usable access token, Intuit's standard 101-day life, no hard
    limit known).
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise UpstreamUnavailable("Intuit's answer was not JSON", intuit_tid=tid) from None
    if not isinstance(data, dict):
        raise UpstreamUnavailable("Intuit's answer was not a JSON object", intuit_tid=tid)
    odd: list[str] = []

    def token(name: str) -> str | None:
        value = data.get(name)
        if isinstance(value, str) and 0 < len(value) <= _MAX_TOKEN_LENGTH:
            return value
        odd.append(name)
        return None

    def seconds(name: str, *, low: int, high: int) -> timedelta | None:
        value = data.get(name)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return timedelta(seconds=value)
        if name in data:
            odd.append(name)
        return None

    refresh_token = token("refresh_token")
    if refresh_token is None:
        raise UpstreamUnavailable("Intuit's answer lacks a usable refresh_token", intuit_tid=tid)
    year = 366 * 24 * 3600
    access_token = token("access_token")
    expires_in = seconds("expires_in", low=1, high=24 * 3600)
    refresh_in = seconds("x_refresh_token_expires_in", low=1, high=6 * year)
    if refresh_in is None and "x_refresh_token_expires_in" not in odd:
        odd.append("x_refresh_token_expires_in")
    if odd:
        log.warning(
            "Intuit's answer had unusable fields; keeping its refresh token",
            extra={**_fields(realm_id, tid), "fields": sorted(set(odd))},
        )
    return IssuedTokens(
        access_token=access_token if expires_in is not None else None,
        refresh_token=refresh_token,
        expires_in=expires_in or timedelta(0),
        refresh_token_expires_in=refresh_in or INTUIT_REFRESH_TOKEN_LIFETIME,
        hard_expires_in=seconds("x_refresh_token_hard_expires_in", low=0, high=6 * year),
        intuit_tid=tid,
    )
