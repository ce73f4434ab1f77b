"""Trouble to inject into the simulated Intuit, one request at a time.

Tests fill a ``FaultPlan`` from Python; ``qbo-broker dev`` fills it over
``POST /_simulator/faults``. The HTTP server asks the plan for a fault on
every token and revoke request and acts it out (see ``server.py``).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeAlias, cast, get_args

Endpoint: TypeAlias = Literal["token", "revoke", "company_info"]
FaultEndpoint: TypeAlias = Literal["token", "revoke", "company_info", "any"]


class FaultKind(StrEnum):
    SERVER_ERROR = "server_error"
    """5xx (500 by default) with a JSON body."""
    HTML_ERROR = "html_error"
    """502 (by default) with an HTML page, as a load balancer in trouble sends."""
    THROTTLED = "throttled"
    """429 with ``Retry-After: ceil(seconds)``."""
    DELAY = "delay"
    """Sleep ``seconds`` and then answer normally, so clients can hit their timeouts."""
    RESET = "reset"
    """Close the connection without an answer."""
    GARBAGE = "garbage"
    """200 (by default) with ``body`` (default: not JSON) labelled application/json."""
    INVALID_CLIENT = "invalid_client"
    """401 ``{"error": "invalid_client"}`` whatever the credentials."""
    ROTATE_THEN_FAIL = "rotate_then_fail"
    """Do the work (the token rotates server-side) but answer 500: the answer is lost."""
    ROTATE_THEN_RESET = "rotate_then_reset"
    """Do the work (the token rotates server-side), then drop the connection unanswered."""
    HOLD = "hold"
    """Keep the request waiting until ``FaultPlan.release()``, then answer normally: a
    test knows (``wait_held``) that the broker is waiting on Intuit, without sleeping."""


_DEFAULT_STATUS: dict[FaultKind, int] = {
    FaultKind.SERVER_ERROR: 500,
    FaultKind.HTML_ERROR: 502,
    FaultKind.THROTTLED: 429,
    FaultKind.GARBAGE: 200,
    FaultKind.INVALID_CLIENT: 401,
    FaultKind.ROTATE_THEN_FAIL: 500,
}

DEFAULT_GARBAGE_BODY = "<<this is not JSON>>"


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    ``realm_id`` restricts the fault to requests about that realm: the realm
    of the refresh token, authorization code or revoked token, as the model
    knows it. ``body`` is the payload of a GARBAGE answer (e.g. a wrong-shape
    JSON document); other kinds ignore it.
    """

    kind: FaultKind
    status: int | None = None
    seconds: float = 0.0
    endpoint: FaultEndpoint = "token"
    realm_id: str | None = None
    body: str | None = None

    def __post_init__(self) -> None:
        # Accept the plain string too ("delay"), and store the enum member.
        object.__setattr__(self, "kind", FaultKind(self.kind))
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")
        is_5xx = self.status is None or 500 <= self.status <= 599
        if self.kind is FaultKind.SERVER_ERROR and not is_5xx:
            raise ValueError("a SERVER_ERROR status must be 5xx")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError("seconds must be a finite number >= 0")
        if self.endpoint not in get_args(FaultEndpoint):
            raise ValueError(f"endpoint must be one of {get_args(FaultEndpoint)}")

    @property
    def response_status(self) -> int | None:
        """The status the client sees; None for kinds that answer normally or not at all."""
        return self.status or _DEFAULT_STATUS.get(self.kind)

    def matches(self, endpoint: Endpoint, realm_id: str | None) -> bool:
        if self.endpoint not in ("any", endpoint):
            return False
        return self.realm_id is None or self.realm_id == realm_id

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build from the admin endpoint's JSON; raises ValueError on anything odd."""
        unknown = set(data) - {"kind", "status", "seconds", "endpoint", "realm_id", "body"}
        if unknown:
            raise ValueError(f"unknown fields: {sorted(unknown)}")
        try:
            kind = FaultKind(data["kind"])
        except (KeyError, ValueError):
            raise ValueError(f"kind must be one of {[k.value for k in FaultKind]}") from None
        status = data.get("status")
        seconds = data.get("seconds", 0.0)
        endpoint = data.get("endpoint", "token")
        realm_id = data.get("realm_id")
        body = data.get("body")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise ValueError("status must be an integer")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise ValueError("seconds must be a number")
        if endpoint not in get_args(FaultEndpoint):
            raise ValueError(f"endpoint must be one of {get_args(FaultEndpoint)}")
        if realm_id is not None and not isinstance(realm_id, str):
            raise ValueError("realm_id must be a string")
        if body is not None and not isinstance(body, str):
            raise ValueError("body must be a string")
        return cls(kind, status, float(seconds), cast(FaultEndpoint, endpoint), realm_id, body)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "status": self.status,
            "seconds": self.seconds,
            "endpoint": self.endpoint,
            "realm_id": self.realm_id,
            "body": self.body,
        }


