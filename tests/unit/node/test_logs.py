"""Application and access logs go out as text or one JSON object per line, the access log at any level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agent.node.logs import configure_logging
from agent.observability.accesslog import ACCESS_LOGGER


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
