"""What the client driver writes when it opens a tunnel: the CONNECT, and the client's first bytes
with it, in one write (the destination holds them until it accepts)."""

from __future__ import annotations

from agent.hbone import DataReceived, HboneServerConnection, HboneSettings, TunnelRequested
from agent.identity.spiffe import SpiffeId
from agent.proxy.hbone_driver import HboneClientDriver
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
