"""Node redirection on the local cluster: real kernel, real rules (issue 3, "Proved by e2e tests").

The capture state is installed by the real tool, `ambient-agent redirect apply|run`, inside node-1's
namespace, as the node agent would. The agent's listeners are stood in for by plain `IP_TRANSPARENT`
sockets on 15001/15006/15008 in node-1 that answer every connection with what they saw: `peer <ip>
<port>` and `captured <listening port> <local ip> <local port>` (under TPROXY the local address is
the original destination). Pods run `agent.testing.echo`, which answers `peer <ip> <port>`. So a
reply with a `captured` line was redirected; one without came from the real destination.

The harness is IPv4-only: IPv6 capture is covered by the unit tests (docs/redirect.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.settings import PortSettings, RedirectSettings
from tests.e2e.cluster import Cluster, NodeHandle, PodHandle
from tests.e2e.mesh import sockets_in

NAMESPACE = "redirect"
ECHO_PORT = 8080
PORTS = PortSettings()
SETTINGS = RedirectSettings()
TABLE = SETTINGS.table_name
UNROUTED_ADDRESS = "198.51.100.7"
"""TEST-NET-2: no host has it; a connection there succeeds only if something captured it."""
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"


@dataclass(frozen=True)
class Reply:
    """What a connection received: the greeting lines of an echo server or a stand-in listener."""

    lines: list[str]

    @property
    def peer(self) -> str:
        """The client address the answering socket saw."""
        (line,) = [line for line in self.lines if line.startswith("peer ")]
        return line.split()[1]

    @property
    def captured(self) -> tuple[int, str, int] | None:
        """(listening port, original destination ip, port) when a stand-in listener answered."""
        for line in self.lines:
            if line.startswith("captured "):
                _, port, ip, original_port = line.split()
                return int(port), ip, int(original_port)
        return None


def talk(
    netns: str,
    host: str,
    port: int,
    *,
    bind: str | None = None,
    mark: int | None = None,
    timeout: float = 10.0,
) -> Reply:
    """Connects from `netns` (optionally as an agent upstream socket: transparent, bound to `bind`,
    marked `mark`), half-closes and reads the answer until the peer closes."""
    (sock,) = sockets_in(netns)
    with sock:
        sock.settimeout(timeout)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if bind is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind((bind, 0))
        sock.connect((host, port))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return Reply(received.decode().splitlines())


def inside(pod: PodHandle) -> str:
    """The pod's network namespace (every pod here has its own)."""
    assert pod.netns is not None
    return pod.netns


