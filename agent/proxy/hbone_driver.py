"""The asyncio driver of HBONE connections: agent.hbone's sans-IO connections over a TLS transport.

One module for both sides. `HboneDriver` is the asyncio Protocol of one mutual-TLS connection: it
checks the handshake (ALPN `h2`, the peer's SPIFFE identity) before any HTTP/2 byte leaves, feeds
received bytes to the HBONE connection, writes what it has to send, dispatches every event
exhaustively (a tracked stream takes its bytes itself, as they are parsed: `deliver_to`), keeps the
connection alive with PINGs, and fails every tunnel when the connection is lost. It is a
BufferedProtocol: TLS decrypts straight into one read buffer that every connection shares (the
HBONE connection copies whatever it keeps, and events are handled before the next read), instead of
a new bytes object per TLS record.

`HboneStreamEnd` is one CONNECT stream as a `RelayEnd`, so a `Relay` joins it to a `TcpEnd`:

- received bytes are acknowledged (handed back to the peer's window) only once they are handed on,
  and are held, unacknowledged, while the relay does not want them (before the tunnel is joined, or
  while the TCP side is congested), so a slow consumer slows the remote sender; the bytes a CONNECT
  brought can be handed straight to the destination's socket before the relay joins (`send_held_to`);
- bytes h2 holds back for lack of peer window, or a TLS transport above its high-water mark, make
  the stream report itself congested, which pauses the TCP side feeding it;
- END_STREAM is TCP half-close, RST_STREAM is a TCP reset, both ways.

`HboneServerDriver` reports each CONNECT to a callback and lets it `accept` or `refuse`;
`HboneClientDriver` opens tunnels whose answer (`TunnelAnswer`) arrives on the stream's `answer`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never, cast

from agent.hbone import (
    ConnectionClosing,
    ConnectionEvent,
    ConnectionFailed,
    DataReceived,
    ErrorCode,
    HboneClientConnection,
    HboneConnection,
    HboneServerConnection,
    HboneSettings,
    MalformedTunnelRequest,
    OutboundBufferDrained,
    PeerHalfClosed,
    PingAcknowledged,
    RefusalReason,
    SocketAddress,
    StreamReset,
    TunnelEstablished,
    TunnelFailure,
    TunnelRefused,
    TunnelRequested,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import (
    ALPN_HBONE,
    PeerCertificateInvalid,
    PeerIdentityMismatch,
    PeerVerified,
    PeerWithoutUriSan,
    verify_peer,
)
from agent.proxy.relay import Relay
from agent.proxy.sockets import Address

log = logging.getLogger(__name__)

READ_BUFFER_SIZE = 256 * 1024
"""Bytes decrypted per read at most: what uvloop's TLS layer reads in one go."""

_read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
"""The read buffer of every HBONE connection of the process: a read is fully handled (its bytes
parsed, copied where kept, and relayed) before the event loop performs the next."""


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    """The server answered the CONNECT with 2xx: join the stream to the client's connection."""


@dataclass(frozen=True, slots=True)
class TunnelDeclined:
    """The server answered the CONNECT with an error status (policy, no workload, upstream down)."""

    status: int
    failure: TunnelFailure


@dataclass(frozen=True, slots=True)
class TunnelBroken:
    """The stream ended before an answer: reset, or its connection was lost."""

    reason: str
    retryable: bool
    """The server never processed the request (REFUSED_STREAM after a GOAWAY): safe to retry on
    another connection."""


TunnelAnswer = TunnelOpened | TunnelDeclined | TunnelBroken


