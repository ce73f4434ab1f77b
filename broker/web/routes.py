"""The HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``, and the connect flow's pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from broker.web.oauth import ConnectEndpoints, add_routes

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason."""


def build_app(
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    connect: Callable[[], ConnectEndpoints | None],
) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        # Everything is read from memory: the fleet gauges are computed in the background.
        # OpenMetrics when asked (Prometheus asks): it has a real gauge-histogram type.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

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
    add_routes(app, connect)
    return app
