"""Access log: one line per closed (or failed) connection, as text or JSON, on its own logger.

The line is built from the connection's metric labels and byte counts, so the log and `/metrics`
can never disagree about who talked to whom or how much they sent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

from agent.observability.metrics import PeerLabels, TrackedConnection

ACCESS_LOGGER = "ambient_agent.access"
"""Name of the logger the access lines go to (separate from the application log)."""

Direction = Literal["inbound", "outbound"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """Everything one access-log line says about a connection."""

    direction: Direction
    """`outbound` on the source's node, `inbound` on the destination's."""

    source_address: str
    """`ip:port` of the client as the agent saw it."""

    destination_address: str
    """`ip:port` the client asked for (the original destination)."""

    source: PeerLabels
    """Source workload, namespace and identity."""

    destination: PeerLabels
    """Destination workload, namespace and identity."""

    bytes_sent: int
    """Bytes from source to destination."""

    bytes_received: int
    """Bytes from destination to source."""

    duration_s: float
    """Seconds from accept to close."""

    error: str = ""
    """Why the connection failed or was refused; empty when it ended normally."""

    @classmethod
    def of(
        cls,
        connection: TrackedConnection,
        direction: Direction,
        source_address: str,
        destination_address: str,
        *,
        error: str = "",
        now: float | None = None,
    ) -> AccessRecord:
        """The record of a tracked connection at close."""
        ended = time.monotonic() if now is None else now
        return cls(
            direction=direction,
            source_address=source_address,
            destination_address=destination_address,
            source=connection.labels.source,
            destination=connection.labels.destination,
            bytes_sent=connection.sent,
            bytes_received=connection.received,
            duration_s=max(0.0, ended - connection.started),
            error=error,
        )

    def as_dict(self) -> dict[str, object]:
        """The JSON form: flat keys, stable names, absent values omitted."""
        fields: dict[str, object] = {
            "direction": self.direction,
            "src.addr": self.source_address,
            "src.workload": self.source.workload,
            "src.namespace": self.source.namespace,
            "src.identity": self.source.principal,
            "dst.addr": self.destination_address,
            "dst.workload": self.destination.workload,
            "dst.namespace": self.destination.namespace,
            "dst.identity": self.destination.principal,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_received,
            "duration_ms": round(self.duration_s * 1000, 3),
            "error": self.error,
        }
        return {key: value for key, value in fields.items() if value != ""}

    def format(self, log_format: LogFormat) -> str:
        """One line, JSON or `key=value` text (values with spaces quoted)."""
        fields = self.as_dict()
        if log_format == "json":
            return json.dumps({"message": "connection complete", **fields}, separators=(",", ":"))
        parts = []
        for key, value in fields.items():
            text = str(value)
            if " " in text or '"' in text or not text:
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class AccessLog:
    """Writes access records to the access logger in the configured format.

    A line is an INFO record of the access logger, as `logger.info(line)` makes it, except that the
    record names this method as its origin instead of finding its caller: `logging` walks the stack
    for that on every record, and a line is written for every connection.
    """

    def __init__(self, log_format: LogFormat = "text", logger: logging.Logger | None = None) -> None:
        self._format: LogFormat = log_format
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)

    def write(self, record: AccessRecord) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        line = record.format(self._format)
        logger.handle(logger.makeRecord(logger.name, logging.INFO, *_ORIGIN, line, (), None, "write"))


_ORIGIN = (__file__, AccessLog.write.__code__.co_firstlineno)
"""The path and line an access-log record names as where it was made (`AccessLog.write`)."""
