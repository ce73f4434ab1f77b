"""Per-connection backoff after Intuit failed: do not hammer it, tell callers when to return."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.errors import UpstreamError

ZERO = timedelta(0)
FIRST_DELAY = timedelta(seconds=1)
MAX_DELAY = timedelta(minutes=2)


@dataclass
class _State:
    failures: int = 0
    until: datetime | None = None


class Backoff:
    """Exponential backoff with jitter, per realm, honouring Intuit's ``Retry-After``."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def left(self, realm_id: str, now: datetime) -> timedelta | None:
        """How long this realm must still wait, or None if it may call Intuit now."""
        state = self._states.get(realm_id)
        if state is None or state.until is None:
            return None
        left = state.until - now
        return left if left > ZERO else None

    def failed(self, realm_id: str, exc: UpstreamError, now: datetime) -> timedelta:
        """Record a failure; returns how long the realm now waits."""
        state = self._states.setdefault(realm_id, _State())
        state.failures += 1
        delay = exc.retry_after
        if delay is None:
            ceiling = min(MAX_DELAY, FIRST_DELAY * 2 ** min(state.failures - 1, 10))
            delay = ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
        delay = min(delay, MAX_DELAY)
        state.until = now + delay
        return delay

    def clear(self, realm_id: str) -> None:
        self._states.pop(realm_id, None)
