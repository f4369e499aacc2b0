"""A client and a server HBONE connection wired back to back in memory: bytes move only on `pump`."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address

from agent.hbone import (
    ClientEvent,
    DataReceived,
    HboneClientConnection,
    HboneServerConnection,
    HboneSettings,
    ServerEvent,
    SocketAddress,
    TunnelEstablished,
    TunnelRequested,
)

TARGET = SocketAddress(ip_address("10.0.2.7"), 8080)
CLIENT = SocketAddress(ip_address("10.0.1.5"), 43210)

_MAX_ROUNDS = 1000
"""More exchanges than any test needs: more means two sides answer each other forever."""


class Wire:
    """Shuttles `data_to_send()` of each side into the other's `receive_data` until both are quiet."""

    def __init__(
        self, client_settings: HboneSettings | None = None, server_settings: HboneSettings | None = None
    ) -> None:
        self.client = HboneClientConnection(client_settings)
        self.server = HboneServerConnection(server_settings)
        self.pump()

    def pump(self) -> tuple[list[ClientEvent], list[ServerEvent]]:
        """Exchanges bytes until neither side has any to send; returns the events each side got."""
        client_events: list[ClientEvent] = []
        server_events: list[ServerEvent] = []
        for _ in range(_MAX_ROUNDS):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return client_events, server_events
            if to_server:
                server_events += self.server.receive_data(to_server)
            if to_client:
                client_events += self.client.receive_data(to_client)
        raise AssertionError("the connections never went quiet")

    def open(self, target: SocketAddress = TARGET) -> int:
        """Opens a tunnel and has the server accept it; returns its stream id."""
        stream_id = self.client.open_tunnel(target, CLIENT)
        _, server_events = self.pump()
        assert server_events == [TunnelRequested(stream_id, target, CLIENT)]
        assert self.server.accept(stream_id)
        client_events, _ = self.pump()
        assert client_events == [TunnelEstablished(stream_id, 200)]
        return stream_id


def received_bytes(events: list[ClientEvent] | list[ServerEvent], stream_id: int) -> bytes:
    """The tunnel bytes `events` delivered on `stream_id`, in order."""
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


def flow_controlled(events: list[ClientEvent] | list[ServerEvent], stream_id: int) -> int:
    """How many flow-controlled bytes `events` delivered on `stream_id` (what to acknowledge)."""
    return sum(
        e.flow_controlled_length for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def merged(events: Sequence[object]) -> list[object]:
    """Events with consecutive pieces of tunnel bytes on one stream joined (how they were cut up
    depends on how the bytes arrived)."""
    out: list[object] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, DataReceived)
            and isinstance(last, DataReceived)
            and last.stream_id == event.stream_id
        ):
            out[-1] = DataReceived(
                event.stream_id,
                last.data + event.data,
                last.flow_controlled_length + event.flow_controlled_length,
            )
        else:
            out.append(event)
    return out
