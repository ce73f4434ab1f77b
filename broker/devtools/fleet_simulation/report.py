"""The simulation's report: Markdown tables, and what they say about the origin design's claims."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from broker.devtools.fleet_simulation.engine import INTUIT, MONTH, MonthStats, SimulationResult
from broker.devtools.fleet_simulation.fleet import DAY, days_text
from broker.devtools.fleet_simulation.policies import MIN_VALIDITY, PolicyName, renewal_capacity

CLAIMED_HYBRID_CALLS_PER_MONTH = 100
CLAIMED_BACKGROUND_CALLS_PER_MONTH = 500
CLAIMED_SAVING = 0.9


def render(results: Sequence[SimulationResult]) -> str:
    """The whole report for runs of one fleet (one result per policy)."""
    if not results:
        raise ValueError("nothing to report")
    parts = [_introduction(results[0])]
    parts.extend(policy_table(result) for result in results)
    parts.append(comparison_table(results))
    parts.append("\n\n".join(claims(results)))
    return "\n\n".join(parts) + "\n"


def policy_table(result: SimulationResult) -> str:
    lines = [
        f"### {result.policy.name}: {result.policy.describe()}",
        "",
        "| month | uses | access_expiry | proactive | sweep | total | lost "
        "| highest true refresh-token age (days) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, month in enumerate(result.months, 1):
        lines.append(_row(str(number), month, month.lost, month.oldest_presented))
    total = result.total
    lines.append(_row("**total**", total, result.connections_lost, result.highest_age_overall))
    lines.append(
        "| **per month** | "
        + " | ".join(
            f"{result.per_month(count):,.0f}"
            for count in (
                total.uses,
                total.access_expiry,
                total.proactive,
                total.sweep,
                total.refreshes,
            )
        )
        + " | | |"
    )
    notes = [
        "Age: the oldest refresh token presented to Intuit that month (the total row also "
        "counts the ones nobody had refreshed by the end); 101 or more means it was dead."
    ]
    if result.expired_unnoticed:
        notes.append(
            f"{result.expired_unnoticed:,} of the lost had a dead refresh token at the end "
            "that nobody had presented yet."
        )
    if result.capped_runs:
        notes.append(
            f"The sweep found more than {result.policy.max_per_run} connections due in "
            f"{result.capped_runs} of {result.sweep_runs} runs (at most {result.most_due:,} "
            "at once); the rest waited."
        )
    if result.overlooked:
        notes.append(
            f"{result.overlooked:,} times a run passed over a refresh token that was in truth "
            f"at least {days_text(result.policy.refresh_policy.background_age)} days old, "
            "because its own records (restamped by every refresh) said it was younger."
        )
    if result.lost_to_hard_limit:
        notes.append(
            f"{result.lost_to_hard_limit:,} of the lost had reached Intuit's "
            f"{_years(INTUIT.hard_limit)}-year hard limit."
        )
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def comparison_table(results: Sequence[SimulationResult]) -> str:
    lines = [
        "### Comparison",
        "",
        "| policy | refresh calls / month | renewals / month (proactive + sweep) "
        "| refresh calls per connection-month | connections lost "
        "| highest true refresh-token age (days)¹ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        total = result.total
        lines.append(
            f"| {result.policy.name} | {result.per_month(total.refreshes):,.0f} "
            f"| {result.per_month(total.renewals):,.0f} "
            f"| {total.refreshes / result.connection_months:.2f} "
            f"| {result.connections_lost:,} | {_age(result.highest_age)} |"
        )
    return "\n".join(lines) + (
        "\n\n¹ Of the refresh tokens issued during the run: the starting ones, the same under "
        "every policy, are left out."
    )


def claims(results: Sequence[SimulationResult]) -> list[str]:
    """What the numbers say about the origin design's two claims."""
    original = _find(results, PolicyName.ORIGINAL)
    if original is None:
        return ["(Run the `original` policy to check the origin design's claims.)"]
    return [_never_reconnect(original, results), _calls_a_month(original, results)]


