"""Transparent listener and upstream sockets on loopback (needs CAP_NET_ADMIN: root)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

import pytest

from agent.proxy.relay import connect_socket
from agent.proxy.sockets import (
    Address,
    disable_nagle,
    original_destination,
    transparent_listener,
    upstream_socket,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT and SO_MARK need root")


@pytest.mark.parametrize(
    ("sockaddr", "expected"),
    [
        (("10.0.0.1", 80), Address("10.0.0.1", 80)),
        (("::ffff:10.0.0.1", 80, 0, 0), Address("10.0.0.1", 80)),
        (("fd00::1", 443, 0, 0), Address("fd00::1", 443)),
    ],
)
def test_address_of_unmaps_v4_in_v6(sockaddr: tuple[object, ...], expected: Address) -> None:
    assert Address.of(sockaddr) == expected


def test_address_text_brackets_ipv6() -> None:
    assert str(Address("fd00::1", 15008)) == "[fd00::1]:15008"
    assert str(Address("10.0.0.1", 15008)) == "10.0.0.1:15008"
    assert Address("fd00::1", 1).family == socket.AF_INET6


@needs_root
def test_listener_reports_the_local_address_as_original_destination() -> None:
    listener = transparent_listener(Address("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        listener.setblocking(True)
        accepted, _ = listener.accept()
        assert original_destination(accepted) == Address("127.0.0.1", port)
        accepted.close()
        client.close()
    finally:
        listener.close()


@needs_root
def test_upstream_socket_carries_the_mark() -> None:
    sock = upstream_socket(Address("127.0.0.1", 9), mark=0x539)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
        assert sock.getblocking() is False
    finally:
        sock.close()


@needs_root
@pytest.mark.parametrize(("destination", "source"), [("127.0.0.1", "192.0.2.1"), ("::1", "2001:db8::1")])
def test_upstream_socket_binds_transparently_to_the_source_ip_leaving_the_port_to_connect(
    destination: str, source: str
) -> None:
    # The source is not local: only IP_TRANSPARENT lets the bind succeed. A port chosen now
    # would show in the socket's name.
    sock = upstream_socket(Address(destination, 9), mark=0x539, source=Address(source, 0))
    try:
        assert sock.getsockname()[:2] == (source, 0)
    finally:
        sock.close()


@needs_root
async def test_a_transparently_bound_upstream_socket_gets_its_port_when_it_connects() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sock = upstream_socket(Address("127.0.0.1", port), mark=0x539, source=Address("127.0.0.1", 0))
        try:
            await connect_socket(sock, ("127.0.0.1", port), timeout_s=5)
            assert sock.getsockname()[1] != 0
        finally:
            sock.close()


def test_an_address_parses_its_ip_once() -> None:
    assert Address("10.1.0.5", 80).ip_address == ipaddress.IPv4Address("10.1.0.5")
    assert Address("fd00::5", 80).ip_address == ipaddress.IPv6Address("fd00::5")
    assert Address("10.1.0.5", 81).ip_address is Address("10.1.0.5", 80).ip_address


async def test_the_loops_servers_accept_connections_without_nagle_and_sock_accept_needs_it_set() -> None:
    # The capture listeners rely on the first (no setsockopt per connection); the HBONE listener,
    # which takes its sockets with sock_accept, sets it itself (`disable_nagle`).
    loop = asyncio.get_running_loop()
    accepted: list[asyncio.BaseTransport] = []

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    server = await loop.create_server(Keep, "127.0.0.1", 0)
    with socket.create_connection(server.sockets[0].getsockname()):
        async with asyncio.timeout(5):
            while not accepted:
                await asyncio.sleep(0.001)
        sock = accepted[0].get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted[0].close()
    server.close()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    with listener, socket.create_connection(listener.getsockname()):
        raw, _ = await loop.sock_accept(listener)
        disable_nagle(raw)
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        raw.close()
