"""Two data planes ("node-a", "node-b") in one process on loopback, with real TLS and echo servers.

All of 127.0.0.0/8 is local, so each pod gets its own 127.0.0.x address: the pods' echo servers
listen there, each node's HBONE listener is bound on its own pods' addresses (one port for the
whole mesh, as 15008 is), and a client socket bound to a pod's address is that pod. `Capture`
stands in for TPROXY: it accepts a client's connection and hands it to a data plane together with
the original destination the test chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from agent.hbone import HboneSettings
from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.testing import EphemeralCa
from agent.observability.accesslog import AccessLog
from agent.observability.metrics import AgentMetrics
from agent.proxy.config import DataPlaneSettings
from agent.proxy.credentials import CredentialUnavailable
from agent.proxy.dataplane import DataPlane, Listener, ListenerKind
from agent.proxy.sockets import Address, transparent_listener
from agent.settings import PortSettings
from agent.state import (
    AuthorizationPolicy,
    MeshConfig,
    PeerAuthentication,
    Snapshot,
    Workload,
    build_snapshot,
    parse_authorization_policy,
    parse_peer_authentication,
)
from agent.testing import echo
from tests.unit.state.factories import policy_dict, service, workload

TRUST_DOMAIN = "cluster.local"

SLEEP_IP = "127.0.0.2"
"""The client pod, on node-a."""
LOCAL_IP = "127.0.0.3"
"""A server pod on node-a (same node as the client)."""
ECHO_IP = "127.0.0.5"
"""A server pod on node-b."""
PLAIN_IP = "127.0.0.7"
"""A pod on node-b that is not enrolled."""
OUTSIDER_IP = "127.0.0.9"
"""A client that is no pod at all."""

SERVER_PODS = {"local": LOCAL_IP, "echo": ECHO_IP, "plain": PLAIN_IP}

SERVICE_PORT = 80
SERVICE_IPS = {"echo": "127.0.0.101", "plain": "127.0.0.102"}
"""Cluster IPs of services selecting the pod of that name (nothing listens there: the data plane
load-balances a service address itself)."""


def spiffe(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service_account}"


def deny_from(service_account: str) -> AuthorizationPolicy:
    """A DENY policy on every pod of the namespace for connections from `service_account`."""
    principal = f"{TRUST_DOMAIN}/ns/default/sa/{service_account}"
    spec = {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}
    policy = parse_authorization_policy(
        policy_dict("AuthorizationPolicy", spec, name=f"deny-{service_account}")
    )
    assert isinstance(policy, AuthorizationPolicy)
    return policy


def strict_mtls() -> PeerAuthentication:
    """Mutual TLS required for every pod of the namespace."""
    policy = parse_peer_authentication(policy_dict("PeerAuthentication", {"mtls": {"mode": "STRICT"}}))
    assert isinstance(policy, PeerAuthentication)
    return policy


class StaticCredentials:
    """A `CredentialSource` holding one certificate per identity hosted on a node."""

    def __init__(self, ca: EphemeralCa, identities: Iterable[str]) -> None:
        self._certificates = {identity: ca.issue(identity) for identity in identities}
        self._bundle = ca.bundle

    async def credential(
        self, identity: str, timeout_s: float
    ) -> WorkloadCertificate | CredentialUnavailable:
        return self._certificates.get(identity) or CredentialUnavailable(f"{identity} is not hosted here")

    def trust_bundle(self) -> TrustBundle:
        return self._bundle


class RecordingHandler(logging.Handler):
    """Keeps the JSON access-log lines written to one logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


