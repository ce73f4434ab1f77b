"""What the guard adds to each call, measured in-process where the machine's noise cannot hide it.

    python -m tests.benchmarks.guard_overhead

The end-to-end benchmark (``./bin/bench``) compares the broker with a bare gRPC
server, but on a shared two-core machine its cells move by ±10% from one run to
the next, as much as the guard costs. Here the same servicer method is called
a few hundred thousand times on one event loop, bare and under ``@guarded``
(identity, policy decision, the call's context, the audit record, the call
metrics), and the audit trail is flushed as the broker flushes it (JSON lines
to the process's log handler, here /dev/null). Prints microseconds per call;
compare them with the server's CPU time per call that ``./bin/bench`` prints.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry

from broker import logs
from broker.access.audit import FLUSH_AT, AuditTrail
from broker.api.guard import Guard, current_call, guarded
from broker.metrics import BrokerMetrics

CALLS = 200_000
REALMS = 10_000


class _Servicer:
    SERVICE = "qbo.broker.v1.TokenBrokerService"

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def bare(self, request: str, context: Any) -> str:
        return request

    @guarded(admin=False)
    async def GetAccessToken(self, request: str, context: Any) -> str:
        current_call().require(request)  # as the real one does, so the realm is audited
        return request


async def _per_call(call: Any, trail: AuditTrail | None, realms: list[str]) -> float:
    began = time.perf_counter()
    for n in range(CALLS):
        await call(realms[n % len(realms)], None)
        if trail is not None and n % FLUSH_AT == FLUSH_AT - 1:
            await trail.flush()
    if trail is not None:
        await trail.flush()
    return (time.perf_counter() - began) / CALLS * 1e6


def _log_to_nowhere() -> None:
    logs.configure("INFO", "json", secrets=["s" * 32])
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the life of the process


async def main() -> None:
    trail = AuditTrail(None)
    guard = Guard(audit=trail, calls=BrokerMetrics(CollectorRegistry()))
    servicer = _Servicer(guard)
    one = ["9130350000000001"]
    many = [str(9130350000000000 + n) for n in range(REALMS)]
    for _ in range(2):  # the second round counts: caches and allocator warm
        bare = await _per_call(servicer.bare, None, one)
        same = await _per_call(servicer.GetAccessToken, trail, one)
        spread = await _per_call(servicer.GetAccessToken, trail, many)
    print(f"bare method call: {bare:.2f} µs")
    print(f"guarded, audited, counted, one realm: {same:.2f} µs ({same - bare:.2f} µs added)")
    print(
        f"guarded, audited, counted, {REALMS:,} realms in turn: {spread:.2f} µs "
        f"({spread - bare:.2f} µs added)"
    )


if __name__ == "__main__":
    _log_to_nowhere()
    asyncio.run(main())
