"""The fast path (DATA frames, and a tunnel's HEADERS and END_STREAM past h2's codec) against h2.

A connection with the fast path and its twin where h2 handles every frame get the same peer bytes
and the same calls; they must report the same events, send the same bytes and end in the same
flow-control and stream states. Peers are bare frames (hyperframe, hpack), so the sequences cover
what a well-behaved HBONE peer never sends: padding, END_STREAM with data, DATA on closed, reset or
unknown streams, beyond the windows or the frame size, inside a header block, before the answer,
requests beyond the stream limit, informational answers, content-lengths; and header blocks both
as hpack's encoder writes them (indexed, Huffman-coded: h2 decodes them) and as this side does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    ExtensionFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.hbone import (
    ConnectionFailed,
    DataReceived,
    ErrorCode,
    HboneClientConnection,
    HboneConnection,
    HboneServerConnection,
    HboneSettings,
    PeerHalfClosed,
    RefusalReason,
    TunnelRequested,
    header_block,
)
from agent.hbone.connection import FRAME_HEADER
from tests.unit.hbone.wire import CLIENT, TARGET, Wire, merged, received_bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

SMALL = HboneSettings(stream_window=65_535, connection_window=100_000, max_frame_size=16_384)
"""Windows and frames small enough that generated peers run into every limit."""

STREAMS = (1, 3, 5, 7)
"""The stream ids the sequences use (client-initiated, odd)."""

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.2.7:80"), (b"forwarded", b'for="10.0.1.5:4321"')]

REQUESTS = (CONNECT, [*CONNECT, (b"content-length", b"0")], [*CONNECT, (b"content-length", b"x")])
"""Header blocks a generated client sends: a CONNECT, one with a body length, one h2 refuses."""

ANSWERS = (
    [(b":status", b"200")],
    [(b":status", b"100")],
    [(b":status", b"503")],
    [(b":status", b"200"), (b"content-length", b"0")],
    [(b":status", b"204"), (b"x-answer", b"yes")],
)
"""Header blocks a generated server sends: informational, errors, a body length, another header."""


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


class Peer:
    """Builds the frames a bare peer sends, with its own HPACK state."""

    def __init__(self) -> None:
        self._encoder = Encoder()

    def headers(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool,
        split: bool,
        plain: bool = False,
    ) -> bytes:
        """A HEADERS frame (and CONTINUATION if `split`); `plain`: the block as this side encodes
        (no table, no Huffman), else as hpack's encoder does."""
        block = header_block.encode(headers) if plain else self._encoder.encode(headers)
        flags = {"END_STREAM"} if end_stream else set()
        if not split:
            return HeadersFrame(stream_id, block, flags=flags | {"END_HEADERS"}).serialize()
        half = len(block) // 2
        return (
            HeadersFrame(stream_id, block[:half], flags=flags).serialize()
            + ContinuationFrame(stream_id, block[half:], flags={"END_HEADERS"}).serialize()
        )


def data_frame(stream_id: int, size: int, *, end_stream: bool = False, pad: int | None = None) -> bytes:
    """A DATA frame, built by hand: peers under test send what hyperframe would refuse to build."""
    body = payload(size, stream_id)
    flags = 0x1 if end_stream else 0
    if pad is not None:
        flags |= 0x8
        body = bytes([pad]) + body + bytes(pad)
    return len(body).to_bytes(3, "big") + bytes([0x0, flags]) + stream_id.to_bytes(4, "big") + body


@dataclass
class Twins:
    """One connection with the fast path, one without, driven identically."""

    fast: HboneClientConnection | HboneServerConnection
    h2: HboneClientConnection | HboneServerConnection
    written_now: bytes = b""
    """Frames the fast connection had written at once (`data_frame_now`), ahead of its queue."""

    @classmethod
    def of(cls, make: Callable[[], HboneClientConnection | HboneServerConnection]) -> Twins:
        fast, reference = make(), make()
        reference.fast_path = False
        twins = cls(fast, reference)
        twins.outputs()
        return twins

    def feed(self, data: bytes) -> list[Any]:
        fast_events = self.fast.receive_data(data)
        h2_events = self.h2.receive_data(data)
        assert fast_events == h2_events
        self.check_state()
        return list(fast_events)

    def call(self, action: Callable[[Any], object]) -> None:
        outcomes = []
        for connection in (self.fast, self.h2):
            try:
                outcomes.append(("returned", action(connection)))
            except Exception as error:  # both sides must fail the same way
                outcomes.append(("raised", type(error)))
        assert outcomes[0] == outcomes[1]
        self.check_state()

    def send_now(self, stream_id: int, data: bytes) -> None:
        """Sends as the driver does: one frame written at once when the connection frames it so,
        else `send_data`. The twin without the fast path never frames; it must send the same."""
        assert self.h2.data_frame_now(stream_id, data) is None
        frame = self.fast.data_frame_now(stream_id, data)
        if frame is None:
            self.call(lambda c: c.send_data(stream_id, data))
            return
        assert self.h2.send_data(stream_id, data) == 0  # all of it sent, as with the frame
        self.written_now += frame
        self.check_state()

    def outputs(self) -> bytes:
        sent, self.written_now = self.written_now + self.fast.data_to_send(), b""
        assert sent == self.h2.data_to_send()
        return sent

    def check_state(self) -> None:
        assert describe(self.fast) == describe(self.h2)