class HboneStreamEnd:
    """One HBONE tunnel (an HTTP/2 CONNECT stream) as one end of a relay."""

    __slots__ = (
        "_h2_blocked",
        "_held",
        "_peer_end_forwarded",
        "_peer_ended",
        "_receiving",
        "_reported_congested",
        "_sent_end",
        "answer",
        "downstream",
        "driver",
        "gone",
        "relay",
        "stream_id",
    )

    def __init__(
        self,
        driver: HboneDriver,
        stream_id: int,
        *,
        downstream: bool,
        answer: asyncio.Future[TunnelAnswer] | None = None,
    ) -> None:
        self.driver = driver
        self.stream_id = stream_id
        self.downstream = downstream
        """True on the server (the tunnel brings the client), False on the client (it leads to the server)."""
        self.answer = answer
        """Client side: resolves with the CONNECT's answer."""
        self.relay: Relay | None = None
        self.gone = False
        """The stream ended (both ways, reset, refused, or its connection was lost)."""
        self._receiving = False
        self._held: list[tuple[bytes, int]] = []
        """Received bytes not handed on yet, with their flow-controlled lengths (unacknowledged)."""
        self._peer_ended = False
        self._peer_end_forwarded = False
        self._sent_end = False
        self._h2_blocked = False
        self._reported_congested = False

    def send_held_to(self, sock: socket.socket) -> int:
        """Sends the bytes received before the relay joined (a client's first bytes, which come with
        its CONNECT) straight to `sock`, a connected non-blocking socket no transport owns yet, as far
        as it takes them at once; returns how many it took. What it does not take stays held, for the
        relay; a send that fails is left for the relay's end to find out."""
        held = self._held
        connection = self.driver.connection
        sent_total = 0
        while held:
            data, length = held[0]
            try:
                sent = sock.send(data)
            except OSError:
                break
            sent_total += sent
            if sent < len(data):
                held[0] = (data[sent:], length)  # its window is given back once it is all handed on
                break
            held.pop(0)
            connection.acknowledge_received_data(self.stream_id, length)
        return sent_total

    # RelayEnd

    def send(self, data: bytes) -> None:
        if self.gone or self.driver.write_data_frame_now(self.stream_id, data):
            return
        held_back = self.driver.connection.send_data(self.stream_id, data)
        self.driver.flush()
        if held_back and not self._h2_blocked:
            self._h2_blocked = True
            self.update_congestion()

    def send_eof(self) -> None:
        if self.gone or self._sent_end:
            return
        self._sent_end = True
        self.driver.connection.end_stream(self.stream_id)
        self.driver.flush()
        self._finish_if_done()

    def pause_receiving(self) -> None:
        self._receiving = False

    def resume_receiving(self) -> None:
        if self.gone or self.relay is None:
            return
        self._receiving = True
        connection = self.driver.connection
        while self._held and self._receiving:
            data, length = self._held.pop(0)
            self.relay.received(data, from_downstream=self.downstream)
            connection.acknowledge_received_data(self.stream_id, length)
        if self._receiving and self._peer_ended and not self._peer_end_forwarded:
            self._forward_peer_end()
        self.driver.flush()

    def abort(self) -> None:
        """Resets the tunnel (RST_STREAM CONNECT_ERROR: the remote side delivers a TCP reset)."""
        if self.gone:
            return
        self.gone = True
        self.driver.connection.reset_stream(self.stream_id, ErrorCode.CONNECT_ERROR)
        self.driver.forget(self)
        self.driver.flush()

    # From the connection (bytes, see `HboneDriver._track`) and the driver (events).

    def data_received(self, data: bytes, flow_controlled_length: int) -> None:
        if self._receiving and self.relay is not None:
            self.relay.received(data, from_downstream=self.downstream)
            self.driver.connection.acknowledge_received_data(self.stream_id, flow_controlled_length)
        else:
            self._held.append((data, flow_controlled_length))

    def peer_ended(self) -> None:
        self._peer_ended = True
        if self._receiving and not self._held and self.relay is not None:
            self._forward_peer_end()

    def outbound_drained(self) -> None:
        self._h2_blocked = False
        self.update_congestion()
        self._finish_if_done()

    def update_congestion(self) -> None:
        """Tells the relay when this end starts or stops refusing more data."""
        congested = self._h2_blocked or self.driver.write_paused
        if congested == self._reported_congested or self.relay is None:
            return
        self._reported_congested = congested
        if congested:
            self.relay.congested(downstream=self.downstream)
        else:
            self.relay.drained(downstream=self.downstream)

    def answered(self, answer: TunnelAnswer) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(answer)

    def ended(self, error: str, *, retryable: bool = False) -> None:
        """The stream is gone abnormally (reset either way, or its connection was lost)."""
        if self.gone:
            return
        self.gone = True
        self._held.clear()
        self.driver.forget(self)
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(TunnelBroken(error, retryable))
        elif self.relay is not None:
            self.relay.closed(downstream=self.downstream, error=error)

    def _forward_peer_end(self) -> None:
        assert self.relay is not None
        self._peer_end_forwarded = True
        self.relay.eof(from_downstream=self.downstream)
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self.gone or not (self._peer_end_forwarded and self._sent_end) or self._h2_blocked:
            return
        self.gone = True
        self.driver.forget(self)
        if self.relay is not None:
            self.relay.closed(downstream=self.downstream)


