"""The outbound HBONE connection pool: tunnels share TLS+HTTP/2 connections per identity pair and address.

A connection is keyed by (source identity, destination identity, HBONE address): it presents the
source's certificate and was checked to be served by the destination's identity, so a tunnel never
rides a connection authenticated for someone else. Each carries up to the stream limit; past it
another connection is dialled. Callers that find no room wait for one dial in flight instead of each
dialling. A connection that received GOAWAY takes no new tunnels and closes when its last ends; an
idle one is closed after `pool_idle_timeout_s`; a lost one fails its tunnels (their clients get a
reset). A tunnel refused with REFUSED_STREAM (the server never processed it) is retried elsewhere.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import assert_never

from agent.hbone import SocketAddress
from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.proxy.config import DataPlaneSettings
from agent.proxy.credentials import TlsContexts
from agent.proxy.hbone_driver import (
    HboneClientDriver,
    HboneStreamEnd,
    TunnelAnswer,
    TunnelBroken,
    TunnelDeclined,
    TunnelOpened,
)
from agent.proxy.relay import connect_socket
from agent.proxy.sockets import Address, SocketSetupError, upstream_socket
from agent.proxy.tasks import OwnedTasks

_ATTEMPTS = 3
"""Tries per tunnel: one more than a connection lost to GOAWAY right after the dial needs."""


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Which tunnels may share a connection."""

    source_identity: str
    destination_identity: str
    address: Address
    """Where the destination's agent accepts HBONE (the destination pod's IP, HBONE port)."""


@dataclass(frozen=True, slots=True)
class DialFailed:
    """No HBONE connection could be established (refused, timed out, TLS or identity failure)."""

    reason: str


@dataclass(frozen=True, slots=True)
class TunnelNotOpened:
    """The tunnel could not be opened; the client connection is to be reset."""

    reason: str
    declined: TunnelDeclined | None = None
    """The server's answer, when it answered with an error status."""


@dataclass(eq=False)
class _Entry:
    connections: list[HboneClientDriver] = field(default_factory=list)
    dialing: asyncio.Task[HboneClientDriver | DialFailed] | None = None


def _answer_missing(answer: asyncio.Future[TunnelAnswer], waited_s: float) -> None:
    if not answer.done():
        answer.set_result(TunnelBroken(f"no answer to the CONNECT within {waited_s:g}s", retryable=False))