def describe(connection: HboneConnection) -> dict[str, object]:
    """Everything of a connection's HTTP/2 state the fast path could get wrong."""
    h2 = connection._h2
    return {
        "closed": connection.closed,
        "open_streams": connection.open_stream_count,
        "h2_state": h2.state_machine.state,
        "inbound_window": h2.inbound_flow_control_window,
        "outbound_window": h2.outbound_flow_control_window,
        "streams": {
            stream_id: (
                stream.state_machine.state,
                stream.inbound_flow_control_window,
                stream.outbound_flow_control_window,
            )
            for stream_id, stream in h2.streams.items()
        },
        "held_back": {stream_id: connection.outbound_buffered(stream_id) for stream_id in STREAMS},
        "owed": dict(connection._unacknowledged),
        "pending": bytes(connection._partial),
    }


def test_the_fast_path_is_on_with_the_installed_h2() -> None:
    # If an h2 upgrade renames what the fast path relies on, it turns itself off: fail loudly here.
    assert HboneConnection.fast_path


def test_a_data_frames_payload_is_delivered_as_it_arrives() -> None:
    wire = Wire()
    stream_id = wire.open()
    wire.client.send_data(stream_id, payload(10_000))
    frame = wire.client.data_to_send()
    first, second = wire.server.receive_data(frame[:4009]), wire.server.receive_data(frame[4009:])
    assert first == [DataReceived(stream_id, payload(4000), 4000)]
    assert second == [DataReceived(stream_id, payload(10_000)[4000:], 6000)]


def test_without_the_fast_path_h2_delivers_whole_frames_only() -> None:
    wire = Wire()
    wire.server.fast_path = False
    stream_id = wire.open()
    wire.client.send_data(stream_id, payload(10_000))
    frame = wire.client.data_to_send()
    assert wire.server.receive_data(frame[:4009]) == []
    assert wire.server.receive_data(frame[4009:]) == [DataReceived(stream_id, payload(10_000), 10_000)]


def test_sent_frames_are_byte_for_byte_h2s() -> None:
    twins = Twins.of(lambda: HboneServerConnection(SMALL))
    peer = Peer()
    twins.feed(PREFACE + SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 20_000}).serialize())
    twins.feed(peer.headers(1, CONNECT, end_stream=False, split=False))
    twins.call(lambda c: c.accept(1))
    twins.outputs()
    for size in (1, 19_999, 20_000, 20_001, 70_000):
        twins.call(lambda c, size=size: c.send_data(1, payload(size)))
        twins.outputs()
    twins.feed(WindowUpdateFrame(0, window_increment=200_000).serialize())
    twins.feed(WindowUpdateFrame(1, window_increment=200_000).serialize())
    assert len(twins.outputs()) > 0


def test_a_view_of_a_reused_buffer_is_copied_before_the_caller_reuses_it() -> None:
    wire = Wire()
    stream_id = wire.open()
    read_buffer = bytearray(b"a" * 1000)
    wire.client.send_data(stream_id, memoryview(read_buffer)[:600])
    read_buffer[:] = b"b" * 1000
    _, server_events = wire.pump()
    assert server_events == [DataReceived(stream_id, b"a" * 600, 600)]


# Explicit sequences for each kind of frame the fast path must leave to h2.


def server_twins_with_open_tunnels(*accepted: int) -> tuple[Twins, Peer]:
    twins = Twins.of(lambda: HboneServerConnection(SMALL))
    peer = Peer()
    twins.feed(PREFACE + SettingsFrame(0).serialize())
    for stream_id in accepted:
        twins.feed(peer.headers(stream_id, CONNECT, end_stream=False, split=False))
        twins.call(lambda c, stream_id=stream_id: c.accept(stream_id))
    twins.outputs()
    return twins, peer


UNUSUAL_DATA = {
    "padded": data_frame(1, 100, pad=20),
    "padded with nothing": data_frame(1, 0, pad=0),
    "end stream with data": data_frame(1, 100, end_stream=True),
    "empty end stream": data_frame(1, 0, end_stream=True),
    "empty": data_frame(1, 0),
    "on stream 0": data_frame(0, 10),
    "on an idle stream": data_frame(9, 10),
    "beyond the stream window": data_frame(1, 16_384) * 4 + data_frame(1, 100),
    "beyond the frame size": data_frame(1, 16_385),
}


@pytest.mark.parametrize("frames", UNUSUAL_DATA.values(), ids=UNUSUAL_DATA.keys())
def test_unusual_data_frames_are_h2s_to_handle(frames: bytes) -> None:
    twins, _ = server_twins_with_open_tunnels(1)
    twins.feed(frames)
    twins.outputs()


def test_data_on_a_stream_this_side_reset_gets_h2s_answer() -> None:
    twins, _ = server_twins_with_open_tunnels(1, 3)
    twins.call(lambda c: c.reset_stream(1))
    twins.outputs()
    events = twins.feed(data_frame(1, 500) + data_frame(3, 500))
    assert events == [DataReceived(3, payload(500, 3), 500)]
    assert len(twins.outputs()) > 0  # h2 answers the closed stream's frame with RST_STREAM


