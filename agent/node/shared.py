"""What both modes of the node process share (static configuration, Kubernetes): the HTTP endpoints,
the readiness conditions on capture and listeners, and what a snapshot asks of this node.

Metrics (15020) and readiness (15021) listen on every address, admin (15000) on loopback only; each
binds with `SO_REUSEPORT`, so a restarting agent binds while the old one still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import logging

from aiohttp import web

from agent.identity.spiffe import SpiffeId
from agent.observability.metrics import AgentMetrics
from agent.observability.servers import AdminProviders, Readiness, admin_app, metrics_app, readiness_app
from agent.proxy.dataplane import DataPlane
from agent.redirect.command import node_reconciler
from agent.redirect.reconciler import ReconcileLoop, RedirectStatus
from agent.redirect.ruleset import PodIp
from agent.settings import PortSettings, RedirectSettings
from agent.state import Snapshot

log = logging.getLogger(__name__)

REDIRECTION_RECONCILER = "redirection"
"""`reconciler` label of `ambient_agent_reconcile_errors` for failed capture reconciles."""

RULES_INSTALLED = "rules-installed"
"""Readiness condition: the capture rules match the enrolled local pods."""

LISTENERS_BOUND = "listeners-bound"
"""Readiness condition: the data plane accepts on all its ports."""

_SYNC_CHECK_INTERVAL_S = 0.05
"""How often start-up checks whether the redirect loop has installed the rules."""

SHUTDOWN_OVERRUN_S = 8.0
"""How long a stopping node may take beyond its drain deadline (stopping the control plane, closing
the HTTP endpoints) before the shutdown watchdog ends it. The chart's termination grace period
(30 s) covers the default drain (20 s) plus this."""

_ENDPOINT_SHUTDOWN_S = 1.0
"""How long closing the HTTP endpoints waits for requests in progress (aiohttp's default: 60 s)."""

_TASK_DUMP_LEAD_S = 1.0
"""How long before the watchdog fires the still-pending asyncio tasks are logged."""


async def start_endpoints(
    ports: PortSettings,
    *,
    listen_ipv6: bool,
    metrics: AgentMetrics,
    readiness: Readiness,
    admin: AdminProviders,
    runners: list[web.AppRunner],
) -> None:
    """Serves metrics, readiness and admin; each runner is added to `runners` (to clean up) once set
    up. Raises `OSError` when a port cannot be bound."""
    any_address = ["0.0.0.0", "::"] if listen_ipv6 else ["0.0.0.0"]
    for app, hosts, port in (
        (metrics_app(metrics), any_address, ports.metrics),
        (readiness_app(readiness), any_address, ports.readiness),
        (admin_app(metrics, admin), ["127.0.0.1"], ports.admin),
    ):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_ENDPOINT_SHUTDOWN_S)
        await runner.setup()
        runners.append(runner)
        for host in hosts:
            await web.TCPSite(runner, host, port, reuse_port=True).start()


def capture_loop(redirect: RedirectSettings, ports: PortSettings, metrics: AgentMetrics) -> ReconcileLoop:
    """The loop keeping this node's capture rules right, each failed pass counted in `metrics`."""

    def count_failure(_: object) -> None:
        metrics.reconcile_errors.labels(REDIRECTION_RECONCILER).inc()

    return ReconcileLoop(node_reconciler(redirect, ports), redirect, on_failure=count_failure)


def enrolled_here(snapshot: Snapshot, node_name: str) -> tuple[frozenset[PodIp], frozenset[SpiffeId]]:
    """What `snapshot` asks of `node_name`: every address of its enrolled pods (what capture must
    cover) and their identities (the certificates to hold)."""
    local = [workload for workload in snapshot.workloads_on_node(node_name) if workload.enrolled]
    trust_domain = snapshot.mesh.trust_domain
    return (
        frozenset(ip for workload in local for ip in workload.ips),
        frozenset(SpiffeId(trust_domain, workload.namespace, workload.service_account) for workload in local),
    )


async def await_rules(redirect: ReconcileLoop, readiness: Readiness) -> None:
    """Satisfies `RULES_INSTALLED` once the redirect loop has installed the rules."""
    while redirect.status.synced_pods is None:
        await asyncio.sleep(_SYNC_CHECK_INTERVAL_S)
    readiness.satisfy(RULES_INSTALLED)
    log.info("capture rules installed for %d local pod addresses", len(redirect.status.synced_pods))


async def serve_until_stopped(
    long_running: list[asyncio.Task[None]],
    helpers: list[asyncio.Task[None]],
    *,
    stop: asyncio.Event,
    readiness: Readiness,
    dataplane: DataPlane,
    drain_deadline_s: float,
) -> int:
    """Serves until `stop` is set or a `long_running` task ends, then drains the data plane.

    Returns the exit status: 0 for a requested stop, 1 when a long-running task ended on its own
    (logged with its error). Every task, `helpers` included, is cancelled and awaited before returning.
    """
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        done, _ = await asyncio.wait({stopping, *long_running}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        for task in done - {stopping}:
            failure = None if task.cancelled() else task.exception()
            log.error("%s ended unexpectedly, stopping the node", task.get_name(), exc_info=failure)
            status = 1
        log.info("stopping: draining the data plane (up to %.0fs)", drain_deadline_s)
        arm_shutdown_watchdog(drain_deadline_s + SHUTDOWN_OVERRUN_S)
        readiness.draining = True
        await dataplane.drain()
        return status
    finally:
        tasks = [stopping, *long_running, *helpers]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def arm_shutdown_watchdog(deadline_s: float) -> None:
    """Gives the process `deadline_s` to exit. Past it, every thread's stack is written to stderr and
    the process exits with status 1 (the capture rules stay, as after any stop); a second before, the
    asyncio tasks still pending are logged with their stacks. A stuck shutdown must neither keep the
    ports nor leave the kubelet waiting to SIGKILL, and must say where it was stuck."""
    loop = asyncio.get_running_loop()
    loop.call_later(max(0.0, deadline_s - _TASK_DUMP_LEAD_S), _log_pending_tasks, deadline_s)
    faulthandler.dump_traceback_later(deadline_s, exit=True)


def _log_pending_tasks(deadline_s: float) -> None:
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=stacks)
    log.error(
        "shutdown overran its %gs deadline; exiting in %gs. Pending tasks:\n%s",
        deadline_s,
        _TASK_DUMP_LEAD_S,
        stacks.getvalue(),
    )


def redirect_dump(status: RedirectStatus) -> dict[str, object]:
    """The capture's state for the admin `/config_dump`."""
    return {
        "synced_pods": None if status.synced_pods is None else sorted(str(ip) for ip in status.synced_pods),
        "consecutive_failures": status.consecutive_failures,
        "last_error": status.last_error,
    }