class HbonePool:
    """The pooled outbound HBONE connections of one data plane."""

    def __init__(self, settings: DataPlaneSettings, contexts: TlsContexts, tasks: OwnedTasks) -> None:
        self._settings = settings
        self._contexts = contexts
        self._tasks = tasks
        self._entries: dict[PoolKey, _Entry] = {}
        self._closed = False

    async def open_tunnel(
        self,
        key: PoolKey,
        credential: WorkloadCertificate,
        bundle: TrustBundle,
        target: SocketAddress,
        forwarded_for: SocketAddress,
        *,
        early_data: bytes = b"",
    ) -> HboneStreamEnd | TunnelNotOpened:
        """A tunnel to `target` the server accepted (200), or why there is none. `early_data` (the
        client's first bytes) leaves with the CONNECT, and again with the retry of a refused stream
        (REFUSED_STREAM: the server processed nothing of it)."""
        reason = "no attempt made"
        wait_s = 2 * self._settings.connect_timeout_s
        loop = asyncio.get_running_loop()
        for _ in range(_ATTEMPTS):
            driver = await self._connection(key, credential, bundle)
            if isinstance(driver, DialFailed):
                return TunnelNotOpened(driver.reason)
            stream = driver.open_stream(target, forwarded_for, early_data)
            answer_future = stream.answer
            assert answer_future is not None
            # A timer rather than `asyncio.timeout`: the answer is awaited on every new connection,
            # and the context manager's Python-level bookkeeping was 5% of the source agent's
            # Python time per connection.
            timer = loop.call_later(wait_s, _answer_missing, answer_future, wait_s)
            try:
                answer = await answer_future
            except asyncio.CancelledError:
                stream.abort()
                raise
            finally:
                timer.cancel()
            match answer:
                case TunnelOpened():
                    return stream
                case TunnelDeclined():
                    return TunnelNotOpened(f"refused with {answer.status} ({answer.failure.value})", answer)
                case TunnelBroken():
                    if not answer.retryable:
                        stream.abort()  # unanswered in time; a no-op for a stream that ended
                        return TunnelNotOpened(answer.reason)
                    reason = answer.reason
                case _:
                    assert_never(answer)
        return TunnelNotOpened(f"refused on {_ATTEMPTS} connections, last: {reason}")

    def stop(self) -> None:
        """Drain: no new tunnels or dials; idle connections close now, busy ones after their last tunnel."""
        self._closed = True
        for entry in list(self._entries.values()):
            for driver in list(entry.connections):
                driver.close_when_idle = True
                if not driver.streams:
                    driver.close()

    def abort(self, reason: str) -> None:
        """Drops every connection at once; their tunnels are reset."""
        for entry in list(self._entries.values()):
            for driver in list(entry.connections):
                driver.abort(reason)

    def describe(self) -> list[dict[str, object]]:
        """The pooled connections per key, for the admin config dump and tests."""
        return [
            {
                "source_identity": key.source_identity,
                "destination_identity": key.destination_identity,
                "address": str(key.address),
                "connections": [len(driver.streams) for driver in entry.connections],
            }
            for key, entry in self._entries.items()
            if entry.connections
        ]

    async def _connection(
        self, key: PoolKey, credential: WorkloadCertificate, bundle: TrustBundle
    ) -> HboneClientDriver | DialFailed:
        for _ in range(_ATTEMPTS):
            if self._closed:
                return DialFailed("the data plane is draining")
            # Fetched anew each round: the entry goes when its last connection is lost.
            entry = self._entries.setdefault(key, _Entry())
            for driver in entry.connections:
                if driver.can_open_stream:
                    return driver
            if entry.dialing is None:
                entry.dialing = self._tasks.spawn(
                    self._dial(key, entry, credential, bundle),
                    name=f"HBONE dial {key.address} for {key.source_identity}",
                )
            # Shielded: one waiter giving up (its client left) must not cancel the others' dial.
            outcome = await asyncio.shield(entry.dialing)
            if isinstance(outcome, DialFailed):
                return outcome
        return DialFailed(f"no connection to {key.address} could take another tunnel")

    async def _dial(
        self, key: PoolKey, entry: _Entry, credential: WorkloadCertificate, bundle: TrustBundle
    ) -> HboneClientDriver | DialFailed:
        # While `dialing` is set the entry stays in the pool (see `_forget`), so it is still current here.
        try:
            outcome = await self._connect(key, credential, bundle)
        finally:
            entry.dialing = None
        if isinstance(outcome, HboneClientDriver):
            entry.connections.append(outcome)
            outcome.lost.add_done_callback(lambda _: self._forget(key, outcome))
        return outcome

    async def _connect(
        self, key: PoolKey, credential: WorkloadCertificate, bundle: TrustBundle
    ) -> HboneClientDriver | DialFailed:
        settings = self._settings
        try:
            expected = SpiffeId.parse(key.destination_identity)
            sock = upstream_socket(key.address, mark=settings.upstream_mark)
        except (ValueError, SocketSetupError) as error:
            return DialFailed(str(error))
        context = self._contexts.client(credential, bundle)
        driver = HboneClientDriver(
            settings.hbone,
            expected_identity=expected,
            keepalive_interval_s=settings.keepalive_interval_s,
            idle_timeout_s=settings.pool_idle_timeout_s,
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await connect_socket(sock, (key.address.ip, key.address.port), settings.connect_timeout_s)
                # The protocol is `driver`, whatever the result says (uvloop may name its SSL layer).
                await loop.create_connection(
                    lambda: driver,
                    sock=sock,
                    ssl=context,
                    server_hostname="",  # no SNI: the server picks its identity by the address dialled
                    ssl_handshake_timeout=settings.connect_timeout_s,
                )
        except TimeoutError:
            sock.close()
            return DialFailed(f"HBONE connection to {key.address} timed out")
        except OSError as error:  # ssl.SSLError included
            sock.close()
            return DialFailed(f"HBONE connection to {key.address} failed: {error}")
        if driver.rejection:
            return DialFailed(f"HBONE connection to {key.address}: {driver.rejection}")
        return driver

    def _forget(self, key: PoolKey, driver: HboneClientDriver) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        if driver in entry.connections:
            entry.connections.remove(driver)
        if not entry.connections and entry.dialing is None:
            del self._entries[key]