def test_data_on_a_stream_the_peer_reset_or_ended_gets_h2s_answer() -> None:
    twins, _ = server_twins_with_open_tunnels(1, 3)
    twins.feed(RstStreamFrame(1, error_code=ErrorCode.CANCEL).serialize() + data_frame(3, 0, end_stream=True))
    twins.feed(data_frame(1, 10))
    twins.feed(data_frame(3, 10))
    twins.outputs()


def test_data_of_a_refused_tunnel_gets_h2s_answer() -> None:
    twins, peer = server_twins_with_open_tunnels()
    twins.feed(peer.headers(1, CONNECT, end_stream=False, split=False))
    twins.call(lambda c: c.refuse(1, RefusalReason.DENIED_BY_POLICY))
    twins.outputs()
    twins.feed(data_frame(1, 300))
    twins.outputs()


def test_data_inside_a_header_block_is_a_protocol_error() -> None:
    twins, peer = server_twins_with_open_tunnels(1)
    block = peer.headers(3, CONNECT, end_stream=False, split=True)
    headers_only = block[: 9 + int.from_bytes(block[:3])]
    events = twins.feed(headers_only + data_frame(1, 10))
    assert [type(e) for e in events] == [ConnectionFailed]
    assert events[0].error_code is ErrorCode.PROTOCOL_ERROR


def test_data_before_the_answer_is_a_protocol_error_for_the_client() -> None:
    twins = Twins.of(lambda: HboneClientConnection(SMALL))
    twins.call(lambda c: c.open_tunnel(TARGET, CLIENT))
    twins.outputs()
    twins.feed(SettingsFrame(0).serialize())
    events = twins.feed(data_frame(1, 10))
    assert [type(e) for e in events] == [ConnectionFailed]


@pytest.mark.parametrize("plain", [False, True], ids=["hpack", "plain"])
def test_data_on_a_tunnel_with_a_content_length_is_checked_by_h2(plain: bool) -> None:
    twins, peer = server_twins_with_open_tunnels()
    request = [*CONNECT, (b"content-length", b"5")]
    twins.feed(peer.headers(1, request, end_stream=False, split=False, plain=plain))
    twins.call(lambda c: c.accept(1))
    twins.feed(data_frame(1, 3))
    twins.feed(data_frame(1, 3))
    twins.outputs()


def test_settings_changing_the_window_mid_transfer() -> None:
    twins, _ = server_twins_with_open_tunnels(1)
    twins.call(lambda c: c.send_data(1, payload(100_000)))
    twins.outputs()
    twins.feed(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 10}).serialize())
    twins.feed(WindowUpdateFrame(0, window_increment=1_000_000).serialize())
    twins.feed(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 200_000}).serialize())
    twins.outputs()


# Generated sequences.

PEER_FRAME = st.one_of(
    st.tuples(
        st.just("headers"),
        st.sampled_from(STREAMS),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.integers(0, len(ANSWERS) - 1),
    ),
    st.tuples(
        st.just("data"),
        st.sampled_from((0, *STREAMS, 9)),
        st.sampled_from((0, 1, 100, 4096, 16_384, 16_385, 40_000)),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 255)),
    ),
    st.tuples(st.just("rst"), st.sampled_from(STREAMS), st.sampled_from((0, 8, 10))),
    st.tuples(
        st.just("window"), st.sampled_from((0, *STREAMS)), st.sampled_from((1, 1000, 70_000, 2**31 - 1))
    ),
    st.tuples(
        st.just("settings"), st.sampled_from((None, 0, 10, 70_000)), st.sampled_from((None, 16_384, 20_000))
    ),
    st.tuples(st.just("ping")),
    st.tuples(st.just("priority"), st.sampled_from(STREAMS)),
    st.tuples(st.just("goaway"), st.sampled_from((0, 3, 7))),
    st.tuples(st.just("unknown")),
)

SERVER_ACTION = st.one_of(
    st.tuples(st.sampled_from(("accept", "refuse", "reset", "end", "ack all")), st.sampled_from(STREAMS)),
    st.tuples(
        st.sampled_from(("send", "send now")),
        st.sampled_from(STREAMS),
        st.sampled_from((1, 1000, 20_000, 70_000)),
    ),
    st.tuples(st.just("ack"), st.sampled_from(STREAMS), st.sampled_from((1, 1000, 70_000))),
    st.tuples(st.sampled_from(("drain", "close"))),
)

CLIENT_ACTION = st.one_of(
    st.tuples(st.just("open")),
    st.tuples(st.sampled_from(("reset", "end", "ack all")), st.sampled_from(STREAMS)),
    st.tuples(
        st.sampled_from(("send", "send now")),
        st.sampled_from(STREAMS),
        st.sampled_from((1, 1000, 20_000, 70_000)),
    ),
    st.tuples(st.just("ack"), st.sampled_from(STREAMS), st.sampled_from((1, 1000, 70_000))),
    st.tuples(st.just("close")),
)


