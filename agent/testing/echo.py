"""TCP echo server for tests: names the peer it saw, then echoes everything, honouring half-close.

`python -m agent.testing.echo --port P [--host H]`. On each accepted connection it first writes
`peer <ip> <port>\\n` (the client address as this server sees it, which is what tests about source-IP
preservation check), then echoes every byte. When the client half-closes, it finishes echoing and
shuts down its own write side, so a client can send, half-close and read the whole echo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

log = logging.getLogger("agent.testing.echo")

_CHUNK = 256 * 1024


def peer_line(host: str, port: int) -> bytes:
    """The greeting naming the client's address."""
    return f"peer {host} {port}\n".encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serves one connection: greeting, echo until EOF, then half-close our side."""
    host, port = writer.get_extra_info("peername")[:2]
    log.info("connection from %s %s", host, port)
    try:
        writer.write(peer_line(host, port))
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except ConnectionError as error:
        log.info("connection from %s %s ended: %s", host, port, error)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_server(host: str, port: int) -> asyncio.Server:
    """A listening echo server (port 0 picks a free port; read it from `server.sockets`)."""
    return await asyncio.start_server(handle, host, port, reuse_address=True)


async def serve(host: str, port: int) -> None:
    """Serves until SIGTERM or SIGINT."""
    server = await start_server(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]} {bound[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.testing.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all IPv4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s echo %(message)s")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
