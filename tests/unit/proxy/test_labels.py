"""Istio's metric labels and response flags for every outcome of a connection, as each side reports it.

The table runs the real outbound decision over one snapshot where it applies, and compares the whole
label set (every one of Istio's labels, "unknown" included) with what Istio would report.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_address

import pytest

from agent.hbone import RefusalReason, TunnelFailure
from agent.observability.metrics import LABEL_NAMES, PeerLabels, ServiceLabels, TcpLabels
from agent.proxy.labels import (
    ResponseFlag,
    declined_tunnel_flag,
    failed_labels,
    hbone_inbound_labels,
    inbound_refusal_flag,
    outbound_labels,
    outbound_refusal_flag,
    peer_labels,
    plaintext_inbound_labels,
    same_node_inbound_labels,
    service_labels,
)
from agent.state import (
    Address,
    LoadBalanced,
    OutboundDecision,
    Passthrough,
    Refuse,
    RefuseReason,
    Tunnel,
    build_snapshot,
    decide_outbound,
)
from tests.unit.state.factories import service, workload

SLEEP = workload("sleep", "10.1.0.2", namespace="shop", labels={"app": "sleep", "version": "v1"})
LOCAL = workload("local", "10.1.0.3", namespace="shop")
ECHO = workload("echo", "10.2.0.5", namespace="shop", node="node-b")
PLAIN = workload("plain", "10.2.0.7", namespace="shop", node="node-b", enrolled=False)
OUTSIDER_IP = "10.9.0.9"
"""A client address that is no pod."""
EXTERNAL = Address(ip_address("203.0.113.1"), 443)
"""A destination that is neither a pod nor a service."""

SERVICE_IPS = {"echo": "10.96.0.5", "plain": "10.96.0.7", "empty": "10.96.0.9"}
SNAPSHOT = build_snapshot(
    version=1,
    created_at=0.0,
    workloads=[SLEEP, LOCAL, ECHO, PLAIN],
    services=[
        service("echo", SERVICE_IPS["echo"], (80, 8080), namespace="shop"),
        service("plain", SERVICE_IPS["plain"], (80, 8080), namespace="shop"),
        service("empty", SERVICE_IPS["empty"], (80, 8080), namespace="shop", selector={"app": "nobody"}),
    ],
)


def spiffe(service_account: str) -> str:
    return f"spiffe://cluster.local/ns/shop/sa/{service_account}"


def route(source_ip: str, destination: Address, decided: type[OutboundDecision]) -> TcpLabels:
    """The source side's labels of the connection the real decision routes, which must be `decided`."""
    decision = decide_outbound(SNAPSHOT, ip_address(source_ip), destination, pick=lambda _: 0)
    assert isinstance(decision, decided), decision
    return outbound_labels(decision, SNAPSHOT, ip_address(source_ip), destination)


def pod(name: str, port: int = 8080) -> Address:
    return Address(next(w.ip for w in (SLEEP, LOCAL, ECHO, PLAIN) if w.name == name), port)


def vip(name: str) -> Address:
    return Address(ip_address(SERVICE_IPS[name]), 80)


# What Istio reports of one side: the workload's names, app and version labels, and the canonical
# service and revision falling back to the app and version, then "latest".
UNKNOWN_PEER = {
    "workload": "unknown",
    "workload_namespace": "unknown",
    "app": "unknown",
    "version": "unknown",
    "canonical_service": "unknown",
    "canonical_revision": "latest",
    "cluster": "unknown",
}


def known(name: str, version: str = "unknown") -> dict[str, str]:
    """A workload of namespace `shop` whose `app` label is its name."""
    return {
        "workload": name,
        "workload_namespace": "shop",
        "app": name,
        "version": version,
        "canonical_service": name,
        "canonical_revision": "latest" if version == "unknown" else version,
        "cluster": "unknown",
    }


SLEEP_PEER, LOCAL_PEER, ECHO_PEER, PLAIN_PEER = (
    known("sleep", "v1"),
    known("local"),
    known("echo"),
    known("plain"),
)