def peer_bytes(peer: Peer, frames: Sequence[tuple[Any, ...]], *, answers: bool) -> bytes:
    """The wire bytes of generated frames; `answers`: the peer is a server answering with :status."""
    out = b""
    for frame in frames:
        match frame:
            case ("headers", stream_id, end_stream, split, plain, variant):
                headers = ANSWERS[variant] if answers else REQUESTS[variant % len(REQUESTS)]
                out += peer.headers(stream_id, headers, end_stream=end_stream, split=split, plain=plain)
            case ("data", stream_id, size, end_stream, pad):
                out += data_frame(stream_id, size, end_stream=end_stream, pad=pad)
            case ("rst", stream_id, code):
                out += RstStreamFrame(stream_id, error_code=code).serialize()
            case ("window", stream_id, increment):
                out += WindowUpdateFrame(stream_id, window_increment=increment).serialize()
            case ("settings", window, frame_size):
                values = {}
                if window is not None:
                    values[SettingsFrame.INITIAL_WINDOW_SIZE] = window
                if frame_size is not None:
                    values[SettingsFrame.MAX_FRAME_SIZE] = frame_size
                out += SettingsFrame(0, settings=values).serialize()
            case ("ping",):
                out += PingFrame(0, opaque_data=b"12345678").serialize()
            case ("priority", stream_id):
                out += PriorityFrame(stream_id, depends_on=0, stream_weight=16).serialize()
            case ("goaway", last_stream_id):
                out += GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize()
            case ("unknown",):
                out += ExtensionFrame(type=0xFA, stream_id=0, flag_byte=0, body=b"extension").serialize()
            case _:
                raise AssertionError(frame)
    return out


