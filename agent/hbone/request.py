"""The HBONE CONNECT request and response headers: building them and validating what a peer sent.

An HBONE request is a plain HTTP/2 CONNECT (RFC 9113 8.5): `:method` CONNECT and `:authority` the
target's literal `ip:port`, no `:scheme` or `:path`, plus `forwarded: for="<client ip:port>"`
(RFC 7239) naming the connection's original client. Pure functions; validation returns a value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from hpack import NeverIndexedHeaderTuple

Header = tuple[bytes, bytes]
"""One header field as h2 carries it: lowercase name and value, both bytes."""

_MAX_PORT_DIGITS = 5

_PARSED_ADDRESSES = 4096
"""Distinct address texts whose parse is remembered: a node's tunnels name the same few pod IPs
over and over, and `ipaddress` parses in Python (~10 us for an IPv4 address)."""


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """A literal IP address and TCP port: a tunnel's target or its original client."""

    ip: IPv4Address | IPv6Address
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> SocketAddress | None:
        """Reads `ipv4:port` or `[ipv6]:port` (port 1-65535); None for anything else, host names,
        IPv6 zone ids and unbracketed IPv6 included."""
        host, colon, port_text = text.rpartition(":")
        if not colon or not port_text.isascii() or not port_text.isdigit():
            return None
        port = int(port_text)
        if len(port_text) > _MAX_PORT_DIGITS or not 1 <= port <= 65535:
            return None
        ip = _parse_host(host)
        return None if ip is None else cls(ip, port)


@functools.lru_cache(maxsize=_PARSED_ADDRESSES)
def _parse_host(host: str) -> IPv4Address | IPv6Address | None:
    """The IP of an `ipv4` or `[ipv6]` host text (no zone id); None for anything else."""
    try:
        if host.startswith("[") and host.endswith("]"):
            ip = IPv6Address(host[1:-1])
            return None if ip.scope_id is not None else ip
        return IPv4Address(host)
    except ValueError:
        return None


def connect_request_headers(target: SocketAddress, forwarded_for: SocketAddress) -> list[Header]:
    """The header block of the CONNECT that opens a tunnel to `target` for client `forwarded_for`.

    `forwarded` is kept out of the HPACK dynamic tables (a literal never indexed): it names a new
    client port on every tunnel, so indexing it only filled both sides' 4 KiB tables with entries
    never used again, evicting the ones that are (`:method CONNECT`, each target's `:authority`),
    and made every encoder lookup scan the whole full table.
    """
    forwarded = format_forwarded_for(forwarded_for).encode("ascii")
    return [
        (b":method", b"CONNECT"),
        (b":authority", str(target).encode("ascii")),
        NeverIndexedHeaderTuple(b"forwarded", forwarded),
    ]


