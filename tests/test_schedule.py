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
from tests.support import eventually


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


def make_due(scheduler: SweepScheduler) -> datetime:
    """Make every job due now; returns the moment, to see when the thread has run them."""
    now = datetime.now()
    for job in scheduler.scheduler.jobs:
        job.next_run = now - timedelta(seconds=1)
    return now


def all_run_since(scheduler: SweepScheduler, moment: datetime) -> bool:
    """The thread has run every job made due at ``moment`` (each was rescheduled)."""
    return all(
        job.next_run is not None and job.next_run > moment for job in scheduler.scheduler.jobs
    )


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
        make_due(scheduler)
        await eventually(lambda: recorder.kinds, what="a sweep handed over")

        # The sweep ran on the event loop's thread, not the scheduler's.
        assert recorder.threads == [threading.current_thread()]
        assert recorder.kinds[0] in (SweepKind.SCHEDULED, SweepKind.CATCH_UP)

        moment = make_due(scheduler)  # due again while the first still runs
        await eventually(lambda: all_run_since(scheduler, moment), what="the jobs ran again")
        assert len(recorder.kinds) == 1  # not stacked on top of the running one

        recorder.release.set()
        await eventually(lambda: scheduler.idle, what="the first sweep finished")
        make_due(scheduler)
        await eventually(lambda: len(recorder.kinds) == 2, what="a second sweep")
    finally:
        scheduler.stop()
    assert not scheduler.alive


@pytest.mark.parametrize(
    "text", ["sunday 02:00", "wednesday 23:45", "daily 02:00", "every 6 hours", "every 30 minutes"]
)
async def test_the_thread_and_the_schedule_agree_on_the_next_run(text: str) -> None:
    """``SweepSchedule.next_after`` states when runs happen; the ``schedule`` job follows it."""
    when = SweepSchedule.parse(text)
    started = datetime.now(UTC)
    scheduler = SweepScheduler(when, asyncio.get_running_loop(), Recorder(), clock=lambda: started)

    job_next = scheduler.sweep_job.next_run
    assert job_next is not None
    library = job_next.astimezone(UTC)  # schedule keeps naive local times
    ours = when.next_after(started, started=started)
    assert abs(library - ours) < timedelta(seconds=2)


def test_next_after_walks_the_calendar() -> None:
    sunday = SweepSchedule.parse("sunday 02:00")
    saturday_noon = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert sunday.next_after(saturday_noon) == datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    at_the_run = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    assert sunday.next_after(at_the_run) == datetime(2026, 12, 6, 2, 0, tzinfo=UTC)
    every = SweepSchedule.parse("every 6 hours")
    assert every.next_after(saturday_noon + timedelta(hours=7), started=saturday_noon) == (
        saturday_noon + timedelta(hours=12)
    )
