"""`/metrics`, `/healthz` and `/readyz` on `CLEAR_HTTP_PORT` (aiohttp, same event loop)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(frozen=True)
class HealthChecks:
    """Callables that say why the daemon is unhealthy or not ready (None when fine)."""

    liveness: Callable[[], str | None]
    readiness: Callable[[], str | None]


def create_app(registry: CollectorRegistry, checks: HealthChecks) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def verdict(problem: str | None) -> web.Response:
        if problem is None:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "fail", "reason": problem}, status=503)

    async def healthz(_: web.Request) -> web.Response:
        return verdict(checks.liveness())

    async def readyz(_: web.Request) -> web.Response:
        return verdict(checks.readiness())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http_server(
    registry: CollectorRegistry, checks: HealthChecks, *, host: str, port: int
) -> web.AppRunner:
    runner = web.AppRunner(create_app(registry, checks), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