class StandInListeners:
    """`IP_TRANSPARENT` listeners on the agent's capture ports in a node, reporting what they see."""

    def __init__(self, netns: str) -> None:
        self._netns = netns
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        ports = (PORTS.outbound, PORTS.inbound_plaintext, PORTS.inbound_hbone)
        self._sockets = sockets_in(self._netns, len(ports))
        for sock, port in zip(self._sockets, ports, strict=True):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(64)
            thread = threading.Thread(
                target=self._serve, args=(sock, port), name=f"stand-in-{port}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for sock in self._sockets:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._sockets, self._threads = [], []

    @staticmethod
    def _serve(listener: socket.socket, port: int) -> None:
        while True:
            try:
                connection, peer = listener.accept()
            except OSError:
                return
            with connection:
                local = connection.getsockname()
                connection.sendall(
                    f"peer {peer[0]} {peer[1]}\ncaptured {port} {local[0]} {local[1]}\n".encode()
                )


@dataclass
class Scene:
    cluster: Cluster
    enrolled: PodHandle
    """On node-1, echo on 8080: enrolled in every test unless the test says otherwise."""
    plain_local: PodHandle
    """On node-1, never enrolled, echo on 8080 and on 15001 (the agent's outbound port)."""
    plain_remote: PodHandle
    """On node-2, never enrolled, echo on 8080."""
    listeners: StandInListeners
    baseline: dict[str, dict[str, str]] = field(default_factory=dict)
    """Each node's listings before the agent ran."""

    @property
    def node(self) -> NodeHandle:
        return self.enrolled.node

    @property
    def other_node(self) -> NodeHandle:
        return self.plain_remote.node

    def address(self, name: str) -> str:
        """The address of a pod (by attribute name), of "node-1", "node-2", or the "unrouted" one."""
        nodes = {"node-1": self.node.ip, "node-2": self.other_node.ip, "unrouted": UNROUTED_ADDRESS}
        return nodes[name] if name in nodes else str(getattr(self, name).ip)

    def netns(self, name: str) -> str:
        """The network namespace of a pod (by attribute name), of "node-1" or "node-2"."""
        nodes = {"node-1": self.node.netns, "node-2": self.other_node.netns}
        return nodes[name] if name in nodes else inside(getattr(self, name))

    def agent(self, *args: str, node: NodeHandle | None = None, check: bool = True) -> list[str]:
        """`ambient-agent ARGS` in the node's namespace; its output lines."""
        result = self.cluster.run_in((node or self.node).netns, ["python", "-m", "agent", *args], check=check)
        return result.stdout.splitlines()

    def enrol(self, *pods: PodHandle) -> list[str]:
        """`ambient-agent redirect apply` for exactly `pods`; what it changed."""
        return self.agent("redirect", "apply", *(arg for pod in pods for arg in ("--pod-ip", pod.ip)))

    def table(self) -> dict[str, Any]:
        listing = self.cluster.run_in(self.node.netns, ["nft", "-j", "list", "table", "inet", TABLE]).stdout
        parsed: dict[str, Any] = json.loads(listing)
        return parsed

    def counter(self, rule_name: str) -> int:
        """Packets counted by the agent's rule named `rule_name`."""
        for item in self.table()["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment", "").rsplit(" ", 1)[0] == rule_name:
                (counter,) = [s["counter"] for s in rule["expr"] if "counter" in s]
                packets: int = counter["packets"]
                return packets
        raise AssertionError(f"no rule {rule_name!r} in table inet {TABLE}")

    def assert_listings_unchanged(self, node: NodeHandle) -> None:
        """Each listing equals the one taken before the agent ran (one assertion per listing, so a
        failure shows the lines that differ)."""
        now = self.listings(node)
        for name, before in self.baseline[node.name].items():
            assert now[name].splitlines() == before.splitlines(), name

    def listings(self, node: NodeHandle) -> dict[str, str]:
        """Everything cleanup must restore: the ruleset, the ip rules and all routing tables but the
        kernel's own routes for addresses."""
        commands = {
            "nft list ruleset": ["nft", "list", "ruleset"],
            "ip rule": ["ip", "rule"],
            "ip -6 rule": ["ip", "-6", "rule"],
            "ip -4 route show table all": ["ip", "-4", "route", "show", "table", "all"],
            "ip -6 route show table all": ["ip", "-6", "route", "show", "table", "all"],
        }
        listings = {name: self.cluster.run_in(node.netns, argv).stdout for name, argv in commands.items()}
        for name in ("ip -4 route show table all", "ip -6 route show table all"):
            # The kernel adds and removes these with addresses (a new veth's link-local address
            # appears seconds after the link): they change on their own, and the agent makes none.
            listings[name] = "".join(
                line for line in listings[name].splitlines(keepends=True) if "proto kernel" not in line
            )
        return listings


@pytest.fixture(scope="module")
def scene(cluster: Cluster) -> Iterator[Scene]:
    node1, node2 = cluster.nodes[:2]
    python = sys.executable

    def echo(*ports: int) -> list[str]:
        servers = [f"{python} -m agent.testing.echo --port {port}" for port in ports]
        return ["sh", "-c", " & ".join([*servers[:-1], f"exec {servers[-1]}"])]

    pods = [
        cluster.create_pod("enrolled", NAMESPACE, node1, command=echo(ECHO_PORT)),
        cluster.create_pod("plain-local", NAMESPACE, node1, command=echo(ECHO_PORT, PORTS.outbound)),
        cluster.create_pod("plain-remote", NAMESPACE, node2, command=echo(ECHO_PORT)),
    ]
    scene = Scene(cluster, *pods, listeners=StandInListeners(node1.netns))
    try:
        for node in (node1, node2):
            # Capture left by an earlier test module would make the baseline wrong.
            scene.agent("cleanup", node=node)
            scene.baseline[node.name] = scene.listings(node)
        for pod, port in [*((pod, ECHO_PORT) for pod in pods), (pods[1], PORTS.outbound)]:
            wait_until(
                lambda pod=pod, port=port: talk(pod.node.netns, pod.ip, port).peer,
                f"{pod.name} answers on {port}",
            )
        scene.listeners.start()
        yield scene
    finally:
        scene.listeners.stop()
        for node in (node1, node2):
            scene.agent("cleanup", node=node, check=False)
        for pod in pods:
            cluster.delete_pod(pod, wait=False)


@pytest.fixture
def capturing(scene: Scene) -> Scene:
    """The scene with exactly the `enrolled` pod enrolled on node-1."""
    scene.enrol(scene.enrolled)
    return scene


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.1)


