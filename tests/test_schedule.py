"""QB_REFRESH_JOB_SCHEDULE and the scheduler thread that acts on it."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.schedule import SweepSchedule
from broker.domain.sweep import SweepKind
from broker.errors import ConfigurationError
from broker.scheduler import SweepScheduler


@pytest.mark.parametrize(
    ("text", "day", "at", "interval"),
    [
        ("sunday 02:00", "sunday", "02:00", timedelta(days=7)),
        ("  Monday   3:30 ", "monday", "03:30", timedelta(days=7)),
        ("daily 23:59", "daily", "23:59", timedelta(days=1)),
        ("every 6 hours", None, None, timedelta(hours=6)),
        ("every 1 hour", None, None, timedelta(hours=1)),
        ("EVERY 30 MINUTES", None, None, timedelta(minutes=30)),
    ],
)
def test_the_accepted_forms(
    text: str, day: str | None, at: str | None, interval: timedelta
) -> None:
    schedule = SweepSchedule.parse(text)
    assert (schedule.day, schedule.at, schedule.interval) == (day, at, interval)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "whenever",
        "blursday 02:00",
        "sunday 25:00",
        "sunday 24:00",
        "sunday 02:60",
        "sunday 2",
        "sunday at 02:00",
        "every 0 hours",
        "every 169 hours",
        "every 1441 minutes",
        "every 5 days",
        "every six hours",
        "sunday 02:00; rm -rf /",
    ],
)
def test_a_malformed_schedule_stops_start_up_with_a_clear_message(text: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SweepSchedule.parse(text)
    assert "QB_REFRESH_JOB_SCHEDULE" in str(caught.value)


class Recorder:
    def __init__(self) -> None:
        self.kinds: list[SweepKind] = []
        self.threads: list[threading.Thread] = []
        self.release = asyncio.Event()

    async def __call__(self, kind: SweepKind) -> object:
        self.kinds.append(kind)
        self.threads.append(threading.current_thread())
        await self.release.wait()  # a long sweep
        return None


async def eventually(check: object, within: float = 3.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not reached in time")


async def test_the_weekly_job_is_due_on_sunday_at_two_utc() -> None:
    scheduler = SweepScheduler(
        SweepSchedule.parse("sunday 02:00"), asyncio.get_running_loop(), Recorder()
    )
    scheduled = [job for job in scheduler.scheduler.jobs if job.at_time is not None]
    assert len(scheduled) == 1
    next_run = scheduled[0].next_run
    assert next_run is not None
    in_utc = next_run.astimezone(UTC)  # schedule keeps naive local times
    assert (in_utc.weekday(), in_utc.hour, in_utc.minute) == (6, 2, 0)
    assert timedelta(0) < in_utc - datetime.now(UTC) <= timedelta(days=7)


async def test_the_thread_hands_the_sweep_to_the_event_loop_once_at_a_time() -> None:
    recorder = Recorder()
    scheduler = SweepScheduler(
        SweepSchedule.parse("every 1 hours"),
        asyncio.get_running_loop(),
        recorder,
        tick_seconds=0.02,
    )
    scheduler.start()
    try:
        for job in scheduler.scheduler.jobs:  # make every job due now
            job.next_run = datetime.now() - timedelta(seconds=1)
        await eventually(lambda: recorder.kinds)

        # The sweep ran on the event loop's thread, not the scheduler's.
        assert recorder.threads == [threading.current_thread()]
        assert recorder.kinds[0] in (SweepKind.SCHEDULED, SweepKind.CATCH_UP)

        for job in scheduler.scheduler.jobs:  # due again while the first still runs
            job.next_run = datetime.now() - timedelta(seconds=1)
        await asyncio.sleep(0.2)
        assert len(recorder.kinds) == 1  # not stacked on top of the running one

        recorder.release.set()
        await asyncio.sleep(0.05)
        for job in scheduler.scheduler.jobs:
            job.next_run = datetime.now() - timedelta(seconds=1)
        await eventually(lambda: len(recorder.kinds) == 2)
    finally:
        scheduler.stop()
    assert not scheduler.alive