@dataclass
class _Scheduled:
    fault: Fault
    remaining: int | None
    """None: forever."""


class FaultPlan:
    """An ordered list of faults; each request takes the first one that matches."""

    def __init__(self) -> None:
        self._scheduled: list[_Scheduled] = []
        self._served = 0
        self.served_by_kind: Counter[FaultKind] = Counter()
        self._held = 0
        self._held_changed = asyncio.Event()
        self._release = asyncio.Event()

    # -- HOLD -----------------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting in a HOLD fault right now."""
        return self._held

    async def wait_held(self, count: int = 1) -> None:
        """Wait until ``count`` requests are held (bound it with the test's own timeout)."""
        while self._held < count:
            self._held_changed.clear()
            await self._held_changed.wait()

    def release(self) -> None:
        """Let every held request go on (requests held later wait for the next release)."""
        self._release.set()
        self._release = asyncio.Event()

    async def hold(self, stopping: asyncio.Event) -> bool:
        """Hold one request until released; False if ``stopping`` came first."""
        release = self._release
        self._held += 1
        self._held_changed.set()
        waits = [asyncio.ensure_future(release.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return release.is_set()
        finally:
            for wait in waits:
                wait.cancel()
            self._held -= 1
            self._held_changed.set()

    def add(self, fault: Fault, times: int = 1) -> None:
        """Serve ``fault`` to the next ``times`` matching requests."""
        if times < 1:
            raise ValueError("times must be >= 1 (use add_forever for no limit)")
        self._scheduled.append(_Scheduled(fault, times))

    def add_forever(self, fault: Fault) -> None:
        """Serve ``fault`` to every matching request until ``clear``."""
        self._scheduled.append(_Scheduled(fault, None))

    def clear(self) -> None:
        self._scheduled.clear()

    def take(self, endpoint: Endpoint, realm_id: str | None) -> Fault | None:
        """The fault for this request, if any (first scheduled match wins)."""
        for index, entry in enumerate(self._scheduled):
            if not entry.fault.matches(endpoint, realm_id):
                continue
            if entry.remaining is not None:
                entry.remaining -= 1
                if entry.remaining == 0:
                    del self._scheduled[index]
            self._served += 1
            self.served_by_kind[entry.fault.kind] += 1
            return entry.fault
        return None

    @property
    def served(self) -> int:
        """How many faults have been acted out so far."""
        return self._served

    def pending(self) -> list[tuple[Fault, int | None]]:
        """Scheduled faults with their remaining count (None: forever)."""
        return [(entry.fault, entry.remaining) for entry in self._scheduled]

    def __len__(self) -> int:
        return len(self._scheduled)

    def to_json(self) -> dict[str, Any]:
        return {
            "served": self._served,
            "served_by_kind": {kind.value: n for kind, n in self.served_by_kind.items()},
            "pending": [
                {**fault.to_json(), "times": remaining} for fault, remaining in self.pending()
            ],
        }
