"""When the background sweep runs: ``QB_REFRESH_JOB_SCHEDULE``, parsed once.

Accepted forms (case-insensitive, times in UTC)::

    sunday 02:00        weekly, on that day (monday … sunday)
    daily 02:00         every day
    every 6 hours       every N hours (1 to 168), counted from start-up
    every 30 minutes    every N minutes (1 to 1440), counted from start-up

``interval`` is the longest gap between two runs; the sweep uses it to renew
connections that would otherwise expire before the next run. ``next_after``
is the one statement of when runs happen: the scheduler thread logs it and
checks the ``schedule`` package against it, the fleet simulation runs on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.errors import ConfigurationError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_AT = re.compile(r"(?P<day>[a-z]+)\s+(?P<hour>\d{1,2}):(?P<minute>\d{2})")
_EVERY = re.compile(r"every\s+(?P<count>\d{1,4})\s+(?P<unit>hours?|minutes?)")


@dataclass(frozen=True)
class SweepSchedule:
    """``day`` is a weekday name, ``"daily"``, or None for a plain interval."""

    text: str
    day: str | None
    at: str | None
    interval: timedelta

    @classmethod
    def parse(cls, text: str) -> SweepSchedule:
        spec = " ".join(text.strip().lower().split())
        if match := _AT.fullmatch(spec):
            day, hour, minute = match["day"], int(match["hour"]), int(match["minute"])
            if day not in (*WEEKDAYS, "daily"):
                raise _bad(text, f"{match['day']!r} is not a weekday or 'daily'")
            if hour > 23 or minute > 59:
                raise _bad(text, f"{match['hour']}:{match['minute']} is not a time of day")
            interval = timedelta(days=1 if day == "daily" else 7)
            return cls(spec, day, f"{hour:02d}:{minute:02d}", interval)
        if match := _EVERY.fullmatch(spec):
            count = int(match["count"])
            hours = match["unit"].startswith("hour")
            limit = 168 if hours else 1440
            if not 1 <= count <= limit:
                raise _bad(text, f"the count must be between 1 and {limit}")
            interval = timedelta(hours=count) if hours else timedelta(minutes=count)
            return cls(spec, None, None, interval)
        raise _bad(text, "expected '<weekday> HH:MM', 'daily HH:MM' or 'every N hours'")

    def next_after(self, moment: datetime, *, started: datetime | None = None) -> datetime:
        """The first run strictly after ``moment`` (an aware UTC datetime).

        Plain intervals count from ``started`` (the scheduler's start; default
        ``moment`` itself).
        """
        if self.day is None or self.at is None:
            origin = moment if started is None else started
            steps = (moment - origin) // self.interval + 1
            return origin + steps * self.interval
        hour, minute = (int(part) for part in self.at.split(":"))
        run = moment.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if self.day != "daily":
            run += timedelta(days=(WEEKDAYS.index(self.day) - run.weekday()) % 7)
        while run <= moment:
            run += self.interval
        return run


def _bad(text: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"QB_REFRESH_JOB_SCHEDULE {text[:60]!r}: {why}")


DEFAULT_SCHEDULE = SweepSchedule.parse("sunday 02:00")
