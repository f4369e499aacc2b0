"""What both ends share, run back to back: bytes and half-closes both ways, resets both ways, flow
control with large windows and backpressure, keepalive, close, and robustness to how bytes arrive."""

from __future__ import annotations

import itertools

import h2.events
import pytest
from hyperframe.frame import DataFrame, Frame, HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.hbone import (
    ConnectionClosing,
    DataReceived,
    ErrorCode,
    HboneClientConnection,
    HboneServerConnection,
    HboneSettings,
    HboneUsageError,
    OutboundBufferDrained,
    PeerHalfClosed,
    PingAcknowledged,
    StreamReset,
    TunnelEstablished,
    TunnelRequested,
)
from agent.hbone.connection import _ReceiveFrameBuffer
from tests.unit.hbone.wire import CLIENT, TARGET, Wire, flow_controlled, merged, received_bytes

KIB = 1024
MIB = 1024 * KIB


def pattern(size: int) -> bytes:
    """Bytes whose order matters: a reordered, dropped or repeated chunk shows."""
    return b"".join(i.to_bytes(4, "big") for i in range(size // 4 + 1))[:size]


def test_bytes_flow_both_ways_and_the_client_half_closes_first() -> None:
    wire = Wire()
    stream_id = wire.open()
    assert wire.client.send_data(stream_id, b"GET / HTTP/1.0\r\n\r\n") == 0
    wire.client.end_stream(stream_id)
    client_events, server_events = wire.pump()
    assert client_events == []
    request = b"GET / HTTP/1.0\r\n\r\n"
    assert server_events == [DataReceived(stream_id, request, len(request)), PeerHalfClosed(stream_id)]

    # Half-closed: the other direction still works, then closes the tunnel.
    wire.server.send_data(stream_id, b"HTTP/1.0 200 OK\r\n\r\n")
    wire.server.end_stream(stream_id)
    client_events, _ = wire.pump()
    response = b"HTTP/1.0 200 OK\r\n\r\n"
    assert client_events == [DataReceived(stream_id, response, len(response)), PeerHalfClosed(stream_id)]
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)


def test_the_server_half_closes_first() -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.server.send_data(stream_id, b"banner")
    wire.server.end_stream(stream_id)
    client_events, _ = wire.pump()
    assert client_events == [DataReceived(stream_id, b"banner", 6), PeerHalfClosed(stream_id)]
    assert wire.client.open_stream_count == 1
    wire.client.send_data(stream_id, b"bye")
    wire.client.end_stream(stream_id)
    _, server_events = wire.pump()
    assert server_events == [DataReceived(stream_id, b"bye", 3), PeerHalfClosed(stream_id)]
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)


@pytest.mark.parametrize("code", [ErrorCode.CONNECT_ERROR, ErrorCode.CANCEL, ErrorCode.NO_ERROR])
def test_client_reset_reaches_the_server_with_its_code(code: ErrorCode) -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.client.reset_stream(stream_id, code)
    assert wire.client.open_stream_count == 0
    client_events, server_events = wire.pump()
    assert server_events == [StreamReset(stream_id, code, by_peer=True)]
    assert client_events == []
    assert wire.server.open_stream_count == 0


def test_server_reset_reaches_the_client_as_a_connect_error_by_default() -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.client.end_stream(stream_id)
    wire.pump()
    wire.server.reset_stream(stream_id)
    client_events, _ = wire.pump()
    assert client_events == [StreamReset(stream_id, ErrorCode.CONNECT_ERROR, by_peer=True)]
    assert wire.client.open_stream_count == 0


def test_gone_streams_take_and_drop_bytes_but_writing_after_half_close_is_a_bug() -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.client.end_stream(stream_id)
    with pytest.raises(HboneUsageError):
        wire.client.send_data(stream_id, b"late")
    wire.client.end_stream(stream_id)  # twice is harmless
    wire.server.reset_stream(stream_id)
    wire.pump()
    assert wire.client.send_data(stream_id, b"after reset") == 0
    wire.client.end_stream(stream_id)
    wire.client.reset_stream(stream_id)
    assert wire.client.data_to_send() == b""


def test_bytes_sent_before_the_peers_settings_flow_once_they_arrive() -> None:
    client = HboneClientConnection()
    server = HboneServerConnection()
    stream_id = client.open_tunnel(TARGET, CLIENT)
    # Until the server's SETTINGS arrive, HTTP/2's 64 KiB initial windows apply.
    assert client.send_data(stream_id, pattern(1 * MIB)) == 1 * MIB - 65_535
    server_events = server.receive_data(client.data_to_send())
    client_events = client.receive_data(server.data_to_send())
    assert client_events == [OutboundBufferDrained(stream_id)]
    server_events += server.receive_data(client.data_to_send())
    assert received_bytes(server_events, stream_id) == pattern(1 * MIB)


