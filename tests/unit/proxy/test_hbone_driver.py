"""What the client driver writes when it opens a tunnel (the CONNECT, and the client's first bytes
with it, in one write: the destination holds them until it accepts, or hands them to the pod's socket
itself), and how a tunnel's chunks take the connection's shortcuts: one DATA frame read whole, one
written at once."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from agent.hbone import (
    DataReceived,
    HboneClientConnection,
    HboneServerConnection,
    HboneSettings,
    PingAcknowledged,
    TunnelRequested,
)
from agent.identity.spiffe import SpiffeId
from agent.proxy.hbone_driver import HboneClientDriver, HboneDriver, HboneServerDriver, HboneStreamEnd
from agent.proxy.relay import Relay
from tests.unit.hbone.wire import CLIENT, TARGET


class RecordingTransport:
    """Takes the driver's writes (the TLS transport's part here); every call is one write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False


def connected_client() -> tuple[HboneClientDriver, RecordingTransport, HboneServerConnection]:
    driver = HboneClientDriver(
        HboneSettings(),
        expected_identity=SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/echo"),
        keepalive_interval_s=60,
        idle_timeout_s=60,
    )
    transport = RecordingTransport()
    driver.transport = transport  # type: ignore[assignment]  # the handshake is not what is tested
    driver.flush()
    server = HboneServerConnection()
    server.receive_data(b"".join(transport.writes))  # the preface and settings
    transport.writes.clear()
    return driver, transport, server


async def test_the_clients_first_bytes_leave_with_the_connect_in_one_write() -> None:
    driver, transport, server = connected_client()
    stream = driver.open_stream(TARGET, CLIENT, early_data=b"GET / HTTP/1.1\r\n\r\n")
    [written] = transport.writes
    assert server.receive_data(written) == [
        TunnelRequested(stream.stream_id, TARGET, CLIENT),
        DataReceived(stream.stream_id, b"GET / HTTP/1.1\r\n\r\n", 18),
    ]
    assert stream.answer is not None
    assert not stream.answer.done()


async def test_without_early_bytes_the_connect_leaves_alone() -> None:
    driver, transport, server = connected_client()
    stream = driver.open_stream(TARGET, CLIENT)
    [written] = transport.writes
    assert server.receive_data(written) == [TunnelRequested(stream.stream_id, TARGET, CLIENT)]


def receive(driver: HboneDriver, data: bytes) -> None:
    """Hands `data` to the driver as one read of its transport."""
    driver.get_buffer(len(data))[: len(data)] = data
    driver.buffer_updated(len(data))


def refused(name: str) -> Callable[..., object]:
    """Stands in for a connection method the shortcut must not reach."""

    def call(*args: object) -> object:
        raise AssertionError(f"the general path was taken: {name}")

    return call


class EchoingRelay(Relay):
    """Sends every chunk the tunnel brings straight back on it, noting how many writes the
    transport had taken by then."""

    def __init__(self, stream: HboneStreamEnd, transport: RecordingTransport) -> None:
        super().__init__(lambda outcome: None)
        self.stream, self.transport = stream, transport
        self.writes_when_received: list[int] = []

    def received(self, data: bytes, *, from_downstream: bool) -> None:
        self.writes_when_received.append(len(self.transport.writes))
        self.stream.send(data)


Tunnel = tuple[HboneClientDriver, RecordingTransport, HboneServerConnection, HboneStreamEnd]


async def answered_tunnel() -> Tunnel:
    driver, transport, server = connected_client()
    stream = driver.open_stream(TARGET, CLIENT)
    server.receive_data(b"".join(transport.writes))
    transport.writes.clear()
    assert server.accept(stream.stream_id)
    receive(driver, server.data_to_send())
    assert stream.answer is not None
    await stream.answer
    transport.writes.clear()  # the acknowledgement of the server's settings
    stream.relay = EchoingRelay(stream, transport)
    stream.resume_receiving()
    return driver, transport, server, stream


async def test_a_chunk_on_an_answered_tunnel_is_written_at_once_as_one_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver, transport, server, stream = await answered_tunnel()
    monkeypatch.setattr(driver.hbone, "send_data", refused("send_data"))
    stream.send(b"request")
    [written] = transport.writes
    assert server.receive_data(written) == [DataReceived(stream.stream_id, b"request", 7)]


