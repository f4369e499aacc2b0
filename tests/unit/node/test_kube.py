"""Kubernetes mode of the node: its settings, the credentials it hands the data plane, the state it
reports back to the control plane, and its failed reconciles counted in `ambient_agent_reconcile_errors`."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from agent.identity.certificates import WorkloadCertificate
from agent.identity.manager import CertificateManager, IdentityStatus
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa
from agent.node.kube import (
    CERTIFICATES_RECONCILER,
    KubernetesNodeProcess,
    KubernetesNodeSettings,
    KubernetesSettings,
    ManagedCredentials,
    kubernetes_node_settings,
    node_state,
)
from agent.node.settings import LogSettings, add_node_arguments
from agent.node.shared import LISTENERS_BOUND, REDIRECTION_RECONCILER
from agent.operator.kubeapi import ApiAccess
from agent.operator.status import NodeState
from agent.proxy.credentials import CredentialUnavailable
from agent.redirect.reconciler import RedirectStatus
from agent.settings import NodeSettings, SettingsError
from agent.state import MeshConfig, build_snapshot
from tests.unit.identity.issuing import LIFETIME, T0, InProcessIssuer, ManualClock
from tests.unit.node.running import (
    dataplane_settings,
    eventually,
    free_ports,
    no_nft_on_path,
    reconcile_errors,
    running,
)
from tests.unit.state.factories import workload

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return parser.parse_args(argv)


def test_kubernetes_mode_defaults_fit_the_daemonset() -> None:
    settings = kubernetes_node_settings(parse(), {"NODE_NAME": "node-1", "POD_NAME": "ambient-agent-x7"})
    assert settings.node.node_name == "node-1"
    assert settings.node.trust_domain == "cluster.local"
    kubernetes = settings.kubernetes
    assert kubernetes.kubeconfig is None
    assert (kubernetes.agent_namespace, kubernetes.trust_bundle_configmap) == (
        "ambient-system",
        "ambient-agent-trust-bundle",
    )
    assert kubernetes.exclude_labels == {"app.kubernetes.io/name": "ambient-agent"}
    control_plane = settings.control_plane
    assert control_plane.node_name == "node-1"
    assert control_plane.instance == "ambient-agent-x7"
    assert control_plane.mesh == MeshConfig(trust_domain="cluster.local", root_namespace="istio-system")


def test_kubernetes_mode_reads_flags_and_environment() -> None:
    env = {
        "NODE_NAME": "from-env",
        "POD_NAMESPACE": "mesh-system",
        "AMBIENT_TRUST_DOMAIN": "example.org",
        "AMBIENT_EXCLUDE_LABELS": "app=agent, tier=infra",
        "AMBIENT_ROOT_NAMESPACE": "mesh-root",
        "AMBIENT_CERTIFICATE_TIMEOUT": "5",
        "AMBIENT_PORT_INBOUND_HBONE": "16008",
    }
    settings = kubernetes_node_settings(parse("--node-name", "node-2", "--kubeconfig", "/k.yaml"), env)
    assert settings.node.node_name == "node-2"
    assert settings.kubernetes.kubeconfig == "/k.yaml"
    assert settings.kubernetes.agent_namespace == "mesh-system"
    assert settings.kubernetes.exclude_labels == {"app": "agent", "tier": "infra"}
    assert settings.kubernetes.certificate_timeout_s == 5.0
    assert settings.control_plane.mesh == MeshConfig(
        trust_domain="example.org", root_namespace="mesh-root", hbone_port=16008
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "node_name"),
        ({"NODE_NAME": "n", "AMBIENT_EXCLUDE_LABELS": "app"}, "AMBIENT_EXCLUDE_LABELS"),
        ({"NODE_NAME": "n", "POD_NAMESPACE": "Not_A_Name"}, "kubernetes.agent_namespace"),
        ({"NODE_NAME": "n", "AMBIENT_CERTIFICATE_TIMEOUT": "0"}, "kubernetes.certificate_timeout_s"),
        ({"NODE_NAME": "n", "AMBIENT_CERTIFICATE_TIMEOUT": "soon"}, "AMBIENT_CERTIFICATE_TIMEOUT"),
    ],
)
def test_bad_kubernetes_settings_fail_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        kubernetes_node_settings(parse(), env)


@pytest.fixture
def ca() -> EphemeralCa:
    return EphemeralCa.create()


@pytest.fixture
async def manager(ca: EphemeralCa) -> AsyncIterator[CertificateManager]:
    async with CertificateManager(InProcessIssuer(ca, ManualClock(T0)), clock=ManualClock(T0)) as running:
        yield running


async def test_the_data_plane_gets_certificates_of_hosted_identities_and_reasons_otherwise(
    manager: CertificateManager, ca: EphemeralCa
) -> None:
    credentials = ManagedCredentials(manager)
    manager.set_wanted([WEB])
    certificate = await credentials.credential(str(WEB), timeout_s=5)
    assert isinstance(certificate, WorkloadCertificate)
    assert certificate.spiffe_id == WEB
    assert credentials.trust_bundle() == ca.bundle

    assert await credentials.credential(str(DB), timeout_s=5) == CredentialUnavailable(
        f"{DB} is not hosted on this node (no enrolled local pod has that service account)"
    )
    malformed = await credentials.credential("spiffe://cluster.local/shop/web", timeout_s=5)
    assert isinstance(malformed, CredentialUnavailable)
    assert malformed.reason.startswith("not a workload identity: ")


def test_the_node_state_reports_capture_and_the_identities_with_valid_certificates() -> None:
    captured = frozenset({ip_address("10.1.0.5")})
    identities = {
        WEB: IdentityStatus(not_after=T0 + LIFETIME, renewal_due=None, failures=1, last_error="CA slow"),
        DB: IdentityStatus(not_after=None, renewal_due=None, failures=2, last_error="the CA denied it"),
        SpiffeId("cluster.local", "shop", "new"): IdentityStatus(
            not_after=None, renewal_due=None, failures=0, last_error=None
        ),
    }
    state = node_state(RedirectStatus(captured, 1, "nft failed"), identities, T0 + timedelta(minutes=1))
    assert state == NodeState(
        captured=captured,
        capture_error="nft failed",
        certified=frozenset({str(WEB)}),
        certificate_errors={str(DB): "the CA denied it"},
    )
    expired = node_state(RedirectStatus(None, 0, None), identities, T0 + LIFETIME)
    assert expired.captured is None
    assert expired.certified == frozenset()
    assert expired.certificate_errors == {str(WEB): "CA slow", str(DB): "the CA denied it"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the data plane's listeners need root (IP_TRANSPARENT)")
async def test_failed_capture_and_certificate_requests_count_as_reconcile_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server is unreachable, so certificate requests fail; `nft` is missing, so capture fails."""
    no_nft_on_path(monkeypatch, tmp_path)
    with socket.socket() as probe:  # a port nothing listens on: the API server is down
        probe.bind(("127.0.0.1", 0))
        unreachable = ApiAccess(server=f"http://127.0.0.1:{probe.getsockname()[1]}")
    ports = free_ports()
    process = KubernetesNodeProcess(
        KubernetesNodeSettings(
            node=NodeSettings(node_name="node-a", ports=ports),
            dataplane=dataplane_settings(ports),
            log=LogSettings(),
            kubernetes=KubernetesSettings(pod_name="ambient-agent-a", certificate_timeout_s=1.0),
        ),
        unreachable,
    )
    snapshot = build_snapshot(
        version=1, created_at=0.0, workloads=[workload("web", "192.0.2.5", namespace="shop")]
    )
    async with running(process.run, ports):
        await eventually(lambda: LISTENERS_BOUND not in process.readiness.pending, "listeners bound")
        assert reconcile_errors(process.metrics, CERTIFICATES_RECONCILER) == 0
        assert reconcile_errors(process.metrics, REDIRECTION_RECONCILER) == 0
        # What the control plane would hand over from its own thread once it has listed the cluster:
        # an enrolled pod on this node, whose address capture must cover and whose identity it needs.
        await asyncio.to_thread(process._snapshot_published, snapshot)
        await eventually(
            lambda: reconcile_errors(process.metrics, CERTIFICATES_RECONCILER) >= 1,
            "a failed certificate request counted",
        )
        await eventually(
            lambda: reconcile_errors(process.metrics, REDIRECTION_RECONCILER) >= 1, "a failed capture counted"
        )
        dump: dict[str, Any] = process.config_dump()
        assert dump["identities"]["spiffe://cluster.local/ns/shop/sa/web"]["failures"] >= 1
        # Capture never got past its first step on this machine.
        assert dump["redirect"]["synced_pods"] is None
        assert "nft" in str(dump["redirect"]["last_error"])
