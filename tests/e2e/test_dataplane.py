"""The HBONE data plane across real network namespaces (issue 4, "Proved by e2e tests").

Two nodes, each running `ambient-agent node` from a static configuration in its own namespace, with
real capture rules and real mutual TLS. On node-1: an enrolled client and an enrolled echo server
(same-node path); on node-2: an enrolled echo server, a non-enrolled echo server (passthrough), and a
pod that node-1 believes runs as another service account than it really does (wrong identity).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.identity.certificates import WorkloadCertificate
from agent.identity.testing import EphemeralCa
from tests.e2e.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.mesh import (
    ADMIN_PORT,
    HBONE_PORT,
    METRICS_PORT,
    READINESS_PORT,
    Agent,
    MeshWorkload,
    eventually,
    http_get,
    sockets_in,
    spiffe_id,
    start_agent,
    stop_agents,
    write_static_config,
)

NAMESPACE = "mesh"
ECHO_PORT = 8080
CLOSED_PORT = 8081
"""A port nothing listens on, in every pod."""
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
ETH_P_ALL = 0x0003
AGENT_ENV = {"AMBIENT_DRAIN_DEADLINE": "10", "AMBIENT_CONFIG_POLL_INTERVAL": "0.5"}
"""A short drain keeps a failed drain test short; fast polling keeps reload tests short."""


@dataclass
class Mesh:
    cluster: Cluster
    ca: EphemeralCa
    client: PodHandle
    local_server: PodHandle
    server: PodHandle
    plain: PodHandle
    mislabeled: PodHandle
    configs: dict[str, Path]
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def node1(self) -> NodeHandle:
        return self.client.node

    @property
    def node2(self) -> NodeHandle:
        return self.server.node

    def destination(self, name: str) -> PodHandle:
        pod = getattr(self, name)
        assert isinstance(pod, PodHandle)
        return pod

    def talk(
        self, destination: PodHandle, *args: str, port: int = ECHO_PORT, check: bool = True
    ) -> list[str]:
        """Runs the test client in the client pod; its output lines."""
        result = self.run_client(destination, *args, port=port, check=check)
        return result.stdout.splitlines()

    def run_client(
        self, destination: PodHandle, *args: str, port: int = ECHO_PORT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.run_in(
            self.client.netns,
            ["python", "-m", "agent.testing.client", destination.ip, str(port), "--timeout", "30", *args],
            timeout=60,
            check=check,
        )


@pytest.fixture(scope="module")
def mesh(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    node1, node2 = cluster.nodes[:2]
    echo = ["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)]

    def pod(name: str, node: NodeHandle, command: list[str], enrolled: bool) -> PodHandle:
        return cluster.create_pod(
            name,
            NAMESPACE,
            node,
            command=command,
            labels=AMBIENT if enrolled else {"app": name},
            service_account=name if enrolled else None,
        )

    pods = [
        pod("client", node1, ["sleep", "infinity"], enrolled=True),
        pod("local-server", node1, echo, enrolled=True),
        pod("server", node2, echo, enrolled=True),
        pod("plain", node2, echo, enrolled=False),
        pod("mislabeled", node2, echo, enrolled=True),
    ]
    client, local_server, server, plain, mislabeled = pods
    ca = EphemeralCa.create()
    directory = tmp_path_factory.mktemp("dataplane")

    def view(pod: PodHandle, enrolled: bool = True, service_account: str | None = None) -> MeshWorkload:
        return MeshWorkload(pod, service_account or (pod.name if enrolled else "default"), enrolled)

    shared = [view(client), view(local_server), view(server), view(plain, enrolled=False)]
    # node-1 expects the mislabeled pod to run as `expected-server`; node-2 knows it as `mislabeled`.
    views = {
        node1.name: [*shared, view(mislabeled, service_account="expected-server")],
        node2.name: [*shared, view(mislabeled)],
    }

    def certificates(node: NodeHandle) -> list[WorkloadCertificate]:
        return [
            ca.issue(spiffe_id(w.pod.namespace, w.service_account))
            for w in views[node.name]
            if w.enrolled and w.pod.node == node
        ]

    configs = {
        node.name: write_static_config(
            directory / node.name,
            node=node,
            bundle=ca.bundle,
            certificates=certificates(node),
            workloads=views[node.name],
        )
        for node in (node1, node2)
    }
    mesh = Mesh(cluster, ca, client, local_server, server, plain, mislabeled, configs)
    try:
        for node in (node1, node2):
            mesh.agents[node.name] = start_agent(cluster, node, configs[node.name], env=AGENT_ENV)
        for agent in mesh.agents.values():
            agent.wait_ready()
        yield mesh
    finally:
        stop_agents(cluster, mesh.agents.values())
        for handle in pods:
            cluster.delete_pod(handle, wait=False)


def echo_connections(mesh: Mesh, pod: PodHandle) -> int:
    """How many connections the echo server in `pod` has accepted so far (from its log)."""
    return len(ACCEPTED.findall(mesh.cluster.pod_log(pod)))


ACCEPTED = re.compile(r" connection from \S+ \d+$", re.MULTILINE)
"""The echo server's line for an accepted connection (not the one saying how it ended)."""


