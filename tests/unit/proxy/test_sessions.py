"""Metric labels of each side of a connection, from the snapshot's workloads and services."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.observability.metrics import PeerLabels, ServiceLabels
from agent.proxy.sessions import peer_labels, service_labels
from agent.state import build_snapshot
from agent.state.model import Address
from tests.unit.state.factories import service, workload

PRINCIPAL = "spiffe://cluster.local/ns/shop/sa/web"


def test_unknown_peer_keeps_only_its_identity() -> None:
    assert peer_labels(None, PRINCIPAL) == PeerLabels(principal=PRINCIPAL)
    assert peer_labels(None) == PeerLabels()


@pytest.mark.parametrize(
    ("labels", "app", "version"),
    [
        ({"app": "web", "version": "v1"}, "web", "v1"),
        ({"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "2.0"}, "web", "2.0"),
        ({"app": "web", "app.kubernetes.io/name": "other"}, "web", ""),
        ({"tier": "front"}, "", ""),
    ],
)
def test_app_and_version_follow_istios_label_fallbacks(
    labels: dict[str, str], app: str, version: str
) -> None:
    labelled = peer_labels(workload("web-1", "10.1.0.5", namespace="shop", labels=labels), PRINCIPAL)
    assert (labelled.workload, labelled.namespace, labelled.principal) == ("web-1", "shop", PRINCIPAL)
    assert (labelled.app, labelled.version) == (app, version)


def test_canonical_names_come_from_istio_labels() -> None:
    labels = {"service.istio.io/canonical-name": "storefront", "service.istio.io/canonical-revision": "r7"}
    labelled = peer_labels(workload("web-1", "10.1.0.5", labels=labels))
    assert (labelled.canonical_service, labelled.canonical_revision) == ("storefront", "r7")


def test_service_labels_name_the_addressed_service() -> None:
    snapshot = build_snapshot(
        version=1,
        created_at=0.0,
        workloads=[workload("web-1", "10.1.0.5", namespace="shop", labels={"app": "web"})],
        services=[service("web", "10.96.0.10", (80, 8080), namespace="shop")],
    )
    target = snapshot.service(Address(ip=ip_address("10.96.0.10"), port=80))
    assert target is not None
    assert service_labels(target) == ServiceLabels(
        host="web.shop.svc.cluster.local", name="web", namespace="shop"
    )
    assert service_labels(None) == ServiceLabels()
