"""Access log: one line per closed (or failed) connection, as text or JSON.

The line is built from the connection's metric labels and byte counts, so the log and `/metrics`
can never disagree about who talked to whom or how much they sent.

Lines go out as INFO records of their own logger, or, when the process hands the access log an
`AccessOutput` (the node process does: its log stream), straight to that output, several lines in
one write. A line is written for every connection, and `logging`'s record machinery and a flush
per record cost more than the line itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.observability.metrics import PeerLabels, TrackedConnection

ACCESS_LOGGER = "ambient_agent.access"
"""Name of the logger the access lines go to (separate from the application log)."""

Direction = Literal["inbound", "outbound"]
LogFormat = Literal["text", "json"]

AccessOutput = Callable[[Sequence[str]], None]
"""Writes access lines (each as `AccessRecord.format` made it), in order, framed as the process frames
an INFO record of the access logger."""


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
    """Writes access records in the configured format: to `output` when given, else as records of
    the access logger.

    A logger record is an INFO record of the access logger, as `logger.info(line)` makes it, except
    that it names this class's `write_all` as its origin instead of finding its caller: `logging`
    walks the stack for that on every record.
    """

    def __init__(
        self,
        log_format: LogFormat = "text",
        logger: logging.Logger | None = None,
        output: AccessOutput | None = None,
    ) -> None:
        self._format: LogFormat = log_format
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._output = output

    def write_all(self, records: Sequence[AccessRecord]) -> None:
        """Writes `records` in order (to an output, in one write), unless the access logger's level
        is above INFO."""
        logger = self._logger
        if not records or not logger.isEnabledFor(logging.INFO):
            return
        log_format = self._format
        if self._output is not None:
            self._output([record.format(log_format) for record in records])
            return
        for record in records:
            line = record.format(log_format)
            logger.handle(logger.makeRecord(logger.name, logging.INFO, *_ORIGIN, line, (), None, "write_all"))


_ORIGIN = (__file__, AccessLog.write_all.__code__.co_firstlineno)
"""The path and line an access-log record names as where it was made (`AccessLog.write_all`)."""