class Acknowledger:
    """Acknowledges what the twins delivered (they delivered the same, or a check already failed)."""

    def __init__(self) -> None:
        self.owed: dict[int, int] = dict.fromkeys(STREAMS, 0)

    def delivered(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.owed[event.stream_id] += event.flow_controlled_length

    def all_of(self, stream_id: int) -> Callable[[Any], None]:
        size, self.owed[stream_id] = self.owed[stream_id], 0
        return lambda c: c.acknowledge_received_data(stream_id, size)


def server_action(action: tuple[Any, ...], acknowledger: Acknowledger) -> Callable[[Any], object]:
    match action:
        case ("accept", stream_id):
            return lambda c: c.accept(stream_id)
        case ("refuse", stream_id):
            return lambda c: c.refuse(stream_id, RefusalReason.DENIED_BY_POLICY)
        case ("drain",):
            return lambda c: c.start_drain()
        case _:
            return common_action(action, acknowledger)


def client_action(action: tuple[Any, ...], acknowledger: Acknowledger) -> Callable[[Any], object]:
    if action == ("open",):
        return lambda c: c.open_tunnel(TARGET, CLIENT) if c.can_open_stream else None
    return common_action(action, acknowledger)


def common_action(action: tuple[Any, ...], acknowledger: Acknowledger) -> Callable[[Any], object]:
    match action:
        case ("reset", stream_id):
            return lambda c: c.reset_stream(stream_id)
        case ("end", stream_id):
            return lambda c: c.end_stream(stream_id)
        case ("ack all", stream_id):
            return acknowledger.all_of(stream_id)
        case ("send", stream_id, size):
            return lambda c: c.send_data(stream_id, payload(size))
        case ("ack", stream_id, size):
            return lambda c: c.acknowledge_received_data(stream_id, size)
        case ("close",):
            return lambda c: c.close()
        case _:
            raise AssertionError(action)


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def interleaved(local_action: st.SearchStrategy[tuple[Any, ...]]) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """Up to 25 steps, each a few frames from the peer or one call on the local side."""
    return st.lists(
        st.one_of(
            st.tuples(st.just("peer"), st.lists(PEER_FRAME, min_size=1, max_size=4)),
            st.tuples(st.just("local"), local_action),
        ),
        max_size=25,
    )


def connects(peer: Peer) -> bytes:
    """The peer's CONNECTs opening the first two streams (most generated DATA frames then meet a
    stream that takes them)."""
    return b"".join(
        peer.headers(stream_id, CONNECT, end_stream=False, split=False, plain=stream_id == STREAMS[1])
        for stream_id in STREAMS[:2]
    )


def run_steps(
    twins: Twins,
    peer: Peer,
    steps: Sequence[tuple[str, Any]],
    action: Callable[[tuple[Any, ...], Acknowledger], Callable[[Any], object]],
    *,
    answers: bool,
) -> None:
    acknowledger = Acknowledger()
    for kind, step in steps:
        if kind == "peer":
            acknowledger.delivered(twins.feed(peer_bytes(peer, step, answers=answers)))
        elif step[0] == "send now":
            _, stream_id, size = step
            twins.send_now(stream_id, payload(size))
        else:
            twins.call(action(step, acknowledger))
        twins.outputs()


@PROPERTY_SETTINGS
@given(interleaved(SERVER_ACTION))
def test_a_server_with_the_fast_path_behaves_as_h2(steps: list[tuple[str, Any]]) -> None:
    twins = Twins.of(lambda: HboneServerConnection(SMALL))
    twins.feed(PREFACE + SettingsFrame(0).serialize())
    peer = Peer()
    twins.feed(connects(peer))
    run_steps(twins, peer, steps, server_action, answers=False)


@PROPERTY_SETTINGS
@given(interleaved(CLIENT_ACTION))
def test_a_client_with_the_fast_path_behaves_as_h2(steps: list[tuple[str, Any]]) -> None:
    twins = Twins.of(lambda: HboneClientConnection(SMALL))
    peer = Peer()
    twins.feed(SettingsFrame(0).serialize())
    for _ in STREAMS[:2]:
        twins.call(lambda c: c.open_tunnel(TARGET, CLIENT))
    twins.feed(
        b"".join(
            peer.headers(stream_id, [(b":status", b"200")], end_stream=False, split=False)
            for stream_id in STREAMS[:2]
        )
    )
    run_steps(twins, peer, steps, client_action, answers=True)


@PROPERTY_SETTINGS
@given(
    st.lists(PEER_FRAME, min_size=1, max_size=12),
    st.lists(st.integers(0, 200_000), max_size=20),
)
def test_how_the_bytes_are_cut_changes_nothing_but_the_pieces(
    frames: list[tuple[Any, ...]], cuts: list[int]
) -> None:
    peer_stream = PREFACE + SettingsFrame(0).serialize()
    peer = Peer()
    peer_stream += connects(peer)
    peer_stream += peer_bytes(peer, frames, answers=False)
    whole, chunked = HboneServerConnection(SMALL), HboneServerConnection(SMALL)
    whole_events = whole.receive_data(peer_stream)
    chunked_events = []
    bounds = [0, *sorted(cut % (len(peer_stream) + 1) for cut in cuts), len(peer_stream)]
    for start, end in itertools.pairwise(bounds):
        chunked_events += chunked.receive_data(peer_stream[start:end])
    assert merged(chunked_events) == merged(whole_events)
    assert describe(chunked) == describe(whole)
    assert chunked.data_to_send() == whole.data_to_send()


class _Refused:
    """Stands in for an h2 entry point the fast path must not reach: fails the test if called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"h2's {self.name} was called")


def test_a_tunnels_headers_and_end_stream_pass_h2s_codec_by() -> None:
    wire = Wire()
    first = wire.open()  # a connection's first block resets the peer's table: h2 decodes it
    for connection in (wire.client, wire.server):
        for name in ("receive_data", "send_headers", "end_stream"):
            setattr(connection._h2, name, _Refused(name))
    stream_id = wire.open()
    wire.client.send_data(stream_id, b"ping")
    wire.server.send_data(stream_id, b"pong")
    wire.client.end_stream(stream_id)
    wire.server.end_stream(stream_id)
    client_events, server_events = wire.pump()
    assert received_bytes(server_events, stream_id) == b"ping"
    assert received_bytes(client_events, stream_id) == b"pong"
    assert [type(e) for e in server_events if not isinstance(e, DataReceived)] == [PeerHalfClosed]
    assert [type(e) for e in client_events if not isinstance(e, DataReceived)] == [PeerHalfClosed]
    assert (wire.client.open_stream_count, wire.server.open_stream_count) == (1, 1)  # `first` is open
    assert first != stream_id


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda answer: b" ".join(v for _, v in answer).decode())
def test_an_answer_read_past_hpack_is_taken_as_h2_takes_it(answer: list[tuple[bytes, bytes]]) -> None:
    # Informational answers, a body length the DATA then breaks, errors: then the tunnel's bytes.
    twins = Twins.of(lambda: HboneClientConnection(SMALL))
    twins.feed(SettingsFrame(0).serialize())
    twins.call(lambda c: c.open_tunnel(TARGET, CLIENT))
    twins.outputs()
    peer = Peer()
    twins.feed(peer.headers(STREAMS[0], answer, end_stream=False, split=False, plain=True))
    twins.outputs()
    for frame in (data_frame(STREAMS[0], 3), data_frame(STREAMS[0], 0, end_stream=True)):
        twins.feed(frame)
        twins.outputs()


def test_a_request_beyond_the_stream_limit_fails_as_h2_fails_it() -> None:
    twins = Twins.of(lambda: HboneServerConnection(HboneSettings(max_concurrent_streams=1)))
    twins.feed(PREFACE + SettingsFrame(0).serialize())
    peer = Peer()
    events = twins.feed(
        b"".join(peer.headers(s, CONNECT, end_stream=False, split=False, plain=True) for s in STREAMS[:3])
    )
    assert [type(e) for e in events] == [TunnelRequested, ConnectionFailed]
    twins.outputs()  # h2's GOAWAY


@pytest.mark.parametrize(
    "block",
    [
        header_block.encode([(b":status", b"200")], empty_table_first=True),  # a size update
        bytes([0x40, 1]) + b"x" + bytes([1]) + b"y",  # a literal to be indexed
        bytes([0x00, 0x81, 0x7F, 1]) + b"y",  # a Huffman-coded name
        bytes([0xFF, 0x7F]),  # no such table entry
        bytes([0x00, 5]) + b"ab",  # truncated
    ],
)
def test_answers_only_hpack_can_read_are_hpacks_to_read(block: bytes) -> None:
    twins = Twins.of(lambda: HboneClientConnection(SMALL))
    twins.feed(SettingsFrame(0).serialize())
    twins.call(lambda c: c.open_tunnel(TARGET, CLIENT))
    twins.outputs()
    twins.feed(HeadersFrame(STREAMS[0], block, flags={"END_HEADERS"}).serialize())
    twins.outputs()


def test_large_payloads_are_handed_on_uncopied_and_small_frames_together() -> None:
    wire = Wire()
    stream_id = wire.open()
    large = payload(100_000)
    wire.client.ping(b"12345678")
    wire.client.send_data(stream_id, b"small")
    wire.client.send_data(stream_id, large)
    wire.client.send_data(stream_id, b"tail")
    parts = wire.client.data_to_send_parts()
    # The PING, the small frame and the large frame's header; the payload as given; the last frame.
    assert len(parts) == 3
    assert parts[1] is large
    events = wire.server.receive_data(b"".join(parts))
    assert received_bytes(events, stream_id) == b"small" + large + b"tail"
    assert wire.client.data_to_send_parts() == []


def test_a_small_chunk_leaves_as_one_part_with_its_frame_header() -> None:
    wire = Wire()
    stream_id = wire.open()
    request = payload(1024)
    wire.client.send_data(stream_id, request)
    [part] = wire.client.data_to_send_parts()
    assert part == FRAME_HEADER.pack(0, 1024, 0, 0, stream_id) + request
    assert received_bytes(wire.server.receive_data(part), stream_id) == request


def test_a_payload_split_into_frames_is_handed_on_as_views_of_it() -> None:
    wire = Wire(client_settings=HboneSettings(max_frame_size=16_384))
    stream_id = wire.open()
    large = payload(3 * 1024 * 1024)
    wire.server.send_data(stream_id, large)  # the client takes frames of 16 KiB
    parts = wire.server.data_to_send_parts()
    views = [part for part in parts if isinstance(part, memoryview)]
    assert len(views) == len(large) // 16_384
    assert all(view.obj is large for view in views)
    events = wire.client.receive_data(b"".join(parts))
    assert received_bytes(events, stream_id) == large


@PROPERTY_SETTINGS
@given(st.lists(PEER_FRAME, min_size=1, max_size=12))
def test_a_sink_takes_exactly_the_bytes_the_events_would_carry(frames: list[tuple[Any, ...]]) -> None:
    peer = Peer()
    opening = PREFACE + SettingsFrame(0).serialize() + connects(peer)
    rest = peer_bytes(peer, frames, answers=False)
    sinked, reference = HboneServerConnection(SMALL), HboneServerConnection(SMALL)
    sinked.receive_data(opening)
    reference.receive_data(opening)
    taken: dict[int, list[tuple[bytes, int]]] = {}
    for stream_id in STREAMS[:2]:
        sinked.deliver_to(
            stream_id, lambda data, length, s=stream_id: taken.setdefault(s, []).append((data, length))
        )

    sinked_events = sinked.receive_data(rest)
    reference_events = reference.receive_data(rest)

    def bytes_of(stream_id: int) -> tuple[bytes, int]:
        pieces = [
            (e.data, e.flow_controlled_length)
            for e in reference_events
            if isinstance(e, DataReceived) and e.stream_id == stream_id
        ]
        return b"".join(p for p, _ in pieces), sum(n for _, n in pieces)

    for stream_id in STREAMS[:2]:
        pieces = taken.get(stream_id, [])
        assert (b"".join(p for p, _ in pieces), sum(n for _, n in pieces)) == bytes_of(stream_id)
    assert [
        e for e in sinked_events if not isinstance(e, DataReceived) or e.stream_id not in STREAMS[:2]
    ] == [e for e in reference_events if not isinstance(e, DataReceived) or e.stream_id not in STREAMS[:2]]
    assert describe(sinked) == describe(reference)
    for stream_id, pieces in taken.items():  # acknowledged as the events' lengths would be
        for _, length in pieces:
            sinked.acknowledge_received_data(stream_id, length)
            reference.acknowledge_received_data(stream_id, length)
    assert sinked.data_to_send() == reference.data_to_send()
    assert describe(sinked) == describe(reference)


PLAIN_DATA_FRAME = st.tuples(
    st.just("data"),
    st.sampled_from(STREAMS[:2]),
    st.sampled_from((1, 100, 4096, 16_384)),
    st.just(False),
    st.none(),
)
"""A DATA frame without flags on a stream that has a sink (in the tests that set one)."""


@PROPERTY_SETTINGS
@given(
    # Half the frames plain DATA for a sink (one_of would draw them as one of PEER_FRAME's kinds).
    st.lists(
        st.tuples(st.booleans(), PLAIN_DATA_FRAME, PEER_FRAME).map(lambda t: t[1] if t[0] else t[2]),
        min_size=3,
        max_size=12,
    ),
    st.lists(st.sampled_from((False, False, True)), min_size=12, max_size=12),
)
def test_a_whole_data_frame_taken_at_once_is_received_as_receive_data_would(
    frames: list[tuple[Any, ...]], cut_off: list[bool]
) -> None:
    """A read is offered whole to `receive_whole_data_frame` first, as the driver does, then (if
    not taken) to `receive_data`; reads are single frames, or a frame missing its last byte (which
    comes with the next read)."""
    peer = Peer()
    opening = PREFACE + SettingsFrame(0).serialize() + connects(peer)
    shortcut, reference = HboneServerConnection(SMALL), HboneServerConnection(SMALL)
    shortcut.receive_data(opening)
    reference.receive_data(opening)
    taken: dict[object, list[tuple[int, bytes, int]]] = {shortcut: [], reference: []}
    for connection in (shortcut, reference):
        for stream_id in STREAMS[:2]:
            connection.deliver_to(
                stream_id,
                lambda data, length, s=stream_id, c=connection: taken[c].append((s, data, length)),
            )
    reads = [peer_bytes(peer, [frame], answers=False) for frame in frames]
    carried = b""
    shortcut_events: list[object] = []
    for frame, cut in zip(reads, cut_off, strict=False):
        read, carried = carried + (frame[:-1] if cut else frame), frame[-1:] if cut else b""
        if not shortcut.receive_whole_data_frame(memoryview(read)):
            shortcut_events += shortcut.receive_data(read)
    shortcut_events += shortcut.receive_data(carried)
    reference_events = reference.receive_data(b"".join(reads))

    def joined(pieces: list[tuple[int, bytes, int]]) -> dict[int, tuple[bytes, int]]:
        return {
            stream_id: (
                b"".join(data for s, data, _ in pieces if s == stream_id),
                sum(length for s, _, length in pieces if s == stream_id),
            )
            for stream_id in STREAMS[:2]
        }

    assert joined(taken[shortcut]) == joined(taken[reference])
    assert merged(shortcut_events) == merged(reference_events)
    assert describe(shortcut) == describe(reference)
    for stream_id, (_, length) in joined(taken[reference]).items():
        shortcut.acknowledge_received_data(stream_id, length)
        reference.acknowledge_received_data(stream_id, length)
    assert shortcut.data_to_send() == reference.data_to_send()


def test_a_read_of_one_data_frame_for_a_sink_is_taken_whole() -> None:
    wire = Wire()
    stream_id = wire.open()
    taken: list[tuple[bytes, int]] = []
    wire.server.deliver_to(stream_id, lambda data, length: taken.append((data, length)))
    frame = data_frame(stream_id, 1024)
    assert wire.server.receive_whole_data_frame(memoryview(frame))
    assert taken == [(payload(1024, stream_id), 1024)]
    window = wire.server._h2.streams[stream_id].inbound_flow_control_window
    assert window == HboneSettings().stream_window - 1024


def test_a_read_spanning_data_frames_of_a_stream_reaches_its_sink_in_one_call() -> None:
    """A relay's large reads end inside one DATA frame and start inside the next: the frames' bytes
    in one read go to the sink together (one copy, one write on the other side), each stream's
    apart and in order, the frame cut by the read's end in two parts."""
    wire = Wire()
    first, second = wire.open(), wire.open()
    taken: list[tuple[int, bytes, int]] = []
    for stream_id in (first, second):
        wire.server.deliver_to(stream_id, lambda data, length, s=stream_id: taken.append((s, data, length)))
    frames = data_frame(first, 100) + data_frame(first, 200) + data_frame(second, 50) + data_frame(first, 300)
    cut = len(frames) - 120
    events = wire.server.receive_data(frames[:cut]) + wire.server.receive_data(frames[cut:])
    first_bytes = payload(100, first) + payload(200, first)
    assert events == []
    assert taken == [
        (first, first_bytes, 300),
        (second, payload(50, second), 50),
        (first, payload(300, first)[:180], 180),
        (first, payload(300, first)[180:], 120),
    ]


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda s: data_frame(s, 1024)[:-1], id="part of a frame"),
        pytest.param(lambda s: data_frame(s, 1024) + data_frame(s, 10), id="two frames"),
        pytest.param(lambda s: data_frame(s, 10, end_stream=True), id="END_STREAM"),
        pytest.param(lambda s: data_frame(s, 10, pad=3), id="padded"),
        pytest.param(lambda s: data_frame(s, 0), id="empty"),
        pytest.param(lambda s: data_frame(s + 2, 10), id="another stream"),
        pytest.param(lambda s: data_frame(s, 16_385), id="beyond the frame size"),
        pytest.param(lambda s: data_frame(s, 65_536), id="beyond the window"),
        pytest.param(lambda s: PingFrame(0, opaque_data=b"12345678").serialize(), id="not DATA"),
        pytest.param(lambda s: b"\x00\x00", id="part of a header"),
    ],
)
def test_any_other_read_is_left_to_receive_data(read: Callable[[int], bytes]) -> None:
    wire = Wire(server_settings=SMALL)
    stream_id = wire.open()
    taken: list[bytes] = []
    wire.server.deliver_to(stream_id, lambda data, length: taken.append(data))
    before = describe(wire.server)
    assert not wire.server.receive_whole_data_frame(memoryview(read(stream_id)))
    assert (taken, describe(wire.server)) == ([], before)


