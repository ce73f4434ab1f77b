"""``qbo-broker simulate``: the options, and the run that prints the report."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from broker.devtools.fleet_simulation.engine import SimulationResult, simulate
from broker.devtools.fleet_simulation.fleet import DAY, FleetSpec
from broker.devtools.fleet_simulation.policies import PolicyName, PolicySpec
from broker.devtools.fleet_simulation.report import render
from broker.domain.policy import DEFAULT_BACKGROUND_AGE, DEFAULT_PROACTIVE_AGE
from broker.domain.schedule import DEFAULT_SCHEDULE, SweepSchedule
from broker.errors import ConfigurationError

EXIT_USAGE = 2
SUMMARY = "the refresh policies on a simulated fleet against Intuit's rules, side by side"


def run(argv: list[str], prog: str = "qbo-broker simulate") -> int:
    """``qbo-broker simulate [options]``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Run {SUMMARY}: this broker's policy, a daily refresh of everything, and "
        "the original design. No database and no network; the policies run in parallel "
        "processes and print month-by-month Markdown tables and a comparison.",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--connections", type=_positive_int, default=10_000, metavar="N")
    fleet.add_argument("--days", type=_positive_int, default=730, help="simulated days")
    fleet.add_argument(
        "--active-share",
        type=float,
        default=0.9,
        metavar="SHARE",
        help="share of companies that use the integration regularly (0 to 1)",
    )
    fleet.add_argument(
        "--active-max-gap-days",
        type=_positive_float,
        default=30.0,
        metavar="DAYS",
        help="an active company's longest gap between two uses",
    )
    fleet.add_argument(
        "--idle-gap-days",
        type=_positive_float,
        nargs=2,
        default=[90.0, 365.0],
        metavar=("MIN", "MAX"),
        help="an idle company's gaps between two uses",
    )
    fleet.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--jobs", type=int, default=0, metavar="N", help="processes (default: one per core)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=[name.value for name in PolicyName],
        help="a policy to simulate (repeatable; default: all)",
    )
    broker = parser.add_argument_group("the broker policy")
    broker.add_argument(
        "--proactive-days",
        type=_positive_float,
        default=DEFAULT_PROACTIVE_AGE / DAY,
        metavar="DAYS",
        help="as QB_REFRESH_TOKEN_PROACTIVE_DAYS (default: %(default)g)",
    )
    broker.add_argument(
        "--background-days",
        type=_positive_float,
        default=DEFAULT_BACKGROUND_AGE / DAY,
        metavar="DAYS",
        help="as QB_REFRESH_TOKEN_BACKGROUND_DAYS (default: %(default)g)",
    )
    broker.add_argument(
        "--schedule",
        type=_schedule,
        default=DEFAULT_SCHEDULE,
        help="when the sweep runs, as QB_REFRESH_JOB_SCHEDULE "
        f"(default: {DEFAULT_SCHEDULE.text!r})",
    )
    broker.add_argument(
        "--max-per-run", type=int, default=0, metavar="N", help="cap on one sweep (0: none)"
    )


def main(options: argparse.Namespace) -> int:
    try:
        fleet = FleetSpec(
            connections=options.connections,
            active_share=options.active_share,
            active_max_gap=options.active_max_gap_days * DAY,
            idle_gap=(options.idle_gap_days[0] * DAY, options.idle_gap_days[1] * DAY),
        )
        if options.max_per_run < 0:
            raise ValueError("--max-per-run cannot be negative")
    except (ValueError, OverflowError) as exc:
        print(f"qbo-broker simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    chosen = policies(options)
    # One process per policy (they share nothing): the cores work side by side.
    workers = max(1, min(options.jobs or os.cpu_count() or 1, len(chosen)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        runs = [pool.submit(_timed, fleet, policy, options.days, options.seed) for policy in chosen]
        results = []
        for run in runs:
            result, seconds = run.result()
            results.append(result)
            print(
                f"{result.policy.name}: {fleet.connections:,} connections over {options.days} "
                f"days simulated in {seconds:.1f} s",
                file=sys.stderr,
            )
    print(render(results), end="")
    return 0


def _timed(
    fleet: FleetSpec, policy: PolicySpec, days: int, seed: int
) -> tuple[SimulationResult, float]:
    started = time.perf_counter()
    result = simulate(fleet, policy, days=days, seed=seed)
    return result, time.perf_counter() - started


def policies(options: argparse.Namespace) -> list[PolicySpec]:
    """The policies asked for, in the order given, each once."""
    names = dict.fromkeys(options.policy or [name.value for name in PolicyName])
    specs = {
        PolicyName.BROKER: PolicySpec.broker(
            proactive_age=options.proactive_days * DAY,
            background_age=options.background_days * DAY,
            schedule=options.schedule,
            max_per_run=options.max_per_run,
        ),
        PolicyName.BACKGROUND_DAILY: PolicySpec.background_daily(),
        PolicyName.ORIGINAL: PolicySpec.original(),
    }
    return [specs[PolicyName(name)] for name in names]


def _schedule(text: str) -> SweepSchedule:
    try:
        return SweepSchedule.parse(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value