def test_a_large_transfer_completes_only_as_the_receiver_acknowledges() -> None:
    window = 1 * MIB
    settings = HboneSettings(stream_window=window, connection_window=2 * window)
    wire = Wire(settings, settings)
    stream_id = wire.open()
    payload = pattern(5 * MIB + 123)

    held_back = wire.server.send_data(stream_id, payload)
    assert held_back == len(payload) - window
    assert wire.server.outbound_buffered(stream_id) == held_back
    wire.server.end_stream(stream_id)

    received = b""
    acknowledged = 0
    drained = 0
    while True:
        client_events, _ = wire.pump()
        received += received_bytes(client_events, stream_id)
        # Never more in flight than one window beyond what the receiver consumed.
        assert len(received) <= acknowledged + window
        drained += client_events.count(OutboundBufferDrained(stream_id))
        if PeerHalfClosed(stream_id) in client_events:
            break
        assert flow_controlled(client_events, stream_id) > 0, "the sender stalled"
        wire.client.acknowledge_received_data(stream_id, flow_controlled(client_events, stream_id))
        acknowledged = len(received)
    assert received == payload
    assert drained == 0  # drained events go to the sender, not to the receiver
    assert wire.server.outbound_buffered(stream_id) == 0


def test_without_acknowledgement_the_sender_stops_at_the_window() -> None:
    settings = HboneSettings(stream_window=256 * KIB, connection_window=1 * MIB)
    wire = Wire(settings, settings)
    stream_id = wire.open()
    wire.client.send_data(stream_id, pattern(600 * KIB))
    _, server_events = wire.pump()
    assert len(received_bytes(server_events, stream_id)) == 256 * KIB
    _, server_events = wire.pump()
    assert server_events == []
    assert wire.client.outbound_buffered(stream_id) == 600 * KIB - 256 * KIB


def test_backpressure_is_reported_and_drain_is_announced_once() -> None:
    settings = HboneSettings(stream_window=64 * KIB, connection_window=64 * KIB)
    wire = Wire(settings, settings)
    stream_id = wire.open()
    assert wire.client.send_data(stream_id, pattern(64 * KIB)) == 0
    assert wire.client.send_data(stream_id, b"a" * 1000) == 1000
    assert wire.client.send_data(stream_id, b"b" * 500) == 1500
    assert wire.client.send_data(stream_id, b"") == 1500
    wire.client.end_stream(stream_id)  # deferred until the held-back bytes are out
    _, server_events = wire.pump()
    assert PeerHalfClosed(stream_id) not in server_events

    wire.server.acknowledge_received_data(stream_id, flow_controlled(server_events, stream_id))
    client_events, server_events = wire.pump()
    assert client_events == [OutboundBufferDrained(stream_id)]
    assert received_bytes(server_events, stream_id) == b"a" * 1000 + b"b" * 500
    assert server_events[-1] == PeerHalfClosed(stream_id)
    assert wire.client.outbound_buffered(stream_id) == 0


def test_streams_blocked_on_the_connection_window_all_get_through() -> None:
    settings = HboneSettings(stream_window=64 * KIB, connection_window=96 * KIB)
    wire = Wire(settings, settings)
    streams = [wire.open() for _ in range(3)]
    for stream_id in streams:
        wire.client.send_data(stream_id, pattern(60 * KIB))
    received = dict.fromkeys(streams, b"")
    drained: list[int] = []
    for _ in range(10):
        client_events, server_events = wire.pump()
        drained += [e.stream_id for e in client_events if isinstance(e, OutboundBufferDrained)]
        for stream_id in streams:
            received[stream_id] += received_bytes(server_events, stream_id)
            wire.server.acknowledge_received_data(stream_id, flow_controlled(server_events, stream_id))
    assert received == dict.fromkeys(streams, pattern(60 * KIB))
    assert sorted(drained) == streams[1:]


def test_a_bulk_stream_does_not_take_every_connection_window_update() -> None:
    settings = HboneSettings(stream_window=1 * MIB, connection_window=1 * MIB)
    wire = Wire(settings, settings)
    finished, bulk, small = wire.open(), wire.open(), wire.open()
    wire.client.send_data(finished, pattern(1 * MIB))
    wire.client.send_data(bulk, pattern(2 * MIB))  # waits for the connection window, as does:
    assert wire.client.send_data(small, b"small") == 5
    wire.pump()
    # The connection window comes back in two halves, none of it from the bulk stream's bytes.
    wire.server.acknowledge_received_data(finished, 512 * KIB)
    _, first_half = wire.pump()
    wire.server.acknowledge_received_data(finished, 512 * KIB)
    _, second_half = wire.pump()
    assert received_bytes(first_half, small) == b""
    assert received_bytes(second_half, small) == b"small"
    assert len(received_bytes(first_half + second_half, bulk)) == 1 * MIB - 5