def test_a_data_frame_is_not_taken_whole_without_a_sink_or_while_a_frame_is_open() -> None:
    wire = Wire()
    stream_id = wire.open()
    frame = data_frame(stream_id, 10)
    assert not wire.server.receive_whole_data_frame(memoryview(frame))
    taken: list[bytes] = []
    wire.server.deliver_to(stream_id, lambda data, length: taken.append(data))
    first = data_frame(stream_id, 100)
    wire.server.receive_data(first[:50])  # the frame's payload is on its way
    assert not wire.server.receive_whole_data_frame(memoryview(frame))
    wire.server.receive_data(first[50:])
    assert taken == [payload(100, stream_id)[:41], payload(100, stream_id)[41:]]
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    wire.server.receive_data(ping[:5])  # a frame header on its way
    assert not wire.server.receive_whole_data_frame(memoryview(frame))
    wire.server.receive_data(ping[5:])
    wire.server.close()
    assert not wire.server.receive_whole_data_frame(memoryview(frame))
    assert len(taken) == 2


def test_a_chunk_sent_now_is_the_frame_send_data_would_queue() -> None:
    wire, twin = Wire(), Wire()
    stream_id, _ = wire.open(), twin.open()
    chunk = payload(1024)
    frame = wire.client.data_frame_now(stream_id, chunk)
    assert twin.client.send_data(stream_id, chunk) == 0
    assert frame == twin.client.data_to_send()
    assert describe(wire.client) == describe(twin.client)
    assert wire.client.data_to_send() == b""
    assert received_bytes(wire.server.receive_data(frame), stream_id) == chunk


