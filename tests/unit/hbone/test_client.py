"""The client end: opens CONNECT tunnels within the stream limits, reads answers into typed events,
and survives a broken server."""

from __future__ import annotations

from collections import deque
from ipaddress import ip_address

import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import NeverIndexedHeaderTuple

from agent.hbone import (
    ClientEvent,
    ConnectionClosing,
    ConnectionFailed,
    ErrorCode,
    HboneClientConnection,
    HboneSettings,
    HboneUsageError,
    PeerHalfClosed,
    SocketAddress,
    StreamReset,
    TunnelEstablished,
    TunnelFailure,
    TunnelRefused,
    TunnelRequested,
)
from agent.hbone.request import Header
from tests.unit.hbone.wire import CLIENT, TARGET, Wire, received_bytes


class RawServer:
    """A bare h2 server that answers whatever it is told to, to play a broken peer."""

    def __init__(self, client: HboneClientConnection) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, validate_outbound_headers=False))
        self.h2.initiate_connection()
        self.client = client
        self.requests: list[h2.events.RequestReceived] = []
        self.exchange()

    def exchange(self) -> list[ClientEvent]:
        client_events: list[ClientEvent] = []
        for _ in range(10):
            to_server, to_client = self.client.data_to_send(), self.h2.data_to_send()
            if not to_server and not to_client:
                break
            events = self.h2.receive_data(to_server)
            self.requests += [e for e in events if isinstance(e, h2.events.RequestReceived)]
            client_events += self.client.receive_data(to_client)
        return client_events

    def answer(self, stream_id: int, headers: list[Header], *, end_stream: bool = False) -> list[ClientEvent]:
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        return self.exchange()


def test_the_request_on_the_wire_is_a_plain_connect() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    target = SocketAddress(ip_address("fd00::7"), 15008)
    client.open_tunnel(target, CLIENT)
    server.exchange()
    assert [r.headers for r in server.requests] == [
        [
            (b":method", b"CONNECT"),
            (b":authority", b"[fd00::7]:15008"),
            (b"forwarded", b'for="10.0.1.5:43210"'),
        ]
    ]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b":status", b"200")], TunnelEstablished(1, 200)),
        ([(b":status", b"204")], TunnelEstablished(1, 204)),
        ([(b":status", b"401")], TunnelRefused(1, 401, TunnelFailure.DENIED)),
        ([(b":status", b"403")], TunnelRefused(1, 403, TunnelFailure.DENIED)),
        ([(b":status", b"502")], TunnelRefused(1, 502, TunnelFailure.UNEXPECTED_STATUS)),
        ([(b":status", b"301"), (b"location", b"/")], TunnelRefused(1, 301, TunnelFailure.UNEXPECTED_STATUS)),
        ([(b"server", b"no-status")], StreamReset(1, ErrorCode.PROTOCOL_ERROR, by_peer=False)),
        ([(b":status", b"2xx")], StreamReset(1, ErrorCode.PROTOCOL_ERROR, by_peer=False)),
    ],
)
def test_responses_become_typed_events(headers: list[Header], expected: ClientEvent) -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    assert server.answer(1, headers) == [expected]
    still_open = isinstance(expected, TunnelEstablished)
    assert client.open_stream_count == int(still_open)


def test_refusal_left_open_by_the_server_is_cancelled_by_the_client() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    server.answer(1, [(b":status", b"503")])
    assert server.h2.open_inbound_streams == 0
    assert client._h2.open_outbound_streams == 0


def test_informational_responses_are_skipped() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    assert server.answer(1, [(b":status", b"100")]) == []
    assert server.answer(1, [(b":status", b"200")]) == [TunnelEstablished(1, 200)]


def test_established_then_end_stream_in_one_answer() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    assert server.answer(1, [(b":status", b"200")], end_stream=True) == [
        TunnelEstablished(1, 200),
        PeerHalfClosed(1),
    ]


def test_trailers_from_the_server_reset_the_tunnel() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    server.answer(1, [(b":status", b"200")])
    assert server.answer(1, [(b"x-trailer", b"1")], end_stream=True) == [
        StreamReset(1, ErrorCode.PROTOCOL_ERROR, by_peer=False)
    ]


