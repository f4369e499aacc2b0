"""The HTTP/2 machinery both ends of an HBONE connection share, over h2: settings and windows,
sending within the peer's flow-control windows (holding back the rest per stream), handing window
back only as the application consumes, resets, GOAWAY, and turning h2's failures into values.

Sans-IO: bytes in through `receive_data`, bytes out through `data_to_send`; no sockets, no clocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import h2.events as h2e
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.exceptions import FrameTooLargeError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from agent.hbone.config import HTTP2_MIN_WINDOW, HboneSettings
from agent.hbone.errors import ErrorCode, HboneUsageError
from agent.hbone.events import (
    ConnectionClosing,
    ConnectionFailed,
    DataReceived,
    OutboundBufferDrained,
    PeerHalfClosed,
    PingAcknowledged,
    StreamReset,
)

CommonEvent = (
    DataReceived
    | PeerHalfClosed
    | StreamReset
    | OutboundBufferDrained
    | PingAcknowledged
    | ConnectionClosing
    | ConnectionFailed
)
"""Events both ends report."""

Emit = Callable[[CommonEvent], None]
"""Where a handler appends the events it produces (the `append` of the caller's event list)."""


def _payload_not_formatted() -> str:
    return "<payload not formatted>"


class _ReceiveFrameBuffer(FrameBuffer):
    """h2's frame parser, changed in two ways on the receive path.

    GOAWAY frames are set aside instead of reaching h2: h2 4.4 moves the whole connection to CLOSED
    on a GOAWAY, sent or received, after which the streams the GOAWAY lets finish (RFC 9113 6.8)
    could neither send nor receive.

    A frame header announcing more than the max frame size fails at once: h2 checks only after
    the whole frame arrived, so an HTTP/1.1 answer (its first bytes read as a 4.7 MB frame) would
    wait for megabytes that never come instead of failing the connection.

    DATA frames get a constant body repr: h2 formats `repr(frame)` of every received frame for a
    trace log even when nothing logs (a no-op logger does not help: the argument is built first),
    and a DATA frame's repr copies and hex-encodes its whole payload (FACTS.md: 45% of receive CPU
    with 1 MiB frames).
    """

    def __init__(self, *, server: bool) -> None:
        super().__init__(server=server)
        self.goaway_frames: list[GoAwayFrame] = []

    def __next__(self) -> Frame:
        header = self._data[:3]
        if len(header) == 3 and int.from_bytes(header) > self.max_frame_size:
            raise FrameTooLargeError(f"frame of {int.from_bytes(header)} bytes announced")
        frame = super().__next__()
        while isinstance(frame, GoAwayFrame):
            self.goaway_frames.append(frame)
            frame = super().__next__()
        if isinstance(frame, DataFrame):
            frame._body_repr = _payload_not_formatted  # type: ignore[method-assign]
        return frame


class _Stream:
    """What this side tracks of one open tunnel beyond h2's own stream state."""

    __slots__ = ("end_requested", "pending", "pending_bytes", "remote_ended")

    def __init__(self) -> None:
        self.pending: deque[memoryview] | None = None
        """Bytes accepted by `send_data` that did not fit the peer's windows, in order."""
        self.pending_bytes = 0
        self.end_requested = False
        """`end_stream` was called; END_STREAM goes out once `pending` is empty."""
        self.remote_ended = False


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
        self._h2.local_settings = Settings(client=client_side, initial_values=initial_settings)
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._frames = _ReceiveFrameBuffer(server=not client_side)
        self._h2.incoming_buffer = self._frames
        self._h2.initiate_connection()
        if settings.connection_window > HTTP2_MIN_WINDOW:
            self._h2.increment_flow_control_window(settings.connection_window - HTTP2_MIN_WINDOW)
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, None] = {}
        """Streams holding back bytes, oldest first (an ordered set)."""
        self._unacknowledged: dict[int, int] = {}
        """Flow-controlled bytes delivered per stream and not yet acknowledged; outlives the
        stream when it ended normally, since the application may still be writing them on."""
        self._sent_before_h2 = b""
        """Bytes to send ahead of h2's output: a GOAWAY h2 must not know about (see
        `_ReceiveFrameBuffer`) and whatever h2 had queued before it."""
        self._closed = False
        self._peer_going_away = False

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
        if self._sent_before_h2:
            data, self._sent_before_h2 = self._sent_before_h2 + self._h2.data_to_send(), b""
            return data
        return self._h2.data_to_send()

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
        sent = self._send_within_window(stream_id, data)
        if sent == len(data):
            return 0
        # `data` may be a view of a read buffer the I/O layer reuses: keep a copy.
        rest = memoryview(data if isinstance(data, bytes) else bytes(data))[sent:]
        stream.pending = deque((rest,))
        stream.pending_bytes = len(rest)
        self._blocked[stream_id] = None
        return stream.pending_bytes

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
            self._h2.end_stream(stream_id)
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
        """Hands `size` consumed bytes of `stream_id` back to the peer's windows (h2 batches the
        WINDOW_UPDATE frames). Bytes of a reset stream were already released and are ignored."""
        owed = self._unacknowledged.get(stream_id, 0)
        size = min(size, owed)
        if size <= 0:
            return
        if size == owed:
            del self._unacknowledged[stream_id]
        else:
            self._unacknowledged[stream_id] = owed - size
        self._h2.acknowledge_received_data(size, stream_id)

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

    def _receive_h2_events(self, data: bytes | memoryview, emit: Emit) -> list[h2e.Event]:
        if self._closed:
            return []
        try:
            return self._h2.receive_data(data)
        except ProtocolError as error:
            emit(self._fail(ErrorCode.from_wire(int(error.error_code)), str(error) or type(error).__name__))
            return []

    def _fail(self, error_code: ErrorCode, detail: str) -> ConnectionFailed:
        self._closed = True
        if self._h2.state_machine.state is not ConnectionState.CLOSED:
            self._h2.close_connection(error_code)
        self._streams.clear()
        self._blocked.clear()
        self._unacknowledged.clear()
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
        self._unacknowledged[stream_id] = self._unacknowledged.get(stream_id, 0) + length
        emit(DataReceived(stream_id, event.data, length))

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

    def _send_within_window(self, stream_id: int, data: bytes | memoryview) -> int:
        """Sends as much of `data` as the windows allow, in frames the peer accepts; returns how much."""
        h2 = self._h2
        size = len(data)
        window = h2.local_flow_control_window(stream_id)
        max_frame = h2.max_outbound_frame_size
        if size <= window and size <= max_frame:
            h2.send_data(stream_id, data)
            return size
        allowed = max(0, min(size, window))  # a peer lowering its initial window can drive it negative
        view = memoryview(data)
        offset = 0
        while offset < allowed:
            end = min(offset + max_frame, allowed)
            h2.send_data(stream_id, view[offset:end])
            offset = end
        return allowed

    def _flush(self, stream_id: int, stream: _Stream, emit: Emit) -> bool:
        """Sends what the stream held back, as far as the windows allow; True once all is sent."""
        if not self._h2_stream_open(stream_id):
            return False  # reset in the batch being handled; its StreamReset event comes next
        pending = stream.pending
        while pending:
            chunk = pending[0]
            sent = self._send_within_window(stream_id, chunk)
            stream.pending_bytes -= sent
            if sent < len(chunk):
                pending[0] = chunk[sent:]
                return False
            pending.popleft()
        stream.pending = None
        del self._blocked[stream_id]
        emit(OutboundBufferDrained(stream_id))
        if stream.end_requested:
            self._h2.end_stream(stream_id)
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
        self._streams[stream_id] = _Stream()

    def _forget_if_finished(self, stream_id: int, stream: _Stream) -> None:
        if stream.remote_ended and stream.end_requested and stream.pending is None:
            del self._streams[stream_id]

    def _forget(self, stream_id: int) -> None:
        """Drops a stream that ended abnormally, releasing what it held and owed."""
        del self._streams[stream_id]
        self._blocked.pop(stream_id, None)
        self._release_unacknowledged(stream_id)

    def _release_unacknowledged(self, stream_id: int) -> None:
        owed = self._unacknowledged.pop(stream_id, 0)
        if owed:
            self._h2.acknowledge_received_data(owed, stream_id)

    def _h2_stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and stream.open
