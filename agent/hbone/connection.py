"""The HTTP/2 machinery both ends of an HBONE connection share, over h2: settings and windows,
sending within the peer's flow-control windows (holding back the rest per stream), handing window
back only as the application consumes, resets, GOAWAY, and turning h2's failures into values.

Sans-IO: bytes in through `receive_data`, bytes out through `data_to_send`; no sockets, no clocks.

The fast path. A tunnel's bytes are nearly all plain DATA frames on open streams, and h2 costs
several copies and a few dozen Python calls per frame (its frame buffer accumulates each frame
before parsing it, then copies the payload twice more). So this module splits the received byte
stream into frames itself: a DATA frame on a stream that h2 would accept as it is (open for
receiving, no END_STREAM, no padding, within both windows, no header block in progress) has its
payload handed out as it arrives, in pieces (to a stream's sink, the frames of one read together),
with h2's window accounting done exactly as h2 does it; every other frame (HEADERS, SETTINGS,
WINDOW_UPDATE, RST_STREAM, PING, GOAWAY, DATA with flags or on a stream in any other state, anything
malformed) goes to h2 whole, in order. Sending, a DATA frame on a stream h2 would let send is framed
here and accounted in h2's windows, after whatever h2 had queued.

A relay's commonest read and write are one small chunk of an interactive exchange: one whole DATA
frame in, one out. Two shortcuts serve exactly that case with a few checks and no frame splitting,
event list or output queue: `receive_whole_data_frame` (a read that is one DATA frame for a stream
delivered to a sink) and `data_frame_now` (a chunk that can leave at once as one DATA frame, when
nothing else is queued). Each does what the general path does with the same bytes, or nothing.

A tunnel's other frames, its CONNECT, the answer and one END_STREAM each way, cost h2 a hundred
Python calls per side beyond what they mean to its state machines (frame objects, flag sets, HPACK,
debug logging). Those frames pass h2's codec by in the common case: sending, this side builds the
HEADERS frame (the header block is stateless, `header_block`) or the empty END_STREAM frame and
feeds h2's connection and stream state machines the inputs h2's `send_headers` and `end_stream`
feed them; receiving, a whole HEADERS frame (END_HEADERS only, no header block in progress) whose
block `header_block.decode` reads, on a tracked stream open for receiving or as a new request
within the stream limit, and an empty DATA frame with END_STREAM on a tracked stream, drive h2's
stream state machine as h2's own `receive_headers` and `receive_data` would drive it, less what
this side's configuration makes idle there (header validation, normalization and decoding; a
content-length check of zero bytes; an event for no bytes). Anything else goes through h2 as a
frame. h2's connection state machine is fed a stream's frames only while it could still change
(see `_CLIENT_OPEN`).

h2 stays the single owner of stream states and windows; the fast path only reads them, consumes
window the way h2's own DATA handling does and drives h2's state machines with the inputs h2's own
code would (`_h2_internals_present` names the h2 internals it touches; the fast path turns itself
off if they are missing).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import h2.events as h2e
from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2Connection
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamInputs, StreamState
from h2.utilities import authority_from_headers, extract_method_header, is_informational_response
from h2.windows import WindowManager
from hpack import Encoder
from hpack.table import HeaderTable
from hyperframe.frame import Frame, GoAwayFrame

from agent.hbone import header_block
from agent.hbone.config import HTTP2_MIN_WINDOW, HboneSettings
from agent.hbone.errors import ErrorCode, HboneUsageError
from agent.hbone.events import (
    ConnectionClosing,
    ConnectionEvent,
    ConnectionFailed,
    DataReceived,
    OutboundBufferDrained,
    PeerHalfClosed,
    PingAcknowledged,
    StreamReset,
)

CommonEvent = DataReceived | ConnectionEvent
"""Events both ends report."""

Emit = Callable[[CommonEvent], None]
"""Where a handler appends the events it produces (the `append` of the caller's event list)."""

DataSink = Callable[[bytes, int], None]
"""Takes one stream's received tunnel bytes in place of `DataReceived` events: `(data,
flow_controlled_length)`, the same bytes and lengths, in the same order (see
`HboneConnection.deliver_to`)."""

H2Handler = Callable[[Any, Any], None]
"""Turns one h2 event into this side's events: `(event, emit)`."""

_PAYLOAD_LEFT_AS_IS = 16_384
"""Outbound parts at least this large (DATA payloads) are handed on as they are rather than joined
to their neighbours: the copy would cost more than the record boundary a TLS layer puts there."""

_ACKNOWLEDGE_BATCH = 16
"""Consumed bytes are handed to h2 once a stream's reach 1/16 of its receive window, or all
streams' 1/16 of the connection's (and when a stream ends): h2's accounting costs a few Python
calls per acknowledgement, i.e. per DATA frame relayed, while it only sends WINDOW_UPDATE once
half a window is consumed. A peer never waits on a batch: with everything consumed, the bytes it
has in flight, h2's unsent half and the batch stay below the window."""

FRAME_HEADER = struct.Struct(">BHBBL")
"""An HTTP/2 frame header (RFC 9113 4.1): length as 8 + 16 bits, type, flags, R bit + stream id."""

PREFACE_SIZE = 24
"""Length of the client connection preface (RFC 9113 3.4) that precedes the client's first frame."""

_DATA = 0x0
_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_STREAM_ID_MASK = 0x7FFF_FFFF

# Stream states compared by identity: an Enum's hash is a Python-level call, and these checks run
# for every DATA frame.
_OPEN = StreamState.OPEN
_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
"""With OPEN, the states in which h2 accepts a DATA frame (any other is an error h2 reports)."""

_CLIENT_OPEN = ConnectionState.CLIENT_OPEN
_SERVER_OPEN = ConnectionState.SERVER_OPEN
"""The states in which h2's connection state machine takes a stream's HEADERS and DATA, sent or
received, as they are: no action, no event, the same state (its transition table). Feeding it those
inputs then changes nothing, and costs three Python calls (the table is keyed by enum pairs)."""


def _h2_internals_present() -> bool:
    """Whether h2 has the internals the fast path uses (checked once, on a real connection).

    h2 has no public way to consume receive window for a frame it did not parse. The fast path uses
    what h2's own `_receive_data_frame` and `H2Stream.receive_data` use: the connection's
    `_inbound_flow_control_window_manager` and each stream's `_inbound_window_manager`
    (`WindowManager.current_window_size`), the stream's `_expected_content_length` (bodies h2
    checks against a content-length) and `state_machine` (`state`, `headers_received`,
    `trailers_sent`); and `_data_to_send`, the buffer `data_to_send` empties, to skip that call (a
    copy and a new buffer) when h2 queued nothing. For HEADERS and END_STREAM it uses what
    `send_headers`, `end_stream`, `_receive_headers_frame` and `H2Stream.receive_headers` use:
    `_get_or_create_stream`, the stream's `_authority`, `request_method` and
    `_initialize_content_length`, and the decoder's `header_table`. If an h2 release
    renamed them, the fast path stays off and every frame goes through h2.
    """
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    h2.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"probe:1")])
    stream = h2.streams[1]
    try:
        return (
            isinstance(h2._inbound_flow_control_window_manager, WindowManager)
            and isinstance(stream._inbound_window_manager, WindowManager)
            and isinstance(stream._inbound_window_manager.current_window_size, int)
            and stream._expected_content_length is None
            and stream.state_machine.state is _OPEN
            and not stream.state_machine.headers_received
            and not stream.state_machine.trailers_sent
            and stream._authority == b"probe:1"
            and stream.request_method == b"CONNECT"
            and callable(stream._initialize_content_length)
            and h2._get_or_create_stream(1, AllowedStreamIDs.ODD) is stream
            and isinstance(h2.decoder.header_table, HeaderTable)
            and isinstance(h2.decoder.max_header_list_size, int)
            and isinstance(h2._data_to_send, bytearray)
        )
    except AttributeError:
        return False


