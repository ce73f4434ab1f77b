"""One policy, one fleet, days of simulated time: what the refreshes cost and what is lost.

Time is a ``FakeClock`` moved from event to event: the companies' uses (a heap
of next-use times) and the policy's sweep runs. Intuit is an ``IntuitModel`` on
the same clock, called directly. Every connection exists from the start, as a
grant whose refresh token is already some days old (``fleet`` says how old), so
month 1 is a full fleet rather than a ramp; both this broker and the original
design know that age from their own records at the start.

The truth about a refresh token's age is Intuit's: it was issued when the
model last handed out a new value. A connection is lost when a refresh hits
``invalid_grant``; it is not used or swept again. A token that died without
anyone presenting it by the end of the run counts as lost too
(``expired_unnoticed``).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker.clock import FakeClock
from broker.devtools.fake_intuit.in_process import issued_tokens
from broker.devtools.fake_intuit.model import IntuitModel, OAuthError, SimulatorConfig
from broker.devtools.fleet_simulation.fleet import Company, FleetSpec, companies
from broker.devtools.fleet_simulation.policies import (
    MIN_VALIDITY,
    ZERO,
    PolicySpec,
    Rules,
    run_times,
)
from broker.domain.model import (
    ConnectionStatus,
    LockedConnection,
    TokenSnapshot,
    TokenUpdate,
    Trigger,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
MONTH = timedelta(days=365) / 12
INTUIT = SimulatorConfig(sequential_tokens=True)
"""Intuit's rules as simulated: the model's defaults (token values are mere numbers)."""


@dataclass(slots=True)
class MonthStats:
    """One simulated month (365/12 days); the last one may be partial."""

    uses: int = 0
    access_expiry: int = 0
    proactive: int = 0
    sweep: int = 0
    lost: int = 0
    oldest_presented: timedelta = ZERO
    """The greatest true age of a refresh token presented to Intuit this month."""

    @property
    def renewals(self) -> int:
        return self.proactive + self.sweep

    @property
    def refreshes(self) -> int:
        return self.access_expiry + self.proactive + self.sweep

    def count(self, trigger: Trigger) -> None:
        if trigger is Trigger.ACCESS_EXPIRY:
            self.access_expiry += 1
        elif trigger is Trigger.PROACTIVE:
            self.proactive += 1
        elif trigger is Trigger.SWEEP:
            self.sweep += 1
        else:
            raise ValueError(f"the simulation makes no {trigger.value} refreshes")


@dataclass(frozen=True)
class SimulationResult:
    policy: PolicySpec
    fleet: FleetSpec
    days: int
    seed: int
    months: tuple[MonthStats, ...]
    expired_unnoticed: int
    """Connections whose refresh token was dead at the end though nobody had presented it."""
    lost_to_hard_limit: int
    """Of the lost, those past Intuit's five-year limit (which no policy can move)."""
    highest_age: timedelta
    """The greatest true age reached by a refresh token issued during the run (when it was
    presented to Intuit, or by the end): what the policy let happen."""
    highest_age_overall: timedelta
    """The same, counting the starting tokens too (as the months do)."""
    connection_months: float
    """Months of live connections (a lost one stops counting when found lost)."""
    sweep_runs: int
    capped_runs: int
    """Sweep runs that found more connections due than ``max_per_run``."""
    most_due: int
    """The most connections one sweep run found due."""
    overlooked: int
    """Times a sweep passed over a refresh token whose true age had reached the policy's
    background age, because the policy's own records said it was younger."""
    intuit_refresh_calls: int
    """Intuit's own count of refresh calls: the counters by trigger must add up to it."""
    intuit_rotations: int

    @property
    def month_count(self) -> float:
        """Months simulated, the partial last one as a fraction."""
        return timedelta(days=self.days) / MONTH

    @property
    def total(self) -> MonthStats:
        total = MonthStats()
        for month in self.months:
            total.uses += month.uses
            total.access_expiry += month.access_expiry
            total.proactive += month.proactive
            total.sweep += month.sweep
            total.lost += month.lost
            total.oldest_presented = max(total.oldest_presented, month.oldest_presented)
        return total

    @property
    def connections_lost(self) -> int:
        return self.total.lost + self.expired_unnoticed

    def per_month(self, count: int) -> float:
        return count / self.month_count

    @property
    def first_loss_month(self) -> int | None:
        return next((n for n, month in enumerate(self.months, 1) if month.lost), None)