def expected(
    reporter: str,
    *,
    source: dict[str, str] = UNKNOWN_PEER,
    source_principal: str = "unknown",
    destination: dict[str, str] = UNKNOWN_PEER,
    destination_principal: str = "unknown",
    service_name: str = "",
    flag: str = "-",
    policy: str = "unknown",
) -> dict[str, str]:
    """Every label Istio reports, for a service `service_name` of namespace `shop` if given."""
    return {
        "reporter": reporter,
        **{f"source_{name}": value for name, value in source.items()},
        "source_principal": source_principal,
        **{f"destination_{name}": value for name, value in destination.items()},
        "destination_principal": destination_principal,
        "destination_service": f"{service_name}.shop.svc.cluster.local" if service_name else "unknown",
        "destination_service_name": service_name or "unknown",
        "destination_service_namespace": "shop" if service_name else "unknown",
        "request_protocol": "tcp",
        "response_flags": flag,
        "connection_security_policy": policy,
    }


def tunnel_to_echo() -> TcpLabels:
    return route(str(SLEEP.ip), pod("echo"), Tunnel)


def passthrough_to_plain() -> TcpLabels:
    return route(str(SLEEP.ip), pod("plain"), Passthrough)


def hbone_from_sleep_to_echo() -> TcpLabels:
    return hbone_inbound_labels(SLEEP, spiffe("sleep"), ECHO, spiffe("echo"))


def plaintext_to_echo() -> TcpLabels:
    return plaintext_inbound_labels(None, ECHO, spiffe("echo"))


def same_node_outbound() -> TcpLabels:
    return route(str(SLEEP.ip), pod("local"), Tunnel)


TUNNEL_SOURCE = {"source": SLEEP_PEER, "source_principal": spiffe("sleep")}
TUNNEL_TO_ECHO = {
    **TUNNEL_SOURCE,
    "destination": ECHO_PEER,
    "destination_principal": spiffe("echo"),
    "policy": "mutual_tls",
}
TUNNEL_TO_LOCAL = {
    **TUNNEL_SOURCE,
    "destination": LOCAL_PEER,
    "destination_principal": spiffe("local"),
    "policy": "mutual_tls",
}
HBONE_TO_ECHO = {"destination": ECHO_PEER, "destination_principal": spiffe("echo"), "policy": "mutual_tls"}
PLAINTEXT_TO_ECHO = {"destination": ECHO_PEER, "destination_principal": spiffe("echo")}