# Bytes both ways, the client's address, half-close.


@pytest.mark.parametrize("destination", ["server", "local_server"], ids=["cross-node", "same-node"])
def test_connection_carries_bytes_both_ways_and_server_sees_client_ip(mesh: Mesh, destination: str) -> None:
    lines = mesh.talk(mesh.destination(destination), "--send", "hello through the mesh")
    assert lines[0].split()[:2] == ["peer", mesh.client.ip]
    assert lines[1:] == ["hello through the mesh"]


@pytest.mark.parametrize("destination", ["server", "local_server"], ids=["cross-node", "same-node"])
def test_large_transfer_arrives_intact(mesh: Mesh, destination: str) -> None:
    size = 64 * 1024 * 1024
    lines = mesh.talk(mesh.destination(destination), "--bytes", str(size))
    assert lines[0].split()[:2] == ["peer", mesh.client.ip]
    sent, received = lines[1].split(), lines[2].split()
    assert sent[:2] == ["sent", str(size)]
    assert received == ["received", *sent[1:]]


@pytest.mark.parametrize("destination", ["server", "local_server"], ids=["cross-node", "same-node"])
def test_half_close_lets_the_client_read_the_reply_after_it_stopped_writing(
    mesh: Mesh, destination: str
) -> None:
    target = mesh.destination(destination)
    (sock,) = sockets_in(mesh.client.netns)
    sock.settimeout(20)
    with sock:
        sock.connect((target.ip, ECHO_PORT))
        greeting = receive_line(sock)
        assert greeting.split()[:2] == [b"peer", mesh.client.ip.encode()]
        sock.sendall(b"before the half-close")
        sock.shutdown(socket.SHUT_WR)
        # The echo server answers only what it received before our FIN, then closes its side.
        assert receive_all(sock) == b"before the half-close"


def receive_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {line!r}"
        line += chunk
    return line.rstrip(b"\n")


def connect_and_receive(sock: socket.socket, address: tuple[str, int]) -> bytes:
    sock.connect(address)
    return sock.recv(1)


def receive_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# What the wire between the nodes shows.


@dataclass(frozen=True)
class Segment:
    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes


class Capture:
    """TCP segments on a node's link, read by an AF_PACKET socket inside the node's namespace."""

    def __init__(self, node: NodeHandle, interface: str = "eth0") -> None:
        (self._sock,) = sockets_in(
            node.netns, family=socket.AF_PACKET, kind=socket.SOCK_RAW, proto=socket.htons(ETH_P_ALL)
        )
        self._sock.bind((interface, 0))
        self._sock.settimeout(0.1)
        self.segments: list[Segment] = []
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"capture-{node.name}")
        self._reader.start()

    def _read(self) -> None:
        while not self._stopping.is_set():
            try:
                frame = self._sock.recv(262144)
            except TimeoutError:
                continue
            if segment := parse_ipv4_tcp(frame):
                self.segments.append(segment)

    def stop(self) -> list[Segment]:
        self._stopping.set()
        self._reader.join()
        self._sock.close()
        return self.segments