async def test_a_data_frame_read_whole_goes_to_its_tunnel_without_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver, transport, server, stream = await answered_tunnel()
    server.send_data(stream.stream_id, b"answer")
    frame = server.data_to_send()
    monkeypatch.setattr(driver.hbone, "receive_data", refused("receive_data"))
    receive(driver, frame)
    assert server.receive_data(b"".join(transport.writes)) == [DataReceived(stream.stream_id, b"answer", 6)]


async def test_what_a_read_causes_is_written_once_the_read_is_dispatched() -> None:
    driver, transport, server, stream = await answered_tunnel()
    server.send_data(stream.stream_id, b"one")
    server.ping(b"pingpong")
    server.send_data(stream.stream_id, b"two")
    receive(driver, server.data_to_send())  # three frames: the general path
    assert isinstance(stream.relay, EchoingRelay)
    assert stream.relay.writes_when_received == [0, 0]
    [written] = transport.writes
    assert server.receive_data(written) == [
        DataReceived(stream.stream_id, b"one", 3),
        PingAcknowledged(b"pingpong"),
        DataReceived(stream.stream_id, b"two", 3),
    ]


# The destination: a CONNECT's first bytes straight to the pod's socket


class RecordingRelay(Relay):
    """Keeps what the tunnel hands on."""

    def __init__(self) -> None:
        super().__init__(lambda outcome: None)
        self.received_bytes = bytearray()

    def received(self, data: bytes, *, from_downstream: bool) -> None:
        self.received_bytes += data


def requested_with(first_bytes: bytes) -> tuple[HboneStreamEnd, HboneServerDriver]:
    """A server driver that took a CONNECT with `first_bytes` right behind it in the same read."""
    requested: list[HboneStreamEnd] = []
    driver = HboneServerDriver(
        HboneSettings(),
        served_identity=SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/echo"),
        trust_domain="cluster.local",
        on_tunnel=lambda driver, stream, request: requested.append(stream),
        on_malformed=lambda driver, event: None,
        keepalive_interval_s=60,
    )
    driver.transport = RecordingTransport()  # type: ignore[assignment]  # the handshake is not what is tested
    driver.flush()
    client = HboneClientConnection()
    stream_id = client.open_tunnel(TARGET, CLIENT)
    client.send_data(stream_id, first_bytes)
    receive(driver, client.data_to_send())
    [stream] = requested
    return stream, driver


@pytest.fixture
def pod_socket() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The agent's (non-blocking) end of a connection to a pod, and the pod's end."""
    agent_end, pod_end = socket.socketpair()
    agent_end.setblocking(False)
    yield agent_end, pod_end
    agent_end.close()
    pod_end.close()


def read_all_now(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(received)
        received += chunk


async def test_a_connects_first_bytes_go_to_the_pod_and_are_not_relayed_again(
    pod_socket: tuple[socket.socket, socket.socket],
) -> None:
    agent_end, pod_end = pod_socket
    stream, driver = requested_with(b"GET / HTTP/1.1\r\n\r\n")
    assert stream.send_held_to(agent_end) == len(b"GET / HTTP/1.1\r\n\r\n")
    assert read_all_now(pod_end) == b"GET / HTTP/1.1\r\n\r\n"
    relay = RecordingRelay()
    stream.relay = relay
    stream.resume_receiving()
    assert relay.received_bytes == b""
    assert driver.hbone._unacknowledged == {}  # the window is given back: the bytes were handed on


async def test_first_bytes_the_pod_socket_does_not_take_at_once_stay_for_the_relay(
    pod_socket: tuple[socket.socket, socket.socket],
) -> None:
    agent_end, pod_end = pod_socket
    agent_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    first_bytes = bytes(range(256)) * 192  # 48 KiB (within the initial window), beyond a small send buffer
    stream, _ = requested_with(first_bytes)
    sent = stream.send_held_to(agent_end)
    assert 0 < sent < len(first_bytes)
    relay = RecordingRelay()
    stream.relay = relay
    stream.resume_receiving()
    assert read_all_now(pod_end) + relay.received_bytes == first_bytes


async def test_first_bytes_a_failing_send_did_not_take_stay_for_the_relay(
    pod_socket: tuple[socket.socket, socket.socket],
) -> None:
    agent_end, _ = pod_socket
    agent_end.shutdown(socket.SHUT_WR)  # every send now fails
    stream, _ = requested_with(b"hello")
    assert stream.send_held_to(agent_end) == 0
    relay = RecordingRelay()
    stream.relay = relay
    stream.resume_receiving()
    assert relay.received_bytes == b"hello"
