"""Prometheus metrics, on a registry the process owns.

Fleet gauges (the same value on every replica: aggregate them with ``max by``,
never ``sum``), read from memory (``broker.storage.fleet``, computed once a
minute for the whole fleet):

- ``qbo_broker_refresh_token_age_seconds`` (gauge histogram; unknown ages only in +Inf)
- ``qbo_broker_connections{status}``
- ``qbo_broker_refresh_tokens_expiring{within="14d"}``
- ``qbo_broker_reconnect_deadlines_approaching{within="30d"|"90d"}``
- ``qbo_broker_sweep_last_success_timestamp_seconds``
- ``qbo_broker_fleet_stats_timestamp_seconds`` (when the figures above were computed)

This replica's own:

- ``qbo_broker_token_refreshes_total{trigger,outcome}``
- ``qbo_broker_connections_lost_total{cause}``
- ``qbo_broker_sweep_runs_total{kind,outcome}``
- ``qbo_broker_unstored_tokens``, ``qbo_broker_refresh_store_seconds``
- ``qbo_broker_intuit_requests_total{endpoint,outcome}``
- ``qbo_broker_intuit_request_duration_seconds{endpoint}``
- ``qbo_broker_token_cache_lookups_total{result}``
- ``qbo_broker_database_up`` (the change feed's session is alive: stale fleet gauges are
  recognisable during an outage)
- ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`` and
  ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}``, named as
  go-grpc-prometheus names them (recorded by ``broker.api.guard``, which already
  wraps every call: no kept library instruments ``grpc.aio`` servers on a registry
  of one's own without a second wrap of every call)
- ``qbo_broker_build_info{version,python_version}``, and the standard ``process_*`` and ``python_*``

No label carries a realm, a user or a token.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.domain.model import ConnectionStatus, LostCause, Outcome, Trigger
from broker.domain.sweep import SweepKind, SweepOutcome, SweepReport
from broker.storage.fleet import EXPIRING_WITHIN, FleetStats

INTUIT_ENDPOINTS = ("refresh", "code_exchange", "revoke")
INTUIT_OUTCOMES = (
    "success",
    "invalid_grant",
    "client_rejected",
    "throttled",
    "server_error",
    "timeout",
    "network_error",
    "bad_response",
    "rejected",
)
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_INTUIT_LATENCY = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BrokerMetrics:
    """Implements ``RefreshObserver``, ``SweepObserver``, and the call and Intuit observers."""

    def __init__(self, registry: CollectorRegistry, *, version: str = "unknown") -> None:
        # The *_created series double the exposition for no dashboard's benefit.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(GC_COLLECTOR)
        Gauge(
            "qbo_broker_build_info",
            "The broker's version (always 1).",
            ["version", "python_version"],
            registry=registry,
        ).labels(version, platform.python_version()).set(1)

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
            for ending in (*(e.value for e in SweepOutcome if e is not SweepOutcome.ABANDONED),):
                self.sweep_runs.labels(kind.value, ending)
            self.sweep_runs.labels(kind.value, "skipped")
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
        self.intuit_requests = Counter(
            "qbo_broker_intuit_requests",
            "Requests to Intuit's OAuth endpoints, by endpoint and how they ended.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.intuit_latency = Histogram(
            "qbo_broker_intuit_request_duration_seconds",
            "How long Intuit took to answer (or to fail), by endpoint.",
            ["endpoint"],
            buckets=_INTUIT_LATENCY,
            registry=registry,
        )
        for endpoint in INTUIT_ENDPOINTS:
            self.intuit_latency.labels(endpoint)
            for ending in INTUIT_OUTCOMES:
                self.intuit_requests.labels(endpoint, ending)
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.grpc_latency = Histogram(
            "grpc_server_handling_seconds",
            "How long the server took to handle an RPC (a stream: its whole life).",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=_LATENCY,
            registry=registry,
        )
        # Children resolved once per (method, code): the hot path does one dict lookup.
        self._calls: dict[tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]] = {}

    # -- observers --------------------------------------------------------------------

    def refresh_finished(self, trigger: Trigger, outcome: Outcome) -> None:
        self.token_refreshes.labels(trigger.value, outcome.value).inc()

    def connection_lost(self, cause: LostCause) -> None:
        self.connections_lost.labels(cause.value).inc()

    def answer_stored(self, seconds: float) -> None:
        self.refresh_store.observe(seconds)

    def sweep_finished(self, report: SweepReport) -> None:
        outcome = report.outcome.value if report.outcome else "skipped"
        self.sweep_runs.labels(report.kind.value, outcome).inc()

    def intuit_answered(self, endpoint: str, ending: str, seconds: float) -> None:
        self.intuit_requests.labels(endpoint, ending).inc()
        self.intuit_latency.labels(endpoint).observe(seconds)

    def call_finished(self, path: str, code: str, seconds: float, *, streaming: bool) -> None:
        recorders = self._calls.get((path, code))
        if recorders is None:
            _, service, method = path.split("/", 2)
            kind = "server_stream" if streaming else "unary"
            recorders = self._calls[(path, code)] = (
                self.grpc_handled.labels(kind, service, method, code).inc,
                self.grpc_latency.labels(kind, service, method).observe,
            )
        count, observe = recorders
        count()
        observe(seconds)

    # -- values read at scrape time ---------------------------------------------------

    def watch(
        self,
        *,
        fleet: Callable[[], FleetStats | None],
        unstored: Callable[[], int],
        cache: Callable[[], tuple[int, int]],
        database_up: Callable[[], bool],
    ) -> None:
        self.unstored_tokens.set_function(unstored)
        self.registry.register(_ReadAtScrape(fleet, cache, database_up))


class _ReadAtScrape(Collector):
    def __init__(
        self,
        fleet: Callable[[], FleetStats | None],
        cache: Callable[[], tuple[int, int]],
        database_up: Callable[[], bool],
    ) -> None:
        self._fleet = fleet
        self._cache = cache
        self._database_up = database_up

    def collect(self) -> Iterator[Metric]:
        hits, misses = self._cache()
        lookups = CounterMetricFamily(
            "qbo_broker_token_cache_lookups",
            "GetAccessToken calls answered from memory (hit) or not (miss).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], hits)
        lookups.add_metric(["miss"], misses)
        yield lookups
        yield GaugeMetricFamily(
            "qbo_broker_database_up",
            "1 while this replica's session with PostgreSQL (its change feed) is alive.",
            value=1 if self._database_up() else 0,
        )
        stats = self._fleet()
        if stats is not None:
            yield from _fleet_metrics(stats)


def _fleet_metrics(stats: FleetStats) -> Iterator[Metric]:
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
    expiring = GaugeMetricFamily(
        "qbo_broker_refresh_tokens_expiring",
        "Active connections whose refresh token expires within the window.",
        labels=["within"],
    )
    expiring.add_metric([f"{EXPIRING_WITHIN.days}d"], stats.expiring_soon)
    yield expiring
    deadlines = GaugeMetricFamily(
        "qbo_broker_reconnect_deadlines_approaching",
        "Active connections whose five-year reconnect deadline falls within the window.",
        labels=["within"],
    )
    for days, count in sorted(stats.deadlines_within.items()):
        deadlines.add_metric([f"{days}d"], count)
    yield deadlines
    last = stats.last_sweep_success
    yield GaugeMetricFamily(
        "qbo_broker_sweep_last_success_timestamp_seconds",
        "When the last sweep that ran to completion finished (any replica); 0: never, so "
        "an alert on its age fires for a fleet whose sweep never completes.",
        value=last.timestamp() if last is not None else 0,
    )
    yield GaugeMetricFamily(
        "qbo_broker_fleet_stats_timestamp_seconds",
        "When the fleet gauges were computed (once a minute, by one replica).",
        value=stats.computed_at.timestamp(),
    )


def _bound(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else str(int(seconds))
