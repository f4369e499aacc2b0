"""The byte pump: joins two connection ends and moves bytes between them with backpressure.

Every path of the data plane (outbound tunnel, inbound delivery, passthrough, plaintext inbound)
is "two ends joined by a `Relay`". An end is anything that can send bytes, send EOF, pause and
resume receiving and be aborted (`RelayEnd`): a plain TCP connection (`TcpEnd`, here) or one HBONE
stream inside a pooled HTTP/2 connection. The relay itself only forwards and counts:

- data from one end is sent to the other; when the other end's send buffer fills, the first end
  stops receiving until it drains (no unbounded buffering, whatever the speeds of the two sides);
- EOF from one end half-closes the other (TCP FIN <-> HBONE END_STREAM), so a client can shut down
  writing and still read the reply;
- the relay finishes when both directions have ended, or at once when either end fails, aborting
  the other (a reset on one side becomes a reset on the other).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from agent.observability.metrics import TrackedConnection
from agent.proxy.sockets import reset_on_close


class RelayEnd(Protocol):
    """One end of a relay, seen from the relay."""

    def send(self, data: bytes) -> None:
        """Queue `data` towards this end's peer."""

    def send_eof(self) -> None:
        """Half-close: no more data towards this end's peer."""

    def pause_receiving(self) -> None:
        """Stop delivering received data to the relay until `resume_receiving`."""

    def resume_receiving(self) -> None:
        """Deliver received data again."""

    def abort(self) -> None:
        """Tear this end down at once (TCP RST / HTTP/2 RST_STREAM)."""


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """How a relay ended."""

    error: str = ""
    """Why it ended abnormally (an end failed or reset); empty for a clean close of both directions."""


class Relay:
    """Joins a downstream end (the client side) and an upstream end (the server side).

    Bytes are counted into every one of `counters`: a connection the agent both sends and receives
    (a same-node tunnel) is reported by the source's and by the destination's side at once.
    """

    def __init__(self, on_done: Callable[[RelayOutcome], None], *counters: TrackedConnection) -> None:
        self._on_done = on_done
        self.counters = counters
        self._downstream: RelayEnd | None = None
        self._upstream: RelayEnd | None = None
        self._eof_from_downstream = False
        self._eof_from_upstream = False
        self.finished = False

    def join(self, downstream: RelayEnd, upstream: RelayEnd) -> None:
        """Starts moving bytes; both ends must already report to this relay."""
        self._downstream, self._upstream = downstream, upstream
        downstream.resume_receiving()
        upstream.resume_receiving()

    def count_sent_before_join(self, size: int) -> None:
        """Counts bytes the client's end handed on before the relay joined (a client's first bytes
        that left with the CONNECT)."""
        for counters in self.counters:
            counters.sent += size

    # Callbacks from the ends. `from_downstream` tells which end is calling.

    def received(self, data: bytes, *, from_downstream: bool) -> None:
        if self.finished:
            return
        if from_downstream:
            assert self._upstream is not None
            self._upstream.send(data)
            for counters in self.counters:
                counters.sent += len(data)
        else:
            assert self._downstream is not None
            self._downstream.send(data)
            for counters in self.counters:
                counters.received += len(data)

    def eof(self, *, from_downstream: bool) -> None:
        if self.finished:
            return
        if from_downstream:
            self._eof_from_downstream = True
            assert self._upstream is not None
            self._upstream.send_eof()
        else:
            self._eof_from_upstream = True
            assert self._downstream is not None
            self._downstream.send_eof()

    def congested(self, *, downstream: bool) -> None:
        """The named end cannot take more data now: stop reading from the other end."""
        other = self._upstream if downstream else self._downstream
        if other is not None and not self.finished:
            other.pause_receiving()

    def drained(self, *, downstream: bool) -> None:
        """The named end can take data again."""
        other = self._upstream if downstream else self._downstream
        if other is not None and not self.finished:
            other.resume_receiving()

    def closed(self, *, downstream: bool, error: str = "") -> None:
        """The named end is gone; clean if both directions had ended, else abort the other end."""
        if self.finished:
            return
        both_ended = self._eof_from_downstream and self._eof_from_upstream
        if not error and not both_ended:
            error = f"{'client' if downstream else 'server'} side closed before the other side finished"
        self.finished = True
        if error:
            other = self._upstream if downstream else self._downstream
            if other is not None:
                other.abort()
        self._on_done(RelayOutcome(error))

    def fail(self, error: str) -> None:
        """Ends the relay from outside (policy change, drain deadline): aborts both ends."""
        if self.finished:
            return
        self.finished = True
        for end in (self._downstream, self._upstream):
            if end is not None:
                end.abort()
        self._on_done(RelayOutcome(error))


