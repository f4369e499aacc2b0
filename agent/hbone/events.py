"""The events an HBONE connection turns received bytes into, one type per thing that happened.

The I/O layer dispatches on them exhaustively (`match` over `ClientEvent` / `ServerEvent` with
`assert_never`), so a new kind of event is a type error at every place that must handle it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.hbone.errors import ErrorCode, TunnelFailure
from agent.hbone.request import SocketAddress


@dataclass(frozen=True, slots=True)
class TunnelEstablished:
    """Client side: the server answered the CONNECT with 2xx; bytes may now flow both ways."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """Client side: the server answered the CONNECT with a non-2xx status. The stream is finished
    (already reset if the server left it open); deliver the failure to the client connection."""

    stream_id: int
    status: int
    failure: TunnelFailure


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: a valid CONNECT arrived. Answer it with `accept` (after authorization and the
    upstream connect succeeded) or `refuse`. DATA may follow before the answer: hold it,
    unacknowledged, until the upstream connection exists."""

    stream_id: int
    target: SocketAddress
    forwarded_for: SocketAddress | None


@dataclass(frozen=True, slots=True)
class MalformedTunnelRequest:
    """Server side: an invalid request, already answered with 400; reported for logs and metrics."""

    stream_id: int
    problem: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes from the peer, in order; one DATA frame's payload may come in several of these,
    as its bytes arrive. Call `acknowledge_received_data(stream_id, flow_controlled_length)` once
    they are consumed (written on), or the peer stops sending."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class PeerHalfClosed:
    """The peer ended its direction of the tunnel (END_STREAM): shut down writing on the TCP side."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The tunnel is gone: reset by the peer (`by_peer`), or by this side for a protocol violation
    on the stream or refused after a GOAWAY (REFUSED_STREAM: never processed, safe to retry).
    Deliver a TCP reset; the stream's unacknowledged bytes were released."""

    stream_id: int
    error_code: ErrorCode
    by_peer: bool


@dataclass(frozen=True, slots=True)
class OutboundBufferDrained:
    """Bytes this stream held back for lack of peer window have all been handed to h2: resume
    reading the TCP side that feeds it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The peer answered a keepalive `ping` carrying `payload`."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosing:
    """The peer sent GOAWAY: no new tunnels on this connection. Tunnels up to `last_stream_id`
    go on; a client's tunnels above it got a StreamReset(REFUSED_STREAM) event."""

    last_stream_id: int
    error_code: ErrorCode


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke HTTP/2 (garbage, a flow-control or framing violation). A GOAWAY is queued:
    send `data_to_send()`, then close the transport and reset every tunnel on it."""

    error_code: ErrorCode
    detail: str


ConnectionEvent = (
    PeerHalfClosed
    | StreamReset
    | OutboundBufferDrained
    | PingAcknowledged
    | ConnectionClosing
    | ConnectionFailed
)
"""What either end of an HBONE connection can report besides tunnel openings and data."""

ClientEvent = TunnelEstablished | TunnelRefused | DataReceived | ConnectionEvent
"""Everything `HboneClientConnection.receive_data` can report."""

ServerEvent = TunnelRequested | MalformedTunnelRequest | DataReceived | ConnectionEvent
"""Everything `HboneServerConnection.receive_data` can report."""
