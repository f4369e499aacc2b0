"""The relay moves bytes both ways with half-close, resets and backpressure, over real loopback TCP."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from agent.observability.metrics import AgentMetrics, PeerLabels, TcpLabels
from agent.proxy.relay import Relay, RelayOutcome, TcpEnd, connect_tcp_end
from tests.unit.proxy.mesh import Firehose

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RelayedPath:
    port: int
    outcomes: list[RelayOutcome]
    relays: list[Relay]


@asynccontextmanager
async def relayed(server_handler: Handler) -> AsyncIterator[RelayedPath]:
    """client -> relay listener -> TcpEnd pair -> server; yields the listener's port."""
    server = await asyncio.start_server(server_handler, "127.0.0.1", 0)
    server_port = server.sockets[0].getsockname()[1]
    path = RelayedPath(0, [], [])
    loop = asyncio.get_running_loop()
    metrics = AgentMetrics()

    async def splice(downstream: TcpEnd) -> None:
        await downstream.connected
        upstream = await connect_tcp_end(socket.socket(), ("127.0.0.1", server_port), 5)
        counters = metrics.tcp.opened(TcpLabels("source", PeerLabels(), PeerLabels()))
        relay = Relay(path.outcomes.append, counters)
        downstream.relay = upstream.relay = relay
        path.relays.append(relay)
        relay.join(downstream, upstream)

    tasks: set[asyncio.Task[None]] = set()

    def accept() -> TcpEnd:
        end = TcpEnd(downstream=True)
        task = loop.create_task(splice(end))
        tasks.add(task)
        return end

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    path.port = listener.sockets[0].getsockname()[1]
    try:
        yield path
    finally:
        listener.close()
        server.close()
        for task in tasks:
            task.cancel()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write(b"bye")
    writer.write_eof()
    await writer.drain()
    writer.close()


async def test_bytes_flow_both_ways_and_half_close_keeps_the_reply() -> None:
    async with relayed(echo) as path:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.port)
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"hellobye"
        writer.close()
        await asyncio.sleep(0.05)
    assert path.outcomes == [RelayOutcome("")]


async def test_early_client_data_is_held_until_the_relay_joins() -> None:
    async with relayed(echo) as path:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.port)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 10)
        assert reply == b"x" * 100_000 + b"bye"
        writer.close()


async def test_large_transfer_is_intact_and_counted() -> None:
    payload = bytes(range(256)) * 40_000  # ~10 MB

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(1 << 20):
            digest.update(data)
        writer.write(digest.hexdigest().encode())
        writer.close()

    async with relayed(sink) as path:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == hashlib.sha256(payload).hexdigest().encode()
        writer.close()
        await asyncio.sleep(0.05)
        assert path.relays[0].counters[0].sent == len(payload)


async def test_server_reset_becomes_a_client_reset() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async with relayed(resetter) as path:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.port)
        writer.write(b"go")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert path.outcomes
    assert path.outcomes[0].error


async def test_slow_reader_pauses_the_fast_writer() -> None:
    """A client that never reads must not make the relay buffer the server's whole output."""
    firehose = Firehose(stall_s=0.5)

    async with relayed(firehose) as path:
        _reader, writer = await asyncio.open_connection("127.0.0.1", path.port, limit=1024)
        _reader._transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.sleep(1.0)
        relay = path.relays[0]
        firehose.stop.set()
        # Kernel socket buffers hold some megabytes; without backpressure the relay would keep
        # reading and buffer without bound (hundreds of MB in a second on loopback).
        assert firehose.produced < 64 << 20
        assert relay.counters[0].received < 64 << 20
        writer.close()


def full_listener() -> tuple[socket.socket, socket.socket]:
    """A loopback listener whose accept queue is full (one queued connection, backlog 0): the
    kernel drops further SYNs, so a connect to it stays in progress. Returns it and the queued client."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    queued = socket.create_connection(listener.getsockname(), timeout=5)
    return listener, queued


async def test_connect_to_a_closed_port_is_refused() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()
    sock = socket.socket()
    sock.setblocking(False)
    with pytest.raises(ConnectionRefusedError):
        await connect_tcp_end(sock, address, 5)
    assert sock.fileno() == -1


async def test_connect_waits_for_a_handshake_still_on_its_way() -> None:
    listener, queued = full_listener()
    try:
        sock = socket.socket()
        sock.setblocking(False)
        connecting = asyncio.ensure_future(connect_tcp_end(sock, listener.getsockname(), 10))
        await asyncio.sleep(0.1)
        assert not connecting.done()
        listener.accept()[0].close()  # room in the queue: the SYN's retransmission (1 s) gets in
        upstream = await asyncio.wait_for(connecting, 10)
        assert upstream.transport is not None
        assert upstream.transport.get_extra_info("peername") == listener.getsockname()
        upstream.abort()
    finally:
        queued.close()
        listener.close()


async def test_a_connect_given_up_on_closes_its_socket() -> None:
    listener, queued = full_listener()
    try:
        sock = socket.socket()
        sock.setblocking(False)
        fd = sock.fileno()
        with pytest.raises(TimeoutError):
            await connect_tcp_end(sock, listener.getsockname(), 0.1)
        assert sock.fileno() == -1
        assert not asyncio.get_running_loop().remove_writer(fd)  # nothing is left watching it
    finally:
        queued.close()
        listener.close()


async def test_held_bytes_are_handed_over_within_a_limit_and_kept_beyond_it() -> None:
    loop = asyncio.get_running_loop()
    ends: list[TcpEnd] = []

    def accept() -> TcpEnd:
        ends.append(TcpEnd(downstream=True))
        return ends[-1]

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    try:
        for count, (limit, handed) in enumerate(((5, b"hello"), (4, b"")), 1):
            _, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
            writer.write(b"hello")
            async with asyncio.timeout(5):
                while len(ends) < count or ends[-1].transport is None:
                    await asyncio.sleep(0.001)
                transport = ends[-1].transport
                transport.resume_reading()  # asyncio's loop keeps the pause of connection_made
                while len(ends[-1]._held) < 5:
                    await asyncio.sleep(0.001)
            assert ends[-1].take_held(limit) == handed
            assert bytes(ends[-1]._held) == b"hello"[len(handed) :]
            writer.close()
    finally:
        listener.close()
