"""``qbo-broker simulate``: the refresh policies proven on a simulated fleet.

The real ``RefreshPolicy`` (and the sweep's selection) runs against the
simulator's model of Intuit on an injected clock, over thousands of companies
and years of simulated time, next to the policies it is compared with::

    fleet.py      who uses the integration, and when
    policies.py   the policies compared, and when their sweeps run
    engine.py     the event loop: uses, sweeps, refreshes, what is lost
    report.py     Markdown tables, and what they say about the original claims
    command.py    the command-line options and ``main``

``simulate(fleet, policy, days=…, seed=…)`` is the pure entry point tests use;
the same arguments always give the same ``SimulationResult``.
"""

from broker.devtools.fleet_simulation.command import add_arguments, main, run
from broker.devtools.fleet_simulation.engine import MonthStats, SimulationResult, simulate
from broker.devtools.fleet_simulation.fleet import FleetSpec
from broker.devtools.fleet_simulation.policies import PolicyName, PolicySpec
from broker.devtools.fleet_simulation.report import render

__all__ = [
    "FleetSpec",
    "MonthStats",
    "PolicyName",
    "PolicySpec",
    "SimulationResult",
    "add_arguments",
    "main",
    "render",
    "run",
    "simulate",
]
