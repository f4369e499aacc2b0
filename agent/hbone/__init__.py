"""Sans-IO HBONE: HTTP/2 CONNECT tunnels over mutual TLS, as bytes in and events out.

`HboneClientConnection` opens tunnels on a pooled connection, `HboneServerConnection` accepts them;
both take bytes with `receive_data` (returning typed events) and give bytes with `data_to_send`.
No sockets, TLS or clocks here: the I/O layer (agent.proxy) owns those.
"""

from __future__ import annotations

from agent.hbone.client import HboneClientConnection
from agent.hbone.config import HboneSettings, hbone_settings_from_env
from agent.hbone.connection import HboneConnection
from agent.hbone.errors import ErrorCode, HboneUsageError, RefusalReason, TunnelFailure
from agent.hbone.events import (
    ClientEvent,
    ConnectionClosing,
    ConnectionEvent,
    ConnectionFailed,
    DataReceived,
    MalformedTunnelRequest,
    OutboundBufferDrained,
    PeerHalfClosed,
    PingAcknowledged,
    ServerEvent,
    StreamReset,
    TunnelEstablished,
    TunnelRefused,
    TunnelRequested,
)
from agent.hbone.request import SocketAddress
from agent.hbone.server import HboneServerConnection

__all__ = [
    "ClientEvent",
    "ConnectionClosing",
    "ConnectionEvent",
    "ConnectionFailed",
    "DataReceived",
    "ErrorCode",
    "HboneClientConnection",
    "HboneConnection",
    "HboneServerConnection",
    "HboneSettings",
    "HboneUsageError",
    "MalformedTunnelRequest",
    "OutboundBufferDrained",
    "PeerHalfClosed",
    "PingAcknowledged",
    "RefusalReason",
    "ServerEvent",
    "SocketAddress",
    "StreamReset",
    "TunnelEstablished",
    "TunnelFailure",
    "TunnelRefused",
    "TunnelRequested",
    "hbone_settings_from_env",
]
