"""The agent's HTTP endpoints: `/metrics` (15020), `/healthz/ready` (15021), admin (127.0.0.1:15000).

What they serve comes from providers handed in by the node process (the snapshot dump, the live
connections, the drain action), so this module knows nothing about the data plane's internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from agent.observability.metrics import LABEL_NAMES, AgentMetrics

log = logging.getLogger(__name__)

JsonProvider = Callable[[], object]
DrainAction = Callable[[], Awaitable[None]]


@dataclass
class Readiness:
    """Named start-up conditions; ready when all are met and the agent is not draining."""

    pending: set[str] = field(default_factory=set)
    """Conditions not met yet, e.g. `first-sync`, `rules-installed`, `listeners-bound`."""

    draining: bool = False
    """Set when a drain starts; the node must leave load balancers before listeners close."""

    def require(self, *conditions: str) -> None:
        self.pending.update(conditions)

    def satisfy(self, condition: str) -> None:
        self.pending.discard(condition)

    @property
    def ready(self) -> bool:
        return not self.pending and not self.draining

    def reason(self) -> str:
        if self.draining:
            return "draining"
        return "waiting for: " + ", ".join(sorted(self.pending)) if self.pending else "ready"


@dataclass(frozen=True)
class AdminProviders:
    """What the admin endpoint shows and does."""

    config_dump: JsonProvider
    """The snapshot (workloads, services, policies), certificates and settings, JSON-ready."""

    drain: DrainAction
    """Starts a graceful drain (`/quitquitquit`)."""


def metrics_app(metrics: AgentMetrics) -> web.Application:
    """`/metrics` in the Prometheus text format (also at `/stats/prometheus`, as Envoy serves it)."""

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    app.router.add_get("/stats/prometheus", serve)
    return app


def readiness_app(readiness: Readiness) -> web.Application:
    """`/healthz/ready`: 200 when ready, 503 with the reason otherwise."""

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if readiness.ready else 503, text=readiness.reason() + "\n")

    app = web.Application()
    app.router.add_get("/healthz/ready", ready)
    return app


def admin_app(metrics: AgentMetrics, providers: AdminProviders) -> web.Application:
    """Admin endpoints; bind only to loopback: they expose identities and can stop the agent."""

    async def config_dump(_: web.Request) -> web.Response:
        return _json(providers.config_dump())

    async def connections(_: web.Request) -> web.Response:
        rows = []
        for connection in metrics.tcp.live():
            labels = dict(zip(LABEL_NAMES, connection.labels.values(), strict=True))
            rows.append(
                {
                    "id": connection.id,
                    "reporter": labels["reporter"],
                    "source_workload": labels["source_workload"],
                    "source_namespace": labels["source_workload_namespace"],
                    "source_principal": labels["source_principal"],
                    "destination_workload": labels["destination_workload"],
                    "destination_namespace": labels["destination_workload_namespace"],
                    "destination_principal": labels["destination_principal"],
                    "security_policy": labels["connection_security_policy"],
                    "bytes_sent": connection.sent,
                    "bytes_received": connection.received,
                }
            )
        return _json({"connections": rows})

    async def logging_level(request: web.Request) -> web.Response:
        wanted = request.query.get("level")
        root = logging.getLogger()
        if wanted is not None:
            level = logging.getLevelName(wanted.upper())
            if not isinstance(level, int):
                return _json({"error": f"unknown level {wanted!r}"}, status=400)
            root.setLevel(level)
            log.warning("log level set to %s through the admin endpoint", wanted.upper())
        return _json({"level": logging.getLevelName(root.level)})

    async def quit_quit_quit(_: web.Request) -> web.Response:
        await providers.drain()
        return web.Response(text="draining\n")

    app = web.Application()
    app.router.add_get("/config_dump", config_dump)
    app.router.add_get("/connections", connections)
    app.router.add_route("*", "/logging", logging_level)
    app.router.add_post("/quitquitquit", quit_quit_quit)
    return app


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body, indent=2, default=str), content_type="application/json"
    )
