"""The server end of an HBONE connection: validates CONNECT requests, answers malformed ones with
400 itself, and lets the I/O layer accept or refuse the valid ones; drains with GOAWAY."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.events as h2e
from hyperframe.frame import GoAwayFrame

from agent.hbone.config import HboneSettings
from agent.hbone.connection import HboneConnection
from agent.hbone.errors import ErrorCode, RefusalReason
from agent.hbone.events import MalformedTunnelRequest, ServerEvent, TunnelRequested
from agent.hbone.request import MalformedRequest, parse_connect_request

_TUNNEL_ESTABLISHED = ((b":status", b"200"),)
"""The answer to an accepted CONNECT."""


class HboneServerConnection(HboneConnection):
    """One accepted HBONE connection: `TunnelRequested` events to answer with `accept` or
    `refuse`, then the tunnel's bytes both ways; `start_drain` to wind it down."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        super().__init__(settings or HboneSettings(), client_side=False)
        self._drain_last_stream_id: int | None = None
        self._handlers: dict[type[h2e.Event], Callable[[Any, Callable[[ServerEvent], None]], None]] = {
            h2e.DataReceived: self._on_data,
            h2e.WindowUpdated: self._on_window_updated,
            h2e.StreamEnded: self._on_stream_ended,
            h2e.StreamReset: self._on_stream_reset,
            h2e.RequestReceived: self._on_request,
            h2e.TrailersReceived: self._on_trailers,
            h2e.RemoteSettingsChanged: self._on_remote_settings,
            h2e.PingAckReceived: self._on_ping_ack,
            h2e.ConnectionTerminated: self._on_h2_connection_terminated,
            h2e.PingReceived: self._ignore,
            h2e.SettingsAcknowledged: self._ignore,
            h2e.PriorityUpdated: self._ignore,
            h2e.AlternativeServiceAvailable: self._ignore,
            h2e.UnknownFrameReceived: self._ignore,
            # Impossible on a server; h2 rejects them before they get here.
            h2e.ResponseReceived: self._ignore,
            h2e.InformationalResponseReceived: self._ignore,
            h2e.PushedStreamReceived: self._ignore,
        }

    @property
    def draining(self) -> bool:
        """`start_drain` was called: new tunnels are refused, open ones go on."""
        return self._drain_last_stream_id is not None

    def receive_data(self, data: bytes | memoryview) -> list[ServerEvent]:
        """Takes bytes read from the transport; returns what they mean. Never raises on a peer's
        bytes: a malformed request is answered with 400 and reported as `MalformedTunnelRequest`,
        a protocol violation is a `ConnectionFailed` event."""
        events: list[ServerEvent] = []
        self._receive(data, events.append)
        return events

    def accept(self, stream_id: int) -> bool:
        """Answers a `TunnelRequested` with 200 (authorization passed and the upstream connection
        exists); False if the stream is gone (the client reset it meanwhile: close the upstream)."""
        if stream_id not in self._streams:
            return False
        self._send_headers(stream_id, _TUNNEL_ESTABLISHED)
        return True

    def refuse(self, stream_id: int, reason: RefusalReason) -> None:
        """Answers a `TunnelRequested` with the status of `reason` and finishes the stream.
        No-op if the stream is gone."""
        if stream_id in self._streams:
            self._answer_refusal(stream_id, reason)
            self._forget(stream_id)

    def start_drain(self) -> None:
        """Graceful shutdown: GOAWAY naming the last stream this side will serve; tunnels opened
        after it are reset with REFUSED_STREAM (clients retry them elsewhere), open ones go on.
        Close the transport once `open_stream_count` is 0 (or at the drain deadline, `close`)."""
        if self._closed or self.draining:
            return
        last_stream_id = self._h2.highest_inbound_stream_id
        self._drain_last_stream_id = last_stream_id
        goaway = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=ErrorCode.NO_ERROR)
        # h2 must not see this GOAWAY (it would stop all streams): send it past h2, after its queue.
        self._send_past_h2(goaway.serialize())

    def close(self, error_code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Closes the connection now (GOAWAY); after `start_drain`, the GOAWAY names the same last
        stream, since a later GOAWAY must not raise it (RFC 9113 6.8)."""
        if self._drain_last_stream_id is None or self._closed:
            super().close(error_code)
            return
        self._closed = True
        self._h2.close_connection(error_code, last_stream_id=self._drain_last_stream_id)

    def _on_request(self, event: h2e.RequestReceived, emit: Callable[[ServerEvent], None]) -> None:
        stream_id = event.stream_id
        if self._drain_last_stream_id is not None and stream_id > self._drain_last_stream_id:
            if self._h2_stream_open(stream_id):
                self._h2.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        request = parse_connect_request(event.headers)
        if isinstance(request, MalformedRequest):
            self._answer_refusal(stream_id, RefusalReason.MALFORMED_REQUEST)
            emit(MalformedTunnelRequest(stream_id, request.problem))
            return
        self._track_stream(stream_id)
        emit(TunnelRequested(stream_id, request.target, request.forwarded_for))

    def _answer_refusal(self, stream_id: int, reason: RefusalReason) -> None:
        if not self._h2_stream_open(stream_id):
            return  # the client reset it, in the batch of frames being handled
        self._h2.send_headers(stream_id, [(b":status", str(reason.status).encode())], end_stream=True)
        if self._h2_stream_open(stream_id):
            # The client may still be sending: ask it to stop, without error (RFC 9113 8.1).
            self._h2.reset_stream(stream_id, ErrorCode.NO_ERROR)
