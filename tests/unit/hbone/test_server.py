"""The server end: validates CONNECT requests on the wire, answers 200/400/401/503, drains with
GOAWAY, and never raises on a peer's bytes."""

from __future__ import annotations

import h2.events
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import Frame, GoAwayFrame

from agent.hbone import (
    ConnectionClosing,
    ConnectionFailed,
    DataReceived,
    ErrorCode,
    HboneServerConnection,
    HboneSettings,
    MalformedTunnelRequest,
    OutboundBufferDrained,
    PeerHalfClosed,
    RefusalReason,
    StreamReset,
    TunnelEstablished,
    TunnelFailure,
    TunnelRefused,
    TunnelRequested,
)
from agent.hbone.request import Header
from tests.unit.hbone.wire import CLIENT, TARGET, Wire, merged, received_bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class RawClient:
    """A bare h2 client that sends whatever headers it is given, to play a broken or hostile peer."""

    def __init__(self, server: HboneServerConnection) -> None:
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        self.h2.initiate_connection()
        self.server = server
        self.events: list[h2.events.Event] = []

    def request(self, headers: list[Header], *, end_stream: bool = False) -> list[object]:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        return self.exchange()

    def exchange(self) -> list[object]:
        server_events: list[object] = []
        for _ in range(10):
            to_server, to_client = self.h2.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                break
            server_events += self.server.receive_data(to_server)
            self.events += self.h2.receive_data(to_client)
        return server_events

    def responses(self) -> dict[int, bytes]:
        return {
            e.stream_id: dict(e.headers)[b":status"]
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived)
        }


def test_valid_request_is_reported_and_accept_answers_200() -> None:
    wire = Wire()
    stream_id = wire.client.open_tunnel(TARGET, CLIENT)
    _, server_events = wire.pump()
    assert server_events == [TunnelRequested(stream_id, TARGET, CLIENT)]
    assert wire.server.open_stream_count == 1
    assert wire.server.accept(stream_id)
    client_events, _ = wire.pump()
    assert client_events == [TunnelEstablished(stream_id, 200)]


@pytest.mark.parametrize(
    ("reason", "status", "failure"),
    [
        (RefusalReason.MALFORMED_REQUEST, 400, TunnelFailure.MALFORMED_REQUEST),
        (RefusalReason.DENIED_BY_POLICY, 401, TunnelFailure.DENIED),
        (RefusalReason.NO_LOCAL_WORKLOAD, 503, TunnelFailure.UNAVAILABLE),
        (RefusalReason.UPSTREAM_REFUSED, 503, TunnelFailure.UNAVAILABLE),
        (RefusalReason.UPSTREAM_UNREACHABLE, 503, TunnelFailure.UNAVAILABLE),
    ],
)
def test_refusals_reach_the_client_as_status_and_typed_failure(
    reason: RefusalReason, status: int, failure: TunnelFailure
) -> None:
    wire = Wire()
    stream_id = wire.client.open_tunnel(TARGET, CLIENT)
    wire.pump()
    wire.server.refuse(stream_id, reason)
    client_events, server_events = wire.pump()
    assert client_events == [TunnelRefused(stream_id, status, failure)]
    assert server_events == []
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)
    assert wire.client._h2.open_outbound_streams == 0
    assert wire.server._h2.open_inbound_streams == 0


def test_early_data_of_a_refused_tunnel_gives_its_window_back() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    refused = wire.client.open_tunnel(TARGET, CLIENT)
    assert wire.client.send_data(refused, b"e" * 65_535) == 0
    _, server_events = wire.pump()
    assert [type(e) for e in server_events] == [TunnelRequested, DataReceived]
    wire.server.refuse(refused, RefusalReason.DENIED_BY_POLICY)
    wire.pump()
    # Nobody acknowledged those bytes, yet the whole connection window is open again.
    second = wire.open()
    assert wire.client.send_data(second, b"s" * 65_535) == 0


