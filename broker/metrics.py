"""Prometheus metrics (prefix ``qbo_broker_``), on a registry the composition root owns.

==================================================  ==============  =======================
metric                                              type            labels
==================================================  ==============  =======================
qbo_broker_refresh_token_age_seconds                gauge histogram (age of every active
                                                                    connection's refresh
                                                                    token; unknown ages
                                                                    only in +Inf)
qbo_broker_connections                              gauge           status
qbo_broker_token_refreshes_total                    counter         trigger, outcome
qbo_broker_sweep_last_success_timestamp_seconds     gauge           (from the database: the
                                                                    same on every replica)
qbo_broker_sweep_runs_total                         counter         kind, outcome
qbo_broker_connections_lost_total                   counter         cause
qbo_broker_unstored_tokens                          gauge           (rotated tokens held only
                                                                    in memory: the database
                                                                    would not take them)
qbo_broker_refresh_store_seconds                    histogram       (Intuit's answer to its
                                                                    commit: the window a
                                                                    crash loses a token in)
==================================================  ==============  =======================

The fleet-wide gauges come from ``broker.storage.fleet`` (one cached aggregate
query); the counters are this replica's own. No label carries a realm, a user
or a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.domain.model import ConnectionStatus, LostCause, Outcome, Trigger
from broker.domain.sweep import SweepKind, SweepOutcome, SweepReport
from broker.storage.fleet import FleetStats


class BrokerMetrics:
    """Implements ``RefreshObserver`` and ``SweepObserver``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The *_created series double the exposition for no dashboard's benefit.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.token_refreshes = Counter(
            "qbo_broker_token_refreshes",
            "Refreshes that reached Intuit, by why they happened and how they ended.",
            ["trigger", "outcome"],
            registry=registry,
        )
        for trigger in Trigger:
            for outcome in Outcome:
                self.token_refreshes.labels(trigger.value, outcome.value)
        self.sweep_runs = Counter(
            "qbo_broker_sweep_runs",
            "Sweep runs on this replica, by kind and outcome ('skipped': not needed or "
            "another replica was sweeping).",
            ["kind", "outcome"],
            registry=registry,
        )
        for kind in SweepKind:  # every pair exists from the start: absent means zero
            for ending in (*(ending.value for ending in SweepOutcome), "skipped"):
                self.sweep_runs.labels(kind.value, ending)
        self.connections_lost = Counter(
            "qbo_broker_connections_lost",
            "Connections that became reauthorization_required, by cause (lost_in_flight: a "
            "refresh of ours rotated the token and its answer was lost).",
            ["cause"],
            registry=registry,
        )
        for cause in LostCause:
            self.connections_lost.labels(cause.value)
        self.unstored_tokens = Gauge(
            "qbo_broker_unstored_tokens",
            "Rotated tokens held only in this replica's memory because the database would not "
            "take them (a crash now loses them).",
            registry=registry,
        )
        self.refresh_store = Histogram(
            "qbo_broker_refresh_store_seconds",
            "From Intuit's answer to a refresh to its commit: the window in which a crash of "
            "the broker loses a rotated token.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )

    def refresh_finished(self, trigger: Trigger, outcome: Outcome) -> None:
        self.token_refreshes.labels(trigger.value, outcome.value).inc()

    def connection_lost(self, cause: LostCause) -> None:
        self.connections_lost.labels(cause.value).inc()

    def answer_stored(self, seconds: float) -> None:
        self.refresh_store.observe(seconds)

    def watch_unstored(self, count: Callable[[], int]) -> None:
        self.unstored_tokens.set_function(count)

    def sweep_finished(self, report: SweepReport) -> None:
        outcome = report.outcome.value if report.outcome else "skipped"
        self.sweep_runs.labels(report.kind.value, outcome).inc()

    def watch_fleet(self, stats: Callable[[], FleetStats | None]) -> None:
        """Expose the fleet-wide gauges from ``stats`` (refreshed before each scrape)."""
        self.registry.register(_FleetCollector(stats))


class _FleetCollector(Collector):
    def __init__(self, stats: Callable[[], FleetStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield GaugeHistogramMetricFamily(
            "qbo_broker_refresh_token_age_seconds",
            "Age of the refresh token of every active connection (unknown ages count in +Inf).",
            buckets=[(_bound(le), float(count)) for le, count in stats.age_buckets],
            gsum_value=stats.age_sum_seconds,
        )
        connections = GaugeMetricFamily(
            "qbo_broker_connections", "Connections by status.", labels=["status"]
        )
        for status in ConnectionStatus:
            connections.add_metric([status.value], stats.by_status.get(status, 0))
        yield connections
        if stats.last_sweep_success is not None:
            yield GaugeMetricFamily(
                "qbo_broker_sweep_last_success_timestamp_seconds",
                "When the last sweep that ran to completion finished (any replica).",
                value=stats.last_sweep_success.timestamp(),
            )


def _bound(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else str(int(seconds))
