"""Application and access logs go out as text or one JSON object per line, the access log at any level."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from agent.node.logs import configure_logging
from agent.observability.accesslog import ACCESS_LOGGER, LogFormat


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger(ACCESS_LOGGER).level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).setLevel(access_level)


def test_json_lines_carry_time_level_logger_and_message() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    logging.getLogger("agent.test").info("hello %s", "there")
    logging.getLogger("agent.test").debug("not shown")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert {k: record[k] for k in ("level", "logger", "message")} == {
        "level": "info",
        "logger": "agent.test",
        "message": "hello there",
    }
    assert record["time"].endswith("+00:00")


def test_access_records_stay_one_object_and_are_written_at_any_level() -> None:
    stream = io.StringIO()
    configure_logging("error", "json", stream)
    logging.getLogger(ACCESS_LOGGER).info('{"message":"connection complete","bytes_sent":5}')
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "connection complete"
    assert record["bytes_sent"] == 5
    assert "time" in record


def test_text_lines_name_the_level_and_logger() -> None:
    stream = io.StringIO()
    configure_logging("warning", "text", stream)
    logging.getLogger("agent.test").warning("careful")
    logging.getLogger("agent.test").info("quiet")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" WARNING agent.test: careful")


class CountingStream(io.StringIO):
    """Counts the writes and flushes that reach the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_output_frames_lines_as_the_access_logger_would_in_one_write(
    log_format: LogFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = CountingStream()
    write_access_lines = configure_logging("warning", log_format, stream)
    monkeypatch.setattr(time, "time", lambda: 1_764_126_000.0456)
    messages = ['{"message":"connection complete","n":1}', '{"message":"connection complete","n":2}']
    write_access_lines(messages)
    assert (stream.writes, stream.flushes) == (1, 1)
    for message in messages:  # the same lines, through the logger, at the same time
        logging.getLogger(ACCESS_LOGGER).info(message)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[:2] == lines[2:]
    assert lines[0] != lines[1]


def test_text_access_lines_carry_the_time_in_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    write_access_lines = configure_logging("warning", "text", stream)
    monkeypatch.setattr(time, "time", lambda: 1_764_126_000.0456)
    write_access_lines(["direction=outbound"])
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(",045 INFO ambient_agent.access: direction=outbound")


def test_access_lines_that_cannot_be_written_are_left_to_the_handlers_error_handling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    write_access_lines = configure_logging("warning", "text", stream)
    stream.close()
    reported: list[logging.LogRecord] = []
    (handler,) = logging.getLogger().handlers
    monkeypatch.setattr(handler, "handleError", reported.append)
    write_access_lines(["direction=outbound", "direction=inbound"])
    assert [record.getMessage() for record in reported] == ["direction=outbound", "direction=inbound"]
