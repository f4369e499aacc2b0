"""Metrics, access log, admin and readiness of real agents after real traffic (issue 7).

Two nodes each run `ambient-agent node` (static configuration, JSON logs). An enrolled client on
node-1 sends a known number of bytes through the tunnel to an enrolled echo server on node-2; both
agents must then report that connection with Istio's labels and the exact byte counts, each from its
own side, and write a matching access-log line. A third enrolled pod on node-1 has no certificate
there: its connections fail with a counted reason and are never sent in plaintext; a fourth, on node-2,
has none there either: tunnels to it are refused before any handshake, counted by node-2. Last, node-2 runs a
Kubernetes-mode agent that cannot reach its API server: it stays not ready, waiting for its first sync.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.identity.testing import EphemeralCa
from tests.e2e.cluster import Cluster, PodHandle
from tests.e2e.cluster.agents import write_token_kubeconfig
from tests.e2e.mesh import (
    ADMIN_PORT,
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

NAMESPACE = "observed"
ECHO_PORT = 8080
DENIED_PORT = 9090
SENT = 300_000
AGENT_ENV = {"AMBIENT_LOG_FORMAT": "json", "AMBIENT_DRAIN_DEADLINE": "20"}


@dataclass
class Observed:
    cluster: Cluster
    client: PodHandle
    server: PodHandle
    uncertified: PodHandle
    """Enrolled on node-1 like `client`, but node-1's configuration holds no certificate for it."""
    uncertified_server: PodHandle
    """Enrolled on node-2 like `server`, but node-2's configuration holds no certificate for it."""
    agents: dict[str, Agent]


@pytest.fixture(scope="module")
def observed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    node1, node2 = cluster.nodes[:2]
    client = cluster.create_pod(
        "client",
        NAMESPACE,
        node1,
        command=["sleep", "infinity"],
        labels={"app": "client"},
        service_account="client",
    )
    server = cluster.create_pod(
        "server",
        NAMESPACE,
        node2,
        command=["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)],
        labels={"app": "server"},
        service_account="server",
    )
    uncertified = cluster.create_pod(
        "uncertified", NAMESPACE, node1, command=["sleep", "infinity"], service_account="uncertified"
    )
    uncertified_server = cluster.create_pod(
        "uncertified-server",
        NAMESPACE,
        node2,
        command=["python", "-m", "agent.testing.echo", "--port", str(ECHO_PORT)],
        service_account="uncertified",
    )
    ca = EphemeralCa.create()
    workloads = [
        MeshWorkload(client, "client", True),
        MeshWorkload(server, "server", True),
        MeshWorkload(uncertified, "uncertified", True),
        MeshWorkload(uncertified_server, "uncertified", True),
    ]
    deny_port = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-9090", "namespace": NAMESPACE},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(DENIED_PORT)]}}]}]},
    }
    directory = tmp_path_factory.mktemp("observability")
    agents: dict[str, Agent] = {}
    try:
        for node, pod in ((node1, client), (node2, server)):
            config = write_static_config(
                directory / node.name,
                node=node,
                bundle=ca.bundle,
                certificates=[ca.issue(spiffe_id(NAMESPACE, pod.name))],
                workloads=workloads,
                policies=[deny_port],
            )
            agents[node.name] = start_agent(cluster, node, config, env=AGENT_ENV)
        for agent in agents.values():
            agent.wait_ready()
        yield Observed(cluster, client, server, uncertified, uncertified_server, agents)
    finally:
        stop_agents(cluster, agents.values())
        for pod in (client, server, uncertified, uncertified_server):
            cluster.delete_pod(pod)


def samples(agent: Agent, name: str) -> list[tuple[dict[str, str], float]]:
    status, body = http_get(agent.node.netns, agent.node.ip, METRICS_PORT, "/metrics")
    assert status == 200
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name
    ]