def _never_reconnect(original: SimulationResult, results: Sequence[SimulationResult]) -> str:
    connections = original.fleet.connections
    lost = original.connections_lost
    others = "; ".join(
        f"{result.policy.name}: {result.connections_lost:,} lost"
        for result in results
        if result is not original
    )
    others = f" ({others})" if others else ""
    if lost:
        verdict = (
            f"**“Never reconnect” is false**: the original design lost {lost:,} of "
            f"{connections:,} connections ({lost / connections:.1%}) in {original.days} days, "
            f"the first in month {original.first_loss_month or len(original.months)}{others}"
        )
    else:
        verdict = (
            f"**“Never reconnect” held in this run**: 0 of {connections:,} connections lost in "
            f"{original.days} days{others}"
        )
        capacity = renewal_capacity(original.policy)
        if capacity is not None:
            verdict += (
                f", but its job renews at most {original.policy.max_per_run} connections a run, "
                f"which can keep no more than about {capacity:,} connections that rely on it "
                f"alive, and the refresh tokens it issued reached {_age(original.highest_age)} "
                f"of their {days_text(INTUIT.refresh_token_ttl)} days"
            )
    return (
        f"{verdict}. Whatever the policy, Intuit ends every grant {_years(INTUIT.hard_limit)} "
        "years after it was made, so every customer reconnects eventually."
    )


def _calls_a_month(original: SimulationResult, results: Sequence[SimulationResult]) -> str:
    total = original.total
    calls = original.per_month(total.refreshes)
    ratio = calls / CLAIMED_HYBRID_CALLS_PER_MONTH
    verdict = "roughly true" if 0.5 <= ratio <= 2 else "false"
    text = (
        f"**“About {CLAIMED_HYBRID_CALLS_PER_MONTH} refresh calls a month for the hybrid” is "
        f"{verdict}** for {original.fleet.connections:,} connections: the original design made "
        f"{calls:,.0f} a month ({ratio:,.1f} times the claim; "
        f"{total.refreshes / original.connection_months:.2f} per connection), of which "
        f"{original.per_month(total.access_expiry):,.0f} on use for an expired access token, "
        f"{original.per_month(total.proactive):,.0f} proactive renewals on use and "
        f"{original.per_month(total.sweep):,.0f} by the weekly job"
    )
    background = _find(results, PolicyName.BACKGROUND_DAILY)
    if background is not None:
        daily = background.per_month(background.total.refreshes)
        text += (
            f"; background-only daily refresh made {daily:,.0f} a month (claimed: "
            f"{CLAIMED_BACKGROUND_CALLS_PER_MONTH}), so the hybrid made {1 - calls / daily:.0%} "
            f"fewer calls (claimed: {CLAIMED_SAVING:.0%})"
        )
    return text + "."


def _introduction(result: SimulationResult) -> str:
    months = timedelta(days=result.days) / MONTH
    return (
        f"## Refresh policies on a simulated fleet\n\n"
        f"{result.fleet.describe()}; {result.days} days ({months:.1f} months of "
        f"{MONTH / DAY:.2f} days), seed {result.seed}. Intuit as simulated: access tokens live "
        f"{INTUIT.access_token_ttl / timedelta(hours=1):g} h; a refresh token lives "
        f"{days_text(INTUIT.refresh_token_ttl)} days from its issue and is replaced only by a "
        f"refresh at least {INTUIT.rotation_after / timedelta(hours=1):g} h after it; every "
        f"grant ends after {_years(INTUIT.hard_limit)} years. A use asks for an access token "
        f"valid {MIN_VALIDITY / timedelta(minutes=1):g} more minutes."
    )


def _row(label: str, month: MonthStats, lost: int, age: timedelta) -> str:
    counts = (month.uses, month.access_expiry, month.proactive, month.sweep, month.refreshes)
    cells = " | ".join(f"{count:,}" for count in counts)
    return f"| {label} | {cells} | {lost:,} | {_age(age)} |"


def _find(results: Sequence[SimulationResult], name: PolicyName) -> SimulationResult | None:
    return next((result for result in results if result.policy.name is name), None)


def _age(span: timedelta) -> str:
    return f"{span / DAY:.1f}"


def _years(span: timedelta) -> str:
    return f"{span / timedelta(days=365):g}"
