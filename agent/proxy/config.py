"""Settings of the data plane: listeners, upstream mark, HBONE windows, timeouts, pool and drain."""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.hbone.config import HboneSettings
from agent.settings import PortSettings, SettingsError


@dataclass(frozen=True)
class DataPlaneSettings:
    """How the data plane listens, dials, pools tunnels and shuts down."""

    ports: PortSettings
    """Listening ports: outbound capture, inbound plaintext capture, inbound HBONE."""

    upstream_mark: int
    """`SO_MARK` of every socket the data plane opens (RedirectSettings.upstream_mark), so the
    node's capture rules never take the agent's own connections."""

    hbone: HboneSettings
    """HTTP/2 windows, frame size and streams per pooled connection."""

    listen_ipv6: bool = False
    """Also bind the three listeners on `[::]` (dual-stack nodes)."""

    connect_timeout_s: float = 5.0
    """Seconds to establish an upstream TCP connection, or an HBONE connection including its TLS
    handshake; a tunnel's CONNECT answer may take twice this (the server connects upstream first)."""

    credential_wait_s: float = 2.0
    """Seconds a connection waits for a certificate that is not issued yet before it is refused."""

    pool_idle_timeout_s: float = 300.0
    """Seconds a pooled HBONE connection without tunnels stays open for reuse."""

    keepalive_interval_s: float = 30.0
    """Seconds between keepalive PINGs on every HBONE connection; one left unanswered for a whole
    interval ends the connection (and resets its tunnels)."""

    drain_deadline_s: float = 20.0
    """Seconds `drain` lets open connections finish before aborting the rest."""

    def __post_init__(self) -> None:
        if not 0 < self.upstream_mark <= 0xFFFFFFFF:
            raise SettingsError(f"upstream_mark: must be a 32-bit non-zero mark, got {self.upstream_mark:#x}")
        for name in ("connect_timeout_s", "pool_idle_timeout_s", "keepalive_interval_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise SettingsError(f"{name}: must be a positive number of seconds, got {value}")
        for name in ("credential_wait_s", "drain_deadline_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise SettingsError(f"{name}: must be zero or a positive number of seconds, got {value}")
