"""The scheduler thread: it keeps the time, the event loop does the work.

A ``schedule.Scheduler`` runs in a thread of its own and, when a sweep is due,
hands it to the broker's event loop with ``asyncio.run_coroutine_threadsafe``.
The thread does no I/O and touches no asyncio object but through that call.
Besides the configured schedule it runs a catch-up check every quarter of an
hour (a sweep that no replica ran, or that was cut short, happens soon after).
The ``schedule`` job is set from ``SweepSchedule``, whose ``next_after`` is the
statement of when runs happen (a test holds the two to the same times).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import schedule

from broker.clock import Clock, system_clock
from broker.domain.schedule import SweepSchedule
from broker.domain.sweep import SweepKind

log = logging.getLogger("broker.scheduler")

CATCH_UP_EVERY_MINUTES = 15
SweepStarter = Callable[[SweepKind], Coroutine[Any, Any, object]]


class SweepScheduler:
    def __init__(
        self,
        when: SweepSchedule,
        loop: asyncio.AbstractEventLoop,
        start_sweep: SweepStarter,
        *,
        clock: Clock = system_clock,
        tick_seconds: float = 1.0,
    ) -> None:
        self._when = when
        self._clock = clock
        self._loop = loop
        self._start_sweep = start_sweep
        self._tick = tick_seconds
        self._stop = threading.Event()
        self._running: concurrent.futures.Future[object] | None = None
        self.scheduler = schedule.Scheduler()
        if when.day is None:
            job = self.scheduler.every(int(when.interval.total_seconds()) // 60).minutes
        else:
            every = self.scheduler.every()
            job = every.day if when.day == "daily" else getattr(every, when.day)
            job = job.at(when.at, "UTC")
        job.do(self._submit, SweepKind.SCHEDULED)
        self.sweep_job = job
        self.scheduler.every(CATCH_UP_EVERY_MINUTES).minutes.do(self._submit, SweepKind.CATCH_UP)
        self._thread = threading.Thread(target=self._run, name="qbo-sweep-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info(
            "sweep scheduler started",
            extra={
                "schedule": self._when.text,
                "next_sweep_utc": self._when.next_after(self._clock()).isoformat(),
            },
        )

    def stop(self) -> None:
        """Blocking (joins the thread): call it from a worker thread, not the event loop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._running is not None:
            self._running.cancel()  # a sweep submitted but not started will not start

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """No sweep handed over by this scheduler is still running."""
        return self._running is None or self._running.done()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                self.scheduler.run_pending()
            except Exception:  # the thread must outlive any one bad tick
                log.exception("sweep scheduler tick failed")

    def _submit(self, kind: SweepKind) -> None:
        if self._running is not None and not self._running.done():
            log.info("a sweep is still running; not starting another", extra={"kind": kind.value})
            return
        self._running = asyncio.run_coroutine_threadsafe(self._start_sweep(kind), self._loop)