def test_bytes_sent_ahead_of_the_answer_hold_their_window_until_acknowledged() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    early = wire.client.open_tunnel(TARGET, CLIENT)
    assert wire.client.send_data(early, b"e" * 65_535) == 0
    _, server_events = wire.pump()
    assert merged(server_events) == [
        TunnelRequested(early, TARGET, CLIENT),
        DataReceived(early, b"e" * 65_535, 65_535),
    ]
    other = wire.client.open_tunnel(TARGET, CLIENT)
    assert wire.client.send_data(other, b"o") == 1  # the unanswered tunnel holds the whole window
    wire.pump()
    assert wire.server.accept(early)
    client_events, _ = wire.pump()
    assert client_events == [TunnelEstablished(early, 200)]
    assert wire.client.outbound_buffered(other) == 1  # answering hands no window back
    wire.server.acknowledge_received_data(early, 65_535)
    client_events, server_events = wire.pump()
    assert OutboundBufferDrained(other) in client_events
    assert received_bytes(server_events, other) == b"o"


def test_end_stream_ahead_of_the_answer_half_closes_the_accepted_tunnel() -> None:
    wire = Wire()
    stream_id = wire.client.open_tunnel(TARGET, CLIENT)
    wire.client.send_data(stream_id, b"request")
    wire.client.end_stream(stream_id)
    _, server_events = wire.pump()
    assert merged(server_events) == [
        TunnelRequested(stream_id, TARGET, CLIENT),
        DataReceived(stream_id, b"request", 7),
        PeerHalfClosed(stream_id),
    ]
    assert wire.server.accept(stream_id)
    wire.server.send_data(stream_id, b"answer")
    wire.server.end_stream(stream_id)
    client_events, _ = wire.pump()
    assert merged(client_events) == [
        TunnelEstablished(stream_id, 200),
        DataReceived(stream_id, b"answer", 6),
        PeerHalfClosed(stream_id),
    ]
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)