def test_goaway_with_an_error_is_reported_and_stops_new_tunnels() -> None:
    client = HboneClientConnection()
    server = RawServer(client)
    client.open_tunnel(TARGET, CLIENT)
    client.open_tunnel(TARGET, CLIENT)
    server.exchange()
    server.h2.close_connection(ErrorCode.ENHANCE_YOUR_CALM, last_stream_id=1)
    # Only one way: h2 itself takes nothing more after its GOAWAY.
    assert client.receive_data(server.h2.data_to_send()) == [
        ConnectionClosing(1, ErrorCode.ENHANCE_YOUR_CALM),
        StreamReset(3, ErrorCode.REFUSED_STREAM, by_peer=True),
    ]
    assert client.peer_going_away
    assert not client.can_open_stream
    with pytest.raises(HboneUsageError):
        client.open_tunnel(TARGET, CLIENT)


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd",  # DATA on stream 0
        b"\x00\x00\x05\x01\x04\x00\x00\x00\x01\xff\xff\xff\xff\xff",  # undecodable HPACK
    ],
)
def test_garbage_from_the_server_is_a_connection_failure_event(garbage: bytes) -> None:
    client = HboneClientConnection()
    client.open_tunnel(TARGET, CLIENT)
    client.data_to_send()
    events = client.receive_data(garbage)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionFailed)
    assert events[0].detail
    assert client.closed
    assert not client.can_open_stream
    assert client.data_to_send() != b""


def test_stream_limit_default_is_100_and_frees_up_as_tunnels_finish() -> None:
    wire = Wire()
    streams = [wire.client.open_tunnel(TARGET, CLIENT) for _ in range(100)]
    assert wire.client.open_stream_count == 100
    assert not wire.client.can_open_stream
    with pytest.raises(HboneUsageError):
        wire.client.open_tunnel(TARGET, CLIENT)
    _, server_events = wire.pump()
    assert [e.stream_id for e in server_events if isinstance(e, TunnelRequested)] == streams
    wire.server.accept(streams[0])
    wire.client.end_stream(streams[0])
    wire.server.end_stream(streams[0])
    wire.pump()
    assert wire.client.can_open_stream
    wire.client.open_tunnel(TARGET, CLIENT)
    assert not wire.client.can_open_stream


def test_own_limit_applies_when_lower_than_the_servers() -> None:
    wire = Wire(client_settings=HboneSettings(max_concurrent_streams=2))
    wire.open()
    wire.open()
    assert not wire.client.can_open_stream


def test_no_new_tunnels_after_close_or_when_stream_ids_run_out() -> None:
    wire = Wire()
    wire.client._h2.highest_outbound_stream_id = 2**31 - 1
    assert not wire.client.can_open_stream
    other = Wire()
    other.client.close()
    assert not other.client.can_open_stream


def test_many_concurrent_tunnels_each_carry_their_own_bytes() -> None:
    wire = Wire(
        client_settings=HboneSettings(max_concurrent_streams=150),
        server_settings=HboneSettings(max_concurrent_streams=150),
    )
    streams = [wire.open() for _ in range(150)]
    for stream_id in streams:
        wire.client.send_data(stream_id, f"up {stream_id}".encode())
        wire.server.send_data(stream_id, f"down {stream_id}".encode() * 100)
        wire.client.end_stream(stream_id)
    client_events, server_events = wire.pump()
    for stream_id in streams:
        assert received_bytes(server_events, stream_id) == f"up {stream_id}".encode()
        assert received_bytes(client_events, stream_id) == f"down {stream_id}".encode() * 100
        wire.server.end_stream(stream_id)
    wire.pump()
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)
    assert wire.client._h2.open_outbound_streams == 0


def test_requests_stay_out_of_the_header_tables_and_are_sent_as_they_are() -> None:
    # Every tunnel names a new client port: indexed, these values would fill both sides' HPACK
    # tables with entries never reused; Huffman-coded, they cost both sides Python bit loops.
    # Nothing is indexed at all: the blocks are stateless, so this side frames them itself.
    client = HboneClientConnection()
    server = RawServer(client)
    for port in range(40000, 40050):
        client.open_tunnel(TARGET, SocketAddress(CLIENT.ip, port))
        to_server = client.data_to_send()
        assert f'for="{CLIENT.ip}:{port}"'.encode() in to_server
        [request] = [e for e in server.h2.receive_data(to_server) if isinstance(e, h2.events.RequestReceived)]
        assert request.headers[2] == (b"forwarded", f'for="{CLIENT.ip}:{port}"'.encode())
        assert isinstance(request.headers[2], NeverIndexedHeaderTuple)
        assert request.headers[:2] == [(b":method", b"CONNECT"), (b":authority", str(TARGET).encode())]
        assert str(TARGET).encode() in to_server
    assert server.h2.decoder.header_table.dynamic_entries == deque()
