"""TCP client for tests, the counterpart of `agent.testing.echo`.

`python -m agent.testing.client HOST PORT [--send TEXT | --bytes N] [--timeout S] [--retry-for S]`
connects, prints the server's `peer <ip> <port>` line, sends TEXT (or N bytes of a fixed pattern),
half-closes and reads until the server closes. With --send it prints what came back; with --bytes it
prints `sent N <sha256>` and `received M <sha256>`. Exit status 0 when the echo matches what was
sent, 1 with a message on stderr otherwise (refused, timed out, reset, mismatch).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

_CHUNK = 256 * 1024
_PATTERN = hashlib.sha256(b"agent.testing.client").digest() * (_CHUNK // 32)
"""What --bytes sends, repeated: incompressible enough, and the same on every run."""


class ExchangeFailed(Exception):
    """The exchange did not complete; the message says how (for the exit message)."""


@dataclass(frozen=True)
class Exchange:
    """What one connection saw."""

    peer_line: str
    """The server's greeting without its newline, e.g. `peer 10.244.1.2 40000`."""
    sent: int
    sent_sha256: str
    received: bytes
    """The echoed bytes after the greeting (kept whole only when `keep_received`)."""
    received_count: int
    received_sha256: str

    @property
    def echoed_intact(self) -> bool:
        return self.sent == self.received_count and self.sent_sha256 == self.received_sha256


def payload(text: str | None, count: int | None) -> list[bytes]:
    """The chunks to send: TEXT as UTF-8, or `count` bytes of the fixed pattern."""
    if text is not None:
        return [text.encode()]
    chunks = []
    remaining = count or 0
    while remaining > 0:
        chunks.append(_PATTERN[: min(remaining, _CHUNK)])
        remaining -= len(chunks[-1])
    return chunks


async def _connect(
    host: str, port: int, retry_for: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return await asyncio.open_connection(host, port, limit=_CHUNK)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def exchange(
    host: str, port: int, chunks: Sequence[bytes], *, retry_for: float = 0.0, keep_received: bool = True
) -> Exchange:
    """Connects, reads the greeting, sends `chunks`, half-closes and reads the echo until EOF."""
    try:
        reader, writer = await _connect(host, port, retry_for)
    except OSError as error:
        raise ExchangeFailed(f"cannot connect to {host}:{port}: {error.strerror or error}") from error
    sent_hash = hashlib.sha256()

    async def send() -> int:
        total = 0
        for chunk in chunks:
            writer.write(chunk)
            sent_hash.update(chunk)
            total += len(chunk)
            await writer.drain()
        writer.write_eof()
        return total

    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"peer ") or not greeting.endswith(b"\n"):
            raise ExchangeFailed(f"{host}:{port} sent no peer line (got {greeting[:80]!r})")
        sender = asyncio.ensure_future(send())
        received_hash = hashlib.sha256()
        kept = bytearray()
        count = 0
        while data := await reader.read(_CHUNK):
            received_hash.update(data)
            count += len(data)
            if keep_received:
                kept += data
        sent = await sender
    except ConnectionError as error:
        raise ExchangeFailed(f"connection to {host}:{port} failed: {error!r}") from error
    finally:
        writer.close()
    return Exchange(
        peer_line=greeting.decode().rstrip("\n"),
        sent=sent,
        sent_sha256=sent_hash.hexdigest(),
        received=bytes(kept),
        received_count=count,
        received_sha256=received_hash.hexdigest(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.testing.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--send", metavar="TEXT", help="text to send (printed back as echoed)")
    what.add_argument("--bytes", type=int, metavar="N", help="send N bytes and compare SHA-256 of the echo")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole exchange")
    parser.add_argument(
        "--retry-for",
        type=float,
        default=0.0,
        metavar="S",
        help="keep retrying a refused connect for S seconds",
    )
    args = parser.parse_args(argv)

    async def run() -> Exchange:
        chunks = payload(args.send, args.bytes)
        async with asyncio.timeout(args.timeout):
            return await exchange(
                args.host, args.port, chunks, retry_for=args.retry_for, keep_received=args.bytes is None
            )

    try:
        result = asyncio.run(run())
    except ExchangeFailed as error:
        print(f"client: {error}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"client: timed out after {args.timeout}s talking to {args.host}:{args.port}", file=sys.stderr)
        return 1
    print(result.peer_line)
    if args.bytes is not None:
        print(f"sent {result.sent} {result.sent_sha256}")
        print(f"received {result.received_count} {result.received_sha256}")
    else:
        sys.stdout.write(result.received.decode(errors="replace"))
        sys.stdout.flush()
    if not result.echoed_intact:
        print(
            f"client: echo differs: sent {result.sent} bytes, got back {result.received_count}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