# Capture.


@pytest.mark.parametrize(
    ("destination", "port"),
    [("plain_remote", ECHO_PORT), ("plain_local", ECHO_PORT), ("node-2", 22), ("unrouted", 443)],
)
def test_enrolled_pod_connections_reach_outbound_listener_with_original_destination(
    capturing: Scene, destination: str, port: int
) -> None:
    address = capturing.address(destination)
    reply = talk(capturing.netns("enrolled"), address, port)
    assert reply.captured == (PORTS.outbound, address, port)
    assert reply.peer == capturing.enrolled.ip


@pytest.mark.parametrize("source", ["plain_remote", "plain_local"])
def test_connections_to_an_enrolled_pods_hbone_port_reach_inbound_hbone(
    capturing: Scene, source: str
) -> None:
    reply = talk(capturing.netns(source), capturing.enrolled.ip, PORTS.inbound_hbone)
    assert reply.captured == (PORTS.inbound_hbone, capturing.enrolled.ip, PORTS.inbound_hbone)
    assert reply.peer == capturing.address(source)


@pytest.mark.parametrize("source", ["plain_remote", "plain_local", "node-2"])
def test_connections_to_an_enrolled_pods_other_ports_reach_inbound_plaintext(
    capturing: Scene, source: str
) -> None:
    reply = talk(capturing.netns(source), capturing.enrolled.ip, ECHO_PORT)
    assert reply.captured == (PORTS.inbound_plaintext, capturing.enrolled.ip, ECHO_PORT)
    assert reply.peer == capturing.address(source)


@pytest.mark.parametrize("port", [ECHO_PORT, PORTS.outbound], ids=["app-port", "agent-outbound-port"])
def test_traffic_between_non_enrolled_pods_is_untouched(capturing: Scene, port: int) -> None:
    # To 15001 too: a rule matching the agent's wildcard listeners would take this forwarded SYN.
    reply = talk(capturing.netns("plain_remote"), capturing.plain_local.ip, port)
    assert reply.captured is None
    assert reply.peer == capturing.plain_remote.ip


def test_probe_from_the_node_to_an_enrolled_pod_is_not_captured(capturing: Scene) -> None:
    reply = talk(capturing.node.netns, capturing.enrolled.ip, ECHO_PORT)
    assert reply.captured is None
    assert reply.peer == capturing.node.ip


def test_agent_upstream_sockets_are_never_captured(capturing: Scene) -> None:
    before = capturing.counter("agent upstream socket")
    reply = talk(capturing.node.netns, capturing.enrolled.ip, ECHO_PORT, mark=SETTINGS.upstream_mark)
    assert reply.captured is None
    assert reply.peer == capturing.node.ip
    assert capturing.counter("agent upstream socket") > before


