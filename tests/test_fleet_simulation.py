"""``qbo-broker simulate``: the fleet simulation must tell the truth about the policies.

Each test pins a number the report prints to something that can be known
without the simulation's own bookkeeping: Intuit's call count, the length of a
schedule, the rules of rotation.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

import pytest

from broker.clock import FakeClock
from broker.devtools.fake_intuit.in_process import issued_tokens
from broker.devtools.fake_intuit.model import IntuitModel, SimulatorConfig
from broker.devtools.fleet_simulation import (
    FleetSpec,
    PolicySpec,
    SimulationResult,
    add_arguments,
    main,
    simulate,
)
from broker.devtools.fleet_simulation.command import policies
from broker.devtools.fleet_simulation.engine import START
from broker.devtools.fleet_simulation.policies import run_times
from broker.domain.model import ConnectionStatus, LockedConnection, TokenSnapshot
from broker.domain.schedule import SweepSchedule

DAY = timedelta(days=1)
NEVER = (timedelta(days=1_000_000), timedelta(days=1_000_000))
ALL_POLICIES = (PolicySpec.broker(), PolicySpec.background_daily(), PolicySpec.original())


def balanced(result: SimulationResult) -> SimulationResult:
    """The counters by trigger add up to the refresh calls Intuit itself counted."""
    assert result.total.refreshes == result.intuit_refresh_calls
    assert 0 <= result.connections_lost <= result.fleet.connections
    return result


def test_a_seed_gives_the_same_run_and_another_seed_another() -> None:
    fleet = FleetSpec(connections=300, active_share=0.7)
    first = simulate(fleet, PolicySpec.broker(), days=90, seed=7)
    assert simulate(fleet, PolicySpec.broker(), days=90, seed=7) == first
    other = simulate(fleet, PolicySpec.broker(), days=90, seed=8)
    assert other.total.uses != first.total.uses


def test_every_policy_sees_the_same_companies() -> None:
    fleet = FleetSpec(connections=300)
    uses = {balanced(simulate(fleet, p, days=60, seed=3)).total.uses for p in ALL_POLICIES}
    assert len(uses) == 1  # nothing was lost, so the same uses happened under every policy


def test_daily_users_only_ever_refresh_expired_access_tokens() -> None:
    # Gaps of 12 to 24 hours: every use finds the 1-hour access token long expired,
    # every refresh after Intuit's 24 hours rotates, so nothing stays old.
    fleet = FleetSpec(connections=200, active_share=1.0, active_max_gap=DAY)
    result = balanced(simulate(fleet, PolicySpec.broker(), days=60, seed=1))
    total = result.total
    assert total.uses > 200 * 60
    assert total.access_expiry == total.uses
    assert total.proactive == total.sweep == 0
    assert result.connections_lost == 0
    # Two gaps at most separate two rotations (the starting token dates from the last use).
    assert result.highest_age_overall < 2 * DAY


def test_uses_inside_an_access_tokens_hour_refresh_nothing() -> None:
    # Gaps of 45 to 90 minutes: a use within 55 minutes of the last refresh finds a
    # valid access token, and the next one (90+ minutes after that refresh) does not.
    fleet = FleetSpec(connections=100, active_share=1.0, active_max_gap=timedelta(minutes=90))
    total = balanced(simulate(fleet, PolicySpec.broker(), days=10, seed=1)).total
    assert total.uses / 2 <= total.access_expiry < total.uses * 0.95


def test_beyond_its_cap_the_original_job_loses_idle_connections_and_the_broker_none() -> None:
    # 2,000 connections nobody uses: the job renews 100 a week, each needs one
    # renewal per 101 days, so at most ~1,440 can be kept alive that way.
    fleet = FleetSpec(connections=2_000, active_share=0.0, idle_gap=NEVER)
    original = balanced(simulate(fleet, PolicySpec.original(), days=200, seed=1))
    assert original.connections_lost > 500
    assert original.capped_runs > 0
    assert original.highest_age_overall >= timedelta(days=101)  # dead tokens were presented

    broker = balanced(simulate(fleet, PolicySpec.broker(), days=200, seed=1))
    assert broker.connections_lost == 0
    assert broker.capped_runs == 0
    # Swept the first Sunday after reaching 60 days, and those were all rotated.
    assert timedelta(days=60) < broker.highest_age <= timedelta(days=67)


def test_a_capped_broker_sweep_loses_connections_too() -> None:
    fleet = FleetSpec(connections=2_000, active_share=0.0, idle_gap=NEVER)
    capped = balanced(simulate(fleet, PolicySpec.broker(max_per_run=100), days=200, seed=1))
    assert capped.connections_lost > 0
    assert capped.capped_runs > 0


def test_the_original_under_its_cap_loses_nothing() -> None:
    fleet = FleetSpec(connections=1_000, active_share=0.0, idle_gap=NEVER)
    result = balanced(simulate(fleet, PolicySpec.original(), days=200, seed=1))
    assert result.connections_lost == 0
    assert result.highest_age < timedelta(days=101)


def test_background_daily_refreshes_every_connection_once_a_day() -> None:
    fleet = FleetSpec(connections=300)
    result = balanced(simulate(fleet, PolicySpec.background_daily(), days=60, seed=1))
    total = result.total
    assert result.sweep_runs == 60  # 02:00 on each of the 60 days
    assert total.sweep == 300 * 60
    assert total.proactive == 0
    assert result.connections_lost == 0
    # After the first run no refresh token is older than about a day (rotation needs 24 h).
    assert result.highest_age < 2 * DAY
    assert all(month.oldest_presented < 2 * DAY for month in result.months[1:])


def test_the_broker_keeps_every_token_well_short_of_101_days() -> None:
    fleet = FleetSpec(connections=2_000)
    weekly = balanced(simulate(fleet, PolicySpec.broker(), days=365, seed=1))
    assert weekly.connections_lost == 0
    assert timedelta(days=60) < weekly.highest_age <= timedelta(days=67)
    assert weekly.total.sweep > 0

    daily = PolicySpec.broker(schedule=SweepSchedule.parse("daily 02:00"))
    result = balanced(simulate(FleetSpec(connections=300), daily, days=200, seed=1))
    assert result.connections_lost == 0
    assert timedelta(days=60) < result.highest_age <= timedelta(days=61)


def test_the_originals_records_restart_the_age_on_every_refresh() -> None:
    clock = FakeClock(START)
    model = IntuitModel(SimulatorConfig(), clock)
    granted = model.create_grant("123", refresh_token_issued_at=START - 2 * DAY)
    clock.advance(timedelta(hours=1))
    rotated = model.refresh(granted.refresh_token)  # older than 24 h: a new value
    clock.advance(timedelta(hours=2))
    same = model.refresh(rotated.refresh_token)  # 2 h old: Intuit hands it back
    assert same.refresh_token == rotated.refresh_token
    rotated_at, now = START + timedelta(hours=1), clock()
    row = LockedConnection(_row(rotated_at), rotated.refresh_token)
    broker = PolicySpec.broker().rules().record(row, issued_tokens(same), now)
    original = PolicySpec.original().rules().record(row, issued_tokens(same), now)
    assert broker.refresh_token_created_at == rotated_at
    assert original.refresh_token_created_at == now


def test_sweep_times_follow_the_schedule() -> None:
    end = START + timedelta(days=21)
    sundays = list(run_times(SweepSchedule.parse("sunday 02:00"), START, end))
    assert sundays == [datetime(2026, 1, day, 2, tzinfo=UTC) for day in (4, 11, 18)]
    daily = list(run_times(SweepSchedule.parse("daily 02:00"), START, end))
    assert len(daily) == 21
    assert daily[0] == datetime(2026, 1, 1, 2, tzinfo=UTC)
    hourly = list(run_times(SweepSchedule.parse("every 6 hours"), START, START + DAY))
    assert hourly == [START + timedelta(hours=h) for h in (6, 12, 18)]


def test_a_small_fleet_simulates_quickly() -> None:
    started = time.perf_counter()
    for policy in ALL_POLICIES:
        balanced(simulate(FleetSpec(connections=500), policy, days=120, seed=1))
    assert time.perf_counter() - started < 10


def _options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_report_says_what_the_numbers_say(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_options("--connections", "300", "--days", "60")) == 0
    report = capsys.readouterr().out
    for name in ("broker", "background-daily", "original"):
        assert f"### {name}:" in report
        assert f"| {name} |" in report
    assert "“Never reconnect” held in this run" in report
    calls_a_month = report.split("| original | ")[1].split(" |")[0]
    assert f"the original design made {calls_a_month} a month" in report
    assert "fewer calls (claimed: 90%)" in report

    overloaded = ("--connections", "2000", "--active-share", "0", "--days", "200")
    options = _options(*overloaded, "--idle-gap-days", "1e6", "1e6", "--policy", "original")
    assert main(options) == 0
    report = capsys.readouterr().out
    assert "### broker:" not in report
    assert "“Never reconnect” is false" in report
    assert "“About 100 refresh calls a month for the hybrid” is false" in report


def test_the_options_reach_the_broker_policy() -> None:
    options = _options("--schedule", "daily 03:00", "--proactive-days", "20", "--max-per-run", "50")
    assert options.policy is None
    spec = PolicySpec.broker(
        proactive_age=timedelta(days=20),
        background_age=timedelta(days=60),
        schedule=SweepSchedule.parse("daily 03:00"),
        max_per_run=50,
    )
    assert policies(options)[0] == spec
    with pytest.raises(SystemExit):
        _options("--schedule", "whenever")


def _row(created: datetime) -> TokenSnapshot:
    return TokenSnapshot(
        realm_id="123",
        user_id="user-123",
        status=ConnectionStatus.ACTIVE,
        access_token="at",
        access_token_expires_at=created + timedelta(hours=1),
        refresh_token_created_at=created,
        refresh_token_expires_at=created + timedelta(days=101),
        reconnect_deadline=created + timedelta(days=5 * 365),
        row_version=1,
    )