def parse_ipv4_tcp(frame: bytes) -> Segment | None:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    header_length = (ip[0] & 0x0F) * 4
    if ip[9] != socket.IPPROTO_TCP:
        return None
    total_length = struct.unpack("!H", ip[2:4])[0] or len(ip)  # 0 for GSO super-frames
    tcp = ip[header_length:]
    source_port, destination_port = struct.unpack("!HH", tcp[:4])
    payload = ip[header_length + (tcp[12] >> 4) * 4 : total_length]
    return Segment(
        (socket.inet_ntoa(ip[12:16]), source_port), (socket.inet_ntoa(ip[16:20]), destination_port), payload
    )


def marked_text(marker: str) -> str:
    # Many copies: whatever the segmentation, some copy lies whole inside one segment.
    return " ".join([marker] * 200)


def test_traffic_between_nodes_is_tls(mesh: Mesh) -> None:
    marker = "PLAINTEXT-MARKER-" + hashlib.sha256(b"tls").hexdigest()[:16]
    capture = Capture(mesh.node1)
    try:
        lines = mesh.talk(mesh.server, "--send", marked_text(marker))
    finally:
        segments = capture.stop()
    assert lines[1:] == [marked_text(marker)]
    tunnel = [s for s in segments if s.destination[1] == HBONE_PORT and s.payload]
    assert tunnel, f"no HBONE traffic seen on {mesh.node1.name}'s link"
    assert {s.source[0] for s in tunnel} == {mesh.node1.ip}
    assert not [s for s in segments if marker.encode() in s.payload], (
        "the payload crossed the wire in plaintext"
    )
    assert not [s for s in segments if s.destination == (mesh.server.ip, ECHO_PORT)]


def test_passthrough_to_a_non_enrolled_pod_works_and_is_not_tunnelled(mesh: Mesh) -> None:
    marker = "PASSTHROUGH-MARKER-" + hashlib.sha256(b"plain").hexdigest()[:16]
    capture = Capture(mesh.node1)
    try:
        lines = mesh.talk(mesh.plain, "--send", marked_text(marker))
    finally:
        segments = capture.stop()
    assert lines[0].split()[:2] == ["peer", mesh.client.ip]
    assert lines[1:] == [marked_text(marker)]
    direct = [
        s for s in segments if s.source[0] == mesh.client.ip and s.destination == (mesh.plain.ip, ECHO_PORT)
    ]
    # On the wire as the client sent it, from the client's own address: not through a tunnel.
    assert any(marker.encode() in s.payload for s in direct), "passthrough traffic should go as it was sent"


# Identities.


def test_a_server_certificate_for_the_wrong_identity_is_rejected(mesh: Mesh) -> None:
    result = mesh.run_client(mesh.mislabeled, "--send", "for expected-server only", check=False)
    assert result.returncode != 0
    assert "for expected-server only" not in result.stdout
    assert echo_connections(mesh, mesh.mislabeled) == 0, "the connection reached the mislabeled pod"


