"""Inbound: connections to this node's enrolled pods, over HBONE (15008), in plaintext (15006), and
from same-node clients handed over by the outbound side; delivered with the client's own IP.

HBONE: the connection is accepted as plain TCP first; its local address (under TPROXY, the
destination pod's IP) names the local workload whose certificate the TLS server presents. The
client must present a certificate chaining to the trust bundle, naming a workload identity of the
mesh's trust domain. Each CONNECT is then checked: the target must be a local enrolled workload
with the identity this connection was served as (else 503), authorization must allow the client's
identity (else 401), and the upstream connection must succeed (else 503); only then is it answered
200 and relayed. The client's first bytes, when they came with the CONNECT, are handed to the pod as
soon as it took the connection, before the answer is written: the pod works on them meanwhile.

The client's IP: a tunnel's `forwarded` header names the original client. It is trusted only when
the snapshot says that IP is a workload with the identity the client authenticated as; then it is
what authorization sees and what delivery binds to (`IP_TRANSPARENT`), so the destination
application sees its real peer. Otherwise another workload's IP would be spoofed on the word of
whoever holds any mesh certificate: authorization then sees the tunnel's own peer address, and the
delivery comes from this agent's own address.

Plaintext: allowed unless the destination's effective PeerAuthentication is STRICT; authorization
runs without an identity (policies by IP or port still apply).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.hbone import MalformedTunnelRequest, RefusalReason, TunnelRequested
from agent.identity.spiffe import SpiffeId
from agent.proxy.config import DataPlaneSettings
from agent.proxy.credentials import CredentialSource, CredentialUnavailable, TlsContexts
from agent.proxy.hbone_driver import HboneServerDriver, HboneStreamEnd
from agent.proxy.labels import (
    ResponseFlag,
    hbone_inbound_labels,
    inbound_refusal_flag,
    plaintext_inbound_labels,
    same_node_inbound_labels,
)
from agent.proxy.relay import TcpEnd, connect_socket, tcp_end_of
from agent.proxy.routes import InboundRoutes, local_workload
from agent.proxy.sessions import InboundAuthorization, Leg, Sessions
from agent.proxy.sockets import Address, SocketSetupError, reset, upstream_socket
from agent.proxy.tasks import OwnedTasks
from agent.state import Deny, InboundConnection, Snapshot, Workload, authorize

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: RefusalReason
    detail: str

    @property
    def flag(self) -> ResponseFlag:
        return inbound_refusal_flag(self.reason)


@dataclass(frozen=True, slots=True)
class _NotServed:
    """Why an HBONE connection cannot be served, before its TLS handshake."""

    destination: Workload | None
    identity: str
    """The identity the destination would be served as; "" when there is no local destination."""
    flag: ResponseFlag
    detail: str


class InboundProxy:
    """Serves the inbound listeners and same-node deliveries of one data plane."""

    def __init__(
        self,
        settings: DataPlaneSettings,
        *,
        snapshot: Callable[[], Snapshot],
        credentials: CredentialSource,
        contexts: TlsContexts,
        sessions: Sessions,
        tasks: OwnedTasks,
        node_name: str,
    ) -> None:
        self._settings = settings
        self._snapshot = snapshot
        self._credentials = credentials
        self._contexts = contexts
        self._sessions = sessions
        self._tasks = tasks
        self._node_name = node_name
        self.connections: set[HboneServerDriver] = set()
        """The HBONE connections being served."""
        self._draining = False
        self._routes = InboundRoutes(node_name)

    # HBONE (15008)

    async def serve_hbone(self, sock: socket.socket, client: Address, local: Address) -> None:
        """Serves one accepted TCP connection to the HBONE port, addressed to `local`."""
        accepted_at = time.monotonic()
        try:
            served = await self._served_identity(local)
        except BaseException:
            reset(sock)
            raise
        if isinstance(served, _NotServed):
            reset(sock)
            labels = hbone_inbound_labels(None, "", served.destination, served.identity)
            leg = Leg("inbound", labels, str(client), str(local))
            self._sessions.refused([leg], served.flag, served.detail, accepted_at)
            return
        identity, context = served
        settings = self._settings
        trust_domain = self._snapshot().mesh.trust_domain
        driver = HboneServerDriver(
            settings.hbone,
            served_identity=identity,
            trust_domain=trust_domain,
            on_tunnel=self._tunnel_requested,
            on_malformed=self._malformed,
            keepalive_interval_s=settings.keepalive_interval_s,
        )
        loop = asyncio.get_running_loop()
        try:
            # The protocol comes from here, not from the result: uvloop returns its SSL layer there.
            await loop.connect_accepted_socket(
                lambda: driver, sock, ssl=context, ssl_handshake_timeout=settings.connect_timeout_s
            )
        except OSError as error:  # ssl.SSLError included: no or an untrusted client certificate
            log.info("HBONE handshake from %s to %s failed: %s", client, local, error)
            return
        if driver.rejection:
            return
        self.connections.add(driver)
        driver.lost.add_done_callback(lambda _: self.connections.discard(driver))
        if self._draining:
            driver.start_drain()

    async def _served_identity(self, local: Address) -> tuple[SpiffeId, ssl.SSLContext] | _NotServed:
        snapshot = self._snapshot()
        workload = local_workload(snapshot, local.ip_address, self._node_name)
        if workload is None:
            detail = f"{local.ip} is not an enrolled workload on this node"
            return _NotServed(None, "", ResponseFlag.NO_HEALTHY_UPSTREAM, detail)
        identity = workload.spiffe_id(snapshot.mesh.trust_domain)
        credential = await self._credentials.credential(identity, self._settings.credential_wait_s)
        if isinstance(credential, CredentialUnavailable):
            detail = f"no certificate for {identity}: {credential.reason}"
            return _NotServed(workload, identity, ResponseFlag.UPSTREAM_FAILURE, detail)
        return credential.spiffe_id, self._contexts.server(credential, self._credentials.trust_bundle())

    def _tunnel_requested(
        self, driver: HboneServerDriver, stream: HboneStreamEnd, request: TunnelRequested
    ) -> None:
        self._tasks.spawn(
            self._serve_tunnel(driver, stream, request),
            name="inbound tunnel",
            detail=lambda: f"{request.forwarded_for} -> {request.target}",
        )

    async def _serve_tunnel(
        self, driver: HboneServerDriver, stream: HboneStreamEnd, request: TunnelRequested
    ) -> None:
        accepted_at = time.monotonic()
        snapshot = self._snapshot()
        peer = driver.peer_address
        assert peer is not None
        route = self._routes.tunnel(snapshot, str(driver.peer_identity), peer, request)
        destination, target, connection = route.destination, route.target, route.connection
        client = request.forwarded_for

        def leg() -> Leg:
            source_address = str(client) if client is not None else str(peer)
            return Leg("inbound", route.labels, source_address, str(target))

        if destination is None or route.destination_identity != str(driver.served_identity):
            driver.refuse(stream, RefusalReason.NO_LOCAL_WORKLOAD)
            detail = f"{target.ip} is not an enrolled workload of {driver.served_identity} on this node"
            self._sessions.refused([leg()], ResponseFlag.NO_HEALTHY_UPSTREAM, detail, accepted_at)
            return
        try:
            upstream = await self._connect_upstream(
                snapshot, destination, target, connection, route.deliver_from
            )
        except BaseException:
            stream.abort()
            raise
        if isinstance(upstream, _Refusal):
            driver.refuse(stream, upstream.reason)
            self._sessions.refused([leg()], upstream.flag, upstream.detail, accepted_at)
            return
        # The pod took the connection: it gets the client's first bytes now, then the answer is
        # written and the socket wrapped while the pod works on them.
        early_sent = stream.send_held_to(upstream)
        if not driver.accept(stream):
            reset(upstream)
            detail = "the client reset the tunnel before it was accepted"
            self._sessions.refused([leg()], ResponseFlag.DOWNSTREAM_TERMINATED, detail, accepted_at)
            return
        try:
            upstream_end = await self._wrap_upstream(upstream, target)
        except BaseException:
            stream.abort()
            raise
        if isinstance(upstream_end, _Refusal):
            stream.abort()
            self._sessions.refused([leg()], upstream_end.flag, upstream_end.detail, accepted_at)
            return
        if stream.gone:
            upstream_end.abort()
            detail = "the client reset the tunnel as it was accepted"
            self._sessions.refused([leg()], ResponseFlag.DOWNSTREAM_TERMINATED, detail, accepted_at)
            return
        relay = self._sessions.begin([leg()], InboundAuthorization(destination, connection))
        relay.count_sent_before_join(early_sent)
        stream.relay = upstream_end.relay = relay
        relay.join(stream, upstream_end)

    def _malformed(self, driver: HboneServerDriver, event: MalformedTunnelRequest) -> None:
        log.info(
            "malformed HBONE request from %s (%s): %s",
            driver.peer_address,
            driver.peer_identity,
            event.problem,
        )
        labels = hbone_inbound_labels(None, str(driver.peer_identity), None, str(driver.served_identity))
        leg = Leg("inbound", labels, str(driver.peer_address), "")
        self._sessions.refused([leg], ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, event.problem, time.monotonic())

    # Plaintext (15006)

    async def serve_plaintext(self, downstream: TcpEnd, client: Address, local: Address) -> None:
        """Serves one captured plaintext connection from a non-mesh client to the local pod at `local`
        (its data is held, reading paused, until the relay joins)."""
        accepted_at = time.monotonic()
        snapshot = self._snapshot()
        client_ip, local_ip = client.ip_address, local.ip_address
        destination = local_workload(snapshot, local_ip, self._node_name)
        destination_identity = (
            destination.spiffe_id(snapshot.mesh.trust_domain) if destination is not None else ""
        )
        labels = plaintext_inbound_labels(snapshot.workload(client_ip), destination, destination_identity)
        leg = Leg("inbound", labels, str(client), str(local))
        if destination is None:
            downstream.abort()
            detail = f"{local.ip} is not an enrolled workload on this node"
            self._sessions.refused([leg], ResponseFlag.NO_HEALTHY_UPSTREAM, detail, accepted_at)
            return
        connection = InboundConnection(
            source_ip=client_ip, destination_ip=local_ip, destination_port=local.port
        )
        try:
            upstream = await self._open_upstream(
                snapshot, destination, local, connection, Address(client.ip, 0)
            )
        except BaseException:
            downstream.abort()
            raise
        if isinstance(upstream, _Refusal):
            downstream.abort()
            self._sessions.refused([leg], upstream.flag, upstream.detail, accepted_at)
            return
        if downstream.lost.done():
            upstream.abort()
            self._sessions.refused([leg], ResponseFlag.DOWNSTREAM_TERMINATED, "the client left", accepted_at)
            return
        relay = self._sessions.begin([leg], InboundAuthorization(destination, connection))
        downstream.relay = upstream.relay = relay
        relay.join(downstream, upstream)

    # Same node

    async def deliver_local(
        self, downstream: TcpEnd, client: Address, target: Address, source_identity: str, outbound: Leg
    ) -> None:
        """Delivers a connection from a local pod to a local pod as if it came through HBONE: the
        same checks, metrics and log lines, without TLS since it never leaves this process.
        `outbound` is the source side's leg, reported along with the destination side's."""
        accepted_at = time.monotonic()
        snapshot = self._snapshot()
        target_ip = target.ip_address
        inbound = Leg(
            "inbound", same_node_inbound_labels(outbound.labels), outbound.source_address, str(target)
        )
        legs = [outbound, inbound]
        destination = local_workload(snapshot, target_ip, self._node_name)
        if destination is None:
            downstream.abort()
            detail = f"{target.ip} is not an enrolled workload on this node"
            self._sessions.refused(legs, ResponseFlag.NO_HEALTHY_UPSTREAM, detail, accepted_at)
            return
        client_ip = client.ip_address
        connection = InboundConnection(
            source_ip=client_ip,
            destination_ip=target_ip,
            destination_port=target.port,
            source_identity=source_identity,
        )
        upstream = await self._open_upstream(snapshot, destination, target, connection, Address(client.ip, 0))
        if isinstance(upstream, _Refusal):
            downstream.abort()
            self._sessions.refused(legs, upstream.flag, upstream.detail, accepted_at)
            return
        if downstream.lost.done():
            upstream.abort()
            self._sessions.refused(legs, ResponseFlag.DOWNSTREAM_TERMINATED, "the client left", accepted_at)
            return
        relay = self._sessions.begin(legs, InboundAuthorization(destination, connection))
        downstream.relay = upstream.relay = relay
        relay.join(downstream, upstream)

    # Drain

    def start_drain(self) -> None:
        """GOAWAY on every served HBONE connection (and on those still in their handshake)."""
        self._draining = True
        for driver in list(self.connections):
            driver.start_drain()

    def abort(self, reason: str) -> None:
        """Drops every served HBONE connection."""
        for driver in list(self.connections):
            driver.abort(reason)

    # Shared

    async def _open_upstream(
        self,
        snapshot: Snapshot,
        destination: Workload,
        target: Address,
        connection: InboundConnection,
        deliver_from: Address | None,
    ) -> TcpEnd | _Refusal:
        """Authorizes, connects to the pod from `deliver_from` (None: from the agent's address) and
        wraps the connection as the relay's upstream end."""
        upstream = await self._connect_upstream(snapshot, destination, target, connection, deliver_from)
        return upstream if isinstance(upstream, _Refusal) else await self._wrap_upstream(upstream, target)

    async def _wrap_upstream(self, sock: socket.socket, target: Address) -> TcpEnd | _Refusal:
        try:
            return await tcp_end_of(sock)
        except OSError as error:
            detail = f"cannot use the connection to {target}: {error}"
            return _Refusal(RefusalReason.UPSTREAM_UNREACHABLE, detail)

    async def _connect_upstream(
        self,
        snapshot: Snapshot,
        destination: Workload,
        target: Address,
        connection: InboundConnection,
        deliver_from: Address | None,
    ) -> socket.socket | _Refusal:
        """Authorizes, then connects to the pod from `deliver_from` (None: from the agent's address)."""
        decision = authorize(snapshot, destination, connection)
        if isinstance(decision, Deny):
            return _Refusal(RefusalReason.DENIED_BY_POLICY, str(decision))
        try:
            sock = upstream_socket(target, mark=self._settings.upstream_mark, source=deliver_from)
        except SocketSetupError as error:
            return _Refusal(RefusalReason.UPSTREAM_UNREACHABLE, str(error))
        timeout_s = self._settings.connect_timeout_s
        try:
            await connect_socket(sock, (target.ip, target.port), timeout_s)
        except ConnectionRefusedError:
            sock.close()
            detail = f"{target} refused the connection"
            return _Refusal(RefusalReason.UPSTREAM_REFUSED, detail)
        except TimeoutError:
            sock.close()
            detail = f"{target} did not answer within {timeout_s:g}s"
            return _Refusal(RefusalReason.UPSTREAM_UNREACHABLE, detail)
        except OSError as error:
            sock.close()
            detail = f"cannot connect to {target}: {error}"
            return _Refusal(RefusalReason.UPSTREAM_UNREACHABLE, detail)
        except BaseException:
            sock.close()
            raise
        # A snapshot swapped in during the connect re-checked the open connections, not this one.
        current = self._snapshot()
        if current is not snapshot:
            decision = authorize(
                current, current.workload(connection.destination_ip) or destination, connection
            )
            if isinstance(decision, Deny):
                reset(sock)
                return _Refusal(RefusalReason.DENIED_BY_POLICY, str(decision))
        return sock