class HboneDriver(asyncio.BufferedProtocol, ABC):
    """One HBONE connection over a TLS transport (both sides share this part)."""

    def __init__(
        self,
        connection: HboneConnection,
        *,
        keepalive_interval_s: float,
        idle_timeout_s: float | None,
    ) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, HboneStreamEnd] = {}
        self.peer_identity: SpiffeId | None = None
        """The peer's verified identity, once the handshake is checked."""
        self.peer_address: Address | None = None
        self.rejection = ""
        """Why the handshake's outcome was refused (the connection was aborted); empty if accepted."""
        self.write_paused = False
        self.close_when_idle = False
        """Close gracefully once the last stream ends (draining, or the peer sent GOAWAY)."""
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = loop.create_future()
        """Resolves with why the connection ended ("" when closed cleanly)."""
        self._loop = loop
        self._keepalive_interval_s = keepalive_interval_s
        self._idle_timeout_s = idle_timeout_s
        self._keepalive: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._ping_outstanding = False
        self._pings_sent = 0
        self._dispatching = False
        self._abort_reason = ""

    @property
    def usable(self) -> bool:
        """The handshake was accepted and the connection is neither closing nor lost."""
        return (
            self.transport is not None
            and not self.rejection
            and not self.transport.is_closing()
            and not self.connection.closed
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_address = Address.of(peer) if peer else None
        self.rejection = self._handshake_problem(transport)
        if self.rejection:
            log.info("HBONE connection with %s refused: %s", self.peer_address, self.rejection)
            self.abort(self.rejection)
            return
        self.flush()  # the HTTP/2 preface and settings: only now that the peer is who it must be
        self._keepalive = self._loop.call_later(self._keepalive_interval_s, self._keepalive_tick)
        self._arm_idle_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.rejection or self.connection.closed:
            return
        data = _read_buffer[:nbytes]
        self._dispatching = True
        try:
            if not self.connection.receive_whole_data_frame(data):
                self._receive(data)
        finally:
            self._dispatching = False
        self.flush()

    def eof_received(self) -> bool:
        return False  # the peer closed its TLS session: close ours, which ends every stream

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.update_congestion()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.update_congestion()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._keepalive, self._idle):
            if timer is not None:
                timer.cancel()
        reason = self._abort_reason or (f"HBONE connection lost: {exc}" if exc else "")
        if not self.lost.done():
            self.lost.set_result(reason)
        for stream in list(self.streams.values()):
            stream.ended(reason or "HBONE connection closed")
        self.streams.clear()

    # Used by the streams and the owners of the connection.

    def flush(self) -> None:
        """Writes what the HBONE connection has to send; closes the transport once it closed
        (closing queues a GOAWAY: a flush with nothing to write has nothing to close either)."""
        transport = self.transport
        if self._dispatching or transport is None or self.rejection:
            return
        parts = self.connection.data_to_send_parts()
        if not parts or transport.is_closing():
            return
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)
        if self.connection.closed:
            transport.close()

    def write_data_frame_now(self, stream_id: int, data: bytes) -> bool:
        """Writes `data` at once as one DATA frame of `stream_id` when the connection can frame it
        so (`HboneConnection.data_frame_now`); False: nothing was done. Not while received bytes
        are being dispatched: what they cause goes out in one write at the end."""
        transport = self.transport
        if self._dispatching or transport is None or self.rejection or transport.is_closing():
            return False
        frame = self.connection.data_frame_now(stream_id, data)
        if frame is None:
            return False
        transport.write(frame)
        return True

    def forget(self, stream: HboneStreamEnd) -> None:
        """A stream ended; the connection may now be idle."""
        self.connection.deliver_to(stream.stream_id, None)
        if self.streams.pop(stream.stream_id, None) is not None and not self.streams:
            if self.close_when_idle:
                self.close()
            else:
                self._arm_idle_timer()

    def close(self) -> None:
        """Closes gracefully now: GOAWAY, then the TLS close (after what is queued is written)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.connection.close()
        self.flush()

    def abort(self, reason: str) -> None:
        """Drops the connection at once; its streams end with `reason`."""
        self._abort_reason = self._abort_reason or reason
        if self.transport is not None:
            self.transport.abort()

    def _track(self, stream: HboneStreamEnd) -> None:
        self.streams[stream.stream_id] = stream
        # Its bytes go straight to it as they are parsed: no event and dispatch per piece.
        self.connection.deliver_to(stream.stream_id, stream.data_received)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    # Shared event handling.

    def _on_data(self, event: DataReceived) -> None:
        # Bytes that came before the stream was tracked (a CONNECT's early bytes, in its read) or
        # after it ended here; a tracked stream takes its bytes itself (`_track`).
        stream = self.streams.get(event.stream_id)
        if stream is None:
            # The stream ended on this side meanwhile; nobody will consume these bytes.
            self.connection.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            return
        stream.data_received(event.data, event.flow_controlled_length)

    def _on_connection_event(self, event: ConnectionEvent) -> None:
        """What both sides do with an event that is neither a tunnel opening nor data."""
        match event:
            case PeerHalfClosed():
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream.peer_ended()
            case StreamReset():
                if (stream := self.streams.get(event.stream_id)) is not None:
                    who = "by the peer" if event.by_peer else "for a protocol violation"
                    stream.ended(
                        f"tunnel reset {who} ({event.error_code.name})",
                        retryable=event.error_code is ErrorCode.REFUSED_STREAM,
                    )
            case OutboundBufferDrained():
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream.outbound_drained()
            case PingAcknowledged():
                self._ping_outstanding = False
            case ConnectionClosing():
                log.debug("HBONE peer %s going away (%s)", self.peer_address, event.error_code.name)
                self.close_when_idle = True
                if not self.streams:
                    self.close()
            case ConnectionFailed():
                log.warning(
                    "HBONE peer %s broke HTTP/2 (%s): %s",
                    self.peer_address,
                    event.error_code.name,
                    event.detail,
                )
                self._abort_reason = f"HBONE peer broke HTTP/2: {event.detail}"
                # The queued GOAWAY goes out with the next flush, which then closes the transport.
            case _:
                assert_never(event)

    # Timers.

    def _keepalive_tick(self) -> None:
        if self._ping_outstanding:
            self.abort(f"HBONE keepalive PING unanswered for {self._keepalive_interval_s:g}s")
            return
        self._ping_outstanding = True
        self._pings_sent += 1
        self.connection.ping(self._pings_sent.to_bytes(8, "big"))
        self.flush()
        self._keepalive = self._loop.call_later(self._keepalive_interval_s, self._keepalive_tick)

    def _arm_idle_timer(self) -> None:
        if self._idle_timeout_s is None or self.streams or self._idle is not None or self.lost.done():
            return
        self._idle = self._loop.call_later(self._idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.streams:
            self.close()

    # Side-specific.

    def _handshake_problem(self, transport: asyncio.Transport) -> str:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return "not a TLS connection"
        # OpenSSL completes a handshake without ALPN when the peer offered nothing we accept.
        if (alpn := ssl_object.selected_alpn_protocol()) != ALPN_HBONE:
            return f"ALPN {alpn!r} negotiated, HBONE needs {ALPN_HBONE!r}"
        identity = self._identify_peer(ssl_object.getpeercert(binary_form=True))
        if isinstance(identity, str):
            return identity
        self.peer_identity = identity
        return ""

    @abstractmethod
    def _identify_peer(self, peer_der: bytes | None) -> SpiffeId | str:
        """The peer's identity if this side accepts it, else why not."""

    @abstractmethod
    def _receive(self, data: memoryview) -> None:
        """Feeds received bytes to the HBONE connection and dispatches its events."""