OUTCOMES: list[tuple[str, Callable[[], TcpLabels], dict[str, str]]] = [
    # Outbound, on the source's node.
    ("outbound tunnel to a mesh workload", tunnel_to_echo, expected("source", **TUNNEL_TO_ECHO)),
    (
        "outbound tunnel to a mesh workload behind a Service",
        lambda: route(str(SLEEP.ip), vip("echo"), Tunnel),
        expected("source", **TUNNEL_TO_ECHO, service_name="echo"),
    ),
    (
        "passthrough to a pod outside the mesh",
        passthrough_to_plain,
        expected("source", source=SLEEP_PEER, destination=PLAIN_PEER),
    ),
    (
        "passthrough to an address outside the cluster",
        lambda: route(str(SLEEP.ip), EXTERNAL, Passthrough),
        expected("source", source=SLEEP_PEER),
    ),
    (
        "Service load-balanced to an endpoint outside the mesh",
        lambda: route(str(SLEEP.ip), vip("plain"), LoadBalanced),
        expected("source", source=SLEEP_PEER, destination=PLAIN_PEER, service_name="plain"),
    ),
    (
        "refused: the source is no known pod (NR)",
        lambda: failed_labels(
            route(OUTSIDER_IP, pod("echo"), Refuse), outbound_refusal_flag(RefuseReason.UNKNOWN_SOURCE)
        ),
        expected("source", destination=ECHO_PEER, flag="NR"),
    ),
    (
        "refused: the Service has no ready endpoints (UH)",
        lambda: failed_labels(
            route(str(SLEEP.ip), vip("empty"), Refuse), outbound_refusal_flag(RefuseReason.NO_READY_ENDPOINTS)
        ),
        expected("source", source=SLEEP_PEER, service_name="empty", flag="UH"),
    ),
    (
        "tunnel not established: no answer, TLS failure or no certificate (UF)",
        lambda: failed_labels(tunnel_to_echo(), declined_tunnel_flag(None)),
        expected("source", **TUNNEL_TO_ECHO, flag="UF"),
    ),
    (
        "tunnel answered 503: the destination's upstream failed (UF)",
        lambda: failed_labels(tunnel_to_echo(), declined_tunnel_flag(TunnelFailure.UNAVAILABLE)),
        expected("source", **TUNNEL_TO_ECHO, flag="UF"),
    ),
    (
        "tunnel answered 401: denied by the destination's policy (UAEX)",
        lambda: failed_labels(tunnel_to_echo(), declined_tunnel_flag(TunnelFailure.DENIED)),
        expected("source", **TUNNEL_TO_ECHO, flag="UAEX"),
    ),
    (
        "plain TCP upstream refused or unreachable (UF)",
        lambda: failed_labels(passthrough_to_plain(), ResponseFlag.UPSTREAM_FAILURE),
        expected("source", source=SLEEP_PEER, destination=PLAIN_PEER, flag="UF"),
    ),
    (
        "the client left before the tunnel opened (DC)",
        lambda: failed_labels(tunnel_to_echo(), ResponseFlag.DOWNSTREAM_TERMINATED),
        expected("source", **TUNNEL_TO_ECHO, flag="DC"),
    ),
    # Inbound HBONE, on the destination's node.
    ("inbound HBONE allowed", hbone_from_sleep_to_echo, expected("destination", **TUNNEL_TO_ECHO)),
    (
        "inbound HBONE from an identity that does not vouch for the address it forwards",
        lambda: hbone_inbound_labels(None, spiffe("local"), ECHO, spiffe("echo")),
        expected("destination", source_principal=spiffe("local"), **HBONE_TO_ECHO),
    ),
    (
        "inbound HBONE denied by policy (UAEX)",
        lambda: failed_labels(
            hbone_from_sleep_to_echo(), inbound_refusal_flag(RefusalReason.DENIED_BY_POLICY)
        ),
        expected("destination", **TUNNEL_TO_ECHO, flag="UAEX"),
    ),
    (
        "inbound HBONE, the pod refused the connection (UF)",
        lambda: failed_labels(
            hbone_from_sleep_to_echo(), inbound_refusal_flag(RefusalReason.UPSTREAM_REFUSED)
        ),
        expected("destination", **TUNNEL_TO_ECHO, flag="UF"),
    ),
    (
        "inbound HBONE to an address that is no local workload (UH)",
        lambda: failed_labels(
            hbone_inbound_labels(SLEEP, spiffe("sleep"), None, ""),
            inbound_refusal_flag(RefusalReason.NO_LOCAL_WORKLOAD),
        ),
        expected("destination", **TUNNEL_SOURCE, flag="UH", policy="mutual_tls"),
    ),
    (
        "inbound HBONE malformed tunnel request (DPE)",
        lambda: failed_labels(
            hbone_inbound_labels(None, spiffe("sleep"), None, spiffe("echo")),
            ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
        ),
        expected(
            "destination",
            source_principal=spiffe("sleep"),
            destination_principal=spiffe("echo"),
            flag="DPE",
            policy="mutual_tls",
        ),
    ),
    (
        "inbound HBONE for a workload whose certificate is not ready, before any handshake (UF)",
        lambda: failed_labels(
            hbone_inbound_labels(None, "", ECHO, spiffe("echo")), ResponseFlag.UPSTREAM_FAILURE
        ),
        expected("destination", **HBONE_TO_ECHO, flag="UF"),
    ),
    # Inbound plaintext (15006).
    ("inbound plaintext allowed", plaintext_to_echo, expected("destination", **PLAINTEXT_TO_ECHO)),
    (
        "inbound plaintext from a pod outside the mesh",
        lambda: plaintext_inbound_labels(PLAIN, ECHO, spiffe("echo")),
        expected("destination", source=PLAIN_PEER, **PLAINTEXT_TO_ECHO),
    ),
    (
        "inbound plaintext refused by STRICT mutual TLS (UAEX)",
        lambda: failed_labels(plaintext_to_echo(), inbound_refusal_flag(RefusalReason.DENIED_BY_POLICY)),
        expected("destination", **PLAINTEXT_TO_ECHO, flag="UAEX"),
    ),
    (
        "inbound plaintext to an address that is no local workload (UH)",
        lambda: failed_labels(plaintext_inbound_labels(None, None, ""), ResponseFlag.NO_HEALTHY_UPSTREAM),
        expected("destination", flag="UH"),
    ),
    # Same node: both sides reported by this node.
    ("same node, source side", same_node_outbound, expected("source", **TUNNEL_TO_LOCAL)),
    (
        "same node, destination side",
        lambda: same_node_inbound_labels(same_node_outbound()),
        expected("destination", **TUNNEL_TO_LOCAL),
    ),
    (
        "same node, denied by the destination's policy (UAEX), destination side",
        lambda: failed_labels(
            same_node_inbound_labels(same_node_outbound()),
            inbound_refusal_flag(RefusalReason.DENIED_BY_POLICY),
        ),
        expected("destination", **TUNNEL_TO_LOCAL, flag="UAEX"),
    ),
]


