"""Runs a node process inside the test's own process, to check how its parts are wired together.

The process binds its listeners and HTTP endpoints on free ports, and the test stops it as the kubelet
would, through the admin `/quitquitquit`, then disarms the shutdown watchdog the drain arms (it would
otherwise end the test run). Capture must never touch the machine the tests run on: `no_nft_on_path`
leaves the capture reconciler without its `nft` binary, so every pass fails at its first step (listing
the agent's table), before any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from agent.hbone import HboneSettings
from agent.observability.metrics import AgentMetrics
from agent.proxy.dataplane import DataPlaneSettings
from agent.settings import PortSettings

WAIT_S = 15.0
"""Upper bound for anything these tests wait for; reached only when the behaviour is broken."""


def free_ports() -> PortSettings:
    """Ports nothing listens on now, one per listener and endpoint."""
    probes = [socket.create_server(("0.0.0.0", 0)) for _ in range(6)]
    try:
        outbound, plaintext, hbone, admin, metrics, readiness = (int(p.getsockname()[1]) for p in probes)
    finally:
        for probe in probes:
            probe.close()
    return PortSettings(
        outbound=outbound,
        inbound_plaintext=plaintext,
        inbound_hbone=hbone,
        admin=admin,
        metrics=metrics,
        readiness=readiness,
    )


def dataplane_settings(ports: PortSettings) -> DataPlaneSettings:
    """Data-plane settings for a node process run in the test process: no IPv6, a short drain."""
    return DataPlaneSettings(
        ports=ports, upstream_mark=0x539, hbone=HboneSettings(), listen_ipv6=False, drain_deadline_s=1.0
    )


def no_nft_on_path(monkeypatch: pytest.MonkeyPatch, empty_dir: Path) -> None:
    """The capture reconciler finds no `nft`: it fails for real, and changes nothing on this machine."""
    monkeypatch.setenv("PATH", str(empty_dir))


def reconcile_errors(metrics: AgentMetrics, reconciler: str) -> float:
    """`ambient_agent_reconcile_errors_total` of one reconciler."""
    value = metrics.registry.get_sample_value(
        "ambient_agent_reconcile_errors_total", {"reconciler": reconciler}
    )
    return value or 0.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Waits until `condition` holds (it is polled), failing after WAIT_S."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


@contextlib.asynccontextmanager
async def running(run: Callable[[], Awaitable[int]], ports: PortSettings) -> AsyncIterator[None]:
    """Runs the process while the block runs, then drains it; it must exit 0."""
    task = asyncio.ensure_future(run())
    try:
        yield
        assert not task.done(), "the process stopped on its own"
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{ports.admin}/quitquitquit"
            async with session.post(url) as response:
                assert response.status == 200
        async with asyncio.timeout(WAIT_S):
            assert await task == 0
    finally:
        faulthandler.cancel_dump_traceback_later()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