def test_frames_respect_the_peers_max_frame_size() -> None:
    wire = Wire(client_settings=HboneSettings(max_frame_size=16 * KIB))
    stream_id = wire.open()
    wire.server.send_data(stream_id, pattern(100 * KIB))
    wire.client.send_data(stream_id, pattern(3 * MIB))
    sizes_to_client = data_frame_sizes(wire.server.data_to_send())
    sizes_to_server = data_frame_sizes(wire.client.data_to_send())
    assert sizes_to_client == [16 * KIB] * 6 + [4 * KIB]
    assert sizes_to_server == [1 * MIB, 1 * MIB, 1 * MIB]


def data_frame_sizes(wire_bytes: bytes) -> list[int]:
    sizes = []
    view = memoryview(wire_bytes)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        if isinstance(frame, DataFrame):
            sizes.append(length)
        view = view[9 + length :]
    return sizes


def test_held_back_bytes_survive_reuse_of_the_callers_buffer() -> None:
    settings = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(settings, settings)
    stream_id = wire.open()
    read_buffer = bytearray(b"x" * 70_000)
    assert wire.client.send_data(stream_id, memoryview(read_buffer)) == 70_000 - 65_535
    read_buffer[:] = b"y" * 70_000  # the I/O layer reads the next chunk into the same buffer
    _, server_events = wire.pump()
    wire.server.acknowledge_received_data(stream_id, flow_controlled(server_events, stream_id))
    _, more = wire.pump()
    assert received_bytes(server_events + more, stream_id) == b"x" * 70_000


def test_a_reset_releases_what_the_receiver_never_acknowledged() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    first = wire.open()
    wire.client.send_data(first, pattern(65_535))
    wire.pump()
    second = wire.open()
    assert wire.client.send_data(second, b"blocked") == 7  # the connection window is used up
    wire.client.reset_stream(first)
    client_events, server_events = wire.pump()
    assert client_events == [OutboundBufferDrained(second)]
    assert received_bytes(server_events, second) == b"blocked"


def test_acknowledging_after_a_normal_close_still_opens_the_connection_window() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    first = wire.open()
    wire.client.send_data(first, pattern(65_535))
    wire.client.end_stream(first)
    _, server_events = wire.pump()
    wire.server.end_stream(first)
    wire.pump()
    assert wire.server.open_stream_count == 0
    second = wire.open()
    assert wire.client.send_data(second, b"waits") == 5
    # The application finished writing the first tunnel's bytes on only now.
    wire.server.acknowledge_received_data(first, flow_controlled(server_events, first))
    wire.server.acknowledge_received_data(first, 1000)  # more than owed: ignored
    client_events, server_events = wire.pump()
    assert client_events == [OutboundBufferDrained(second)]
    assert received_bytes(server_events, second) == b"waits"


def test_acknowledging_in_small_pieces_never_stalls_the_sender() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    stream_id = wire.open()
    payload = pattern(300 * KIB)
    wire.client.send_data(stream_id, payload)
    received = b""
    while len(received) < len(payload):
        _, server_events = wire.pump()
        chunk = received_bytes(server_events, stream_id)
        assert chunk, "the sender stalled"
        received += chunk
        for offset in range(0, len(chunk), 100):  # consumed a little at a time
            wire.server.acknowledge_received_data(stream_id, len(chunk[offset : offset + 100]))
    assert received == payload


@pytest.mark.parametrize("ending", ["both directions end", "reset"])
def test_short_tunnels_give_their_acknowledged_bytes_back_to_the_connection(ending: str) -> None:
    # Each tunnel's bytes stay below what a stream batches before telling h2: if a tunnel took its
    # batch away with it, the connection window would run out after a few dozen tunnels.
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    for _ in range(100):
        stream_id = wire.open()
        assert wire.client.send_data(stream_id, pattern(2000)) == 0, "the connection window ran out"
        _, server_events = wire.pump()
        assert len(received_bytes(server_events, stream_id)) == 2000
        wire.server.acknowledge_received_data(stream_id, flow_controlled(server_events, stream_id))
        if ending == "reset":
            wire.server.reset_stream(stream_id)
        else:
            wire.client.end_stream(stream_id)
            wire.server.end_stream(stream_id)
        wire.pump()
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (0, 0)
    assert wire.server._acknowledged_total == 0  # nothing left batched for streams that are gone


