"""What both node modes share: what a snapshot asks of this node, and the watchdog that ends a
shutdown overrunning its deadline."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address

from agent.identity.spiffe import SpiffeId
from agent.node.shared import enrolled_here
from agent.state import build_snapshot
from tests.unit.state.factories import workload


def test_a_snapshot_asks_this_node_to_capture_and_certify_its_enrolled_pods_only() -> None:
    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[
            workload("web", "10.1.0.5", namespace="shop", extra_ips=("fd00::5",)),
            workload("db", "10.1.0.6", namespace="shop", service_account="db"),
            workload("web-2", "10.1.0.7", namespace="shop", service_account="web"),
            workload("cache", "10.1.0.8", namespace="shop", enrolled=False),
            workload("remote", "10.2.0.5", namespace="shop", node="node-b"),
        ],
    )
    addresses, identities = enrolled_here(snapshot, "node-a")
    assert addresses == {ip_address(a) for a in ("10.1.0.5", "fd00::5", "10.1.0.6", "10.1.0.7")}
    assert identities == {SpiffeId("cluster.local", "shop", "web"), SpiffeId("cluster.local", "shop", "db")}


HANGING_SHUTDOWN = """
import asyncio, logging, sys
from agent.node.shared import arm_shutdown_watchdog

logging.basicConfig(stream=sys.stderr)

async def stuck_cleanup():
    await asyncio.Event().wait()

async def main():
    arm_shutdown_watchdog(1.5)
    await asyncio.create_task(stuck_cleanup(), name="stuck cleanup")

asyncio.run(main())
"""


def test_a_shutdown_that_overruns_its_deadline_is_ended_and_says_where_it_was_stuck() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HANGING_SHUTDOWN], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert "shutdown overran its 1.5s deadline" in result.stderr
    assert "stuck cleanup" in result.stderr
    assert "stuck_cleanup" in result.stderr
    assert "Thread" in result.stderr  # faulthandler's dump of every thread
