"""The data plane as the node process sees it: listeners, snapshot swaps, drain, config dump.

`DataPlane` owns the three capture listeners (outbound 15001, inbound plaintext 15006, inbound
HBONE 15008), serves every accepted connection in its own named task (a failing connection is
logged and never takes its listener down; the two plain-TCP listeners are served by the loop's own
accept path, which hands over a connected transport, the HBONE one by `sock_accept` since its TLS
identity is chosen per socket), holds the current `Snapshot` (swapped atomically; inbound
connections that a new snapshot's policies deny are closed), and winds down gracefully on `drain`.

It runs on one event loop (uvloop when the node process installs it); call every method on that
loop. Connections can also be handed in directly with `handle`, with an original destination known
from elsewhere: that is how tests drive it without TPROXY, and how pre-bound listeners from a
previous process or a parent would be served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import functools
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import assert_never

from agent.observability.accesslog import AccessLog
from agent.observability.metrics import AgentMetrics
from agent.proxy.config import DataPlaneSettings
from agent.proxy.credentials import CredentialSource, CredentialUnavailable, TlsContexts
from agent.proxy.inbound import InboundProxy
from agent.proxy.outbound import OutboundProxy
from agent.proxy.pool import HbonePool
from agent.proxy.relay import TcpEnd, accept_tcp_end
from agent.proxy.sessions import Sessions
from agent.proxy.sockets import (
    LISTEN_BACKLOG,
    Address,
    SocketSetupError,
    disable_nagle,
    original_destination,
    transparent_listener,
)
from agent.proxy.tasks import OwnedTasks
from agent.state import Snapshot

__all__ = [
    "CredentialSource",
    "CredentialUnavailable",
    "DataPlane",
    "DataPlaneSettings",
    "Listener",
    "ListenerKind",
    "bind_listeners",
]

log = logging.getLogger(__name__)

_ACCEPT_RETRY_DELAY_S = 0.1
"""Pause after an accept failed for lack of resources (descriptors, memory), before trying again."""

_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class ListenerKind(enum.StrEnum):
    """What a listener captures."""

    OUTBOUND = "outbound"
    """Connections from enrolled local pods (15001)."""

    INBOUND_PLAINTEXT = "inbound-plaintext"
    """Plaintext connections to enrolled local pods from non-mesh clients (15006)."""

    INBOUND_HBONE = "inbound-hbone"
    """HBONE connections from other agents (15008)."""


@dataclass(frozen=True)
class Listener:
    """A bound, listening socket and what it captures."""

    kind: ListenerKind
    sock: socket.socket


def bind_listeners(settings: DataPlaneSettings) -> list[Listener]:
    """The transparent listeners of `settings.ports` on 0.0.0.0 (and [::] with `listen_ipv6`);
    raises `SocketSetupError` (after closing what it bound) if any cannot be bound."""
    hosts = ["0.0.0.0", "::"] if settings.listen_ipv6 else ["0.0.0.0"]
    ports = {
        ListenerKind.OUTBOUND: settings.ports.outbound,
        ListenerKind.INBOUND_PLAINTEXT: settings.ports.inbound_plaintext,
        ListenerKind.INBOUND_HBONE: settings.ports.inbound_hbone,
    }
    listeners: list[Listener] = []
    try:
        for kind, port in ports.items():
            for host in hosts:
                listeners.append(Listener(kind, transparent_listener(Address(host, port))))
    except SocketSetupError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


class DataPlane:
    """The node's proxy: capture listeners, HBONE tunnels both ways, pooled connections."""

    def __init__(  # noqa: PLR0917 (the node process's contract names these in this order)
        self,
        settings: DataPlaneSettings,
        snapshot: Snapshot,
        credentials: CredentialSource,
        metrics: AgentMetrics,
        access_log: AccessLog,
        node_name: str,
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self._snapshot = snapshot
        self._metrics = metrics
        self._tasks = OwnedTasks("data plane connections")
        self._accepting = OwnedTasks("data plane listeners")
        self._contexts = TlsContexts()
        self._sessions = Sessions(metrics, access_log)
        self._pool = HbonePool(settings, self._contexts, self._tasks)
        self.inbound = InboundProxy(
            settings,
            snapshot=self._current_snapshot,
            credentials=credentials,
            contexts=self._contexts,
            sessions=self._sessions,
            tasks=self._tasks,
            node_name=node_name,
        )
        self.outbound = OutboundProxy(
            settings,
            snapshot=self._current_snapshot,
            credentials=credentials,
            pool=self._pool,
            inbound=self.inbound,
            sessions=self._sessions,
        )
        self._listeners: list[Listener] = []
        self._servers: list[asyncio.Server] = []
        self.listening = False
        """Every listener is bound and accepting (readiness)."""
        metrics.snapshot_timestamp.set(snapshot.created_at)

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot decisions are made on now."""
        return self._snapshot

    def _current_snapshot(self) -> Snapshot:
        return self._snapshot

    def update_snapshot(self, snapshot: Snapshot) -> None:
        """Swaps in `snapshot` for every new decision, and closes the open inbound connections its
        policies deny."""
        self._snapshot = snapshot
        self._metrics.snapshot_timestamp.set(snapshot.created_at)
        if closed := self._sessions.recheck(snapshot):
            log.info("snapshot %d: closed %d connection(s) its policies deny", snapshot.version, closed)

    async def start(self, listeners: Sequence[Listener] | None = None) -> None:
        """Starts accepting on `listeners`, by default the transparent listeners of the settings'
        ports (binding raises `SocketSetupError`)."""
        if self._listeners:
            raise RuntimeError("the data plane is already started")
        self._listeners = list(listeners) if listeners is not None else bind_listeners(self.settings)
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            if listener.kind is ListenerKind.INBOUND_HBONE:
                where = Address.of(listener.sock.getsockname())
                self._accepting.spawn(self._accept(listener), name=f"accept {listener.kind} {where}")
            else:
                server = await loop.create_server(
                    functools.partial(_CapturedConnection, self, listener.kind),
                    sock=listener.sock,
                    backlog=LISTEN_BACKLOG,
                )
                self._servers.append(server)
        self.listening = True

    def handle(self, kind: ListenerKind, sock: socket.socket, client: Address, destination: Address) -> None:
        """Serves one accepted connection from `client` whose original destination is `destination`
        (for HBONE: the local address it was accepted on), in a task of its own."""
        self._tasks.spawn(
            self._serve(kind, sock, client, destination),
            name=kind.value,
            detail=lambda: f"{client} -> {destination}",
        )

    def _captured(self, kind: ListenerKind, downstream: TcpEnd) -> None:
        """Serves a connection a capture listener accepted (called as its transport comes up).

        Both event loops set `TCP_NODELAY` on the connections their servers accept (unlike on a
        socket from `sock_accept`, see `disable_nagle`)."""
        transport = downstream.transport
        assert transport is not None
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if not peer or not local:  # the client is gone already
            downstream.abort()
            return
        client, destination = Address.of(peer), Address.of(local)
        self._tasks.spawn(
            self._serve_captured(kind, downstream, client, destination),
            name=kind.value,
            detail=lambda: f"{client} -> {destination}",
        )

    async def drain(self) -> None:
        """Stops accepting, sends GOAWAY on served HBONE connections, lets open connections finish
        for up to `drain_deadline_s`, then aborts the rest (their clients get resets)."""
        self.listening = False
        await self._accepting.cancel()
        for server in self._servers:
            server.close()
        for listener in self._listeners:
            listener.sock.close()
        self.inbound.start_drain()
        self._pool.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_deadline_s
        while len(self._tasks) or len(self._sessions):
            if not await self._tasks.wait(deadline - loop.time()):
                break
            if not await self._sessions.wait_idle(deadline - loop.time()):
                break
        if len(self._tasks) or len(self._sessions):
            log.warning(
                "drain deadline (%gs): aborting %d connection(s)",
                self.settings.drain_deadline_s,
                len(self._sessions),
            )
        self._sessions.fail_all("the data plane stopped (drain deadline)")
        await self._tasks.cancel()
        self._pool.abort("the data plane stopped")
        self.inbound.abort("the data plane stopped")
        self._sessions.report_pending()

    def config_dump(self) -> dict[str, object]:
        """What the data plane runs on, JSON-ready: settings, snapshot, certificates in use, pools."""
        snapshot = self._snapshot
        workloads = {id(workload): workload for workload in snapshot.workloads_by_ip.values()}
        return {
            "node": self.node_name,
            "listening": self.listening,
            "settings": _jsonable(self.settings),
            "snapshot": {
                "version": snapshot.version,
                "created_at": snapshot.created_at,
                "mesh": _jsonable(snapshot.mesh),
                "workloads": [_jsonable(workload) for workload in workloads.values()],
                "services": [
                    {
                        "address": str(address),
                        "service": f"{target.service.namespace}/{target.service.name}",
                        "target_port": target.port.target_port,
                        "endpoints": [str(endpoint.address) for endpoint in target.endpoints],
                    }
                    for address, target in snapshot.services_by_address.items()
                ],
                "authorization_policies": [
                    _jsonable(policy)
                    for policies in snapshot.authorization_policies.values()
                    for policy in policies
                ],
                "peer_authentications": [
                    _jsonable(policy)
                    for policies in snapshot.peer_authentications.values()
                    for policy in policies
                ],
            },
            "certificates": [
                {
                    "identity": str(certificate.spiffe_id),
                    "serial": f"{certificate.leaf.serial_number:x}",
                    "not_after": certificate.not_after.isoformat(),
                }
                for certificate in self._contexts.in_use()
            ],
            "outbound_pool": self._pool.describe(),
            "inbound_connections": [
                {
                    "peer": str(driver.peer_address),
                    "peer_identity": str(driver.peer_identity),
                    "served_identity": str(driver.served_identity),
                    "streams": len(driver.streams),
                }
                for driver in self.inbound.connections
            ],
            "open_connections": len(self._sessions),
        }

    async def _accept(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener.sock)
            except OSError as error:
                if error.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("%s listener: cannot accept: %s", listener.kind, error)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY_S)
                continue
            try:
                client = Address.of(sock.getpeername())
                destination = original_destination(sock)
            except OSError:  # the client is gone already
                sock.close()
                continue
            self.handle(listener.kind, sock, client, destination)

    async def _serve(
        self, kind: ListenerKind, sock: socket.socket, client: Address, destination: Address
    ) -> None:
        # The handlers own the socket from here on and close it on every path.
        disable_nagle(sock)
        try:
            if kind is ListenerKind.INBOUND_HBONE:
                await self.inbound.serve_hbone(sock, client, destination)
                return
            downstream = await accept_tcp_end(sock)
        except Exception:
            log.exception("%s connection %s -> %s failed", kind, client, destination)
            return
        await self._serve_captured(kind, downstream, client, destination)

    async def _serve_captured(
        self, kind: ListenerKind, downstream: TcpEnd, client: Address, destination: Address
    ) -> None:
        # The handlers own the connection from here on and close it on every path.
        try:
            match kind:
                case ListenerKind.OUTBOUND:
                    await self.outbound.serve(downstream, client, destination)
                case ListenerKind.INBOUND_PLAINTEXT:
                    await self.inbound.serve_plaintext(downstream, client, destination)
                case ListenerKind.INBOUND_HBONE:
                    raise AssertionError("HBONE connections are served from their socket")
                case _:
                    assert_never(kind)
        except Exception:
            log.exception("%s connection %s -> %s failed", kind, client, destination)


class _CapturedConnection(TcpEnd):
    """A connection a plain-TCP capture listener accepted: served as soon as its transport is up."""

    def __init__(self, plane: DataPlane, kind: ListenerKind) -> None:
        super().__init__(downstream=True)
        self._plane = plane
        self._kind = kind

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._plane._captured(self._kind, self)


def _jsonable(value: object) -> object:
    """Settings, snapshot values and policies as JSON types (IP addresses and the like as text)."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