def test_open_streams_batching_small_acknowledgements_do_not_starve_the_connection() -> None:
    smallest = HboneSettings(stream_window=65_535, connection_window=65_535)
    wire = Wire(smallest, smallest)
    streams = [wire.open() for _ in range(40)]
    for stream_id in streams:  # 80,000 bytes through a 65,535-byte connection window
        wire.client.send_data(stream_id, pattern(2000))
    received = dict.fromkeys(streams, 0)
    for _ in range(10):
        _, server_events = wire.pump()
        for stream_id in streams:
            received[stream_id] += len(received_bytes(server_events, stream_id))
            wire.server.acknowledge_received_data(stream_id, flow_controlled(server_events, stream_id))
    assert received == dict.fromkeys(streams, 2000)


def test_keepalive_ping_is_answered() -> None:
    wire = Wire()
    wire.client.ping(b"12345678")
    wire.server.ping(b"abcdefgh")
    client_events, server_events = wire.pump()
    assert client_events == [PingAcknowledged(b"12345678")]
    assert server_events == [PingAcknowledged(b"abcdefgh")]


def test_close_sends_goaway_and_ignores_what_follows() -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.server.close()
    assert wire.server.closed
    wire.client.send_data(stream_id, b"too late")
    client_events, server_events = wire.pump()
    assert client_events == [ConnectionClosing(stream_id, ErrorCode.NO_ERROR)]
    assert server_events == []


@pytest.mark.parametrize("side", [HboneClientConnection, HboneServerConnection])
def test_every_h2_event_has_a_handler(side: type[HboneClientConnection | HboneServerConnection]) -> None:
    def all_subclasses(cls: type) -> set[type]:
        return {sub for direct in cls.__subclasses__() for sub in {direct} | all_subclasses(direct)}

    # h2's underscored events are its own bookkeeping for sent frames; receive_data never returns them.
    public = {cls for cls in all_subclasses(h2.events.Event) if not cls.__name__.startswith("_")}
    assert len(public) >= 17
    assert set(side()._handlers) == public


def test_received_frames_are_not_hex_formatted() -> None:
    frames = _ReceiveFrameBuffer(server=False)
    frames.max_frame_size = 1 * MIB
    frames.add_data(DataFrame(1, b"\xab" * 4096).serialize())
    frames.add_data(HeadersFrame(3, b"\xcd" * 40, flags={"END_HEADERS"}).serialize())
    data, headers = repr(next(frames)), repr(next(frames))
    assert "abab" not in data
    assert data.startswith("DataFrame(stream_id=1")
    assert "cdcd" not in headers
    assert headers.startswith("HeadersFrame(stream_id=3")


def client_bytes_for_a_few_tunnels() -> bytes:
    """Everything a client sends for three tunnels (data, a half-close and a reset), unanswered."""
    client = HboneClientConnection()
    streams = [client.open_tunnel(TARGET, CLIENT) for _ in range(3)]
    client.send_data(streams[0], pattern(20_000))
    client.send_data(streams[1], b"short")
    client.end_stream(streams[1])
    client.send_data(streams[2], pattern(30_000))
    client.reset_stream(streams[2])
    client.ping(b"\x00" * 8)
    return client.data_to_send()


CLIENT_BYTES = client_bytes_for_a_few_tunnels()


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, len(CLIENT_BYTES)), max_size=30))
def test_any_chunking_of_the_byte_stream_gives_the_same_events_but_for_their_pieces(cuts: list[int]) -> None:
    whole = HboneServerConnection().receive_data(CLIENT_BYTES)
    assert [type(e) for e in whole].count(TunnelRequested) == 3

    chunked_server = HboneServerConnection()
    chunked = []
    bounds = [0, *sorted(cuts), len(CLIENT_BYTES)]
    for start, end in itertools.pairwise(bounds):
        chunked += chunked_server.receive_data(CLIENT_BYTES[start:end])
    # A DATA frame's payload may come in pieces, cut where the bytes were.
    assert merged(chunked) == merged(whole)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(garbage: bytes) -> None:
    client = HboneClientConnection()
    client.open_tunnel(TARGET, CLIENT)
    for event in client.receive_data(garbage):
        assert not isinstance(event, TunnelEstablished) or event.stream_id == 1
    server = HboneServerConnection()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + garbage)
    client.data_to_send()
    server.data_to_send()