@pytest.mark.parametrize(
    ("client", "server"),
    [("plain_remote", "enrolled"), ("enrolled", "plain_remote")],
    ids=["inbound-delivery-to-local-pod", "outbound-passthrough-as-local-pod"],
)
def test_transparent_upstream_socket_delivers_with_the_client_ip(
    capturing: Scene, client: str, server: str
) -> None:
    client_ip, server_ip = capturing.address(client), capturing.address(server)
    reply = talk(capturing.node.netns, server_ip, ECHO_PORT, bind=client_ip, mark=SETTINGS.upstream_mark)
    assert reply.captured is None
    assert reply.peer == client_ip


def test_with_the_listeners_down_captured_connections_are_refused(capturing: Scene) -> None:
    capturing.listeners.stop()
    try:
        with pytest.raises(ConnectionRefusedError):
            talk(capturing.netns("enrolled"), capturing.plain_remote.ip, ECHO_PORT)
        with pytest.raises(ConnectionRefusedError):
            talk(capturing.netns("plain_remote"), capturing.enrolled.ip, ECHO_PORT)
        assert talk(capturing.node.netns, capturing.enrolled.ip, ECHO_PORT).peer == capturing.node.ip
    finally:
        capturing.listeners.start()
    assert talk(capturing.netns("enrolled"), capturing.plain_remote.ip, ECHO_PORT).captured is not None


# Reconciling.


def test_pod_changes_update_the_set_without_rewriting_the_table(scene: Scene) -> None:
    scene.enrol(scene.enrolled)
    handles = [next(iter(item.values())).get("handle") for item in scene.table()["nftables"]]

    assert scene.enrol(scene.enrolled, scene.plain_local) == [f"add pod {scene.plain_local.ip}"]
    assert scene.enrol(scene.enrolled, scene.plain_local) == ["no changes"]
    assert scene.enrol(scene.enrolled) == [f"remove pod {scene.plain_local.ip}"]

    assert [next(iter(item.values())).get("handle") for item in scene.table()["nftables"]] == handles


def test_removing_a_pod_stops_its_capture_for_new_connections(scene: Scene) -> None:
    scene.enrol(scene.enrolled, scene.plain_local)
    reply = talk(scene.netns("plain_local"), scene.plain_remote.ip, ECHO_PORT)
    assert reply.captured == (PORTS.outbound, scene.plain_remote.ip, ECHO_PORT)

    scene.enrol(scene.enrolled)

    reply = talk(scene.netns("plain_local"), scene.plain_remote.ip, ECHO_PORT)
    assert reply.captured is None
    assert reply.peer == scene.plain_local.ip
    assert talk(scene.netns("enrolled"), scene.plain_remote.ip, ECHO_PORT).captured is not None


def test_reconciling_twice_changes_nothing(scene: Scene) -> None:
    def without_counters(listings: dict[str, str]) -> dict[str, str]:
        return {
            name: re.sub(r"counter packets \d+ bytes \d+", "counter", text) for name, text in listings.items()
        }

    scene.enrol(scene.enrolled)
    before = without_counters(scene.listings(scene.node))
    assert scene.enrol(scene.enrolled) == ["no changes"]
    assert without_counters(scene.listings(scene.node)) == before


def test_a_sysctl_that_breaks_capture_is_reset(scene: Scene) -> None:
    scene.enrol(scene.enrolled)
    scene.cluster.run_in(scene.node.netns, ["sh", "-c", f"echo 1 > {SRC_VALID_MARK}"])
    try:
        # The source check routes the marked packet's source to lo and drops it as a martian.
        with pytest.raises(TimeoutError):
            talk(scene.netns("enrolled"), scene.plain_remote.ip, ECHO_PORT, timeout=2)
        assert scene.enrol(scene.enrolled) == ["set sysctl net.ipv4.conf.all.src_valid_mark=0"]
        assert scene.cluster.run_in(scene.node.netns, ["cat", SRC_VALID_MARK]).stdout.strip() == "0"
        assert talk(scene.netns("enrolled"), scene.plain_remote.ip, ECHO_PORT).captured is not None
    finally:
        scene.cluster.run_in(scene.node.netns, ["sh", "-c", f"echo 0 > {SRC_VALID_MARK}"])


