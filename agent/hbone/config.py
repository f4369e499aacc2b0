"""Settings of the HBONE layer: HTTP/2 flow-control windows, frame size and stream limit.

The defaults are sized for bulk throughput of a Python relay (ARCHITECTURE.md section 3; the
figures are in FACTS.md "Data-plane speed"): with h2's default 64 KiB windows a relay pair is capped
at 200-350 MB/s, with 16 MiB windows and 1 MiB frames it reached 0.4-0.95 GB/s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from agent.settings import SettingsError, int_from_env

MIB = 1024 * 1024

HTTP2_MIN_WINDOW = 65_535
"""The window every HTTP/2 connection and stream starts with (RFC 9113 6.9.2)."""

HTTP2_MAX_WINDOW = 2**31 - 1
"""The largest flow-control window HTTP/2 allows (RFC 9113 6.9.1)."""

HTTP2_MIN_FRAME_SIZE = 16_384
"""The smallest SETTINGS_MAX_FRAME_SIZE a peer may advertise (RFC 9113 6.5.2)."""

HTTP2_MAX_FRAME_SIZE = 2**24 - 1
"""The largest SETTINGS_MAX_FRAME_SIZE a peer may advertise (RFC 9113 6.5.2)."""

HTTP2_MAX_SETTING_VALUE = 2**32 - 1
"""Every HTTP/2 setting is an unsigned 32-bit value (RFC 9113 6.5.1)."""


@dataclass(frozen=True)
class HboneSettings:
    """How one HBONE (HTTP/2 over mutual TLS) connection advertises and uses flow control."""

    stream_window: int = 16 * MIB
    """Receive window of each tunnel (SETTINGS_INITIAL_WINDOW_SIZE): how many bytes the peer may
    send on one stream before this side acknowledges consumption. h2 hands window back in steps of
    half the window, so half of it must cover the bytes in flight while an update travels through
    two busy event loops (milliseconds at ~1 GB/s); it is also the most one stalled receiver can
    hold unacknowledged."""

    connection_window: int = 64 * MIB
    """Receive window of the whole connection, shared by its tunnels: it bounds the memory of
    unacknowledged data per connection. Four stream windows, so a tunnel whose receiver stopped
    reading (holding at most one stream window) cannot stall the other tunnels of the pooled
    connection on its own."""

    max_frame_size: int = 1 * MIB
    """Largest DATA frame this side accepts (SETTINGS_MAX_FRAME_SIZE); senders split at the peer's
    advertised value. Large frames keep the per-frame Python work small on the bulk path."""

    max_concurrent_streams: int = 100
    """Tunnels per connection: advertised to clients (SETTINGS_MAX_CONCURRENT_STREAMS) and the
    most a client opens on one pooled connection (the lower of this and the server's value)."""

    def __post_init__(self) -> None:
        for name in ("stream_window", "connection_window"):
            value = getattr(self, name)
            if not HTTP2_MIN_WINDOW <= value <= HTTP2_MAX_WINDOW:
                raise SettingsError(
                    f"hbone.{name}: must be {HTTP2_MIN_WINDOW}-{HTTP2_MAX_WINDOW} bytes, got {value}"
                )
        if self.connection_window < self.stream_window:
            raise SettingsError(
                f"hbone.connection_window: must be at least stream_window ({self.stream_window}),"
                f" got {self.connection_window}"
            )
        if not HTTP2_MIN_FRAME_SIZE <= self.max_frame_size <= HTTP2_MAX_FRAME_SIZE:
            raise SettingsError(
                f"hbone.max_frame_size: must be {HTTP2_MIN_FRAME_SIZE}-{HTTP2_MAX_FRAME_SIZE} bytes,"
                f" got {self.max_frame_size}"
            )
        if not 1 <= self.max_concurrent_streams <= HTTP2_MAX_SETTING_VALUE:
            raise SettingsError(
                f"hbone.max_concurrent_streams: must be 1-{HTTP2_MAX_SETTING_VALUE},"
                f" got {self.max_concurrent_streams}"
            )


def hbone_settings_from_env(env: Mapping[str, str] | None = None) -> HboneSettings:
    """Builds `HboneSettings` from `AMBIENT_HBONE_*` environment variables over the defaults."""
    env = os.environ if env is None else env
    d = HboneSettings()
    return HboneSettings(
        stream_window=int_from_env(env, "AMBIENT_HBONE_STREAM_WINDOW", d.stream_window),
        connection_window=int_from_env(env, "AMBIENT_HBONE_CONNECTION_WINDOW", d.connection_window),
        max_frame_size=int_from_env(env, "AMBIENT_HBONE_MAX_FRAME_SIZE", d.max_frame_size),
        max_concurrent_streams=int_from_env(env, "AMBIENT_HBONE_MAX_STREAMS", d.max_concurrent_streams),
    )