def _payload_not_formatted() -> str:
    return "<payload not formatted>"


class _ReceiveFrameBuffer(FrameBuffer):
    """h2's frame parser, changed in two ways for the frames that reach h2.

    GOAWAY frames are set aside instead of reaching h2: h2 4.4 moves the whole connection to CLOSED
    on a GOAWAY, sent or received, after which the streams the GOAWAY lets finish (RFC 9113 6.8)
    could neither send nor receive.

    Frames get a constant body repr: h2 formats `repr(frame)` of every received frame for a trace
    log even when nothing logs (a no-op logger does not help: the argument is built first), and a
    body's repr hex-encodes it (for DATA its whole payload: FACTS.md, 45% of receive CPU with 1 MiB
    frames before the fast path; for HEADERS the header block, on every new tunnel).
    """

    def __init__(self, *, server: bool) -> None:
        super().__init__(server=server)
        self.goaway_frames: list[GoAwayFrame] = []

    def __next__(self) -> Frame:
        frame = super().__next__()
        while isinstance(frame, GoAwayFrame):
            self.goaway_frames.append(frame)
            frame = super().__next__()
        frame._body_repr = _payload_not_formatted  # type: ignore[method-assign]
        return frame


class _StatelessEncoder(Encoder):
    """hpack's encoder replaced by `header_block.encode`: blocks that leave the peer's dynamic
    table alone (empty, from the first block on) and literals that are not Huffman-coded.

    Every tunnel names a new client port, so indexing its `forwarded` value filled both sides'
    tables with entries never used again; hpack codes Huffman strings in Python, a bit at a time,
    on both sides. A stateless block also lets this side frame HEADERS itself (see
    `HboneConnection._send_headers`) and produce the very bytes h2 would.
    """

    def __init__(self) -> None:
        super().__init__()
        self._first_block = True

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        first_block, self._first_block = self._first_block, False
        return header_block.encode(headers, empty_table_first=first_block)


class _Stream:
    """What this side tracks of one open tunnel beyond h2's own stream state."""

    __slots__ = ("acknowledged", "end_requested", "h2_stream", "pending", "pending_bytes", "remote_ended")

    def __init__(self, h2_stream: H2Stream) -> None:
        self.h2_stream = h2_stream
        """h2's state of the stream (h2 may drop it from `streams` once closed; this side untracks
        the stream first)."""
        self.pending: deque[memoryview] | None = None
        """Bytes accepted by `send_data` that did not fit the peer's windows, in order."""
        self.pending_bytes = 0
        self.end_requested = False
        """`end_stream` was called; END_STREAM goes out once `pending` is empty."""
        self.remote_ended = False
        self.acknowledged = 0
        """Bytes the application consumed that h2 was not told of yet (see `_ACKNOWLEDGE_BATCH`)."""