@pytest.mark.parametrize(
    ("build", "labels"), [pytest.param(build, labels, id=name) for name, build, labels in OUTCOMES]
)
def test_every_outcome_is_reported_with_istios_labels(
    build: Callable[[], TcpLabels], labels: dict[str, str]
) -> None:
    assert set(labels) == set(LABEL_NAMES)  # the expectation itself names every label
    assert dict(zip(LABEL_NAMES, build().values(), strict=True)) == labels


def test_a_same_node_tunnel_is_reported_alike_by_both_sides_but_for_the_reporter() -> None:
    outbound = same_node_outbound()
    inbound = same_node_inbound_labels(outbound)
    assert (inbound.reporter, outbound.reporter) == ("destination", "source")
    assert inbound.values()[1:] == outbound.values()[1:]


def test_every_refusal_reason_has_its_flag() -> None:
    assert {reason: outbound_refusal_flag(reason) for reason in RefuseReason} == {
        RefuseReason.UNKNOWN_SOURCE: ResponseFlag.NO_ROUTE,
        RefuseReason.NO_READY_ENDPOINTS: ResponseFlag.NO_HEALTHY_UPSTREAM,
    }
    assert {reason: inbound_refusal_flag(reason) for reason in RefusalReason} == {
        RefusalReason.MALFORMED_REQUEST: ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
        RefusalReason.DENIED_BY_POLICY: ResponseFlag.DENIED,
        RefusalReason.NO_LOCAL_WORKLOAD: ResponseFlag.NO_HEALTHY_UPSTREAM,
        RefusalReason.UPSTREAM_REFUSED: ResponseFlag.UPSTREAM_FAILURE,
        RefusalReason.UPSTREAM_UNREACHABLE: ResponseFlag.UPSTREAM_FAILURE,
    }
    declined = {failure: declined_tunnel_flag(failure) for failure in [*TunnelFailure, None]}
    assert declined == {
        TunnelFailure.MALFORMED_REQUEST: ResponseFlag.UPSTREAM_FAILURE,
        TunnelFailure.DENIED: ResponseFlag.DENIED,
        TunnelFailure.UNAVAILABLE: ResponseFlag.UPSTREAM_FAILURE,
        TunnelFailure.UNEXPECTED_STATUS: ResponseFlag.UPSTREAM_FAILURE,
        None: ResponseFlag.UPSTREAM_FAILURE,
    }


# The pieces: one side's labels, and the addressed service's.

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
    assert service_labels(SNAPSHOT.service(vip("echo"))) == ServiceLabels(
        host="echo.shop.svc.cluster.local", name="echo", namespace="shop"
    )
    assert service_labels(None) == ServiceLabels()