def recorded_access_log(name: str) -> tuple[AccessLog, RecordingHandler]:
    """A JSON access log on a logger of its own (`name` must be unique), and what records its lines."""
    logger = logging.getLogger(f"tests.proxy.access.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = RecordingHandler()
    logger.addHandler(handler)
    return AccessLog("json", logger), handler


@dataclass
class EchoPod:
    """An echo server listening on a pod's address; counts the connections it accepted."""

    ip: str
    port: int = 0
    accepted: int = 0
    server: asyncio.Server | None = None

    @property
    def address(self) -> Address:
        return Address(self.ip, self.port)

    async def start(self) -> None:
        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            await echo.handle(reader, writer)

        self.server = await asyncio.start_server(counted, self.ip, 0)
        self.port = self.server.sockets[0].getsockname()[1]


@dataclass
class Node:
    """One data plane with its metrics and access-log lines."""

    plane: DataPlane
    metrics: AgentMetrics
    access: RecordingHandler

    def count(self, metric: str, **labels: str) -> float:
        """The sum of `metric`'s samples whose labels include `labels`."""
        total = 0.0
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == metric and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


class Capture:
    """Stands in for TPROXY: accepts clients and hands each to a data plane with a chosen destination."""

    def __init__(self, plane: DataPlane, kind: ListenerKind) -> None:
        self._plane = plane
        self._kind = kind
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self._destinations: dict[tuple[str, int], Address] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept(), name=f"test capture {self._kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._listener.close()

    async def open(
        self, source_ip: str, destination: Address, *, limit: int = 1 << 20
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection from `source_ip` that the data plane sees as going to `destination`."""
        sock = socket.socket()
        sock.bind((source_ip, 0))
        self._destinations[sock.getsockname()] = destination
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self._listener.getsockname())
        return await asyncio.open_connection(sock=sock, limit=limit)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(self._listener)
            destination = self._destinations.pop(peer)
            self._plane.handle(self._kind, sock, Address.of(peer), destination)


@dataclass
class Mesh:
    """The two nodes, the pods' echo servers and the captures feeding the data planes."""

    ca: EphemeralCa
    hbone_port: int
    a: Node
    b: Node
    pods: Mapping[str, EchoPod]
    outbound: Capture
    """Connections from node-a's pods (outbound capture of node-a)."""
    plaintext_b: Capture
    """Plaintext connections to node-b's pods (inbound plaintext capture of node-b)."""

    def snapshot(
        self,
        version: int,
        *,
        echo_service_account: str = "echo",
        authorization_policies: Sequence[AuthorizationPolicy] = (),
        peer_authentications: Sequence[PeerAuthentication] = (),
    ) -> Snapshot:
        return mesh_snapshot(
            version,
            self.hbone_port,
            self.pods,
            echo_service_account=echo_service_account,
            authorization_policies=authorization_policies,
            peer_authentications=peer_authentications,
        )

    async def connect(
        self, destination: Address, *, source_ip: str = SLEEP_IP, limit: int = 1 << 20
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection from the client pod (or `source_ip`) captured on node-a."""
        return await self.outbound.open(source_ip, destination, limit=limit)


def mesh_workloads(echo_service_account: str, sleep_service_account: str = "sleep") -> list[Workload]:
    return [
        workload("sleep", SLEEP_IP, node="node-a", service_account=sleep_service_account),
        workload("local", LOCAL_IP, node="node-a"),
        workload("echo", ECHO_IP, node="node-b", service_account=echo_service_account),
        workload("plain", PLAIN_IP, node="node-b", enrolled=False),
    ]


def mesh_snapshot(
    version: int,
    hbone_port: int,
    pods: Mapping[str, EchoPod],
    *,
    echo_service_account: str = "echo",
    sleep_service_account: str = "sleep",
    authorization_policies: Sequence[AuthorizationPolicy] = (),
    peer_authentications: Sequence[PeerAuthentication] = (),
) -> Snapshot:
    return build_snapshot(
        version=version,
        created_at=1_700_000_000.0 + version,
        workloads=mesh_workloads(echo_service_account, sleep_service_account),
        services=[service(name, ip, (SERVICE_PORT, pods[name].port)) for name, ip in SERVICE_IPS.items()],
        authorization_policies=authorization_policies,
        peer_authentications=peer_authentications,
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN, hbone_port=hbone_port),
    )


def _hbone_listeners(ips: Sequence[str], port: int) -> list[Listener]:
    return [Listener(ListenerKind.INBOUND_HBONE, transparent_listener(Address(ip, port))) for ip in ips]


def _free_hbone_port() -> int:
    """A port free on every pod address: the kernel's pick for one, checked on the others."""
    for _ in range(20):
        probe = transparent_listener(Address(ECHO_IP, 0))
        port = int(probe.getsockname()[1])
        probe.close()
        try:
            for listener in _hbone_listeners([SLEEP_IP, LOCAL_IP, ECHO_IP], port):
                listener.sock.close()
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every pod address")


def _node(
    name: str,
    settings: DataPlaneSettings,
    snapshot: Snapshot,
    credentials: StaticCredentials,
) -> Node:
    metrics = AgentMetrics()
    access_log, handler = recorded_access_log(f"{name}.{id(metrics)}")
    plane = DataPlane(settings, snapshot, credentials, metrics, access_log, name)
    return Node(plane, metrics, handler)


@asynccontextmanager
async def running_mesh(
    *,
    hbone: HboneSettings | None = None,
    echo_served_as: str = "echo",
    client_identity_on_a: str = "sleep",
    authorization_policies: Sequence[AuthorizationPolicy] = (),
    peer_authentications: Sequence[PeerAuthentication] = (),
    drain_deadline_s: float = 5.0,
    keepalive_interval_s: float = 30.0,
    pool_idle_timeout_s: float = 300.0,
    connect_timeout_s: float = 5.0,
) -> AsyncIterator[Mesh]:
    """Both nodes running. Node-b believes (and holds a certificate for) the echo pod's service
    account being `echo_served_as`, while node-a expects `echo`; node-a believes the client pod's
    to be `client_identity_on_a` (and holds its certificate), while node-b knows it as `sleep`."""
    ca = EphemeralCa.create(TRUST_DOMAIN)
    port = _free_hbone_port()
    settings = DataPlaneSettings(
        ports=PortSettings(),
        upstream_mark=0x539,
        hbone=hbone or HboneSettings(),
        connect_timeout_s=connect_timeout_s,
        drain_deadline_s=drain_deadline_s,
        keepalive_interval_s=keepalive_interval_s,
        pool_idle_timeout_s=pool_idle_timeout_s,
    )
    pods = {name: EchoPod(ip) for name, ip in SERVER_PODS.items()}
    for pod in pods.values():
        await pod.start()
    a = _node(
        "node-a",
        settings,
        mesh_snapshot(1, port, pods, sleep_service_account=client_identity_on_a),
        StaticCredentials(ca, [spiffe(client_identity_on_a), spiffe("local")]),
    )
    b = _node(
        "node-b",
        settings,
        mesh_snapshot(
            1,
            port,
            pods,
            echo_service_account=echo_served_as,
            authorization_policies=authorization_policies,
            peer_authentications=peer_authentications,
        ),
        StaticCredentials(ca, [spiffe(echo_served_as)]),
    )
    await a.plane.start(_hbone_listeners([SLEEP_IP, LOCAL_IP], port))
    await b.plane.start(_hbone_listeners([ECHO_IP], port))
    mesh = Mesh(
        ca,
        port,
        a,
        b,
        pods,
        Capture(a.plane, ListenerKind.OUTBOUND),
        Capture(b.plane, ListenerKind.INBOUND_PLAINTEXT),
    )
    mesh.outbound.start()
    mesh.plaintext_b.start()
    try:
        yield mesh
    finally:
        await mesh.outbound.stop()
        await mesh.plaintext_b.stop()
        for node in (a, b):
            if node.plane.listening:
                await node.plane.drain()
        for pod in pods.values():
            assert pod.server is not None
            pod.server.close()


class Firehose:
    """A TCP server handler that writes as fast as its peer accepts, until `stop` is set.

    `produced` counts what it wrote; once a write stays undrained for `stall_s` it waits for
    `stop`, so a test can check that backpressure held the producer back.
    """

    def __init__(self, stall_s: float) -> None:
        self.produced = 0
        self.stop = asyncio.Event()
        self._stall_s = stall_s

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"z" * 65536
        while not self.stop.is_set():
            writer.write(chunk)
            self.produced += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), self._stall_s)
            except TimeoutError:
                await self.stop.wait()
        writer.close()
