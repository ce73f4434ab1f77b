"""The background sweep: renew idle connections before their refresh tokens lapse.

Renewal on use keeps busy connections young; the sweep is for the ones nobody
uses. It picks every active connection whose refresh token is at least
``background_age`` old, or would expire before the next run plus a margin
(``RefreshPolicy.sweep_due``), oldest and nearest-to-expiry first, and renews
each through the token service's single-flight path, so a sweep and a caller
never refresh one connection twice.

Replicas: every run holds a PostgreSQL advisory lock for its whole length, so
one replica sweeps at a time; a replica that dies drops its session and the
lock with it. A scheduled run that finds a sweep completed within half an
interval was beaten to it by a sibling and does nothing. A catch-up run (after
start-up, and every quarter of an hour) sweeps only when the last completed
run is older than the interval: a sweep missed because no replica was up, or
cut short by a deploy or an Intuit outage, happens soon after.

Pacing: ``rate_limit`` between two refreshes; ``max_per_run`` caps a run (0:
no cap). Five Intuit (or database) outages in a row end the run early
(``aborted``): the rest wait for the catch-up, and the stored tokens are kept.
A connection that fails on its own (a row that does not decrypt) is counted
as failed and the run goes on. ``stop()`` ends a
run at the next connection; the refresh in flight completes and is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from broker.clock import Clock
from broker.domain.model import Trigger
from broker.domain.policy import RefreshPolicy, SweepCutoffs
from broker.domain.tokens import TokenService
from broker.errors import (
    BrokerError,
    ClientRejected,
    ConnectionNotFound,
    ReauthorizationRequired,
    RefreshPending,
    ShuttingDown,
    StorageError,
    StorageUnavailable,
    SweepInProgress,
    UpstreamError,
)

log = logging.getLogger("broker.sweep")

CATCH_UP_GRACE = timedelta(minutes=15)
MAX_OUTAGES_IN_A_ROW = 5

Progress = Callable[[int, int], None]
"""Called with (done, total) as the run goes."""


class SweepKind(StrEnum):
    SCHEDULED = "scheduled"
    STARTUP = "startup"
    CATCH_UP = "catch_up"
    MANUAL = "manual"


class SweepOutcome(StrEnum):
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    ABORTED = "aborted"
    ABANDONED = "abandoned"
    """Recorded for a run whose replica died: the next run closes it."""


@dataclass(frozen=True)
class SweepReport:
    kind: SweepKind
    outcome: SweepOutcome | None
    """None when the run did not happen (``reason`` says why)."""
    examined: int = 0
    refreshed: int = 0
    failed: int = 0
    skipped: int = 0
    reason: str | None = None


class SweepLock(Protocol):
    async def held(self) -> bool:
        """Still ours? (False once the session that holds it is gone.)"""
        ...


class SweepLedger(Protocol):
    def exclusive(self) -> AbstractAsyncContextManager[SweepLock | None]:
        """Hold the sweep lock for the block; yields None if another holder has it."""
        ...

    async def close_abandoned(self, now: datetime) -> int:
        """Close the runs left "running" by replicas that died (only the lock holder calls)."""
        ...

    async def due_realms(self, cutoffs: SweepCutoffs) -> list[str]: ...

    async def last_completed(self) -> datetime | None: ...

    async def start_run(self, kind: SweepKind, replica: str, now: datetime) -> int: ...

    async def finish_run(
        self,
        run_id: int,
        outcome: SweepOutcome,
        now: datetime,
        *,
        examined: int,
        refreshed: int,
        failed: int,
    ) -> None: ...


class SweepObserver(Protocol):
    def sweep_finished(self, report: SweepReport) -> None: ...


class Sweeper:
    def __init__(
        self,
        *,
        tokens: TokenService,
        ledger: SweepLedger,
        clock: Clock,
        replica: str,
        rate_limit: timedelta,
        max_per_run: int,
        observer: SweepObserver,
    ) -> None:
        self._tokens = tokens
        self._ledger = ledger
        self._clock = clock
        self._replica = replica
        self._rate_limit = rate_limit.total_seconds()
        self._max_per_run = max_per_run
        self._observer = observer
        self._stopping = asyncio.Event()
        self._runs: set[asyncio.Task[SweepReport]] = set()

    @property
    def policy(self) -> RefreshPolicy:
        return self._tokens.policy

    def stop(self) -> None:
        """End any run at the next connection (the refresh in flight completes)."""
        self._stopping.set()

    async def finish(self) -> None:
        """Wait for the runs in flight (after ``stop``, they end at their next connection)."""
        await asyncio.gather(*self._runs, return_exceptions=True)

    async def run(self, kind: SweepKind, progress: Progress | None = None) -> SweepReport:
        """Run a sweep now; SweepInProgress (manual runs), ShuttingDown or storage errors.

        The run outlives its caller's patience: a caller that gives up does not
        stop it; only ``stop`` does.
        """
        task = asyncio.create_task(self._run(kind, progress), name=f"sweep-{kind.value}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return await asyncio.shield(task)

    async def run_quietly(self, kind: SweepKind) -> SweepReport:
        """A background run (scheduled, catch-up, start-up): failures are logged, not raised."""
        try:
            return await self.run(kind)
        except BrokerError as exc:
            log.warning("sweep failed", extra={"kind": kind.value, "error": str(exc)})
            return SweepReport(kind, None, reason=str(exc))

    async def _run(self, kind: SweepKind, progress: Progress | None) -> SweepReport:
        if self._stopping.is_set():
            raise ShuttingDown("the broker is shutting down; no new sweep starts")
        async with self._ledger.exclusive() as lock:
            if lock is None:
                if kind is SweepKind.MANUAL:
                    raise SweepInProgress("another sweep is running; try again when it is done")
                report = SweepReport(kind, None, reason="another replica is sweeping")
            elif (reason := await self._reason_to_skip(kind)) is not None:
                log.info("sweep not needed", extra={"kind": kind.value, "reason": reason})
                report = SweepReport(kind, None, reason=reason)
            else:
                report = await self._sweep(kind, progress, lock)
        self._observer.sweep_finished(report)
        return report

    async def _reason_to_skip(self, kind: SweepKind) -> str | None:
        if kind in (SweepKind.MANUAL, SweepKind.STARTUP):
            return None
        last = await self._ledger.last_completed()
        if last is None:
            return None
        since = self._clock() - last
        interval = self.policy.sweep_interval
        if kind is SweepKind.SCHEDULED and since < interval / 2:
            return "a sibling replica completed this run already"
        if kind is SweepKind.CATCH_UP and since < interval + CATCH_UP_GRACE:
            return "the last run is recent enough"
        return None

    async def _sweep(
        self, kind: SweepKind, progress: Progress | None, lock: SweepLock
    ) -> SweepReport:
        started = self._clock()
        abandoned = await self._ledger.close_abandoned(started)
        if abandoned:
            log.warning("closed sweep runs whose replica died", extra={"runs": abandoned})
        run_id = await self._ledger.start_run(kind, self._replica, started)
        due = await self._ledger.due_realms(self.policy.sweep_cutoffs(started))
        if self._max_per_run and len(due) > self._max_per_run:
            log.warning(
                "more connections are due than QB_REFRESH_JOB_MAX_PER_RUN allows; "
                "the rest wait for the next run",
                extra={"due": len(due), "cap": self._max_per_run},
            )
            due = due[: self._max_per_run]
        log.info("sweep started", extra={"kind": kind.value, "due": len(due)})
        refreshed = failed = skipped = outages_in_a_row = 0
        outcome = SweepOutcome.COMPLETED
        try:
            for done, realm_id in enumerate(due):
                if self._stopping.is_set():
                    outcome = SweepOutcome.INTERRUPTED
                    break
                if not await lock.held():
                    # A database restart ended the session that held the lock: a sibling may
                    # be sweeping now. Touch nothing more; the catch-up finishes the work.
                    log.error("the sweep lost its lock; stopping", extra={"kind": kind.value})
                    outcome = SweepOutcome.ABORTED
                    break
                try:
                    result = await self._tokens.refresh(realm_id, Trigger.SWEEP)
                except ConnectionNotFound:
                    skipped += 1  # deleted since the selection
                except RefreshPending:
                    skipped += 1  # a sibling holds its new tokens and is storing them
                except ShuttingDown:
                    outcome = SweepOutcome.INTERRUPTED  # nothing more is sent to Intuit
                    break
                except ReauthorizationRequired:
                    failed += 1  # the customer must reconnect; marked, and no retry will help
                    outages_in_a_row = 0
                except ClientRejected:
                    # Our credentials: every other call would fail too.
                    failed += 1
                    outcome = SweepOutcome.ABORTED
                    break
                except (UpstreamError, StorageUnavailable):
                    failed += 1
                    outages_in_a_row += 1
                    if outages_in_a_row >= MAX_OUTAGES_IN_A_ROW:
                        # Intuit or PostgreSQL is down: leave the rest.
                        outcome = SweepOutcome.ABORTED
                        break
                except BrokerError as exc:
                    # One bad row (a value that does not decrypt, say), or any failure no
                    # one foresaw, must not stop every run: count it, name it, go on.
                    failed += 1
                    log.error(
                        "sweep could not renew a connection",
                        extra={"realm_id": realm_id, "error": str(exc)},
                    )
                else:
                    outages_in_a_row = 0
                    if not result.performed:
                        skipped += 1  # renewed meanwhile (by a caller or a sibling)
                        continue
                    refreshed += 1
                    await self._pause()
                finally:
                    if progress is not None:
                        progress(done + 1, len(due))
        except BaseException:
            outcome = SweepOutcome.ABORTED  # a bug or a cancellation: the run's row says so
            raise
        finally:
            with contextlib.suppress(StorageError):  # the run's row is history, not state
                await self._ledger.finish_run(
                    run_id,
                    outcome,
                    self._clock(),
                    examined=len(due),
                    refreshed=refreshed,
                    failed=failed,
                )
        report = SweepReport(kind, outcome, len(due), refreshed, failed, skipped)
        log.info(
            "sweep finished",
            extra={
                "kind": kind.value,
                "outcome": outcome.value,
                "examined": len(due),
                "refreshed": refreshed,
                "failed": failed,
                "skipped": skipped,
            },
        )
        return report

    async def _pause(self) -> None:
        if self._rate_limit > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._rate_limit)
