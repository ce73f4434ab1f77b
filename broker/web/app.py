"""``/metrics``, ``/healthz`` and ``/readyz`` on aiohttp."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason."""


def build_app(
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    before_scrape: Callable[[], Awaitable[None]],
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        await before_scrape()  # the fleet-wide gauges come from a (cached) query
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        problem = await readiness()
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": problem}, status=503)

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