def hbone_client_context(mesh: Mesh, credential: WorkloadCertificate | None) -> ssl.SSLContext:
    """What another node's agent would use (verifying the server against the mesh's root)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=mesh.ca.bundle.to_pem().decode())
    context.set_alpn_protocols(["h2"])
    if credential is not None:
        chain = Path(mesh.configs[mesh.node1.name]).parent / "probe.pem"
        chain.write_bytes(credential.chain_pem() + credential.key_pem())
        context.load_cert_chain(chain)
    return context


def first_server_bytes(mesh: Mesh, credential: WorkloadCertificate | None) -> bytes:
    """Opens TLS to the server pod's HBONE port from node-1, as an agent would; what the server sends
    first (an HTTP/2 SETTINGS frame when it accepts us), or raises what the refusal looked like."""
    (sock,) = sockets_in(mesh.node1.netns)
    sock.settimeout(10)
    sock.connect((mesh.server.ip, HBONE_PORT))
    with hbone_client_context(mesh, credential).wrap_socket(sock) as tls:
        return tls.recv(9)


def test_the_hbone_port_accepts_a_client_with_a_mesh_certificate(mesh: Mesh) -> None:
    frame = first_server_bytes(mesh, mesh.ca.issue(spiffe_id(NAMESPACE, "client")))
    assert len(frame) == 9
    assert frame[3] == 0x4, "the server's first frame should be HTTP/2 SETTINGS"


@pytest.mark.parametrize("credential", ["none", "untrusted"])
def test_the_hbone_port_refuses_a_client_without_a_trusted_certificate(mesh: Mesh, credential: str) -> None:
    presented = None if credential == "none" else EphemeralCa.create().issue(spiffe_id(NAMESPACE, "client"))
    try:
        received = first_server_bytes(mesh, presented)
    except (ssl.SSLError, ConnectionResetError):
        received = b""  # a TLS alert or a reset: refused
    assert received == b"", "the HBONE server accepted a client it must refuse"


# Failures reach the client as failures.


@pytest.mark.parametrize("destination", ["server", "local_server"], ids=["cross-node", "same-node"])
def test_a_refusing_destination_resets_the_client_instead_of_hanging(mesh: Mesh, destination: str) -> None:
    target = mesh.destination(destination)
    (sock,) = sockets_in(mesh.client.netns)
    sock.settimeout(10)
    started = time.monotonic()
    with sock, pytest.raises((ConnectionResetError, ConnectionRefusedError)):
        connect_and_receive(sock, (target.ip, CLOSED_PORT))
    assert time.monotonic() - started < 5


# Many connections at once.


async def test_200_concurrent_connections_complete_over_pooled_connections(mesh: Mesh) -> None:
    count = 200
    sockets = sockets_in(mesh.client.netns, count)
    all_open = asyncio.Event()
    opened = 0

    async def one(index: int, sock: socket.socket) -> bytes:
        nonlocal opened
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (mesh.server.ip, ECHO_PORT))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await reader.readline()
            opened += 1
            if opened == count:
                all_open.set()
            await all_open.wait()
            writer.write(f"connection {index}".encode())
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()

    async def tunnels_while_open() -> int:
        await all_open.wait()
        listing = await asyncio.to_thread(
            mesh.cluster.run_in,
            mesh.node1.netns,
            ["ss", "-Htn", "state", "established", "dport", "=", f":{HBONE_PORT}"],
        )
        return len(listing.stdout.splitlines())

    async with asyncio.timeout(60):
        *replies, tunnels = await asyncio.gather(
            *(one(i, s) for i, s in enumerate(sockets)), tunnels_while_open()
        )
    assert replies == [f"connection {i}".encode() for i in range(count)]
    # Up to 100 streams per pooled connection (ARCHITECTURE.md section 3): two, maybe a spare.
    assert 2 <= tunnels <= 4, f"{tunnels} HBONE connections carried {count} tunnels"


# Observability.


def test_readiness_metrics_and_config_dump_answer(mesh: Mesh) -> None:
    mesh.talk(mesh.server, "--send", "counted")
    node1, node2 = mesh.node1, mesh.node2
    assert http_get(node2.netns, node2.ip, READINESS_PORT, "/healthz/ready") == (200, "ready\n")
    status, metrics = http_get(node2.netns, node2.ip, METRICS_PORT, "/metrics")
    assert status == 200
    inbound = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and f'source_principal="{spiffe_id(NAMESPACE, "client")}"' in line
    ]
    assert inbound, metrics
    status, body = http_get(node1.netns, "127.0.0.1", ADMIN_PORT, "/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert dump["node"] == node1.name
    assert mesh.client.ip in body
    assert spiffe_id(NAMESPACE, "client") in body


# Reload, drain and restart.


def test_a_policy_added_to_the_configuration_file_closes_open_connections_and_refuses_new_ones(
    mesh: Mesh,
) -> None:
    config = mesh.configs[mesh.node2.name]
    original = config.read_text()
    document = json.loads(original)
    document["policies"] = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": NAMESPACE, "name": "deny-client"},
            "spec": {
                "action": "DENY",
                "rules": [
                    {"from": [{"source": {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/client"]}}]}
                ],
            },
        }
    ]
    (sock,) = sockets_in(mesh.client.netns)
    sock.settimeout(15)
    try:
        with sock:
            sock.connect((mesh.server.ip, ECHO_PORT))
            receive_line(sock)
            config.write_text(json.dumps(document))  # noticed by polling, as an edit would be
            try:
                closed_by_agent = sock.recv(1) == b""
            except ConnectionResetError:
                closed_by_agent = True
            assert closed_by_agent, "the open connection outlived the policy that denies it"
        before = echo_connections(mesh, mesh.server)
        assert mesh.run_client(mesh.server, "--send", "denied", check=False).returncode != 0
        assert echo_connections(mesh, mesh.server) == before
    finally:
        config.write_text(original)
        # Restored even when an assertion above failed, so later tests start from the same state.
        allowed_again = eventually(
            lambda: mesh.run_client(mesh.server, "--send", "allowed again", check=False).returncode == 0
        )
    assert allowed_again, "the policy stayed after it was removed from the file"


def test_sigterm_drains_open_connections_exits_zero_and_a_restart_takes_over(mesh: Mesh) -> None:
    agent = mesh.agents[mesh.node2.name]
    (sock,) = sockets_in(mesh.client.netns)
    sock.settimeout(20)
    with sock:
        sock.connect((mesh.server.ip, ECHO_PORT))
        receive_line(sock)
        agent.process.send_signal(signal.SIGTERM)
        assert eventually(lambda: not agent.ready(), 10), "still ready after SIGTERM"
        # The open connection finishes during the drain.
        sock.sendall(b"sent while draining")
        sock.shutdown(socket.SHUT_WR)
        assert receive_all(sock) == b"sent while draining"
    assert agent.process.wait(30) == 0

    # Down: captured connections fail and nothing reaches the server in plaintext.
    before = echo_connections(mesh, mesh.server)
    result = mesh.run_client(mesh.server, "--send", "while the agent is down", check=False)
    assert result.returncode != 0
    assert echo_connections(mesh, mesh.server) == before
    rules = mesh.cluster.run_in(
        mesh.node2.netns, ["nft", "list", "table", "inet", "ambient_agent"], check=False
    )
    assert rules.returncode == 0, "capture rules should stay installed while the agent is down"

    restarted = start_agent(mesh.cluster, mesh.node2, mesh.configs[mesh.node2.name], env=AGENT_ENV)
    mesh.agents[mesh.node2.name] = restarted
    restarted.wait_ready()
    lines = mesh.talk(mesh.server, "--send", "after the restart")
    assert lines[1:] == ["after the restart"]


def test_quitquitquit_on_the_admin_port_drains_and_exits_zero(mesh: Mesh) -> None:
    node = mesh.node1
    agent = mesh.agents[node.name]
    assert http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/quitquitquit", method="POST") == (
        200,
        "draining\n",
    )
    assert agent.process.wait(30) == 0
    restarted = start_agent(mesh.cluster, node, mesh.configs[node.name], env=AGENT_ENV)
    mesh.agents[node.name] = restarted
    restarted.wait_ready()
    assert mesh.talk(mesh.server, "--send", "after quitquitquit")[1:] == ["after quitquitquit"]


def test_a_new_agent_takes_over_from_a_running_one_without_refusing_connections(mesh: Mesh) -> None:
    node = mesh.node2
    old = mesh.agents[node.name]
    new = start_agent(mesh.cluster, node, mesh.configs[node.name], env=AGENT_ENV)
    mesh.agents[node.name] = new
    # Readiness cannot tell the two apart (both serve :15021); the new one's own log can.
    assert eventually(lambda: "capture rules installed" in new.log_path.read_text()), new.log_tail()
    failures: list[str] = []
    stop = threading.Event()

    def keep_connecting() -> None:
        while not stop.is_set():
            result = mesh.run_client(mesh.server, "--send", "during the handover", check=False)
            if result.returncode != 0:
                failures.append(result.stderr)

    connecting = threading.Thread(target=keep_connecting)
    connecting.start()
    try:
        time.sleep(1)
        assert old.stop() == 0
        time.sleep(1)
    finally:
        stop.set()
        connecting.join()
    new.wait_ready()
    assert failures == []
