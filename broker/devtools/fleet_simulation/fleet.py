"""The simulated fleet: which companies use the integration, and when.

A company is *active* or *idle*. An active company has a rhythm of its own: a
typical gap drawn uniformly between one day (or the maximum, if that is
shorter) and ``active_max_gap``; each actual gap is then uniform between half
and one and a half times it, never above ``active_max_gap``. An idle company
waits anything between the two ``idle_gap`` bounds between uses. A use is one
GetAccessToken call at a random instant (no office hours: the broker's rules
do not care about the time of day).

The start is a fleet already running, not a launch: the simulation begins in
the middle of every company's current gap. An active company's refresh token
was issued at its last use before the start; an idle company's is anything up
to ``initial_age_max`` old, as if something had kept it alive until then.

Every company draws its gaps from its own random stream, so every policy sees
the same companies using the integration at the same moments (until a
connection is lost), and the policies differ by their rules alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

DAY = timedelta(days=1)
LONGEST_GAP = timedelta(days=1_000_000)
"""Dates must stay representable; a gap this long means "never" in any run."""
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class FleetSpec:
    connections: int = 10_000
    active_share: float = 0.9
    """The share of companies that use the integration at least every ``active_max_gap``."""
    active_max_gap: timedelta = timedelta(days=30)
    idle_gap: tuple[timedelta, timedelta] = (timedelta(days=90), timedelta(days=365))
    """The shortest and longest gap between two uses of an idle company."""
    initial_age_max: timedelta = timedelta(days=60)
    """At the start an idle company's refresh token is uniformly between 0 and this old."""

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError("a fleet needs at least one connection")
        if not 0.0 <= self.active_share <= 1.0:
            raise ValueError("the active share must be between 0 and 1")
        if not timedelta(0) < self.active_max_gap <= LONGEST_GAP:
            raise ValueError(
                f"the active companies' longest gap must be positive, at most "
                f"{LONGEST_GAP.days:,} days"
            )
        low, high = self.idle_gap
        if not timedelta(0) < low <= high <= LONGEST_GAP:
            raise ValueError(
                f"the idle gaps need 0 < MIN <= MAX <= {LONGEST_GAP.days:,} days (never)"
            )
        if self.initial_age_max < timedelta(0):
            raise ValueError("the initial refresh-token age cannot be negative")

    @property
    def active_connections(self) -> int:
        return round(self.connections * self.active_share)

    def describe(self) -> str:
        active = self.active_connections
        low, high = self.idle_gap
        return (
            f"{self.connections:,} connections: {active:,} active (gaps of at most "
            f"{days_text(self.active_max_gap)} days), {self.connections - active:,} idle (gaps of "
            f"{days_text(low)} to {days_text(high)} days). At the start an active company's "
            f"refresh token dates from its last use, an idle one's is 0 to "
            f"{days_text(self.initial_age_max)} days old"
        )


class Company:
    """When one company uses the integration: its gaps, from its own random stream."""

    __slots__ = ("_high", "_low", "_state", "active", "first_use", "initial_age")

    def __init__(
        self,
        *,
        active: bool,
        initial_age: timedelta,
        first_use: timedelta,
        gap: tuple[float, float],
        stream: int,
    ) -> None:
        self.active = active
        self.initial_age = initial_age
        """How old the refresh token is at the start."""
        self.first_use = first_use
        """When, after the start, the company first uses the integration."""
        self._low, self._high = gap  # seconds
        self._state = stream

    def next_gap(self) -> timedelta:
        return timedelta(seconds=self._low + (self._high - self._low) * self._uniform())

    def _uniform(self) -> float:
        # splitmix64: a few integer operations per draw and 8 bytes of state, where a
        # random.Random per company would hold 2.5 kB.
        self._state = state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        return ((state ^ (state >> 31)) >> 11) * 2.0**-53


def companies(spec: FleetSpec, seed: int) -> list[Company]:
    """The fleet's companies, active ones first; the same for every policy given a seed."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible fleet, not a secret
    longest = spec.active_max_gap.total_seconds()
    shortest_typical = min(DAY.total_seconds(), longest)
    idle = (spec.idle_gap[0].total_seconds(), spec.idle_gap[1].total_seconds())
    fleet = []
    for index in range(spec.connections):
        active = index < spec.active_connections
        if active:
            typical = rng.uniform(shortest_typical, longest)
            gap = (typical / 2, min(typical * 3 / 2, longest))
        else:
            gap = idle
        current = rng.uniform(*gap)  # the gap the start falls in
        since_last = current * rng.random()
        age = timedelta(seconds=since_last) if active else spec.initial_age_max * rng.random()
        fleet.append(
            Company(
                active=active,
                initial_age=age,
                first_use=timedelta(seconds=current - since_last),
                gap=gap,
                stream=rng.getrandbits(64),
            )
        )
    return fleet


def days_text(span: timedelta) -> str:
    """A span in days, for text: ``30``, ``0.5``."""
    return f"{span / DAY:g}"