@pytest.mark.parametrize(
    ("prepare", "sent"),
    [
        pytest.param(lambda w, s: w.client.ping(b"12345678"), False, id="h2 queued a frame"),
        pytest.param(lambda w, s: w.client.send_data(s, b"queued"), False, id="a DATA frame queued"),
        pytest.param(lambda w, s: w.client.send_data(s, payload(70_000)), True, id="bytes held back"),
        pytest.param(lambda w, s: w.client.end_stream(s), True, id="stream ended"),
        pytest.param(lambda w, s: w.client.reset_stream(s), True, id="stream reset"),
        pytest.param(lambda w, s: w.client.close(), True, id="connection closed"),
    ],
)
def test_a_chunk_is_not_sent_now_after(prepare: Callable[[Wire, int], object], sent: bool) -> None:
    """`sent`: what `prepare` queued is sent first, so that only the case named is in the way."""
    wire = Wire(server_settings=HboneSettings(stream_window=65_535))
    stream_id = wire.open()
    prepare(wire, stream_id)
    if sent:
        wire.client.data_to_send()
    before = describe(wire.client)
    assert wire.client.data_frame_now(stream_id, b"chunk") is None
    assert describe(wire.client) == before


def test_a_chunk_is_sent_now_only_when_small_and_within_the_windows() -> None:
    wire = Wire(server_settings=HboneSettings(stream_window=65_535))
    stream_id = wire.open()
    assert wire.client.data_frame_now(stream_id, b"") is None
    assert wire.client.data_frame_now(stream_id, payload(16_384)) is None  # large: sent as a view
    for _ in range(4):
        assert wire.client.data_frame_now(stream_id, payload(16_383)) is not None
    assert wire.client.data_frame_now(stream_id, payload(4)) is None  # 3 bytes of window left
    assert wire.client.data_frame_now(stream_id, payload(3)) is not None
    assert wire.client.data_frame_now(stream_id + 2, b"unknown stream") is None
    narrow = Wire(server_settings=HboneSettings(stream_window=65_535, connection_window=65_535))
    first, second = narrow.open(), narrow.open()
    for _ in range(4):
        assert narrow.client.data_frame_now(first, payload(16_383)) is not None
    assert narrow.client.data_frame_now(second, payload(4)) is None  # the connection's window
    unframed = Wire()
    unframed.client.fast_path = False
    stream_id = unframed.open()
    del unframed.client._h2._data_to_send  # as with an h2 that lacks the internals
    assert unframed.client.data_frame_now(stream_id, b"chunk") is None


def test_a_sink_serves_its_stream_until_it_ends_and_none_brings_events_back() -> None:
    wire = Wire()
    stream_id = wire.open()
    taken: list[bytes] = []
    wire.server.deliver_to(stream_id, lambda data, length: taken.append(data))
    wire.client.send_data(stream_id, b"to the sink")
    _, server_events = wire.pump()
    assert (taken, server_events) == ([b"to the sink"], [])

    wire.server.deliver_to(stream_id, None)
    wire.client.send_data(stream_id, b"as an event")
    _, server_events = wire.pump()
    assert received_bytes(server_events, stream_id) == b"as an event"

    wire.server.deliver_to(stream_id, lambda data, length: taken.append(data))
    wire.client.send_data(stream_id, b"last")
    wire.client.end_stream(stream_id)
    _, server_events = wire.pump()
    assert taken[-1] == b"last"
    assert server_events == [PeerHalfClosed(stream_id)]  # the end comes after the bytes, as an event
    wire.server.reset_stream(stream_id)
    wire.pump()
    wire.server.deliver_to(stream_id, lambda data, length: taken.append(data))  # gone: ignored
    assert stream_id not in wire.server._sinks
