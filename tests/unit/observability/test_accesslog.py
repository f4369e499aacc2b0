"""Access lines carry the connection's identities and byte counts in text and JSON forms."""

from __future__ import annotations

import json
import logging

import pytest

from agent.observability.accesslog import ACCESS_LOGGER, AccessLog, AccessRecord
from agent.observability.metrics import AgentMetrics, PeerLabels, TcpLabels

CLIENT = PeerLabels(workload="sleep", namespace="demo", principal="spiffe://cluster.local/ns/demo/sa/sleep")
SERVER = PeerLabels(workload="echo", namespace="demo", principal="spiffe://cluster.local/ns/demo/sa/echo")


def record(error: str = "") -> AccessRecord:
    connection = AgentMetrics().tcp.opened(TcpLabels(reporter="source", source=CLIENT, destination=SERVER))
    connection.sent, connection.received = 1500, 42
    return AccessRecord.of(
        connection,
        "outbound",
        "10.244.1.5:40000",
        "10.244.2.7:8080",
        error=error,
        now=connection.started + 0.25,
    )


def test_json_line_has_both_identities_bytes_and_duration() -> None:
    line = json.loads(record().format("json"))
    assert line["src.identity"] == CLIENT.principal
    assert line["dst.identity"] == SERVER.principal
    assert (line["bytes_sent"], line["bytes_recv"]) == (1500, 42)
    assert line["duration_ms"] == 250.0
    assert line["direction"] == "outbound"
    assert "error" not in line


def test_text_line_is_key_value_and_quotes_spaces() -> None:
    line = record(error="connection refused by upstream").format("text")
    assert "src.addr=10.244.1.5:40000" in line
    assert "dst.workload=echo" in line
    assert 'error="connection refused by upstream"' in line


def test_unknown_peer_fields_are_omitted() -> None:
    connection = AgentMetrics().tcp.opened(
        TcpLabels(reporter="destination", source=PeerLabels(), destination=SERVER)
    )
    fields = AccessRecord.of(connection, "inbound", "10.0.0.1:1", "10.244.2.7:80").as_dict()
    assert "src.identity" not in fields
    assert fields["dst.identity"] == SERVER.principal


def test_access_log_writes_to_its_own_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        AccessLog("json").write_all([record()])
    [entry] = caplog.records
    assert entry.name == ACCESS_LOGGER
    assert json.loads(entry.getMessage())["bytes_sent"] == 1500


def test_access_records_are_info_records_made_by_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        AccessLog("text").write_all([record()])
    [entry] = caplog.records
    assert (entry.levelname, entry.funcName, entry.module) == ("INFO", "write_all", "accesslog")
    assert entry.getMessage() == record().format("text")


def test_access_log_respects_the_logger_level(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[str]] = []
    with caplog.at_level(logging.WARNING, logger=ACCESS_LOGGER):
        AccessLog("text").write_all([record()])
        AccessLog("text", output=lambda lines: calls.append(list(lines))).write_all([record()])
    assert (caplog.records, calls) == ([], [])


def test_records_go_to_an_output_in_one_call_in_order_and_not_to_the_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[str]] = []
    access_log = AccessLog("text", output=lambda lines: calls.append(list(lines)))
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        access_log.write_all([record(), record(error="reset")])
    assert calls == [[record().format("text"), record(error="reset").format("text")]]
    assert caplog.records == []


def test_an_empty_batch_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[list[str]] = []
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        AccessLog("json", output=lambda lines: calls.append(list(lines))).write_all([])
        AccessLog("json").write_all([])
    assert (calls, caplog.records) == ([], [])


def test_text_line_is_exactly_the_fields_in_order() -> None:
    line = record(error='upstream said "no"').format("text")
    assert line == (
        "direction=outbound src.addr=10.244.1.5:40000 src.workload=sleep src.namespace=demo"
        f" src.identity={CLIENT.principal} dst.addr=10.244.2.7:8080 dst.workload=echo"
        f" dst.namespace=demo dst.identity={SERVER.principal} bytes_sent=1500 bytes_recv=42"
        ' duration_ms=250.0 error="upstream said \\"no\\""'
    )
