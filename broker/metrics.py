"""Prometheus metrics (prefix ``qbo_broker_``), on a registry the composition root owns.

No label carries a realm, a user or a token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics

from broker.domain.model import Outcome, Trigger


class BrokerMetrics:
    """Implements ``broker.domain.ports.RefreshObserver``."""

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

    def refresh_finished(self, trigger: Trigger, outcome: Outcome) -> None:
        self.token_refreshes.labels(trigger.value, outcome.value).inc()
