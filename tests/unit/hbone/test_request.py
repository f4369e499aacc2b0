"""CONNECT request building and validation, `forwarded` and `:status` parsing, as pure functions."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.hbone.request import (
    ConnectRequest,
    Header,
    MalformedRequest,
    SocketAddress,
    _parse_forwarded_pairs,
    connect_request_headers,
    format_forwarded_for,
    parse_connect_request,
    parse_forwarded_for,
    parse_response_status,
)


def addr(ip: str, port: int) -> SocketAddress:
    return SocketAddress(ip_address(ip), port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", addr("10.0.0.1", 80)),
        ("255.255.255.255:65535", addr("255.255.255.255", 65535)),
        ("0.0.0.0:1", addr("0.0.0.0", 1)),
        ("[2001:db8::1]:443", addr("2001:db8::1", 443)),
        ("[::ffff:10.0.0.1]:80", addr("::ffff:10.0.0.1", 80)),
        ("[::]:8080", addr("::", 8080)),
        ("10.0.0.1:00080", addr("10.0.0.1", 80)),
    ],
)
def test_socket_address_parses_literal_ip_and_port(text: str, expected: SocketAddress) -> None:
    assert SocketAddress.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.1",
        "10.0.0.1:",
        ":80",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:000080",
        "10.0.0.1:+80",
        "10.0.0.1:8_0",
        "10.0.0.1: 80",
        "10.0.0.1:\u0668\u0660",
        "010.0.0.1:80",
        "10.0.0.256:80",
        "example.com:80",
        "localhost:80",
        "2001:db8::1:443",
        "[2001:db8::1]",
        "[fe80::1%eth0]:80",
        "[10.0.0.1]:80",
        "[2001:db8::g]:80",
        "10.0.0.1:80:80",
    ],
)
def test_socket_address_rejects_everything_else(text: str) -> None:
    assert SocketAddress.parse(text) is None


@given(
    ip=st.ip_addresses().filter(lambda ip: not (ip.version == 6 and ip.scope_id)),
    port=st.integers(1, 65535),
)
def test_socket_address_text_round_trips(ip: IPv4Address | IPv6Address, port: int) -> None:
    address = SocketAddress(ip, port)
    assert SocketAddress.parse(str(address)) == address


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_socket_address_refuses_impossible_ports(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        SocketAddress(ip_address("10.0.0.1"), port)


def test_request_headers_are_a_plain_connect_with_forwarded() -> None:
    assert connect_request_headers(addr("10.0.2.7", 8080), addr("10.0.1.5", 43210)) == [
        (b":method", b"CONNECT"),
        (b":authority", b"10.0.2.7:8080"),
        (b"forwarded", b'for="10.0.1.5:43210"'),
    ]
    assert connect_request_headers(addr("fd00::7", 80), addr("fd00::5", 1)) == [
        (b":method", b"CONNECT"),
        (b":authority", b"[fd00::7]:80"),
        (b"forwarded", b'for="[fd00::5]:1"'),
    ]


def test_forwarded_is_quoted_and_brackets_ipv6_as_rfc7239_shows() -> None:
    assert format_forwarded_for(addr("192.0.2.43", 4711)) == 'for="192.0.2.43:4711"'
    assert format_forwarded_for(addr("2001:db8:cafe::17", 4711)) == 'for="[2001:db8:cafe::17]:4711"'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="192.0.2.43:4711"', addr("192.0.2.43", 4711)),
        ('for="[2001:db8:cafe::17]:4711"', addr("2001:db8:cafe::17", 4711)),
        ('For="192.0.2.43:4711"', addr("192.0.2.43", 4711)),
        ('for="192.0.2.43:4711";proto=http;by=203.0.113.43', addr("192.0.2.43", 4711)),
        ('proto=https; for="192.0.2.43:4711"', addr("192.0.2.43", 4711)),
        ('for="192.0.2.43:4711", for="198.51.100.17:1"', addr("192.0.2.43", 4711)),
        ('by="a;b,c";for="192.0.2.43:4711"', addr("192.0.2.43", 4711)),
        ('for="192.0.2.43:4711",garbage', addr("192.0.2.43", 4711)),
        ('for="192.0.2.43\\:47\\11"', addr("192.0.2.43", 4711)),  # quoted pairs (RFC 7230 3.2.6)
    ],
)
def test_forwarded_for_names_the_first_hop(value: str, expected: SocketAddress) -> None:
    assert parse_forwarded_for(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "for=192.0.2.43",
        'for="192.0.2.43"',
        "for=192.0.2.43:4711",
        "for=unknown",
        'for="_hidden:4711"',
        'for="2001:db8::17:4711"',
        'for="[2001:db8::17]"',
        'for="192.0.2.43:4711";for="192.0.2.44:1"',
        "proto=https",
        'for="192.0.2.43:4711";',
        'for="192.0.2.43:4711" junk',
        'for="192.0.2.43:4711',
        "for",
        '=for="192.0.2.43:4711"',
    ],
)
def test_forwarded_without_a_clear_client_ip_and_port_is_rejected(value: str) -> None:
    assert parse_forwarded_for(value) is None


def request(*extra: Header, method: bytes = b"CONNECT", authority: bytes = b"10.0.2.7:8080") -> list[Header]:
    return [(b":method", method), (b":authority", authority), *extra]


FORWARDED = (b"forwarded", b'for="10.0.1.5:43210"')


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (request(FORWARDED), ConnectRequest(addr("10.0.2.7", 8080), addr("10.0.1.5", 43210))),
        (request(), ConnectRequest(addr("10.0.2.7", 8080), None)),
        (
            request((b"forwarded", b'for="[fd00::5]:1"'), authority=b"[fd00::7]:15008"),
            ConnectRequest(addr("fd00::7", 15008), addr("fd00::5", 1)),
        ),
        (
            [(b":authority", b"10.0.2.7:8080"), (b":method", b"CONNECT"), (b"user-agent", b"x")],
            ConnectRequest(addr("10.0.2.7", 8080), None),
        ),
        (
            request((b"forwarded", b'for="10.0.1.5:43210"'), (b"forwarded", b'for="10.9.9.9:1"')),
            ConnectRequest(addr("10.0.2.7", 8080), addr("10.0.1.5", 43210)),
        ),
    ],
)
def test_valid_requests(headers: list[Header], expected: ConnectRequest) -> None:
    assert parse_connect_request(headers) == expected


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        (request(method=b"GET"), "method 'GET' is not CONNECT"),
        (request(method=b"connect"), "is not CONNECT"),
        ([(b":authority", b"10.0.2.7:8080")], "missing :method"),
        ([(b":method", b"CONNECT")], "missing :authority"),
        (request(authority=b"example.com:80"), "not a literal ip:port"),
        (request(authority=b"10.0.2.7"), "not a literal ip:port"),
        (request(authority=b"10.0.2.7:0"), "not a literal ip:port"),
        (request(authority=b"10.0.2.7:65536"), "not a literal ip:port"),
        (request(authority=b""), "not a literal ip:port"),
        (request(authority=b"10.0.2.7:80\xff"), "not a literal ip:port"),
        (request(authority=b"2001:db8::1:80"), "not a literal ip:port"),
        (request((b":path", b"/")), "no :path"),
        (request((b":scheme", b"https")), "no :scheme"),
        (request((b":protocol", b"websocket")), "extended CONNECT"),
        (request((b":status", b"200")), "response pseudo-header"),
        (request((b":foo", b"bar")), "unknown pseudo-header"),
        (request((b":authority", b"10.0.2.8:80")), "duplicate :authority"),
        (request((b":method", b"CONNECT")), "duplicate :method"),
        ([(b":method", b"CONNECT"), (b"x", b"y"), (b":authority", b"10.0.2.7:80")], "after regular headers"),
        (request((b"Forwarded", b'for="10.0.1.5:1"')), "not lowercase"),
        (request((b"connection", b"keep-alive")), "connection-specific"),
        (request((b"transfer-encoding", b"chunked")), "connection-specific"),
        (request((b"forwarded", b"for=unknown")), "forwarded 'for=unknown'"),
        (request((b"forwarded", b'for="10.0.1.5"')), "does not name a client ip:port"),
        (request((b"forwarded", b'for="\xff:1"')), "does not name a client ip:port"),
    ],
)
def test_malformed_requests_say_why(headers: list[Header], problem: str) -> None:
    result = parse_connect_request(headers)
    assert isinstance(result, MalformedRequest)
    assert problem in result.problem


def test_problems_show_peer_bytes_bounded_and_printable() -> None:
    result = parse_connect_request(request(method=b"\x00\xff" + b"A" * 500))
    assert isinstance(result, MalformedRequest)
    assert "\\x00\\xff" in result.problem
    assert len(result.problem) < 150


_header_bytes = st.binary(max_size=40) | st.sampled_from(
    [b":method", b":authority", b":path", b"CONNECT", b"forwarded", b"10.0.0.1:80", b'for="1.2.3.4:5"']
)


@given(st.lists(st.tuples(_header_bytes, _header_bytes), max_size=8))
def test_validation_never_raises_on_arbitrary_headers(headers: list[Header]) -> None:
    assert isinstance(parse_connect_request(headers), ConnectRequest | MalformedRequest)


@given(st.text(max_size=60))
def test_forwarded_parsing_never_raises(value: str) -> None:
    result = parse_forwarded_for(value)
    assert result is None or isinstance(result, SocketAddress)


_FORWARDED_TEXT = st.text(alphabet='for=";,\\ []:.0123456789abcdef', max_size=30)


@given(
    st.one_of(
        st.builds(SocketAddress, st.ip_addresses(), st.integers(1, 65535)).map(format_forwarded_for),
        _FORWARDED_TEXT.map(lambda node: f'for="{node}"'),
        _FORWARDED_TEXT,
    )
)
def test_the_common_forwarded_form_reads_as_the_general_grammar_reads_it(value: str) -> None:
    assert parse_forwarded_for(value) == _parse_forwarded_pairs(value)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b":status", b"200")], 200),
        ([(b":status", b"503"), (b"server", b"x")], 503),
        ([(b"server", b"x")], None),
        ([(b":status", b"20")], None),
        ([(b":status", b"2000")], None),
        ([(b":status", b"abc")], None),
        ([(b":status", b"200"), (b":status", b"200")], None),
    ],
)
def test_response_status(headers: list[Header], status: int | None) -> None:
    assert parse_response_status(headers) == status
