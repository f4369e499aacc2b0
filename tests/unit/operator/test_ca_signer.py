"""The objects the CA writes: conditions added without losing the existing ones, the chain in
status.certificate, and an Event naming the CSR and the outcome."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.identity.csr import generate_key
from agent.identity.spiffe import SpiffeId
from agent.operator.ca_decision import Approve, Deny
from agent.operator.ca_signer import csr_event, with_certificate, with_condition

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def pending_csr() -> dict[str, Any]:
    return {
        "metadata": {"name": "shop.cart.x7k2p", "uid": "u-1", "resourceVersion": "42"},
        "spec": {"signerName": "ambient-agent.dev/spiffe"},
        "status": {"conditions": [{"type": "Approved", "status": "True"}]},
    }


def test_conditions_are_appended_to_a_copy() -> None:
    csr = pending_csr()
    updated = with_condition(csr, {"type": "Failed", "status": "True"})
    assert [c["type"] for c in updated["status"]["conditions"]] == ["Approved", "Failed"]
    assert [c["type"] for c in csr["status"]["conditions"]] == ["Approved"]
    assert updated["metadata"]["resourceVersion"] == "42"


def test_the_chain_goes_base64_into_status_certificate() -> None:
    updated = with_certificate(pending_csr(), b"-----BEGIN CERTIFICATE-----\n...")
    assert base64.b64decode(updated["status"]["certificate"]) == b"-----BEGIN CERTIFICATE-----\n..."
    assert updated["status"]["conditions"] == pending_csr()["status"]["conditions"]


def test_events_name_the_csr_and_the_outcome() -> None:
    approve = Approve(
        SpiffeId("cluster.local", "shop", "cart"), generate_key().public_key(), "node-1", timedelta(hours=1)
    )
    issued = csr_event(pending_csr(), approve, namespace="default", instance="ca-0", now=NOW)
    assert issued["involvedObject"] == {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "name": "shop.cart.x7k2p",
        "uid": "u-1",
    }
    assert (issued["type"], issued["reason"], issued["message"]) == ("Normal", "Issued", approve.message)
    assert issued["metadata"] == {"generateName": "shop.cart.x7k2p.", "namespace": "default"}
    assert issued["firstTimestamp"] == "2030-01-01T12:00:00Z"
    assert issued["reportingInstance"] == "ca-0"

    denied = csr_event(
        pending_csr(),
        Deny("no pod with service account shop/db"),
        namespace="default",
        instance="ca-0",
        now=NOW,
    )
    assert (denied["type"], denied["reason"], denied["message"]) == (
        "Warning",
        "Denied",
        "no pod with service account shop/db",
    )
