"""Logging of the node process: the application log and the access log on one stream, text or JSON.

The access log (`agent.observability.accesslog`) formats its own lines; here they get a timestamp and
go out at every application log level, since one line per connection is the record operators audit,
not a debugging aid. The data plane hands them over in batches (`configure_logging` returns the
output it writes them to): framed exactly as a record of the access logger would be, under the
handler's lock, one write and one flush per batch instead of a record, a format and a flush per line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from agent.observability.accesslog import ACCESS_LOGGER, AccessOutput, LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any).

    Access-log records are JSON objects already (`AccessRecord.format("json")`); they get the time and
    are otherwise written as they are.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = _json_time(record.created)
        message = record.getMessage()
        if record.name == ACCESS_LOGGER and message.startswith("{"):
            return _json_access_line(when, message)
        fields: dict[str, object] = {
            "time": when,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, separators=(",", ":"))


def _json_time(created: float) -> str:
    """A JSON line's time: UTC, ISO 8601, milliseconds."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def _json_access_line(when: str, message: str) -> str:
    """An access line (a JSON object already) with the time as its first field."""
    return f'{{"time":"{when}",{message[1:]}'


def configure_logging(level: str, log_format: LogFormat, stream: TextIO = sys.stderr) -> AccessOutput:
    """Sends every log record to `stream` in `log_format`; application records from `level` up.

    `level` is a `logging` level name (validated by the settings); the access log stays at INFO.
    Returns the output for access lines on the same stream (see the module docstring).
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)

    def write_access_lines(messages: Sequence[str]) -> None:
        # One access-logger record frames the whole batch: its time, level and logger name.
        frame = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, "", (), None)
        if log_format == "json":
            when = _json_time(frame.created)
            lines = [_json_access_line(when, message) for message in messages]
        else:
            prefix = handler.format(frame)  # the message comes last in TEXT_FORMAT
            lines = [prefix + message for message in messages]
        text = "\n".join(lines) + "\n"
        handler.acquire()
        try:
            stream.write(text)
            stream.flush()
        except Exception:
            # Left to `logging`, as records: its handler reports a broken stream and carries on.
            access_logger = logging.getLogger(ACCESS_LOGGER)
            for message in messages:
                access_logger.info(message)
        finally:
            handler.release()

    return write_access_lines