PIECES = {
    "table": (["nft", "delete", "table", "inet", TABLE], f"replace table inet {TABLE}"),
    "ip rule": (
        ["ip", "rule", "del", "priority", str(SETTINGS.rule_priority)],
        "add IPv4 rule 32000: fwmark 0x111/0xfff lookup 100",
    ),
    "local route": (
        ["ip", "route", "del", "local", "default", "table", str(SETTINGS.route_table)],
        "add IPv4 route local default dev lo table 100",
    ),
}


def captures(scene: Scene) -> bool:
    """Whether a new connection from the enrolled pod reaches the outbound stand-in."""
    try:
        return talk(scene.netns("enrolled"), scene.plain_remote.ip, ECHO_PORT, timeout=2).captured is not None
    except OSError:
        return False


@pytest.mark.parametrize("piece", list(PIECES))
def test_capture_needs_each_piece_and_a_reconcile_restores_it(scene: Scene, piece: str) -> None:
    delete, restored = PIECES[piece]
    scene.enrol(scene.enrolled)
    scene.cluster.run_in(scene.node.netns, delete)
    assert not captures(scene)
    assert scene.enrol(scene.enrolled) == [restored]
    assert captures(scene)


def present(scene: Scene) -> dict[str, bool]:
    """Which pieces of the capture state the node holds."""
    run = scene.cluster.run_in
    netns = scene.node.netns
    return {
        "table": run(netns, ["nft", "list", "table", "inet", TABLE], check=False).returncode == 0,
        "ip rule": f"fwmark 0x111/0xfff lookup {SETTINGS.route_table}" in run(netns, ["ip", "rule"]).stdout,
        "local route": "local default dev lo"
        in run(netns, ["ip", "route", "show", "table", str(SETTINGS.route_table)]).stdout,
    }


def test_the_running_reconciler_repairs_deletions_within_seconds(scene: Scene) -> None:
    scene.agent("cleanup")
    log_path = scene.cluster.layout.log_dir / f"redirect-run-{scene.node.name}.log"
    with open(log_path, "a") as log_file:
        process = scene.cluster.spawn_in(
            scene.node.netns,
            ["python", "-m", "agent", "redirect", "run", "--pod-ip", scene.enrolled.ip],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AMBIENT_DRIFT_CHECK_INTERVAL": "1"},
        )
    everything = dict.fromkeys(PIECES, True)
    try:
        wait_until(lambda: present(scene) == everything, "the reconciler installs capture")
        for piece, (delete, _) in PIECES.items():
            scene.cluster.run_in(scene.node.netns, delete)
            wait_until(
                lambda: present(scene) == everything, f"the reconciler restores the {piece}", timeout=10
            )
        assert captures(scene)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    # Stopping leaves capture in place: a restarting agent must not open a gap.
    assert captures(scene)
    assert f"redirect: replace table inet {TABLE}" in log_path.read_text()


def test_cleanup_restores_the_listings_exactly_and_is_safe_to_repeat(scene: Scene) -> None:
    scene.enrol(scene.enrolled, scene.plain_local)
    assert scene.listings(scene.node) != scene.baseline[scene.node.name]

    removed = scene.agent("cleanup")

    assert removed == [
        f"removed table inet {TABLE}",
        "removed IPv4 rule 32000: fwmark 0x111/0xfff lookup 100",
        "removed IPv6 rule 32000: fwmark 0x111/0xfff lookup 100",
        "removed IPv4 route local default dev lo table 100",
        "removed IPv6 route local default dev lo table 100",
    ]
    scene.assert_listings_unchanged(scene.node)
    assert scene.agent("cleanup") == ["nothing to remove"]
    scene.assert_listings_unchanged(scene.node)


def test_cleanup_on_a_node_that_never_ran_the_agent_changes_nothing(scene: Scene) -> None:
    assert scene.agent("cleanup", node=scene.other_node) == ["nothing to remove"]
    scene.assert_listings_unchanged(scene.other_node)
