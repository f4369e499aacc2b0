"""The client end of an HBONE connection: opens CONNECT tunnels on one pooled TLS+h2 connection
and reports their answers, bytes and endings as `ClientEvent`s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.events as h2e
from h2.connection import H2Connection

from agent.hbone.config import HboneSettings
from agent.hbone.connection import Emit, HboneConnection
from agent.hbone.errors import ErrorCode, HboneUsageError, TunnelFailure
from agent.hbone.events import ClientEvent, StreamReset, TunnelEstablished, TunnelRefused
from agent.hbone.request import SocketAddress, connect_request_headers, parse_response_status


class HboneClientConnection(HboneConnection):
    """One pooled client connection: `open_tunnel` per TCP connection to carry, while
    `can_open_stream` holds; events from `receive_data` say how each tunnel fares."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        super().__init__(settings or HboneSettings(), client_side=True)
        self._handlers: dict[type[h2e.Event], Callable[[Any, Callable[[ClientEvent], None]], None]] = {
            h2e.DataReceived: self._on_data,
            h2e.WindowUpdated: self._on_window_updated,
            h2e.StreamEnded: self._on_stream_ended,
            h2e.StreamReset: self._on_stream_reset,
            h2e.ResponseReceived: self._on_response,
            h2e.TrailersReceived: self._on_trailers,
            h2e.RemoteSettingsChanged: self._on_remote_settings,
            h2e.PingAckReceived: self._on_ping_ack,
            h2e.ConnectionTerminated: self._on_h2_connection_terminated,
            h2e.InformationalResponseReceived: self._ignore,
            h2e.PingReceived: self._ignore,
            h2e.SettingsAcknowledged: self._ignore,
            h2e.PriorityUpdated: self._ignore,
            h2e.AlternativeServiceAvailable: self._ignore,
            h2e.UnknownFrameReceived: self._ignore,
            # Impossible on a client with push disabled; h2 rejects them before they get here.
            h2e.RequestReceived: self._ignore,
            h2e.PushedStreamReceived: self._ignore,
        }

    @property
    def can_open_stream(self) -> bool:
        """Whether `open_tunnel` may be called: the connection is up, the peer is not going away,
        fewer tunnels are open than both sides' stream limits, and stream ids remain."""
        h2 = self._h2
        limit = min(self._settings.max_concurrent_streams, h2.remote_settings.max_concurrent_streams)
        return (
            not self._closed
            and not self._peer_going_away
            and len(self._streams) < limit
            and h2.highest_outbound_stream_id + 2 <= H2Connection.HIGHEST_ALLOWED_STREAM_ID
        )

    def open_tunnel(self, target: SocketAddress, forwarded_for: SocketAddress) -> int:
        """Sends the CONNECT for `target` on behalf of client `forwarded_for`; returns the stream id.
        The answer comes as `TunnelEstablished` or `TunnelRefused` (or `StreamReset`)."""
        if not self.can_open_stream:
            raise HboneUsageError("open_tunnel on a connection that cannot take another stream")
        stream_id = self._h2.get_next_available_stream_id()
        self._send_headers(stream_id, connect_request_headers(target, forwarded_for))
        self._track_stream(stream_id)
        return stream_id

    def receive_data(self, data: bytes | memoryview) -> list[ClientEvent]:
        """Takes bytes read from the transport; returns what they mean. Never raises on a peer's
        bytes: a protocol violation is a `ConnectionFailed` event."""
        events: list[ClientEvent] = []
        self._receive(data, events.append)
        return events

    def _on_response(self, event: h2e.ResponseReceived, emit: Callable[[ClientEvent], None]) -> None:
        stream_id = event.stream_id
        if stream_id not in self._streams:
            return
        status = parse_response_status(event.headers)
        if status is None:
            self._reset_for_violation(stream_id, emit)
        elif 200 <= status < 300:
            emit(TunnelEstablished(stream_id, status))
        else:
            # The tunnel will never carry bytes; the server normally closed its side already.
            if self._h2_stream_open(stream_id):
                self._h2.reset_stream(stream_id, ErrorCode.CANCEL)
            self._forget(stream_id)
            emit(TunnelRefused(stream_id, status, TunnelFailure.from_status(status)))

    def _on_peer_goaway(self, last_stream_id: int, error_code: ErrorCode, emit: Emit) -> None:
        super()._on_peer_goaway(last_stream_id, error_code, emit)
        for stream_id in [s for s in self._streams if s > last_stream_id]:
            # The server never processed these (RFC 9113 6.8): safe to retry elsewhere.
            self.reset_stream(stream_id, ErrorCode.CANCEL)
            emit(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, by_peer=True))
