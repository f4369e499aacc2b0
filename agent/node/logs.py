"""Logging of the node process: the application log and the access log on one stream, text or JSON.

The access log (`agent.observability.accesslog`) formats its own lines; here they get a timestamp and
go out at every application log level, since one line per connection is the record operators audit,
not a debugging aid.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from agent.observability.accesslog import ACCESS_LOGGER, LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any).

    Access-log records are JSON objects already (`AccessRecord.format("json")`); they get the time and
    are otherwise written as they are.
    """

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        message = record.getMessage()
        if record.name == ACCESS_LOGGER and message.startswith("{"):
            return f'{{"time":"{time}",{message[1:]}'
        fields: dict[str, object] = {
            "time": time,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, separators=(",", ":"))


def configure_logging(level: str, log_format: LogFormat, stream: TextIO = sys.stderr) -> None:
    """Sends every log record to `stream` in `log_format`; application records from `level` up.

    `level` is a `logging` level name (validated by the settings); the access log stays at INFO.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
