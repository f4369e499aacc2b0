"""Transparent sockets: the kernel side of capture (listeners) and of delivery (upstream sockets).

Under TPROXY the listener is `IP_TRANSPARENT`, and the captured connection's original destination
is the accepted socket's own local address (`getsockname()`), not `SO_ORIGINAL_DST`. Upstream
sockets carry the agent's `SO_MARK` so the node's capture rules never take them again, and delivery
to a local pod binds `IP_TRANSPARENT` to the client's IP so the application sees its real peer.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import struct
from dataclasses import dataclass

IP_TRANSPARENT = 19
"""`IP_TRANSPARENT` from linux/in.h (Python's socket module does not always export it)."""

IPV6_TRANSPARENT = 75
"""`IPV6_TRANSPARENT` from linux/in6.h."""

IP_BIND_ADDRESS_NO_PORT = 24
"""`IP_BIND_ADDRESS_NO_PORT` from linux/in.h (IPv4 and IPv6 sockets alike): a bind to port 0 leaves
the port to `connect()`, which picks one unique for the whole 4-tuple."""

_LINGER_RESET = struct.pack("ii", 1, 0)

LISTEN_BACKLOG = 4096
"""Connections a capture listener queues before the agent accepts them."""


class SocketSetupError(OSError):
    """A socket option or bind the data plane needs was refused (usually: missing CAP_NET_ADMIN)."""


@dataclass(frozen=True, slots=True)
class Address:
    """An IP and port, as the data plane passes them around."""

    ip: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    @property
    def ip_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """`ip` parsed (remembered: a node's connections name the same few pod IPs over and over,
        and `ipaddress` parses in Python, ~5-10 us per address)."""
        return _parse_ip(self.ip)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @classmethod
    def of(cls, sockaddr: tuple[object, ...]) -> Address:
        """From a socket address tuple (`getsockname()` / `getpeername()`); unmaps v4-in-v6."""
        port = sockaddr[1]
        assert isinstance(port, int)
        if len(sockaddr) == 2:  # AF_INET: the kernel's dotted quad is already canonical
            return cls(str(sockaddr[0]), port)
        ip = ipaddress.ip_address(str(sockaddr[0]))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(str(ip), port)


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def _set_transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError as error:
        raise SocketSetupError(f"cannot set IP_TRANSPARENT (needs CAP_NET_ADMIN): {error}") from error


def transparent_listener(bind: Address, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A non-blocking listening socket that accepts TPROXY-redirected connections.

    `SO_REUSEPORT` lets a restarting agent bind its listeners before the old one closes its own, so
    a restart refuses no captured connection.
    """
    sock = socket.socket(bind.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _set_transparent(sock, bind.family)
        sock.bind((bind.ip, bind.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if isinstance(error, SocketSetupError):
            raise
        raise SocketSetupError(f"cannot listen on {bind}: {error}") from error
    return sock


def upstream_socket(destination: Address, *, mark: int, source: Address | None = None) -> socket.socket:
    """A non-blocking, unconnected socket marked `mark`, optionally bound transparently to `source`.

    Binding to `source` (the original client's IP, port 0) needs `IP_TRANSPARENT`; the reply
    packets come back to this node because the destination routes to the client's IP through it.
    The port is left to the connect: a port chosen at bind time must be free for every destination,
    so a client IP with many connections (or many in TIME_WAIT) would run out of them.
    """
    sock = socket.socket(destination.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            _set_transparent(sock, destination.family)
            # Kernels before 4.2 lack the option; the bind then picks the port, as it used to.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source.ip, 0))
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if isinstance(error, SocketSetupError):
            raise
        raise SocketSetupError(f"cannot prepare an upstream socket to {destination}: {error}") from error
    return sock


def disable_nagle(sock: socket.socket) -> None:
    """Sets `TCP_NODELAY` on a socket from `sock_accept`: a relay writes what it has at once, and
    small writes must not wait for the peer's delayed ACK (~40 ms). uvloop sets it on the sockets it
    wraps, and both loops on those their servers accept; asyncio's own loop does not on a socket
    handed to `connect_accepted_socket`."""
    # The client may have reset the connection already; serving it will notice.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def original_destination(sock: socket.socket) -> Address:
    """Where a TPROXY-captured connection was going: the accepted socket's local address."""
    return Address.of(sock.getsockname())


def reset_on_close(sock: socket.socket) -> None:
    """Makes closing `sock` send a TCP RST, so the peer sees a reset rather than a clean end of stream.

    A refused or failed connection must reach the client as a reset: a clean FIN would read as
    "the server answered nothing", and a client must not mistake a refusal for an empty reply.
    """
    # The peer may have gone already, making the option fail; closing still releases the socket.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def reset(sock: socket.socket) -> None:
    """Closes a socket no transport owns yet with a TCP RST."""
    reset_on_close(sock)
    sock.close()