class HboneConnection:
    """One HBONE connection (TLS + HTTP/2) as a state machine; the I/O layer owns the transport.

    After construction and after every call, send `data_to_send()` on the transport. A stream is
    open until both directions ended or it was reset; `open_stream_count` counts those.
    Flow control: `send_data` returns how many bytes the stream holds back for lack of peer
    window (pause reading its TCP side while that is non-zero; `OutboundBufferDrained` says when
    to resume). Received bytes are handed back to the peer's window only through
    `acknowledge_received_data`, so a slow consumer slows the sender; a reset (either way)
    releases whatever the stream still owed.
    """

    fast_path = _h2_internals_present()
    """Whether plain DATA frames bypass h2, and a tunnel's HEADERS and END_STREAM h2's codec (see the
    module docstring); False: h2 handles every frame."""

    _handlers: dict[type[h2e.Event], H2Handler]
    """Each side's handler of every h2 event `receive_data` can meet."""

    def __init__(self, settings: HboneSettings, *, client_side: bool) -> None:
        self._settings = settings
        self._h2 = H2Connection(
            H2Configuration(
                client_side=client_side,
                header_encoding=None,
                # Request validation is ours, so that a malformed CONNECT gets a 400 on its stream
                # instead of h2 closing the whole connection with a ProtocolError.
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                # What this side sends is built by agent.hbone.request from validated values (and
                # checked by its tests); h2's per-header checks cost a third of opening a tunnel.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        initial_settings = {
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
        }
        if client_side:
            initial_settings[SettingCodes.ENABLE_PUSH] = 0
        self._h2.encoder = _StatelessEncoder()
        self._h2.local_settings = Settings(client=client_side, initial_values=initial_settings)
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._frames = _ReceiveFrameBuffer(server=not client_side)
        self._h2.incoming_buffer = self._frames
        self._h2.initiate_connection()
        if settings.connection_window > HTTP2_MIN_WINDOW:
            self._h2.increment_flow_control_window(settings.connection_window - HTTP2_MIN_WINDOW)
        self._client_side = client_side
        self._own_stream_ids = AllowedStreamIDs(client_side)
        self._peer_stream_ids = AllowedStreamIDs(not client_side)
        """h2's parity arguments for streams this side opens and the peer opens."""
        self._streams: dict[int, _Stream] = {}
        self._sinks: dict[int, DataSink] = {}
        """Streams whose bytes go to a sink instead of `DataReceived` events (`deliver_to`)."""
        self._blocked: dict[int, None] = {}
        """Streams holding back bytes, oldest first (an ordered set)."""
        self._acknowledge_stream_batch = settings.stream_window // _ACKNOWLEDGE_BATCH
        self._acknowledge_connection_batch = settings.connection_window // _ACKNOWLEDGE_BATCH
        self._acknowledged_total = 0
        """Sum of the tracked streams' `acknowledged`."""
        self._unacknowledged: dict[int, int] = {}
        """Flow-controlled bytes delivered per stream and not yet acknowledged; outlives the
        stream when it ended normally, since the application may still be writing them on."""
        self._outbound: list[bytes | memoryview] = []
        """Bytes to send that did not come from h2 (fast-path DATA frames, a GOAWAY h2 must not
        know about), each after whatever h2 had queued when it was added."""
        self._partial = bytearray()
        """The received start of a frame whose rest has not arrived: a header, or a frame for h2."""
        self._payload_stream = 0
        self._payload_left = 0
        """Bytes of the fast-path DATA frame being received (on `_payload_stream`) still to come."""
        self._pieces: list[memoryview] = []
        self._pieces_stream = 0
        """Payload pieces for the sink of `_pieces_stream` (`deliver_to`) read in this `receive_data`
        and not handed on yet: a read that spans DATA frames of one stream hands their bytes to its
        sink in one call (one copy, and one write on the stream's other side)."""
        self._preface_left = 0 if client_side else PREFACE_SIZE
        self._in_header_block = False
        """A HEADERS or PUSH_PROMISE went to h2 without END_HEADERS: CONTINUATION frames must follow."""
        self._past_codec = False
        """The whole frame being received may pass h2's codec by (a tunnel's HEADERS or END_STREAM)."""
        self._closed = False
        self._peer_going_away = False

    @property
    def _passing_h2(self) -> bool:
        """Whether frames may pass h2 by now: the fast path is on and h2 has not closed the
        connection (from then on h2 refuses, and must, whatever this side would send)."""
        return self.fast_path and self._h2.state_machine.state is not ConnectionState.CLOSED

    @property
    def open_stream_count(self) -> int:
        """Streams not yet finished both ways nor reset (tunnels pending an answer included)."""
        return len(self._streams)

    @property
    def closed(self) -> bool:
        """This side closed the connection (`close`) or the peer broke the protocol."""
        return self._closed

    @property
    def peer_going_away(self) -> bool:
        """The peer sent GOAWAY: no new streams."""
        return self._peer_going_away

    def data_to_send(self) -> bytes:
        """The bytes to write on the transport now (possibly empty)."""
        return b"".join(self.data_to_send_parts())

    def data_to_send_parts(self) -> list[bytes | memoryview]:
        """The bytes to write on the transport now, as parts to write in order (possibly none):
        what `data_to_send` joins, except that large DATA payloads are not copied next to the
        rest (a TLS layer can take them as they are, at the cost of a record boundary)."""
        self._take_h2_queue()
        outbound = self._outbound
        if not outbound:
            return []
        self._outbound = []
        if len(outbound) == 1:
            return outbound
        parts: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        for part in outbound:
            if len(part) < _PAYLOAD_LEFT_AS_IS:
                small.append(part)
                continue
            if small:
                parts.append(b"".join(small))
                small = []
            parts.append(part)
        if small:
            parts.append(b"".join(small))
        return parts

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Sends tunnel bytes; returns how many bytes the stream now holds back for lack of peer
        window (0: all handed to h2). A stream that is gone (reset meanwhile) takes and drops
        them: its StreamReset event is, or was, reported."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        if stream.end_requested:
            raise HboneUsageError(f"stream {stream_id}: send_data after end_stream")
        if not data:
            return stream.pending_bytes
        if stream.pending is not None:
            stream.pending.append(memoryview(bytes(data)))
            stream.pending_bytes += len(data)
            return stream.pending_bytes
        sent = self._send_within_window(stream, data)
        if sent == len(data):
            return 0
        # `data` may be a view of a read buffer the I/O layer reuses: keep a copy.
        rest = memoryview(data if isinstance(data, bytes) else bytes(data))[sent:]
        stream.pending = deque((rest,))
        stream.pending_bytes = len(rest)
        self._blocked[stream_id] = None
        return stream.pending_bytes

    def data_frame_now(self, stream_id: int, data: bytes) -> bytes | None:
        """`data` as one DATA frame to write at once, if it can leave that way now: a tracked
        stream holding nothing back and not ended, fewer than `_PAYLOAD_LEFT_AS_IS` bytes (which
        fit any frame size a peer may set) within both windows, the fast path on, and nothing else
        queued to send. Accounts the bytes as sent, as `send_data` would; the caller writes the
        frame before anything `data_to_send` returns later. None: nothing was done, use
        `send_data`."""
        stream = self._streams.get(stream_id)
        size = len(data)
        # Bytes held back mean an exhausted window too; checked anyway, as order depends on it.
        if (
            stream is None
            or stream.pending is not None
            or stream.end_requested
            or not 0 < size < _PAYLOAD_LEFT_AS_IS
            or self._outbound
        ):
            return None
        h2 = self._h2
        h2_stream = stream.h2_stream
        if (
            not self._passing_h2  # first: without the fast path, h2's internals may be missing
            or h2._data_to_send
            or size > h2.outbound_flow_control_window
            or size > h2_stream.outbound_flow_control_window
        ):
            return None
        h2.outbound_flow_control_window -= size
        h2_stream.outbound_flow_control_window -= size
        return FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _DATA, 0, stream_id) + data

    def outbound_buffered(self, stream_id: int) -> int:
        """Bytes `stream_id` holds back for lack of peer window (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.pending_bytes

    def end_stream(self, stream_id: int) -> None:
        """Half-closes this side of the tunnel (the TCP FIN): an empty DATA frame with END_STREAM,
        after any bytes the stream holds back. No-op for streams that are gone."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_requested:
            return
        stream.end_requested = True
        if stream.pending is None:
            self._send_end_stream(stream)
            self._forget_if_finished(stream_id, stream)

    def reset_stream(self, stream_id: int, error_code: ErrorCode = ErrorCode.CONNECT_ERROR) -> None:
        """Abandons the tunnel (RST_STREAM; CONNECT_ERROR is a TCP reset, RFC 9113 8.5) and releases
        the bytes it still owed; for a stream that already finished, only releases them."""
        if stream_id in self._streams:
            # h2 may have closed it already, in the batch of frames whose events are being handled.
            if self._h2_stream_open(stream_id):
                self._h2.reset_stream(stream_id, error_code)
            self._forget(stream_id)
        else:
            self._release_unacknowledged(stream_id)

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """Hands `size` consumed bytes of `stream_id` back to the peer's windows (batched, see
        `_ACKNOWLEDGE_BATCH`; h2 batches the WINDOW_UPDATE frames). Bytes of a reset stream were
        already released and are ignored."""
        owed = self._unacknowledged.get(stream_id, 0)
        size = min(size, owed)
        if size <= 0:
            return
        if size == owed:
            del self._unacknowledged[stream_id]
        else:
            self._unacknowledged[stream_id] = owed - size
        stream = self._streams.get(stream_id)
        if stream is None:  # finished: its bytes go back to the connection window at once
            self._h2.acknowledge_received_data(size, stream_id)
            return
        stream.acknowledged += size
        self._acknowledged_total += size
        if (
            stream.acknowledged >= self._acknowledge_stream_batch
            or self._acknowledged_total >= self._acknowledge_connection_batch
        ):
            for tracked_id, tracked in self._streams.items():
                self._report_acknowledged(tracked_id, tracked)

    def deliver_to(self, stream_id: int, sink: DataSink | None) -> None:
        """Hands the bytes received on `stream_id` from now on to `sink` as they are parsed, in
        place of `DataReceived` events (None: events again); ignored for a stream that is not open.

        The receiving end of a tunnel relays each piece as it comes, and an event per piece costs
        an object, a list and a dispatch on the path of every byte. The sink sees the bytes and
        flow-controlled lengths the events would carry, in order, except that the DATA frames of
        one read come in one call, and owes the same `acknowledge_received_data`; the stream's
        other events (its end, a reset) still come as events, after the bytes that preceded them.
        The sink is dropped when the stream finishes or is reset. It must not call `receive_data`.
        """
        if sink is None:
            self._sinks.pop(stream_id, None)
        elif stream_id in self._streams:
            self._sinks[stream_id] = sink

    def ping(self, payload: bytes) -> None:
        """Sends a keepalive PING with 8 bytes of `payload`; the answer is `PingAcknowledged`."""
        self._h2.ping(payload)

    def close(self, error_code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Closes the connection now: GOAWAY, after which nothing more is received. Send
        `data_to_send()`, then close the transport."""
        if self._closed:
            return
        self._closed = True
        self._h2.close_connection(error_code)

    # Receiving.

    def _receive(self, data: bytes | memoryview, emit: Emit) -> None:
        """Splits received bytes into frames: payloads of fast-path DATA frames are delivered as
        they arrive (consecutive ones of a stream together), every other frame goes to h2 once
        complete. Keeps no reference to `data`."""
        if self._closed:
            return
        view = memoryview(data)
        end = len(view)
        position = 0
        if self._preface_left:
            position = min(self._preface_left, end)
            self._preface_left -= position
            self._receive_by_h2(view[:position], emit)
        while position < end and not self._closed:
            if self._payload_left:
                size = min(self._payload_left, end - position)
                self._payload_left -= size
                stream_id = self._payload_stream
                if self._pieces and self._pieces_stream != stream_id:
                    self._deliver_pieces(emit)
                if stream_id in self._sinks:
                    self._pieces_stream = stream_id
                    self._pieces.append(view[position : position + size])
                else:
                    self._deliver(stream_id, view[position : position + size], emit)
                position += size
            elif self._partial:
                position = self._continue_partial_frame(view, position, emit)
            elif end - position < FRAME_HEADER.size:
                self._partial += view[position:]
                position = end
            else:
                length = self._frame_header(view, position, emit)
                if length is None:
                    position += FRAME_HEADER.size  # the payload (if any) passes through as it arrives
                elif end - position >= FRAME_HEADER.size + length:
                    frame_end = position + FRAME_HEADER.size + length
                    self._receive_frame(view[position:frame_end], emit)
                    position = frame_end
                else:
                    self._partial += view[position:]
                    position = end
        if self._pieces:
            self._deliver_pieces(emit)

    def receive_whole_data_frame(self, data: memoryview) -> bool:
        """Takes `data` if it is exactly one whole non-empty DATA frame for a stream whose bytes go
        to a sink (`deliver_to`), that h2 would take as it is (`_starts_fast_data`): the payload
        goes to the sink, and True. False: nothing was taken; hand `data` to `receive_data`."""
        # No preface check: a stream with a sink was opened after it. A header block in
        # progress is `_starts_fast_data`'s to check.
        if self._payload_left or self._partial or self._closed or len(data) < FRAME_HEADER.size:
            return False
        high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(data)
        length = high << 16 | low
        if kind != _DATA or not length or FRAME_HEADER.size + length != len(data):
            return False
        # A stream id with the reserved bit set has no sink: that frame is left to h2.
        if (
            stream_id not in self._sinks
            or length > self._h2.max_inbound_frame_size
            or not self._starts_fast_data(stream_id, flags, length)
        ):
            return False
        self._payload_left = 0  # delivered whole, here
        self._hand_on(stream_id, data[FRAME_HEADER.size :].tobytes(), length)  # to the sink: no event
        return True

    def _continue_partial_frame(self, view: memoryview, position: int, emit: Emit) -> int:
        """Adds the bytes of `view` from `position` that the partial frame still lacks, and hands
        the frame on once complete. Returns the position after what it took."""
        partial = self._partial
        if len(partial) < FRAME_HEADER.size:
            taken = min(FRAME_HEADER.size - len(partial), len(view) - position)
            partial += view[position : position + taken]
            position += taken
            if len(partial) < FRAME_HEADER.size:
                return position
            if self._frame_header(partial, 0, emit) is None:
                partial.clear()
                return position
        high, low, _, _, _ = FRAME_HEADER.unpack_from(partial)
        frame_size = FRAME_HEADER.size + (high << 16 | low)
        taken = min(frame_size - len(partial), len(view) - position)
        partial += view[position : position + taken]
        position += taken
        if len(partial) == frame_size:
            frame = bytes(partial)
            partial.clear()
            self._receive_frame(frame, emit)
        return position

    def _frame_header(self, buffer: memoryview | bytearray, offset: int, emit: Emit) -> int | None:
        """Decides about the frame whose header starts at `offset`: its payload length when the
        whole frame is for h2; None when it is a fast-path DATA frame (now being received) or too
        large (the connection failed)."""
        high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, offset)
        length: int = high << 16 | low
        if (
            kind == _DATA
            and length <= self._h2.max_inbound_frame_size
            and self._starts_fast_data(stream_id & _STREAM_ID_MASK, flags, length)
        ):
            return None
        if self._pieces:  # before whatever this frame means, and in the event order
            self._deliver_pieces(emit)
        if length > self._h2.max_inbound_frame_size:
            # h2 would first wait for the whole frame: an HTTP/1.1 answer (its first bytes read as
            # a 4.7 MB frame) would then wait for megabytes that never come.
            emit(self._fail(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes announced"))
            return None
        if kind == _DATA:
            self._past_codec = flags == _END_STREAM and not length and not self._in_header_block
        elif kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            self._past_codec = kind == _HEADERS and flags == _END_HEADERS and not self._in_header_block
            self._in_header_block = not flags & _END_HEADERS
        else:
            self._past_codec = False
        return length

    def _starts_fast_data(self, stream_id: int, flags: int, length: int) -> bool:
        """Takes a DATA frame past h2 if h2 would accept it as it is, consuming its length from
        both receive windows as h2 would; False leaves the frame to h2 (and its errors)."""
        if not self.fast_path or flags & (_END_STREAM | _PADDED) or self._in_header_block:
            return False
        stream = self._receiving_data_as_is(stream_id)
        if stream is None:
            return False
        connection_window = self._h2._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if length > connection_window.current_window_size or length > stream_window.current_window_size:
            return False  # a flow-control violation: h2 reports it
        # What `WindowManager.window_consumed` does, its overflow check being the one just made.
        connection_window.current_window_size -= length
        stream_window.current_window_size -= length
        self._payload_stream = stream_id
        self._payload_left = length
        return True

    def _receiving_data_as_is(self, stream_id: int) -> H2Stream | None:
        """h2's stream if it is tracked here and h2 takes DATA on it as it comes: open for
        receiving, answered (its headers received), no content-length to check the body against."""
        tracked = self._streams.get(stream_id)
        if tracked is None:
            return None
        stream = tracked.h2_stream
        machine = stream.state_machine
        state = machine.state
        if (
            (state is not _OPEN and state is not _HALF_CLOSED_LOCAL)
            or not machine.headers_received
            or stream._expected_content_length is not None
        ):
            return None
        return stream

    def _deliver_pieces(self, emit: Emit) -> None:
        """Hands on the pieces of fast-path DATA payload kept for a stream's sink, together."""
        pieces = self._pieces
        payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._deliver(self._pieces_stream, payload, emit)

    def _deliver(self, stream_id: int, payload: memoryview | bytes, emit: Emit) -> None:
        """Hands on fast-path DATA payload (a copy when `payload` views the caller's buffer); a
        stream reset meanwhile gets the window straight back."""
        size = len(payload)
        if stream_id not in self._streams:
            self._h2.acknowledge_received_data(size, stream_id)
            return
        data = payload.tobytes() if isinstance(payload, memoryview) else payload
        if (event := self._hand_on(stream_id, data, size)) is not None:
            emit(event)

    def _hand_on(self, stream_id: int, data: bytes, length: int) -> DataReceived | None:
        """Owes the peer `length` flow-controlled bytes of tracked stream `stream_id` until they are
        acknowledged, and hands `data` to the stream's sink; without one, returns the event that
        carries them."""
        self._unacknowledged[stream_id] = self._unacknowledged.get(stream_id, 0) + length
        if (sink := self._sinks.get(stream_id)) is None:
            return DataReceived(stream_id, data, length)
        sink(data, length)
        return None

    def _receive_frame(self, frame: bytes | memoryview, emit: Emit) -> None:
        """Handles a whole frame that is not fast-path DATA (its header was read by `_frame_header`)."""
        if self._past_codec and self._passing_h2:
            _, _, kind, _, stream_id = FRAME_HEADER.unpack_from(frame)
            stream_id &= _STREAM_ID_MASK
            if kind == _DATA:
                handled = self._receive_end_stream(stream_id, emit)
            else:
                handled = self._receive_headers(stream_id, memoryview(frame)[FRAME_HEADER.size :], emit)
            if handled:
                return
        self._receive_by_h2(frame, emit)

    def _receive_headers(self, stream_id: int, block: memoryview, emit: Emit) -> bool:
        """What h2's `_receive_headers_frame` does with a HEADERS frame carrying END_HEADERS only,
        if the stream is tracked and open for receiving, or (server) a new request within the
        stream limit, and `header_block` reads the block; False (nothing done) otherwise."""
        h2 = self._h2
        tracked = self._streams.get(stream_id)
        if tracked is not None:
            state = tracked.h2_stream.state_machine.state
            if state is not _OPEN and state is not _HALF_CLOSED_LOCAL:
                return False
        elif self._client_side or stream_id % 2 != 1 or stream_id <= h2.highest_inbound_stream_id:
            return False  # not a new request: h2 knows what to make of it
        decoder = h2.decoder
        headers = header_block.decode(block, decoder.header_table, decoder.max_header_list_size)
        if headers is None:
            return False
        # h2's check (and its pruning of closed streams) before a new stream.
        if tracked is None and h2.open_inbound_streams + 1 > h2.local_settings.max_concurrent_streams:
            return False
        try:
            self._connection_input(ConnectionInputs.RECV_HEADERS)
            stream = h2._get_or_create_stream(stream_id, self._peer_stream_ids)
            events = self._stream_receives_headers(stream, headers)
        except ProtocolError as error:  # h2 would end the connection the same way
            emit(self._fail(ErrorCode.from_wire(int(error.error_code)), str(error) or type(error).__name__))
            return True
        self._handle_h2_events(events, emit)
        return True

    @staticmethod
    def _stream_receives_headers(stream: H2Stream, headers: list[header_block.Header]) -> list[h2e.Event]:
        """What h2's `H2Stream.receive_headers` does with a header block without END_STREAM, given
        this side's configuration: h2 neither validates nor normalizes received headers, nor decodes
        them (`__init__`), so its validation flags go unused and the event carries the block as it is.
        An informational answer takes h2's own path."""
        if is_informational_response(headers):
            return stream.receive_headers(headers, False, None)[1]
        events: list[h2e.Event] = stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
        stream._initialize_content_length(headers)
        headers_event = events[0]
        if isinstance(headers_event, h2e.TrailersReceived):
            raise ProtocolError("Trailers must have END_STREAM set")
        headers_event.headers = headers  # type: ignore[attr-defined]
        return events

    def _receive_end_stream(self, stream_id: int, emit: Emit) -> bool:
        """What h2's `_receive_data_frame` does with an empty DATA frame carrying END_STREAM, if the
        stream is tracked, open for receiving, answered and without a content-length; False
        (nothing done) otherwise."""
        stream = self._receiving_data_as_is(stream_id)
        if stream is None:
            return False
        # What h2's `H2Stream.receive_data(b"", True, 0)` does on such a stream, less its empty
        # DataReceived event (which `_on_data` ignores): no window to consume, no content-length
        # to check, and a DATA frame changes neither state.
        self._connection_input(ConnectionInputs.RECV_DATA)
        self._handle_h2_events(stream.state_machine.process_input(StreamInputs.RECV_END_STREAM), emit)
        return True

    def _receive_by_h2(self, data: bytes | memoryview, emit: Emit) -> None:
        """Feeds whole frames (or the preface) to h2 and handles what they mean."""
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as error:
            emit(self._fail(ErrorCode.from_wire(int(error.error_code)), str(error) or type(error).__name__))
            return
        self._handle_h2_events(events, emit)
        self._receive_set_aside_goaways(emit)

    def _handle_h2_events(self, events: list[h2e.Event], emit: Emit) -> None:
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event, emit)

    def _fail(self, error_code: ErrorCode, detail: str) -> ConnectionFailed:
        self._closed = True
        if self._h2.state_machine.state is not ConnectionState.CLOSED:
            self._h2.close_connection(error_code)
        self._streams.clear()
        self._sinks.clear()
        self._blocked.clear()
        self._unacknowledged.clear()
        self._acknowledged_total = 0
        return ConnectionFailed(error_code, detail)

    def _receive_set_aside_goaways(self, emit: Emit) -> None:
        goaways = self._frames.goaway_frames
        while goaways:
            frame = goaways.pop(0)
            self._on_peer_goaway(frame.last_stream_id, ErrorCode.from_wire(frame.error_code), emit)

    def _on_peer_goaway(self, last_stream_id: int, error_code: ErrorCode, emit: Emit) -> None:
        self._peer_going_away = True
        emit(ConnectionClosing(last_stream_id, error_code))

    def _on_h2_connection_terminated(self, event: h2e.ConnectionTerminated, emit: Emit) -> None:
        self._on_peer_goaway(event.last_stream_id or 0, ErrorCode.from_wire(int(event.error_code or 0)), emit)

    def _on_data(self, event: h2e.DataReceived, emit: Emit) -> None:
        stream_id, length = event.stream_id, event.flow_controlled_length
        if stream_id not in self._streams or not event.data:
            # Padding, an empty END_STREAM frame, or bytes for a stream this side refused or
            # reset: nobody will consume them, so give the window straight back.
            if length:
                self._h2.acknowledge_received_data(length, stream_id)
            return
        if (received := self._hand_on(stream_id, event.data, length)) is not None:
            emit(received)

    def _on_stream_ended(self, event: h2e.StreamEnded, emit: Emit) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        emit(PeerHalfClosed(event.stream_id))
        self._forget_if_finished(event.stream_id, stream)

    def _on_stream_reset(self, event: h2e.StreamReset, emit: Emit) -> None:
        if event.stream_id not in self._streams:
            return
        self._forget(event.stream_id)
        emit(StreamReset(event.stream_id, ErrorCode.from_wire(int(event.error_code)), event.remote_reset))

    def _on_trailers(self, event: h2e.TrailersReceived, emit: Emit) -> None:
        # A tunnel's bytes are DATA only; a second header block breaks the CONNECT (RFC 9113 8.5).
        self._reset_for_violation(event.stream_id, emit)

    def _reset_for_violation(self, stream_id: int, emit: Emit) -> None:
        if stream_id not in self._streams:
            return
        self.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
        emit(StreamReset(stream_id, ErrorCode.PROTOCOL_ERROR, by_peer=False))

    def _on_window_updated(self, event: h2e.WindowUpdated, emit: Emit) -> None:
        if not self._blocked:
            return
        if event.stream_id == 0:
            self._flush_blocked(emit)
        elif event.stream_id in self._blocked:
            self._flush(event.stream_id, self._streams[event.stream_id], emit)

    def _on_remote_settings(self, event: h2e.RemoteSettingsChanged, emit: Emit) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._flush_blocked(emit)

    def _on_ping_ack(self, event: h2e.PingAckReceived, emit: Emit) -> None:
        emit(PingAcknowledged(bytes(event.ping_data)))

    def _ignore(self, event: h2e.Event, emit: Emit) -> None:
        """For h2 events that need nothing from this side: h2 already answered them (PING,
        SETTINGS) or they carry nothing a tunnel uses (priority, ALTSVC, unknown frames)."""

    # Sending.

    def _send_within_window(self, stream: _Stream, data: bytes | memoryview) -> int:
        """Sends as much of `data` as the windows allow, in frames the peer accepts; returns how much."""
        h2 = self._h2
        h2_stream = stream.h2_stream
        # A peer lowering its initial window can drive it negative.
        allowed = max(
            0, min(len(data), h2.outbound_flow_control_window, h2_stream.outbound_flow_control_window)
        )
        if not allowed:
            return 0
        max_frame = h2.max_outbound_frame_size
        # A stream this side tracks and has not ended (`send_data` checked) is one h2 lets send on:
        # whatever makes h2 close it (a reset either way, a refusal) untracks it at once. Only a
        # closed connection (GOAWAY sent) is left to h2, which raises as it must.
        if self._passing_h2:
            self._send_fast_data(h2_stream, data, allowed, max_frame)
            return allowed
        stream_id = h2_stream.stream_id
        if allowed == len(data) and allowed <= max_frame:
            h2.send_data(stream_id, data)
            return allowed
        view = memoryview(data)
        offset = 0
        while offset < allowed:
            end = min(offset + max_frame, allowed)
            h2.send_data(stream_id, view[offset:end])
            offset = end
        return allowed

    def _send_headers(self, stream_id: int, headers: Sequence[header_block.Header]) -> None:
        """What h2's `send_headers` does for a header block without END_STREAM (a CONNECT, a 2xx),
        framing the block here: the block is the same either way, the encoder being stateless."""
        h2 = self._h2
        if not self._passing_h2:
            h2.send_headers(stream_id, headers)
            return
        if stream_id not in h2.streams:
            open_streams = h2.open_outbound_streams  # h2 prunes closed streams here
            limit = h2.remote_settings.max_concurrent_streams
            if open_streams + 1 > limit:
                raise TooManyStreamsError(f"Max outbound streams is {limit}, {open_streams} open")
        self._connection_input(ConnectionInputs.SEND_HEADERS)
        stream = h2._get_or_create_stream(stream_id, self._own_stream_ids)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        block = h2.encoder.encode(headers)
        if machine.trailers_sent:
            raise ProtocolError("Trailers must have END_STREAM set.")
        if machine.client and stream._authority is None:
            stream._authority = authority_from_headers(headers)
        stream.request_method = extract_method_header(headers)
        # A CONNECT or a status is far below the smallest frame size a peer may set (16 KiB).
        size = len(block)
        header = FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _HEADERS, _END_HEADERS, stream_id)
        self._send_past_h2(header + block)

    def _send_end_stream(self, stream: _Stream) -> None:
        """What h2's `end_stream` does (an empty DATA frame with END_STREAM), framed here."""
        h2 = self._h2
        h2_stream = stream.h2_stream
        if not self._passing_h2:
            h2.end_stream(h2_stream.stream_id)
            return
        self._connection_input(ConnectionInputs.SEND_DATA)
        h2_stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        self._send_past_h2(FRAME_HEADER.pack(0, 0, _DATA, _END_STREAM, h2_stream.stream_id))

    def _connection_input(self, stream_input: ConnectionInputs) -> None:
        """Feeds h2's connection state machine a stream's HEADERS or DATA input, unless the
        connection is open (see `_CLIENT_OPEN`); it never answers these with an event."""
        machine = self._h2.state_machine
        state = machine.state
        if state is not _CLIENT_OPEN and state is not _SERVER_OPEN:
            machine.process_input(stream_input)

    def _send_past_h2(self, data: bytes) -> None:
        """Queues bytes h2 does not produce, after everything h2 queued so far."""
        self._take_h2_queue()
        self._outbound.append(data)

    def _take_h2_queue(self) -> None:
        """Moves what h2 queued so far to the outbound bytes, ahead of what this side adds next."""
        h2 = self._h2
        if self.fast_path and not h2._data_to_send:
            return
        if queued := h2.data_to_send():
            self._outbound.append(queued)

    def _send_fast_data(self, stream: H2Stream, data: bytes | memoryview, size: int, max_frame: int) -> None:
        """Frames the first `size` bytes of `data` (within both windows) as h2's `send_data` would,
        accounting them in h2's send windows; whatever h2 had queued goes out first."""
        self._take_h2_queue()
        outbound = self._outbound
        if isinstance(data, memoryview) and not isinstance(data.obj, bytes):
            data = bytes(data[:size])  # a view of a buffer the caller may reuse before sending
        stream_id = stream.stream_id
        if size == len(data) and size <= max_frame:
            header = FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _DATA, 0, stream_id)
            if size < _PAYLOAD_LEFT_AS_IS:
                # Joined now rather than by `data_to_send_parts`: a small chunk (an interactive
                # request or answer) then leaves as one part, without another pass over the parts.
                outbound.append(header + data)
            else:
                outbound.append(header)
                outbound.append(data)
        else:
            view = memoryview(data)
            for offset in range(0, size, max_frame):
                end = min(offset + max_frame, size)
                length = end - offset
                outbound.append(FRAME_HEADER.pack(length >> 16, length & 0xFFFF, _DATA, 0, stream_id))
                outbound.append(view[offset:end])
        self._h2.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size

    def _flush(self, stream_id: int, stream: _Stream, emit: Emit) -> bool:
        """Sends what the stream held back, as far as the windows allow; True once all is sent."""
        if not self._h2_stream_open(stream_id):
            return False  # reset in the batch being handled; its StreamReset event comes next
        pending = stream.pending
        while pending:
            chunk = pending[0]
            sent = self._send_within_window(stream, chunk)
            stream.pending_bytes -= sent
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                return False
            pending.popleft()
        stream.pending = None
        del self._blocked[stream_id]
        emit(OutboundBufferDrained(stream_id))
        if stream.end_requested:
            self._send_end_stream(stream)
            self._forget_if_finished(stream_id, stream)
        return True

    def _flush_blocked(self, emit: Emit) -> None:
        for stream_id in list(self._blocked):
            if self._h2.outbound_flow_control_window <= 0:
                return
            if not self._flush(stream_id, self._streams[stream_id], emit):
                # Served last next time, so one busy stream does not take every connection update.
                del self._blocked[stream_id]
                self._blocked[stream_id] = None

    # Stream bookkeeping.

    def _track_stream(self, stream_id: int) -> None:
        self._streams[stream_id] = _Stream(self._h2.streams[stream_id])

    def _forget_if_finished(self, stream_id: int, stream: _Stream) -> None:
        if stream.remote_ended and stream.end_requested and stream.pending is None:
            del self._streams[stream_id]
            self._sinks.pop(stream_id, None)
            self._report_acknowledged(stream_id, stream)

    def _forget(self, stream_id: int) -> None:
        """Drops a stream that ended abnormally, releasing what it held and owed."""
        self._report_acknowledged(stream_id, self._streams.pop(stream_id))
        self._sinks.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        self._release_unacknowledged(stream_id)

    def _report_acknowledged(self, stream_id: int, stream: _Stream) -> None:
        """Tells h2 of the bytes `stream` batched."""
        if acknowledged := stream.acknowledged:
            stream.acknowledged = 0
            self._acknowledged_total -= acknowledged
            self._h2.acknowledge_received_data(acknowledged, stream_id)

    def _release_unacknowledged(self, stream_id: int) -> None:
        owed = self._unacknowledged.pop(stream_id, 0)
        if owed:
            self._h2.acknowledge_received_data(owed, stream_id)

    def _h2_stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and stream.open