def simulate(fleet: FleetSpec, policy: PolicySpec, *, days: int, seed: int) -> SimulationResult:
    """Run ``policy`` over ``fleet`` for ``days``; the same arguments give the same result."""
    if days < 1:
        raise ValueError("simulate at least one day")
    return _Run(fleet, policy, days, seed).run()


@dataclass(slots=True, eq=False)
class _Connection:
    company: Company
    row: LockedConnection
    """The connection as the policy's own bookkeeping has it."""
    issued_at: datetime
    """When Intuit issued the current refresh token: the truth."""
    hard_expires_at: datetime
    alive: bool = True


class _Run:
    def __init__(self, fleet: FleetSpec, policy: PolicySpec, days: int, seed: int) -> None:
        self.fleet = fleet
        self.policy = policy
        self.days = days
        self.seed = seed
        self.clock = FakeClock(START)
        self.end = START + timedelta(days=days)
        self.config = INTUIT
        self.model = IntuitModel(self.config, self.clock)
        self.rules: Rules = policy.rules()
        self.months = [MonthStats() for _ in range(math.ceil(timedelta(days=days) / MONTH))]
        self.lost_to_hard_limit = 0
        self.dead_time = ZERO
        self.sweep_runs = self.capped_runs = self.most_due = self.overlooked = 0
        self.highest_in_run = ZERO
        self.connections = [
            self._connect(index, company) for index, company in enumerate(companies(fleet, seed))
        ]

    def _connect(self, index: int, company: Company) -> _Connection:
        now = self.clock()
        issued_at = now - company.initial_age
        realm_id = f"{index + 1:09d}"
        response = self.model.create_grant(realm_id, refresh_token_issued_at=issued_at)
        snapshot = TokenSnapshot(
            realm_id=realm_id,
            user_id=f"user-{realm_id}",
            status=ConnectionStatus.ACTIVE,
            access_token=response.access_token,
            access_token_expires_at=issued_at + self.config.access_token_ttl,
            refresh_token_created_at=issued_at,
            refresh_token_expires_at=now + timedelta(seconds=response.x_refresh_token_expires_in),
            reconnect_deadline=now + timedelta(seconds=response.x_refresh_token_hard_expires_in),
            row_version=1,
        )
        return _Connection(
            company,
            LockedConnection(snapshot, response.refresh_token),
            issued_at,
            hard_expires_at=issued_at + self.config.hard_limit,
        )

    def run(self) -> SimulationResult:
        uses = [
            (START + connection.company.first_use, index)
            for index, connection in enumerate(self.connections)
        ]
        uses = [use for use in uses if use[0] < self.end]
        heapq.heapify(uses)
        sweeps = run_times(self.policy.schedule, START, self.end)
        next_sweep = next(sweeps, self.end)
        while True:
            if uses and uses[0][0] < next_sweep:
                moment, index = heapq.heappop(uses)
                connection = self.connections[index]
                if not connection.alive:
                    continue  # lost by a sweep since this use was planned
                self.clock.set(moment)
                self._use(connection, moment)
                if connection.alive:
                    following = moment + connection.company.next_gap()
                    if following < self.end:
                        heapq.heappush(uses, (following, index))
            elif next_sweep < self.end:
                self.clock.set(next_sweep)
                self._sweep(next_sweep)
                next_sweep = next(sweeps, self.end)
            else:
                break
        return self._result()

    def _use(self, connection: _Connection, now: datetime) -> None:
        month = self._month(now)
        month.uses += 1
        snapshot = connection.row.snapshot
        trigger = self.rules.on_use(snapshot, now)
        if trigger is not None and self.rules.still_needed(trigger, snapshot, now, MIN_VALIDITY):
            self._refresh(connection, trigger, now, month)

    def _sweep(self, now: datetime) -> None:
        month = self._month(now)
        alive = [connection for connection in self.connections if connection.alive]
        due = self.rules.due([connection.row.snapshot for connection in alive], now)
        self.sweep_runs += 1
        self.most_due = max(self.most_due, len(due))
        self._count_overlooked(alive, due, now)
        cap = self.policy.max_per_run
        if cap and len(due) > cap:
            self.capped_runs += 1
            due = due[:cap]
        for index in due:
            connection = alive[index]
            if self.rules.still_needed(Trigger.SWEEP, connection.row.snapshot, now, ZERO):
                self._refresh(connection, Trigger.SWEEP, now, month)

    def _count_overlooked(self, alive: list[_Connection], due: list[int], now: datetime) -> None:
        if self.policy.background_age is None:
            return  # the sweep takes every connection
        oldest = now - self.policy.background_age
        selected = set(due)
        self.overlooked += sum(
            1
            for index, connection in enumerate(alive)
            if connection.issued_at <= oldest and index not in selected
        )

    def _refresh(
        self, connection: _Connection, trigger: Trigger, now: datetime, month: MonthStats
    ) -> None:
        month.count(trigger)
        self._saw(connection, now, month)
        row = connection.row
        assert row.refresh_token is not None
        try:
            response = self.model.refresh(row.refresh_token)
        except OAuthError as exc:
            if exc.error != "invalid_grant":
                raise
            self._lose(connection, now, month)
            return
        if response.refresh_token != row.refresh_token:
            connection.issued_at = now
        update = self.rules.record(row, issued_tokens(response), now)
        connection.row = LockedConnection(_stored(row.snapshot, update), update.refresh_token)

    def _saw(self, connection: _Connection, now: datetime, month: MonthStats) -> None:
        """Note the true age of ``connection``'s refresh token."""
        age = now - connection.issued_at
        if age > month.oldest_presented:
            month.oldest_presented = age
        if age > self.highest_in_run and connection.issued_at >= START:
            self.highest_in_run = age

    def _lose(self, connection: _Connection, now: datetime, month: MonthStats) -> None:
        connection.alive = False
        month.lost += 1
        self.dead_time += self.end - now
        if now >= connection.hard_expires_at:
            self.lost_to_hard_limit += 1

    def _month(self, now: datetime) -> MonthStats:
        return self.months[int((now - START) / MONTH)]

    def _result(self) -> SimulationResult:
        self.clock.set(self.end)
        at_end = MonthStats()  # the ages the survivors reached, beside the months' own
        unnoticed = 0
        for connection in self.connections:
            if not connection.alive:
                continue
            self._saw(connection, self.end, at_end)
            assert connection.row.refresh_token is not None
            if not self.model.is_refresh_token_alive(connection.row.refresh_token):
                unnoticed += 1
        lifetime = (self.end - START) * len(self.connections) - self.dead_time
        return SimulationResult(
            policy=self.policy,
            fleet=self.fleet,
            days=self.days,
            seed=self.seed,
            months=tuple(self.months),
            expired_unnoticed=unnoticed,
            lost_to_hard_limit=self.lost_to_hard_limit,
            highest_age=self.highest_in_run,
            highest_age_overall=max(month.oldest_presented for month in (*self.months, at_end)),
            connection_months=lifetime / MONTH,
            sweep_runs=self.sweep_runs,
            capped_runs=self.capped_runs,
            most_due=self.most_due,
            overlooked=self.overlooked,
            intuit_refresh_calls=self.model.stats.refresh_calls,
            intuit_rotations=self.model.stats.rotations,
        )


def _stored(previous: TokenSnapshot, update: TokenUpdate) -> TokenSnapshot:
    """The row after ``update`` was written, as the next read would see it."""
    return TokenSnapshot(
        realm_id=previous.realm_id,
        user_id=previous.user_id,
        status=previous.status,
        access_token=update.access_token,
        access_token_expires_at=update.access_token_expires_at,
        refresh_token_created_at=update.refresh_token_created_at,
        refresh_token_expires_at=update.refresh_token_expires_at,
        reconnect_deadline=update.reconnect_deadline,
        row_version=previous.row_version + 1,
    )