def format_forwarded_for(client: SocketAddress) -> str:
    """The `forwarded` value naming `client`: always quoted, since `:` and `[` are not token
    characters (RFC 7239 section 6), e.g. `for="192.0.2.43:4711"`, `for="[2001:db8::17]:4711"`."""
    return f'for="{client}"'


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A valid HBONE CONNECT request."""

    target: SocketAddress
    """The address the client wants a TCP connection to (`:authority`)."""

    forwarded_for: SocketAddress | None
    """The original client named by the `forwarded` header, None when the header is absent."""


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """A request the server answers with 400 and why, for the log."""

    problem: str


_PSEUDO_HEADERS_FORBIDDEN_ON_CONNECT = {
    b":path": "a plain CONNECT carries no :path (RFC 9113 8.5)",
    b":scheme": "a plain CONNECT carries no :scheme (RFC 9113 8.5)",
    b":protocol": "extended CONNECT (:protocol) is not HBONE",
    b":status": ":status is a response pseudo-header",
}

_CONNECTION_SPECIFIC_HEADERS = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te")
)
"""Header fields HTTP/2 forbids (RFC 9113 8.2.2); `te: trailers` is allowed but means nothing here."""


def parse_connect_request(headers: Iterable[Header]) -> ConnectRequest | MalformedRequest:
    """Validates a request header block as an HBONE CONNECT; never raises on a peer's input."""
    method: bytes | None = None
    authority: bytes | None = None
    forwarded: list[bytes] = []
    regular_header_seen = False
    for name, value in headers:
        if name.startswith(b":"):
            if regular_header_seen:
                return MalformedRequest(f"pseudo-header {_show(name)} after regular headers")
            if name == b":method":
                if method is not None:
                    return MalformedRequest("duplicate :method")
                method = value
            elif name == b":authority":
                if authority is not None:
                    return MalformedRequest("duplicate :authority")
                authority = value
            else:
                problem = _PSEUDO_HEADERS_FORBIDDEN_ON_CONNECT.get(
                    name, f"unknown pseudo-header {_show(name)}"
                )
                return MalformedRequest(problem)
            continue
        regular_header_seen = True
        if name != name.lower():
            return MalformedRequest(f"header name {_show(name)} is not lowercase")
        if name in _CONNECTION_SPECIFIC_HEADERS:
            return MalformedRequest(f"connection-specific header {_show(name)}")
        if name == b"forwarded":
            forwarded.append(value)
    if method is None:
        return MalformedRequest("missing :method")
    if method != b"CONNECT":
        return MalformedRequest(f"method {_show(method)} is not CONNECT")
    if authority is None:
        return MalformedRequest("missing :authority")
    target = SocketAddress.parse(authority.decode("latin-1"))
    if target is None:
        return MalformedRequest(f":authority {_show(authority)} is not a literal ip:port with port 1-65535")
    if not forwarded:
        return ConnectRequest(target, None)
    forwarded_value = b", ".join(forwarded)
    forwarded_for = parse_forwarded_for(forwarded_value.decode("latin-1"))
    if forwarded_for is None:
        return MalformedRequest(f"forwarded {_show(forwarded_value)} does not name a client ip:port")
    return ConnectRequest(target, forwarded_for)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED_STRING = r'"(?:[^"\\]|\\.)*"'
_FORWARDED_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED_STRING})[ \t]*(;|,|\Z)")
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_forwarded_for(value: str) -> SocketAddress | None:
    """The `for` node of the first element of a `forwarded` value (the hop nearest the original
    client, RFC 7239 section 4), which HBONE requires to be `ip:port`; None if the value is not
    well formed, has no `for`, repeats a parameter, or its `for` is not an ip:port."""
    if value.startswith('for="') and value.endswith('"') and value.count('"') == 2 and "\\" not in value:
        # What HBONE clients send (`format_forwarded_for`): one quoted node without quoted pairs,
        # read as the general grammar reads it, without a regular expression per CONNECT.
        return SocketAddress.parse(value[5:-1])
    return _parse_forwarded_pairs(value)


def _parse_forwarded_pairs(value: str) -> SocketAddress | None:
    """`parse_forwarded_for` by RFC 7239's grammar, for any value."""
    seen: set[str] = set()
    node: str | None = None
    position = 0
    while True:
        pair = _FORWARDED_PAIR.match(value, position)
        if pair is None:
            return None
        name, raw, separator = pair.group(1).lower(), pair.group(2), pair.group(3)
        if name in seen:
            return None
        seen.add(name)
        if name == "for":
            node = _unquoted(raw) if raw.startswith('"') else raw
        if separator != ";":
            break
        position = pair.end()
    return None if node is None else SocketAddress.parse(node)


def _unquoted(quoted: str) -> str:
    """The text of an RFC 7230 quoted-string (quoted pairs resolved)."""
    inner = quoted[1:-1]
    # Nearly every value has no quoted pair: no substitution then (a regex call per CONNECT).
    return _QUOTED_PAIR.sub(r"\1", inner) if "\\" in inner else inner


def parse_response_status(headers: Iterable[Header]) -> int | None:
    """The `:status` of a response header block, None when it is missing, repeated or not 3 digits."""
    status: int | None = None
    for name, value in headers:
        if name == b":status":
            if status is not None or len(value) != 3 or not value.isdigit():
                return None
            status = int(value)
    return status


def _show(raw: bytes) -> str:
    """A peer's header bytes, printable and bounded, for a log line."""
    shown = repr(raw[:80])[1:]  # bytes' repr escapes everything unprintable; drop its b prefix
    return shown + "..." if len(raw) > 80 else shown
