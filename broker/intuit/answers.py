"""How an answer of Intuit's token endpoint is read: tokens kept, failures classified.

The one statement of the error table of Intuit's OAuth (docs/design.md), used by
the HTTP client (``broker.intuit.oauth``) and the in-process fake:

- ``invalid_grant``             -> InvalidGrant: the grant is dead
- 401 / ``invalid_client``      -> ClientRejected: our credentials are wrong (logged loudly)
- 429, 5xx, timeouts, resets,
  unreadable or odd answers     -> UpstreamUnavailable: keep the stored token, try later

A 200 answer keeps its refresh token whenever there is a usable one, however
odd its other fields: Intuit may already have rotated, and that value can be
the only live one.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from typing import Any

from broker.domain.model import INTUIT_REFRESH_TOKEN_LIFETIME, IssuedTokens
from broker.errors import ClientRejected, InvalidGrant, UpstreamError, UpstreamUnavailable

log = logging.getLogger("broker.intuit")

MAX_TOKEN_LENGTH = 8192
_ERROR_CODE = re.compile(r"[A-Za-z_]{1,64}")
_YEAR = 366 * 24 * 3600


def failure(
    status: int,
    code: str | None,
    *,
    realm_id: str,
    intuit_tid: str | None = None,
    retry_after: timedelta | None = None,
) -> UpstreamError:
    """The error for a non-200 answer with HTTP ``status`` and OAuth ``error`` ``code``."""
    tid = intuit_tid
    if status >= 500:
        # Whatever the body says: Intuit may have rotated server-side; keep the token.
        return UpstreamUnavailable(
            f"Intuit answered HTTP {status}",
            intuit_tid=tid,
            retry_after=retry_after,  # a 503 may say when to come back
            kind="server_error",
        )
    if code == "invalid_grant" and status == 400:
        return InvalidGrant(
            "Intuit answered invalid_grant",
            intuit_tid=tid,
            may_have_rotated=False,
            kind="invalid_grant",
        )
    if status == 401 or code == "invalid_client":
        log.error(
            "Intuit rejected the broker's client credentials (invalid_client): "
            "check QB_CLIENT_ID and QB_CLIENT_SECRET",
            extra=fields(realm_id, tid),
        )
        return ClientRejected(
            "Intuit rejected the broker's client credentials",
            intuit_tid=tid,
            may_have_rotated=False,
            kind="client_rejected",
        )
    if status == 429:
        return UpstreamUnavailable(
            "Intuit is throttling token requests (429)",
            intuit_tid=tid,
            retry_after=retry_after,
            may_have_rotated=False,
            kind="throttled",
        )
    described = f"HTTP {status}" + (f" {code}" if code else "")
    if 400 <= status < 500:
        log.error(
            "Intuit refused a token request", extra={**fields(realm_id, tid), "status": status}
        )
    return UpstreamUnavailable(f"Intuit answered {described}", intuit_tid=tid)


def fields(realm_id: str, tid: str | None) -> dict[str, Any]:
    return {"realm_id": realm_id, "intuit_tid": tid}


def company_id(body: bytes) -> str | None:
    """``CompanyInfo.Id`` of the accounting API's CompanyInfo answer, if it has one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    info = data.get("CompanyInfo") if isinstance(data, dict) else None
    value = info.get("Id") if isinstance(info, dict) else None
    return value if isinstance(value, str) else None


def error_code(body: bytes | None) -> str | None:
    """The ``error`` of an OAuth error body, if it is a plausible one."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def read_tokens(body: bytes, tid: str | None, realm_id: str) -> IssuedTokens:
    """Read a 200 answer; keep its refresh token whenever there is a usable one.

    Only a missing or unusable ``refresh_token`` rejects the answer; an odd
    access token or expiry is noted and replaced by the safe reading (no usable
    access token, Intuit's standard 101-day life, no hard limit known).
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
        if isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_LENGTH:
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
    access_token = token("access_token")
    expires_in = seconds("expires_in", low=1, high=24 * 3600)
    refresh_in = seconds("x_refresh_token_expires_in", low=1, high=6 * _YEAR)
    if refresh_in is None and "x_refresh_token_expires_in" not in odd:
        odd.append("x_refresh_token_expires_in")
    if odd:
        log.warning(
            "Intuit's answer had unusable fields; keeping its refresh token",
            extra={**fields(realm_id, tid), "fields": sorted(set(odd))},
        )
    return IssuedTokens(
        access_token=access_token if expires_in is not None else None,
        refresh_token=refresh_token,
        expires_in=expires_in or timedelta(0),
        refresh_token_expires_in=refresh_in or INTUIT_REFRESH_TOKEN_LIFETIME,
        hard_expires_in=seconds("x_refresh_token_hard_expires_in", low=0, high=6 * _YEAR),
        intuit_tid=tid,
    )
