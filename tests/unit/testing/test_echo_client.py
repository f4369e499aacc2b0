"""The test workloads over loopback: the echo server names the peer and echoes through half-close;
the client reports what it saw and fails loudly when it cannot connect or the echo differs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.testing import client, echo


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await echo.start_server("127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_greeting_names_the_client_address_then_text_is_echoed(echo_port: int) -> None:
    result = await client.exchange("127.0.0.1", echo_port, client.payload("hello\nworld", None))
    word, host, port = result.peer_line.split()
    assert (word, host) == ("peer", "127.0.0.1")
    assert 0 < int(port) < 65536
    assert result.received == b"hello\nworld"
    assert result.echoed_intact


async def test_bulk_bytes_come_back_whole_after_half_close(echo_port: int) -> None:
    size = 3 * 1024 * 1024 + 17
    result = await client.exchange("127.0.0.1", echo_port, client.payload(None, size), keep_received=False)
    assert result.sent == result.received_count == size
    assert result.sent_sha256 == result.received_sha256
    assert result.received == b""


async def test_nothing_sent_still_gets_greeting_and_clean_close(echo_port: int) -> None:
    result = await client.exchange("127.0.0.1", echo_port, [])
    assert result.peer_line.startswith("peer 127.0.0.1 ")
    assert result.received_count == 0
    assert result.echoed_intact


async def test_refused_connection_is_an_exchange_failure() -> None:
    with pytest.raises(client.ExchangeFailed, match="cannot connect"):
        await client.exchange("127.0.0.1", free_port(), [b"x"])


async def test_server_without_greeting_is_reported() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(client.ExchangeFailed, match="no peer line"):
            await client.exchange("127.0.0.1", port, [b"x"])


def test_payload_splits_large_counts_into_chunks_of_the_fixed_pattern() -> None:
    chunks = client.payload(None, 600_000)
    assert sum(len(c) for c in chunks) == 600_000
    assert chunks == client.payload(None, 600_000)
    assert client.payload("é", None) == ["é".encode()]
    assert client.payload(None, 0) == []


def test_client_exits_non_zero_with_a_message_when_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["127.0.0.1", str(free_port()), "--send", "x", "--timeout", "5"]) == 1
    assert "client: cannot connect to 127.0.0.1" in capsys.readouterr().err