def test_answers_to_gone_streams_are_no_ops() -> None:
    wire = Wire()
    stream_id = wire.client.open_tunnel(TARGET, CLIENT)
    wire.pump()
    wire.client.reset_stream(stream_id)
    _, server_events = wire.pump()
    assert server_events == [StreamReset(stream_id, ErrorCode.CONNECT_ERROR, by_peer=True)]
    assert not wire.server.accept(stream_id)
    wire.server.refuse(stream_id, RefusalReason.UPSTREAM_REFUSED)
    assert wire.server.data_to_send() == b""


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ([(b":method", b"GET"), (b":authority", b"10.0.2.7:80")], "not CONNECT"),
        ([(b":method", b"CONNECT")], "missing :authority"),
        ([(b":method", b"CONNECT"), (b":authority", b"db.example:5432")], "not a literal ip:port"),
        ([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:0")], "not a literal ip:port"),
        ([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:65536")], "not a literal ip:port"),
        (
            [(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80"), (b":path", b"/"), (b":scheme", b"h")],
            "no :path",
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80"), (b"forwarded", b"x")], "forwarded"),
        ([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80"), (b"Upper", b"x")], "not lowercase"),
    ],
)
def test_malformed_requests_get_400_on_their_stream_only(headers: list[Header], problem: str) -> None:
    server = HboneServerConnection()
    raw = RawClient(server)
    raw.exchange()
    server_events = raw.request(headers)
    assert len(server_events) == 1
    event = server_events[0]
    assert isinstance(event, MalformedTunnelRequest)
    assert event.stream_id == 1
    assert problem in event.problem
    assert raw.responses() == {1: b"400"}
    assert server.open_stream_count == 0
    # The connection still serves good requests.
    good = [(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80")]
    assert [type(e) for e in raw.request(good)] == [TunnelRequested]
    assert not server.closed


def test_malformed_request_with_end_stream_is_answered_and_closed() -> None:
    server = HboneServerConnection()
    raw = RawClient(server)
    raw.exchange()
    server_events = raw.request([(b":method", b"GET"), (b":authority", b"1.2.3.4:5")], end_stream=True)
    assert [type(e) for e in server_events] == [MalformedTunnelRequest]
    assert raw.responses() == {1: b"400"}
    assert server._h2.open_inbound_streams == 0


def test_request_with_end_stream_is_a_tunnel_half_closed_by_the_client() -> None:
    server = HboneServerConnection()
    raw = RawClient(server)
    raw.exchange()
    events = raw.request([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80")], end_stream=True)
    assert [type(e) for e in events] == [TunnelRequested, PeerHalfClosed]


def test_trailers_on_a_tunnel_reset_it() -> None:
    server = HboneServerConnection()
    raw = RawClient(server)
    raw.exchange()
    raw.request([(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80")])
    server.accept(1)
    raw.exchange()
    raw.h2.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    assert raw.exchange() == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, by_peer=False)]
    assert any(isinstance(e, h2.events.StreamReset) and e.error_code == 1 for e in raw.events)
    assert server.open_stream_count == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        PREFACE + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd",  # DATA on stream 0
        PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x01",  # SETTINGS on stream 1
        PREFACE + b"\x00\x00\x04\x06\x00\x00\x00\x00\x00ping",  # PING of 4 bytes, not 8
    ],
)
def test_garbage_is_a_connection_failure_event_not_an_exception(garbage: bytes) -> None:
    server = HboneServerConnection()
    server.data_to_send()
    events = server.receive_data(garbage)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionFailed)
    assert events[0].detail
    assert server.closed
    goaway = server.data_to_send()
    assert GoAwayFrame.type in goaway[3:4]
    assert server.receive_data(b"more garbage") == []


def test_drain_sends_goaway_lets_open_tunnels_finish_and_refuses_new_ones() -> None:
    wire = Wire()
    first = wire.open()
    wire.server.start_drain()
    assert wire.server.draining
    client_events, _ = wire.pump()
    assert client_events == [ConnectionClosing(first, ErrorCode.NO_ERROR)]
    assert not wire.client.can_open_stream

    # The open tunnel still carries bytes both ways and closes normally.
    wire.client.send_data(first, b"request")
    wire.server.send_data(first, b"response")
    client_events, server_events = wire.pump()
    assert received_bytes(server_events, first) == b"request"
    assert received_bytes(client_events, first) == b"response"
    wire.client.end_stream(first)
    wire.server.end_stream(first)
    wire.pump()
    assert wire.server.open_stream_count == 0


def test_tunnel_opened_while_the_goaway_travels_is_refused_retryably() -> None:
    wire = Wire()
    served = wire.open()
    wire.server.start_drain()
    raced = wire.client.open_tunnel(TARGET, CLIENT)
    client_events, server_events = wire.pump()
    assert server_events == []
    assert client_events == [
        ConnectionClosing(served, ErrorCode.NO_ERROR),
        StreamReset(raced, ErrorCode.REFUSED_STREAM, by_peer=True),
    ]
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (1, 1)

    # Closing at the drain deadline repeats the drain's last stream, not the refused one.
    wire.server.close()
    goaway = last_frame(wire.server.data_to_send())
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.last_stream_id == served < raced


def test_bytes_ahead_of_the_answer_on_a_tunnel_refused_by_the_drain_give_their_window_back() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    served = wire.open()
    wire.server.start_drain()
    raced = wire.client.open_tunnel(TARGET, CLIENT)
    assert wire.client.send_data(raced, b"r" * 65_535) == 0
    _, server_events = wire.pump()
    assert server_events == []
    assert wire.client.send_data(served, b"s" * 65_535) == 0
    _, server_events = wire.pump()
    assert received_bytes(server_events, served) == b"s" * 65_535


def last_frame(wire_bytes: bytes) -> Frame:
    view = memoryview(wire_bytes)
    while True:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        view = view[9 + length :]
        if not view:
            return frame


def test_client_goaway_is_reported_to_the_server() -> None:
    wire = Wire()
    wire.client.close()
    _, server_events = wire.pump()
    assert server_events == [ConnectionClosing(0, ErrorCode.NO_ERROR)]
    assert wire.client.closed


def test_stream_limit_is_advertised_to_the_client() -> None:
    wire = Wire(server_settings=HboneSettings(max_concurrent_streams=3))
    for _ in range(3):
        wire.open()
    assert not wire.client.can_open_stream