def between(found: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(value for sample_labels, value in found if labels.items() <= sample_labels.items())


def access_lines(agent: Agent) -> list[dict[str, object]]:
    lines = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == "connection complete":
            lines.append(record)
    return lines


def connection_fails(observed: Observed, netns: str | None, ip: str, port: int) -> None:
    """Runs the test client from `netns` to `ip:port` and checks that it could not connect."""
    failed = observed.cluster.run_in(
        netns,
        ["python", "-m", "agent.testing.client", ip, str(port), "--timeout", "10"],
        timeout=30,
        check=False,
    )
    assert failed.returncode != 0


def wait_failure_counted(agent: Agent, what: str, **labels: str) -> None:
    """Waits (up to 10 s) for `istio_tcp_connections_failed_total` with `labels` on `agent`."""
    deadline = time.monotonic() + 10
    while not between(samples(agent, "istio_tcp_connections_failed_total"), **labels):
        assert time.monotonic() < deadline, f"{what} was never counted"
        time.sleep(0.2)


def test_both_reporters_count_the_transfer_with_istio_labels(observed: Observed) -> None:
    result = observed.cluster.run_in(
        observed.client.netns,
        ["python", "-m", "agent.testing.client", observed.server.ip, str(ECHO_PORT), "--bytes", str(SENT)],
        timeout=60,
    )
    peer_line = result.stdout.splitlines()[0]
    received = SENT + len(peer_line) + 1  # the echo's greeting line, then the echoed bytes
    node1, node2 = (observed.agents[node.name] for node in observed.cluster.nodes[:2])
    expected = {
        "source_workload": "client",
        "source_workload_namespace": NAMESPACE,
        "source_principal": spiffe_id(NAMESPACE, "client"),
        "destination_workload": "server",
        "destination_workload_namespace": NAMESPACE,
        "destination_principal": spiffe_id(NAMESPACE, "server"),
        "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls",
    }
    for agent, reporter in ((node1, "source"), (node2, "destination")):
        deadline = time.monotonic() + 10
        while (
            between(samples(agent, "istio_tcp_connections_closed_total"), reporter=reporter, **expected) < 1
        ):
            assert time.monotonic() < deadline, f"{reporter} never reported the closed connection"
            time.sleep(0.2)
        assert between(samples(agent, "istio_tcp_sent_bytes_total"), reporter=reporter, **expected) == SENT
        assert (
            between(samples(agent, "istio_tcp_received_bytes_total"), reporter=reporter, **expected)
            == received
        )
        assert (
            between(samples(agent, "istio_tcp_connections_opened_total"), reporter=reporter, **expected) == 1
        )
        [line] = [
            record
            for record in access_lines(agent)
            if record.get("bytes_sent") == SENT and record.get("src.identity") == expected["source_principal"]
        ]
        assert line["bytes_recv"] == received
        assert line["dst.identity"] == expected["destination_principal"]
        assert str(line["src.addr"]).startswith(observed.client.ip + ":")
        assert line["direction"] == ("outbound" if reporter == "source" else "inbound")
    assert samples(node1, "istio_build")
    [(_, snapshot_built)] = samples(node1, "ambient_agent_snapshot_timestamp_seconds")
    assert 0 < snapshot_built <= time.time()


def test_a_denied_connection_counts_with_its_response_flag(observed: Observed) -> None:
    connection_fails(observed, observed.client.netns, observed.server.ip, DENIED_PORT)
    destination = observed.agents[observed.server.node.name]
    wait_failure_counted(
        destination,
        "the denied connection",
        reporter="destination",
        response_flags="UAEX",
        destination_workload="server",
    )
    assert any(
        "error" in record and record.get("dst.workload") == "server" for record in access_lines(destination)
    )


def test_a_workload_without_a_certificate_fails_with_a_reason_and_never_in_plaintext(
    observed: Observed,
) -> None:
    connection_fails(observed, observed.uncertified.netns, observed.server.ip, ECHO_PORT)
    source, destination = (observed.agents[node.name] for node in observed.cluster.nodes[:2])
    wait_failure_counted(
        source,
        "the failed connection",
        reporter="source",
        response_flags="UF",
        source_workload="uncertified",
        destination_workload="server",
    )
    [line] = [record for record in access_lines(source) if record.get("src.workload") == "uncertified"]
    assert str(line["error"]).startswith(f"no certificate for {spiffe_id(NAMESPACE, 'uncertified')}: ")
    # Nothing reached the destination's node: no plaintext fallback, no tunnel without an identity.
    assert not between(
        samples(destination, "istio_tcp_connections_opened_total"), source_workload="uncertified"
    )
    assert not [record for record in access_lines(destination) if record.get("src.workload") == "uncertified"]


def test_a_destination_without_a_certificate_refuses_tunnels_with_a_reason_it_counts(
    observed: Observed,
) -> None:
    target = observed.uncertified_server
    connection_fails(observed, observed.client.netns, target.ip, ECHO_PORT)
    source, destination = (observed.agents[node.name] for node in observed.cluster.nodes[:2])
    identity = spiffe_id(NAMESPACE, "uncertified")
    wait_failure_counted(
        destination,
        "the refused tunnel at its destination",
        reporter="destination",
        response_flags="UF",
        destination_workload=target.name,
        destination_principal=identity,
        connection_security_policy="mutual_tls",
    )
    [line] = [record for record in access_lines(destination) if record.get("dst.workload") == target.name]
    assert str(line["error"]).startswith(f"no certificate for {identity}: ")
    assert line["direction"] == "inbound"
    assert between(
        samples(source, "istio_tcp_connections_failed_total"),
        reporter="source",
        response_flags="UF",
        destination_workload=target.name,
    )
    assert not between(
        samples(destination, "istio_tcp_connections_opened_total"), destination_workload=target.name
    )


def sent_bytes(agent: Agent, reporter: str) -> float:
    return between(
        samples(agent, "istio_tcp_sent_bytes_total"),
        reporter=reporter,
        source_workload="client",
        destination_workload="server",
    )


def test_admin_shows_the_snapshot_and_the_live_connection(observed: Observed) -> None:
    node1 = observed.agents[observed.client.node.name]
    node2 = observed.agents[observed.server.node.name]
    sent_from_source, sent_to_destination = sent_bytes(node1, "source"), sent_bytes(node2, "destination")
    (sock,) = sockets_in(observed.client.netns)
    sock.settimeout(10)
    try:
        sock.connect((observed.server.ip, ECHO_PORT))
        sock.sendall(b"x" * 1000)
        assert sock.recv(100).startswith(b"peer ")
        deadline = time.monotonic() + 10
        while True:
            status, body = http_get(node1.node.netns, "127.0.0.1", ADMIN_PORT, "/connections")
            assert status == 200
            live = [
                row
                for row in json.loads(body)["connections"]
                if row["destination_workload"] == "server" and row["bytes_sent"] >= 1000
            ]
            if live:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        assert live[0]["source_principal"] == spiffe_id(NAMESPACE, "client")
        assert live[0]["security_policy"] == "mutual_tls"
        # Byte counters move while the connection is still open, on both reporters.
        assert sent_bytes(node1, "source") - sent_from_source >= 1000
        assert eventually(lambda: sent_bytes(node2, "destination") - sent_to_destination >= 1000, 10)
        status, body = http_get(node1.node.netns, "127.0.0.1", ADMIN_PORT, "/config_dump")
        assert status == 200
        dump = json.loads(body)
        assert observed.server.ip in body
        assert dump["open_connections"] >= 1
        [tunnel] = [
            entry
            for entry in dump["outbound_pool"]
            if entry["destination_identity"] == spiffe_id(NAMESPACE, "server")
        ]
        assert tunnel["source_identity"] == spiffe_id(NAMESPACE, "client")
        assert sum(tunnel["connections"]) >= 1, "the open tunnel's stream"
    finally:
        sock.close()


def test_readiness_turns_not_ready_while_draining(observed: Observed) -> None:
    """Runs last in this module: it stops node-2's agent (the fixture's teardown tolerates that)."""
    node2 = observed.agents[observed.server.node.name]
    assert http_get(node2.node.netns, node2.node.ip, READINESS_PORT, "/healthz/ready")[0] == 200
    (sock,) = sockets_in(observed.client.netns)
    sock.settimeout(10)
    try:
        sock.connect((observed.server.ip, ECHO_PORT))
        assert sock.recv(100).startswith(b"peer ")  # an open tunnel keeps the drain going
        node2.process.send_signal(15)
        deadline = time.monotonic() + 10
        while True:
            try:
                status, body = http_get(node2.node.netns, node2.node.ip, READINESS_PORT, "/healthz/ready")
            except OSError:
                status, body = 0, ""
            if status == 503:
                assert "draining" in body
                break
            assert time.monotonic() < deadline, f"readiness stayed {status} after SIGTERM"
            time.sleep(0.05)
    finally:
        sock.close()
    assert node2.process.wait(30) == 0


def test_an_agent_is_not_ready_before_its_first_sync(observed: Observed, tmp_path: Path) -> None:
    """Runs after the drain test, on node-2 whose static agent that test stopped: a Kubernetes-mode
    agent there whose API server does not answer binds its listeners but never becomes ready."""
    static_agent = observed.agents[observed.server.node.name]
    static_agent.stop()
    node = static_agent.node
    unreachable = write_token_kubeconfig(
        tmp_path / "unreachable.kubeconfig",
        "https://127.0.0.1:9",  # nothing listens there in the node's namespace
        observed.cluster.layout.pki_dir / "ca.crt",
        "unused",
    )
    log_path = observed.cluster.layout.log_dir / f"agent-{node.name}-unsynced.log"
    with open(log_path, "w") as log_file:
        process = observed.cluster.spawn_in(
            node.netns,
            ["python", "-m", "agent", "node", "--kubeconfig", str(unreachable), "--node-name", node.name],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **AGENT_ENV},
        )
    agent = Agent(node, process, log_path)
    try:
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while not answers or "listeners-bound" in answers[-1][1]:
            assert process.poll() is None, agent.log_tail()
            assert time.monotonic() < deadline, f"listeners never bound: {answers[-1:]}\n{agent.log_tail()}"
            with contextlib.suppress(OSError):  # not listening yet
                answers.append(http_get(node.netns, node.ip, READINESS_PORT, "/healthz/ready", timeout=1))
            time.sleep(0.1)
        for _ in range(10):  # and it stays so
            assert http_get(node.netns, node.ip, READINESS_PORT, "/healthz/ready") == (
                503,
                "waiting for: first-sync, rules-installed\n",
            )
            time.sleep(0.2)
        assert all(status == 503 for status, _ in answers), answers
    finally:
        assert agent.stop() == 0, agent.log_tail()