class TcpEnd(asyncio.Protocol):
    """A plain TCP connection as a relay end.

    Data that arrives before the relay joins (a captured client talking before its tunnel is
    up) is held, and reading is paused; CPython < 3.12 and uvloop ignore `pause_reading()` called
    inside `connection_made()`, so the pause is re-applied whenever early data arrives.
    """

    def __init__(self, *, downstream: bool) -> None:
        self.downstream = downstream
        self.relay: Relay | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        """Resolves when the connection is up (fails if it never comes up)."""
        self.lost: asyncio.Future[str] = loop.create_future()
        """Resolves with the error text ("" when clean) once the connection is gone."""
        self._held = bytearray()
        self._receiving = False
        self._read_eof = False
        self._read_eof_forwarded = False
        self._write_eof = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.pause_reading()
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._receiving and self.relay is not None:
            self.relay.received(data, from_downstream=self.downstream)
            return
        self._held += data
        assert self.transport is not None
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._read_eof = True
        if self._receiving and self.relay is not None:
            self._forward_eof()
        return True  # keep the write side open: a half-closed client still reads the reply

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.congested(downstream=self.downstream)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.drained(downstream=self.downstream)

    def connection_lost(self, exc: Exception | None) -> None:
        error = str(exc) or type(exc).__name__ if exc else ""
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("connection closed"))
        if not self.lost.done():
            self.lost.set_result(error)
        if self.relay is not None:
            self.relay.closed(downstream=self.downstream, error=error)

    # RelayEnd

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_eof(self) -> None:
        self._write_eof = True
        if self.transport is None or self.transport.is_closing():
            return
        if self._read_eof_forwarded:
            self.transport.close()  # both directions done; close() still flushes what is queued
        else:
            self.transport.write_eof()

    def pause_receiving(self) -> None:
        self._receiving = False
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_receiving(self) -> None:
        if self.transport is None or self.transport.is_closing() or self.relay is None:
            return
        self._receiving = True
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            self.relay.received(held, from_downstream=self.downstream)
        if self._read_eof:
            if not self._read_eof_forwarded:
                self._forward_eof()
            return
        if self._receiving:
            self.transport.resume_reading()

    def take_held(self, limit: int) -> bytes:
        """Hands over the bytes received before the relay joined, if there are at most `limit` of
        them (else none: they stay held, for the relay)."""
        if len(self._held) > limit:
            return b""
        held, self._held = bytes(self._held), bytearray()
        return held

    def abort(self) -> None:
        """Closes with a TCP RST so the peer sees a reset, not a clean end of stream."""
        if self.transport is None or self.lost.done():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            reset_on_close(sock)
        self.transport.abort()

    def _forward_eof(self) -> None:
        assert self.relay is not None
        assert self.transport is not None
        self._read_eof_forwarded = True
        self.relay.eof(from_downstream=self.downstream)
        if self._write_eof and not self.transport.is_closing():
            self.transport.close()


async def connect_tcp_end(sock: socket.socket, destination: tuple[str, int], timeout_s: float) -> TcpEnd:
    """Connects a prepared (marked, maybe transparently bound) socket and wraps it as an upstream
    end; TimeoutError if the handshake takes more than `timeout_s`."""
    try:
        await connect_socket(sock, destination, timeout_s)
    except BaseException:
        sock.close()
        raise
    return await tcp_end_of(sock)


async def tcp_end_of(sock: socket.socket) -> TcpEnd:
    """Wraps a connected socket as an upstream end (closing the socket if that fails)."""
    loop = asyncio.get_running_loop()
    try:
        _, end = await loop.create_connection(lambda: TcpEnd(downstream=False), sock=sock)
    except BaseException:
        sock.close()
        raise
    return end


async def connect_socket(sock: socket.socket, destination: tuple[str, int], timeout_s: float) -> None:
    """Connects a non-blocking socket; raises the connect's OSError (ConnectionRefusedError, ...),
    or TimeoutError if the handshake takes more than `timeout_s`.

    A pod on this node answers within the `connect()` call itself (the handshake runs in the
    kernel before the call returns EINPROGRESS), so the socket is checked before anything waits on
    the loop: the loop's `sock_connect` costs a poll registration and two loop iterations (~200 us
    with uvloop here) even then, and a timeout context its own timer.
    """
    error = sock.connect_ex(destination)
    if error == errno.EINPROGRESS:
        if _established(sock):
            return
        # Not connected: refused already (the pod's RST came within the call), or on its way.
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            await _writable(sock, timeout_s)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _writable(sock: socket.socket, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _resolve, writable)
    try:
        async with asyncio.timeout(timeout_s):
            await writable
    finally:
        loop.remove_writer(fd)


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the handshake is still on its way
        return False
    return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def accept_tcp_end(sock: socket.socket) -> TcpEnd:
    """Wraps an accepted client socket as a downstream end (holding its data until a relay joins)."""
    loop = asyncio.get_running_loop()
    try:
        _, end = await loop.connect_accepted_socket(lambda: TcpEnd(downstream=True), sock)
    except BaseException:
        sock.close()
        raise
    return end