TunnelHandler = Callable[["HboneServerDriver", HboneStreamEnd, TunnelRequested], None]
"""Called for each valid CONNECT; answers later with `accept` or `refuse` (from a task)."""

MalformedHandler = Callable[["HboneServerDriver", MalformedTunnelRequest], None]
"""Told of each CONNECT that was answered 400 (for logs and metrics)."""


class HboneServerDriver(HboneDriver):
    """An accepted HBONE connection, served with the identity of the workload it was addressed to."""

    def __init__(
        self,
        settings: HboneSettings,
        *,
        served_identity: SpiffeId,
        trust_domain: str,
        on_tunnel: TunnelHandler,
        on_malformed: MalformedHandler,
        keepalive_interval_s: float,
    ) -> None:
        self.hbone = HboneServerConnection(settings)
        super().__init__(self.hbone, keepalive_interval_s=keepalive_interval_s, idle_timeout_s=None)
        self.served_identity = served_identity
        self._trust_domain = trust_domain
        self._on_tunnel = on_tunnel
        self._on_malformed = on_malformed

    def accept(self, stream: HboneStreamEnd) -> bool:
        """Answers the stream's CONNECT with 200; False if the client gave up on it meanwhile."""
        if stream.gone or not self.hbone.accept(stream.stream_id):
            return False
        self.flush()
        return True

    def refuse(self, stream: HboneStreamEnd, reason: RefusalReason) -> None:
        """Answers the stream's CONNECT with `reason`'s status and ends the stream."""
        if stream.gone:
            return
        stream.gone = True
        self.hbone.refuse(stream.stream_id, reason)
        self.forget(stream)
        self.flush()

    def start_drain(self) -> None:
        """GOAWAY: no new tunnels; the connection closes once its open tunnels end."""
        if not self.usable:
            return
        self.hbone.start_drain()
        self.close_when_idle = True
        self.flush()
        if not self.streams:
            self.close()

    def _identify_peer(self, peer_der: bytes | None) -> SpiffeId | str:
        # Any workload of this trust domain whose chain verified against the bundle may connect;
        # authorization decides per tunnel. With no identity expected, a well-formed leaf comes
        # back as a "mismatch" carrying the identity it names.
        match verify_peer(peer_der, ()):
            case PeerIdentityMismatch(actual=identity) | PeerVerified(spiffe_id=identity):
                if identity.trust_domain != self._trust_domain:
                    return f"client {identity} is outside trust domain {self._trust_domain}"
                return identity
            case PeerWithoutUriSan() | PeerCertificateInvalid() as problem:
                return f"client certificate refused: {problem.reason}"
            case unexpected:
                assert_never(unexpected)

    def _receive(self, data: memoryview) -> None:
        for event in self.hbone.receive_data(data):
            match event:
                case DataReceived():  # first: nearly every event is one
                    self._on_data(event)
                case TunnelRequested():
                    stream = HboneStreamEnd(self, event.stream_id, downstream=True)
                    self._track(stream)
                    self._on_tunnel(self, stream, event)
                case MalformedTunnelRequest():
                    self._on_malformed(self, event)
                case _:
                    self._on_connection_event(event)


