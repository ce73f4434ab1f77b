"""The audit trail: every token handed out and every admin call, allowed or denied.

A call only appends a small tuple to a list (no formatting, no I/O, no lock);
a background task turns the batch into one structured log event per call
(``"event": "audit"``: principal, method, realm, outcome; the line's ``ts`` is
the call's time) written to the log in one write, and the admin calls to
``broker_audit_events`` in one statement. The hot path pays for a tuple; the
log and the database pay once per batch.

If the database cannot take a batch, it is kept and retried, up to a bound;
beyond it the oldest admin events are dropped from the database copy (never
from the log), and the number dropped is counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from broker import logs
from broker.errors import StorageError

log = logging.getLogger(logs.AUDIT_LOGGER)

FLUSH_EVERY = 0.25
"""Seconds between two writes of the batch."""
FLUSH_AT = 2000
"""A batch this large is written at once."""
MAX_UNWRITTEN = 100_000
"""Admin events kept for the database while it is away."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime
    principal: str | None
    method: str
    realm_id: str | None
    outcome: str


class AuditSink(Protocol):
    async def write(self, events: Sequence[AuditEvent]) -> None:
        """Store admin events (StorageError if the database fails)."""
        ...


_Pending = tuple[float, str | None, str, str | None, str, bool]


class AuditTrail:
    def __init__(self, sink: AuditSink | None) -> None:
        self._sink = sink
        self._pending: list[_Pending] = []
        self._unwritten: list[AuditEvent] = []
        self._dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        principal: str | None,
        method: str,
        realm_id: str | None,
        outcome: str,
        *,
        admin: bool,
    ) -> None:
        """Note one call (cheap: the hot path calls this)."""
        self._pending.append((time.time(), principal, method, realm_id, outcome, admin))
        if len(self._pending) >= FLUSH_AT:
            self._wake.set()

    @property
    def dropped(self) -> int:
        """Admin events the database never got (the log has them)."""
        return self._dropped

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-trail")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        logs.write_events(
            log.name,
            (
                (
                    at,
                    {
                        "message": "audit",
                        "event": "audit",
                        "principal": principal,
                        "method": method,
                        "realm_id": realm_id,
                        "outcome": outcome,
                    },
                )
                for at, principal, method, realm_id, outcome, _ in batch
            ),
        )
        if self._sink is not None:
            self._unwritten += [
                AuditEvent(datetime.fromtimestamp(at, UTC), principal, method, realm_id, outcome)
                for at, principal, method, realm_id, outcome, admin in batch
                if admin
            ]
        await self._write_unwritten()

    async def _write_unwritten(self) -> None:
        if not self._unwritten or self._sink is None:
            return
        try:
            await self._sink.write(self._unwritten)
        except StorageError as exc:
            over = len(self._unwritten) - MAX_UNWRITTEN
            if over > 0:
                del self._unwritten[:over]
                self._dropped += over
                log.error(
                    "audit events the database could not take were dropped (the log has them)",
                    extra={"dropped": over, "error": str(exc)},
                )
            return
        self._unwritten = []

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY)
            self._wake.clear()
            await self.flush()
