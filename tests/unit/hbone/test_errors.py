"""Refusal reasons and failures carry their HTTP status; error codes read leniently off the wire."""

from __future__ import annotations

import pytest

from agent.hbone.errors import ErrorCode, RefusalReason, TunnelFailure


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (RefusalReason.MALFORMED_REQUEST, 400),
        (RefusalReason.DENIED_BY_POLICY, 401),
        (RefusalReason.NO_LOCAL_WORKLOAD, 503),
        (RefusalReason.UPSTREAM_REFUSED, 503),
        (RefusalReason.UPSTREAM_UNREACHABLE, 503),
    ],
)
def test_refusal_statuses_follow_the_hbone_design(reason: RefusalReason, status: int) -> None:
    assert reason.status == status


def test_refusal_reasons_are_distinct_even_when_they_share_a_status() -> None:
    assert len(set(RefusalReason)) == 5
    assert len({reason.description for reason in RefusalReason}) == 5


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (400, TunnelFailure.MALFORMED_REQUEST),
        (401, TunnelFailure.DENIED),
        (403, TunnelFailure.DENIED),
        (503, TunnelFailure.UNAVAILABLE),
        (502, TunnelFailure.UNEXPECTED_STATUS),
        (301, TunnelFailure.UNEXPECTED_STATUS),
    ],
)
def test_client_reads_failures_from_status(status: int, failure: TunnelFailure) -> None:
    assert TunnelFailure.from_status(status) is failure


def test_unknown_wire_error_codes_read_as_internal_error() -> None:
    assert ErrorCode.from_wire(0xA) is ErrorCode.CONNECT_ERROR
    assert ErrorCode.from_wire(0xFF) is ErrorCode.INTERNAL_ERROR