class HboneClientDriver(HboneDriver):
    """A pooled HBONE connection to one destination identity, opening tunnels for local clients."""

    def __init__(
        self,
        settings: HboneSettings,
        *,
        expected_identity: SpiffeId,
        keepalive_interval_s: float,
        idle_timeout_s: float,
    ) -> None:
        self.hbone = HboneClientConnection(settings)
        super().__init__(self.hbone, keepalive_interval_s=keepalive_interval_s, idle_timeout_s=idle_timeout_s)
        self.expected_identity = expected_identity

    @property
    def can_open_stream(self) -> bool:
        """Another tunnel fits: usable, not winding down, below both sides' stream limits."""
        return self.usable and not self.close_when_idle and self.hbone.can_open_stream

    def open_stream(
        self, target: SocketAddress, forwarded_for: SocketAddress, early_data: bytes = b""
    ) -> HboneStreamEnd:
        """Sends a CONNECT, and `early_data` (the client's first bytes) right behind it in the same
        write; the stream's `answer` resolves with the server's answer."""
        stream_id = self.hbone.open_tunnel(target, forwarded_for)
        stream = HboneStreamEnd(self, stream_id, downstream=False, answer=self._loop.create_future())
        self._track(stream)
        if early_data:
            stream.send(early_data)  # flushes, with the CONNECT
        else:
            self.flush()
        return stream

    def _identify_peer(self, peer_der: bytes | None) -> SpiffeId | str:
        match verify_peer(peer_der, self.expected_identity):
            case PeerVerified(spiffe_id=identity):
                return identity
            case PeerIdentityMismatch() | PeerWithoutUriSan() | PeerCertificateInvalid() as problem:
                return f"server certificate refused: {problem.reason}"
            case unexpected:
                assert_never(unexpected)

    def _receive(self, data: memoryview) -> None:
        for event in self.hbone.receive_data(data):
            match event:
                case DataReceived():  # first: nearly every event is one
                    self._on_data(event)
                case TunnelEstablished():
                    if (stream := self.streams.get(event.stream_id)) is not None:
                        stream.answered(TunnelOpened())
                case TunnelRefused():
                    if (stream := self.streams.get(event.stream_id)) is not None:
                        stream.gone = True
                        self.forget(stream)
                        stream.answered(TunnelDeclined(event.status, event.failure))
                case _:
                    self._on_connection_event(event)
