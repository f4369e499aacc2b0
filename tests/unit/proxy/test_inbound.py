"""Inbound HBONE connections that cannot be served are counted and logged before any handshake.

The destination's node picks its TLS identity by the address a connection was accepted on; when it has
no certificate for that workload (not issued yet, or not at all), or the address is no local enrolled
workload, the connection is reset and reported by the destination (`istio_tcp_connections_failed_total`
with reporter `destination`, and an access-log line saying why). Needs root, as the data plane does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable

import pytest

from agent.state import Snapshot, build_snapshot
from tests.unit.proxy.mesh import ECHO_IP, Mesh, mesh_workloads, running_mesh, spiffe

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and IP_TRANSPARENT need root"),
    pytest.mark.timeout(60),
]

WAIT_S = 10.0
"""Upper bound for anything a test waits for; reached only when the behaviour is broken."""


def echo_runs_as_another_identity(mesh: Mesh) -> Snapshot:
    """Node-b's view where the echo pod runs as `other`, for which node-b holds no certificate."""
    return mesh.snapshot(2, echo_service_account="other")


def echo_is_not_enrolled(mesh: Mesh) -> Snapshot:
    """Node-b's view where the echo pod has left the mesh, so no local workload has its address."""
    current = mesh.snapshot(2)
    workloads = [
        dataclasses.replace(workload, enrolled=False) if workload.name == "echo" else workload
        for workload in mesh_workloads("echo")
    ]
    return build_snapshot(
        version=2,
        created_at=current.created_at,
        workloads=workloads,
        mesh=current.mesh,
    )


async def ends_with_a_reset(mesh: Mesh) -> bool:
    """Connects node-a's client to the echo pod; True when the connection is reset, False when echoed."""
    reader, writer = await mesh.connect(mesh.pods["echo"].address)
    writer.write(b"hello")
    writer.write_eof()
    try:
        async with asyncio.timeout(WAIT_S):
            echoed = await reader.read()
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    assert echoed.endswith(b"hello"), echoed
    return False


async def eventually_counted(mesh: Mesh, **labels: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while mesh.b.count("istio_tcp_connections_failed_total", **labels) != 1:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("destination_view", "flag", "destination", "error"),
    [
        pytest.param(
            echo_runs_as_another_identity,
            "UF",
            {"destination_workload": "echo", "destination_principal": spiffe("other")},
            f"no certificate for {spiffe('other')}: ",
            id="no certificate for the destination's identity",
        ),
        pytest.param(
            echo_is_not_enrolled,
            "UH",
            {"destination_workload": "unknown", "destination_principal": "unknown"},
            f"{ECHO_IP} is not an enrolled workload on this node",
            id="no local workload at the address",
        ),
    ],
)
async def test_an_hbone_connection_the_destination_cannot_serve_is_counted_and_logged_there(
    destination_view: Callable[[Mesh], Snapshot], flag: str, destination: dict[str, str], error: str
) -> None:
    async with running_mesh() as mesh:
        mesh.b.plane.update_snapshot(destination_view(mesh))
        assert await ends_with_a_reset(mesh)
        await eventually_counted(
            mesh,
            reporter="destination",
            response_flags=flag,
            connection_security_policy="mutual_tls",
            source_workload="unknown",  # nothing is known of the client before its handshake
            source_principal="unknown",
            **destination,
        )
        [line] = mesh.b.access.lines
        assert line["direction"] == "inbound"
        assert str(line["error"]).startswith(error), line
        assert line["dst.addr"] == f"{mesh.pods['echo'].ip}:{mesh.hbone_port}"
        assert mesh.pods["echo"].accepted == 0
        # The source side counts its tunnel as not established.
        assert mesh.a.count("istio_tcp_connections_failed_total", reporter="source", response_flags="UF") == 1

        # The control: the same connection is served once node-b can serve the echo pod again.
        mesh.b.plane.update_snapshot(mesh.snapshot(3))
        assert not await ends_with_a_reset(mesh)
        assert mesh.b.count("istio_tcp_connections_failed_total") == 1
