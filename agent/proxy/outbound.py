"""Outbound: connections captured from this node's pods (15001), routed by `decide_outbound`.

- Tunnel to another node: the source workload's certificate, a pooled HBONE connection to the
  destination (pod IP, HBONE port) checked to be served by the destination's identity, one CONNECT
  per connection naming the client, with the client's first bytes right behind it when they came
  with the connection; the client is held (later bytes buffered, reading paused) until the 200,
  and reset if the tunnel is refused, reset, or cannot be established.
- Tunnel to this node: handed to the inbound side in-process (same policy, metrics and logs).
- LoadBalanced / Passthrough: plain TCP to the chosen endpoint / the original destination, from the
  client's own IP (`IP_TRANSPARENT`) with the agent's upstream mark, as if the agent were not there.
- Refuse: reset.

A route (client IP, original destination) is decided once per snapshot (`OutboundRoutes`), with
what its tunnel needs; a load-balanced one is decided for each connection.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import assert_never

from agent.hbone import SocketAddress
from agent.proxy.config import DataPlaneSettings
from agent.proxy.credentials import CredentialSource, CredentialUnavailable
from agent.proxy.inbound import InboundProxy
from agent.proxy.labels import ResponseFlag, declined_tunnel_flag, outbound_labels, outbound_refusal_flag
from agent.proxy.pool import HbonePool, TunnelNotOpened
from agent.proxy.relay import TcpEnd, connect_tcp_end
from agent.proxy.routes import OutboundRoutes, TunnelRoute
from agent.proxy.sessions import Leg, Sessions
from agent.proxy.sockets import Address, SocketSetupError, upstream_socket
from agent.state import Address as StateAddress
from agent.state import (
    EndpointPicker,
    LoadBalanced,
    Passthrough,
    Refuse,
    Snapshot,
    Tunnel,
)

EARLY_DATA_MAX = 64 * 1024
"""A client's first bytes beyond this wait for the tunnel's answer (they would only wait in the
flow-control windows instead, or at the destination, before it accepts)."""


class OutboundProxy:
    """Serves the outbound listener of one data plane."""

    def __init__(
        self,
        settings: DataPlaneSettings,
        *,
        snapshot: Callable[[], Snapshot],
        credentials: CredentialSource,
        pool: HbonePool,
        inbound: InboundProxy,
        sessions: Sessions,
        pick: EndpointPicker = random.randrange,
    ) -> None:
        self._settings = settings
        self._snapshot = snapshot
        self._credentials = credentials
        self._pool = pool
        self._inbound = inbound
        self._sessions = sessions
        self._routes = OutboundRoutes(pick)

    async def serve(self, downstream: TcpEnd, client: Address, original_destination: Address) -> None:
        """Serves one captured connection from `client` that was going to `original_destination`
        (its data is held, reading paused, until the relay joins)."""
        accepted_at = time.monotonic()
        try:
            await self._route(downstream, client, original_destination, accepted_at)
        except BaseException:
            downstream.abort()
            raise

    async def _route(
        self, downstream: TcpEnd, client: Address, destination: Address, accepted_at: float
    ) -> None:
        snapshot = self._snapshot()
        route = self._routes.decide(snapshot, client, destination)
        decision = route.decision

        def leg() -> Leg:
            if isinstance(decision, Tunnel):
                labels = self._routes.labels(snapshot, decision)
            else:
                original = StateAddress(destination.ip_address, destination.port)
                labels = outbound_labels(decision, snapshot, client.ip_address, original)
            return Leg("outbound", labels, str(client), str(destination))

        match decision:
            case Refuse():
                flag = outbound_refusal_flag(decision.reason)
                self._fail(downstream, leg(), flag, decision.reason.value, accepted_at)
            case Passthrough() | LoadBalanced():
                await self._direct(downstream, client, decision.target, leg=leg(), accepted_at=accepted_at)
            case Tunnel():
                if route.tunnel is None:  # to this node
                    target = Address(str(decision.target.ip), decision.target.port)
                    await self._inbound.deliver_local(
                        downstream, client, target, decision.source_identity, leg()
                    )
                else:
                    await self._tunnel(
                        downstream,
                        SocketAddress(client.ip_address, client.port),
                        decision,
                        route.tunnel,
                        leg=leg,
                        accepted_at=accepted_at,
                    )
            case _:
                assert_never(decision)

    async def _direct(
        self, downstream: TcpEnd, client: Address, connect_to: StateAddress, *, leg: Leg, accepted_at: float
    ) -> None:
        """Plain TCP to `connect_to` (the original destination, or a Service endpoint), from the
        client's IP."""
        target = Address(str(connect_to.ip), connect_to.port)
        timeout_s = self._settings.connect_timeout_s
        failure: str | None = None
        try:
            sock = upstream_socket(target, mark=self._settings.upstream_mark, source=Address(client.ip, 0))
            upstream = await connect_tcp_end(sock, (target.ip, target.port), timeout_s)
        except SocketSetupError as error:
            failure = str(error)
        except TimeoutError:
            failure = f"{target} did not answer within {timeout_s:g}s"
        except OSError as error:
            failure = f"cannot connect to {target}: {error}"
        if failure is not None:
            self._fail(downstream, leg, ResponseFlag.UPSTREAM_FAILURE, failure, accepted_at)
            return
        if downstream.lost.done():
            upstream.abort()
            self._sessions.refused([leg], ResponseFlag.DOWNSTREAM_TERMINATED, "the client left", accepted_at)
            return
        relay = self._sessions.begin([leg])
        downstream.relay = upstream.relay = relay
        relay.join(downstream, upstream)

    async def _tunnel(
        self,
        downstream: TcpEnd,
        client: SocketAddress,
        tunnel: Tunnel,
        route: TunnelRoute,
        *,
        leg: Callable[[], Leg],
        accepted_at: float,
    ) -> None:
        """HBONE to the destination pod's node, presenting the source workload's identity.

        The client's first bytes, when they came with the connection (up to `EARLY_DATA_MAX`),
        leave with the CONNECT instead of after the answer: the destination holds them until it
        accepts, and drops them if it refuses (the client is reset either way). A new connection's
        first exchange then waits on one round trip between the agents fewer. The connection's
        labels are built once the CONNECT is out, off the path of those bytes.
        """
        credential = await self._credentials.credential(
            tunnel.source_identity, self._settings.credential_wait_s
        )
        if isinstance(credential, CredentialUnavailable):
            detail = f"no certificate for {tunnel.source_identity}: {credential.reason}"
            self._fail(downstream, leg(), ResponseFlag.UPSTREAM_FAILURE, detail, accepted_at)
            return
        early_data = downstream.take_held(EARLY_DATA_MAX)
        stream = await self._pool.open_tunnel(
            route.pool_key,
            credential,
            self._credentials.trust_bundle(),
            route.target,
            client,
            early_data=early_data,
        )
        if isinstance(stream, TunnelNotOpened):
            failure = stream.declined.failure if stream.declined is not None else None
            self._fail(downstream, leg(), declined_tunnel_flag(failure), stream.reason, accepted_at)
            return
        if downstream.lost.done():
            stream.abort()
            flag = ResponseFlag.DOWNSTREAM_TERMINATED
            self._sessions.refused([leg()], flag, "the client left", accepted_at)
            return
        relay = self._sessions.begin([leg()])
        relay.count_sent_before_join(len(early_data))
        downstream.relay = stream.relay = relay
        relay.join(downstream, stream)

    def _fail(
        self, downstream: TcpEnd, leg: Leg, flag: ResponseFlag, detail: str, accepted_at: float
    ) -> None:
        downstream.abort()
        self._sessions.refused([leg], flag, detail, accepted_at)
