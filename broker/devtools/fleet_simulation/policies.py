"""The refresh policies the simulation compares, and when their sweeps run.

- ``broker``: this broker's ``RefreshPolicy``, called as the token service and
  the sweep call it: ``trigger_on_use`` on every use, ``still_needed`` before
  every refresh, ``sweep_due`` to select (in the order of the SQL selection),
  ``apply`` to record what Intuit answered.
- ``background-daily``: refresh on use only when the access token would not
  last, and every day at 02:00 refresh every connection.
- ``original``: the design the product grew from. On use, the access token
  first, then a refresh token its own records say is 30 days old; a job on
  Sundays at 02:00 renews connections its records say are 60 days old, oldest
  first, at most 100 a run. Its records are untruthful: every refresh stamps
  ``refresh_token_created_at = now`` ("updates refresh token age on every
  refresh"), even when Intuit handed back the same refresh token, whose 101
  days did not restart.

Every policy sees a connection through the ``TokenSnapshot`` its own
bookkeeping would hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from broker.devtools.fleet_simulation.fleet import days_text
from broker.domain.model import (
    INTUIT_REFRESH_TOKEN_LIFETIME,
    IssuedTokens,
    LockedConnection,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)
from broker.domain.policy import (
    DEFAULT_BACKGROUND_AGE,
    DEFAULT_PROACTIVE_AGE,
    RefreshPolicy,
    SweepCutoffs,
)
from broker.domain.schedule import DEFAULT_SCHEDULE, SweepSchedule

MIN_VALIDITY = timedelta(minutes=5)
"""What a use asks of the access token (GetAccessToken's ``min_validity``)."""
ZERO = timedelta(0)
_NULLS_FIRST = datetime.min.replace(tzinfo=UTC)


class PolicyName(StrEnum):
    BROKER = "broker"
    BACKGROUND_DAILY = "background-daily"
    ORIGINAL = "original"


class Rules(Protocol):
    """What a policy decides; the simulation does everything else."""

    def on_use(self, snapshot: TokenSnapshot, now: datetime) -> Trigger | None:
        """Must this use refresh first, and why?"""
        ...

    def still_needed(
        self, trigger: Trigger, snapshot: TokenSnapshot, now: datetime, min_validity: timedelta
    ) -> bool:
        """Re-checked right before asking Intuit."""
        ...

    def due(self, snapshots: Sequence[TokenSnapshot], now: datetime) -> list[int]:
        """The sweep's selection: positions in ``snapshots``, in the order it renews them
        (before ``max_per_run`` cuts it)."""
        ...

    def record(self, row: LockedConnection, issued: IssuedTokens, now: datetime) -> TokenUpdate:
        """The columns the policy writes after Intuit answered a refresh of ``row``."""
        ...


@dataclass(frozen=True)
class PolicySpec:
    """A policy to simulate: ``PolicySpec.broker(…)``, ``background_daily()`` or ``original()``."""

    name: PolicyName
    schedule: SweepSchedule
    proactive_age: timedelta | None = None
    """Renew on use a refresh token this old (None: never renew on use)."""
    background_age: timedelta | None = None
    """The sweep renews refresh tokens this old (None: it refreshes every connection)."""
    max_per_run: int = 0
    """The most connections one sweep renews (0: no cap)."""

    @property
    def refresh_policy(self) -> RefreshPolicy:
        """This broker's policy with these knobs (what ``broker`` runs)."""
        defaults = RefreshPolicy()
        return RefreshPolicy(
            proactive_age=_or(self.proactive_age, defaults.proactive_age),
            background_age=_or(self.background_age, defaults.background_age),
            sweep_interval=self.schedule.interval,
        )

    @classmethod
    def broker(
        cls,
        *,
        proactive_age: timedelta = DEFAULT_PROACTIVE_AGE,
        background_age: timedelta = DEFAULT_BACKGROUND_AGE,
        schedule: SweepSchedule | None = None,
        max_per_run: int = 0,
    ) -> PolicySpec:
        return cls(
            PolicyName.BROKER,
            schedule or DEFAULT_SCHEDULE,
            proactive_age,
            background_age,
            max_per_run,
        )

    @classmethod
    def background_daily(cls) -> PolicySpec:
        return cls(PolicyName.BACKGROUND_DAILY, SweepSchedule.parse("daily 02:00"))

    @classmethod
    def original(cls) -> PolicySpec:
        # The original design's own numbers (its config/quickbooks.ts and job), which
        # this broker's defaults happen to keep; its cap of 100 a run it did not.
        return cls(
            PolicyName.ORIGINAL,
            SweepSchedule.parse("sunday 02:00"),
            proactive_age=timedelta(days=30),
            background_age=timedelta(days=60),
            max_per_run=100,
        )

    def describe(self) -> str:
        if self.name is PolicyName.BACKGROUND_DAILY:
            return (
                f"refresh on use only for the access token; {self.schedule.text} every connection"
            )
        policy = self.refresh_policy
        cap = f"at most {self.max_per_run} a run" if self.max_per_run else "no cap"
        renew = f"renew on use at {days_text(policy.proactive_age)} days"
        if self.name is PolicyName.ORIGINAL:
            return (
                f"{renew}; {self.schedule.text} job: {days_text(policy.background_age)} days old "
                f"by its own records (stamped on every refresh), oldest first, {cap}"
            )
        return (
            f"{renew}; {self.schedule.text} sweep: {days_text(policy.background_age)} days old "
            f"or expiring within {days_text(policy.sweep_horizon)} days, truthful dates, {cap}"
        )

    def rules(self) -> Rules:
        if self.name is PolicyName.BROKER:
            return BrokerRules(self.refresh_policy)
        if self.name is PolicyName.BACKGROUND_DAILY:
            return BackgroundDailyRules()
        policy = self.refresh_policy
        return OriginalRules(policy.proactive_age, policy.background_age)


class BrokerRules:
    """This broker: ``RefreshPolicy`` itself, and the SQL selection's order."""

    def __init__(self, policy: RefreshPolicy) -> None:
        self._policy = policy

    def on_use(self, snapshot: TokenSnapshot, now: datetime) -> Trigger | None:
        return self._policy.trigger_on_use(snapshot, now, MIN_VALIDITY)

    def still_needed(
        self, trigger: Trigger, snapshot: TokenSnapshot, now: datetime, min_validity: timedelta
    ) -> bool:
        return self._policy.still_needed(trigger, snapshot, now, min_validity)

    def due(self, snapshots: Sequence[TokenSnapshot], now: datetime) -> list[int]:
        cutoffs = self._policy.sweep_cutoffs(now)
        due = [i for i, snapshot in enumerate(snapshots) if cutoffs.due(snapshot)]
        due.sort(key=lambda i: SweepCutoffs.order(snapshots[i]))
        return due

    def record(self, row: LockedConnection, issued: IssuedTokens, now: datetime) -> TokenUpdate:
        return self._policy.apply(row, issued, now)


class BackgroundDailyRules:
    """Refresh everything every day; on use, only an access token about to expire."""

    def on_use(self, snapshot: TokenSnapshot, now: datetime) -> Trigger | None:
        return None if snapshot.access_token_valid_for(now, MIN_VALIDITY) else Trigger.ACCESS_EXPIRY

    def still_needed(
        self, trigger: Trigger, snapshot: TokenSnapshot, now: datetime, min_validity: timedelta
    ) -> bool:
        if trigger is Trigger.ACCESS_EXPIRY:
            return not snapshot.access_token_valid_for(now, min_validity)
        return True

    def due(self, snapshots: Sequence[TokenSnapshot], now: datetime) -> list[int]:
        return list(range(len(snapshots)))

    def record(self, row: LockedConnection, issued: IssuedTokens, now: datetime) -> TokenUpdate:
        return RefreshPolicy.apply(row, issued, now)


class OriginalRules:
    """The origin design, bookkeeping included; it re-checks nothing before refreshing."""

    def __init__(self, proactive_age: timedelta, background_age: timedelta) -> None:
        # getValidAccessToken makes the broker's own on-use test (the access token
        # first, then the refresh token's age), only on its own records.
        self._on_use = RefreshPolicy(proactive_age=proactive_age)
        self._background_age = background_age

    def on_use(self, snapshot: TokenSnapshot, now: datetime) -> Trigger | None:
        return self._on_use.trigger_on_use(snapshot, now, MIN_VALIDITY)

    def still_needed(
        self, trigger: Trigger, snapshot: TokenSnapshot, now: datetime, min_validity: timedelta
    ) -> bool:
        return True

    def due(self, snapshots: Sequence[TokenSnapshot], now: datetime) -> list[int]:
        # getStaleConnectionsForBackgroundRefresh: created_at <= now - 60 days,
        # ORDER BY created_at (LIMIT 100 is max_per_run).
        oldest = now - self._background_age
        due = [
            i
            for i, snapshot in enumerate(snapshots)
            if (snapshot.refresh_token_created_at or _NULLS_FIRST) <= oldest
        ]
        due.sort(key=lambda i: snapshots[i].refresh_token_created_at or _NULLS_FIRST)
        return due

    def record(self, row: LockedConnection, issued: IssuedTokens, now: datetime) -> TokenUpdate:
        # "refreshAccessToken() - Updates refresh token age on every refresh"
        return replace(RefreshPolicy.apply(row, issued, now), refresh_token_created_at=now)


def run_times(schedule: SweepSchedule, start: datetime, end: datetime) -> Iterator[datetime]:
    """When the schedule runs in ``(start, end)``; plain intervals count from ``start``."""
    moment = schedule.next_after(start, started=start)
    while moment < end:
        yield moment
        moment = schedule.next_after(moment, started=start)


def renewal_capacity(spec: PolicySpec) -> int | None:
    """How many connections a capped sweep alone can keep alive (None: no cap).

    Each needs one renewal every refresh-token lifetime at the very least; the
    sweep renews ``max_per_run`` per run.
    """
    if not spec.max_per_run:
        return None
    return int(spec.max_per_run * (INTUIT_REFRESH_TOKEN_LIFETIME / spec.schedule.interval))


def _or(value: timedelta | None, default: timedelta) -> timedelta:
    return default if value is None else value
