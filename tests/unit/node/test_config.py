"""The static configuration file becomes the control plane's snapshot plus certificates, or an error
naming the file and the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.identity.certificates import WorkloadCertificate
from agent.identity.testing import EphemeralCa
from agent.node.config import StaticConfigError, load_static_config
from agent.state import Action, Address, MtlsMode

NOW = datetime.now(UTC)
"""The one instant of this module: certificates are issued and checked at it, so a slow collection
(e2e tests run first in `make test`) cannot make them "not yet valid"."""
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/demo/sa/server"


@pytest.fixture(scope="module")
def ca() -> EphemeralCa:
    return EphemeralCa.create(now=NOW)


def write_credential(directory: Path, name: str, certificate: WorkloadCertificate) -> dict[str, str]:
    (directory / f"{name}.pem").write_bytes(certificate.chain_pem())
    (directory / f"{name}-key.pem").write_bytes(certificate.key_pem())
    return {"chain": f"{name}.pem", "key": f"{name}-key.pem"}


def document(directory: Path, ca: EphemeralCa) -> dict[str, Any]:
    """A two-node mesh: an enrolled client on node-1, an enrolled server and a plain pod on node-2."""
    (directory / "bundle.pem").write_bytes(ca.bundle.to_pem())
    return {
        "trustDomain": "cluster.local",
        "nodeName": "node-1",
        "trustBundle": "bundle.pem",
        "certificates": [write_credential(directory, "client", ca.issue(CLIENT_ID, now=NOW))],
        "workloads": [
            {
                "name": "client",
                "namespace": "demo",
                "serviceAccount": "client",
                "ip": "10.244.1.5",
                "node": "node-1",
                "nodeIP": "10.99.0.11",
                "enrolled": True,
            },
            {
                "name": "server",
                "namespace": "demo",
                "serviceAccount": "server",
                "ip": "10.244.2.7",
                "node": "node-2",
                "nodeIP": "10.99.0.12",
                "labels": {"app": "server", "istio.io/dataplane-mode": "ambient"},
                "namedPorts": {"echo": 8080},
            },
            {
                "name": "plain",
                "namespace": "demo",
                "ips": ["10.244.2.8"],
                "node": "node-2",
                "nodeIP": "10.99.0.12",
                "labels": {"app": "plain"},
            },
        ],
        "services": [
            {
                "metadata": {"namespace": "demo", "name": "server"},
                "spec": {
                    "clusterIP": "10.96.0.20",
                    "selector": {"app": "server"},
                    "ports": [{"port": 80, "targetPort": "echo"}],
                },
            }
        ],
        "policies": [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"namespace": "demo", "name": "only-client"},
                "spec": {
                    "selector": {"matchLabels": {"app": "server"}},
                    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}],
                },
            },
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"namespace": "demo", "name": "strict"},
                "spec": {"mtls": {"mode": "STRICT"}},
            },
        ],
    }


def write(directory: Path, content: dict[str, Any], name: str = "mesh.yaml") -> Path:
    path = directory / name
    path.write_text(json.dumps(content) if name.endswith(".json") else yaml.safe_dump(content))
    return path


def load(path: Path) -> Any:
    return load_static_config(path, version=3, now=NOW, hbone_port=15008)


@pytest.mark.parametrize("name", ["mesh.yaml", "mesh.json"])
def test_a_complete_file_becomes_the_snapshot_and_certificates(
    tmp_path: Path, ca: EphemeralCa, name: str
) -> None:
    config = load(write(tmp_path, document(tmp_path, ca), name))

    snapshot = config.snapshot
    assert (snapshot.version, snapshot.created_at) == (3, NOW.timestamp())
    assert (snapshot.mesh.trust_domain, snapshot.mesh.hbone_port) == ("cluster.local", 15008)
    assert config.node_name == "node-1"
    client = snapshot.workload(ip_address("10.244.1.5"))
    server = snapshot.workload(ip_address("10.244.2.7"))
    plain = snapshot.workload(ip_address("10.244.2.8"))
    assert client is not None
    assert server is not None
    assert plain is not None
    assert (client.node, client.node_ip, client.enrolled, client.ready) == (
        "node-1",
        ip_address("10.99.0.11"),
        True,
        True,
    )
    # Without `enrolled`, the enrolment rule decides from the labels.
    assert server.enrolled
    assert not plain.enrolled
    assert (plain.service_account, server.spiffe_id("cluster.local")) == ("default", SERVER_ID)
    assert [w.name for w in snapshot.workloads_on_node("node-2")] == ["plain", "server"]
    target = snapshot.service(Address(ip_address("10.96.0.20"), 80))
    assert target is not None
    assert [e.address for e in target.endpoints] == [Address(ip_address("10.244.2.7"), 8080)]
    (policy,) = snapshot.authorization_policies["demo"]
    assert (policy.name, policy.action) == ("only-client", Action.ALLOW)
    (peer_authentication,) = snapshot.peer_authentications["demo"]
    assert peer_authentication.mode is MtlsMode.STRICT

    assert list(config.certificates) == [CLIENT_ID]
    assert config.trust_bundle == ca.bundle
    assert config.files == (
        tmp_path / name,
        tmp_path / "bundle.pem",
        tmp_path / "client.pem",
        tmp_path / "client-key.pem",
    )
    assert config.missing_certificates("node-1") == []
    assert config.missing_certificates("node-2") == [SERVER_ID]


def test_a_minimal_file_needs_only_the_trust_bundle(tmp_path: Path, ca: EphemeralCa) -> None:
    (tmp_path / "bundle.pem").write_bytes(ca.bundle.to_pem())
    config = load(write(tmp_path, {"trustBundle": "bundle.pem"}))
    assert config.node_name is None
    assert config.snapshot.mesh.trust_domain == "cluster.local"
    assert config.snapshot.mesh.root_namespace == "istio-system"
    assert not config.snapshot.workloads_by_ip
    assert not config.certificates


def test_paths_are_relative_to_the_file_and_absolute_paths_work(tmp_path: Path, ca: EphemeralCa) -> None:
    content = document(tmp_path, ca)
    content["trustBundle"] = str(tmp_path / "bundle.pem")
    (tmp_path / "conf").mkdir()
    content["certificates"][0] = {"chain": "../client.pem", "key": str(tmp_path / "client-key.pem")}
    config = load(write(tmp_path / "conf", content))
    assert list(config.certificates) == [CLIENT_ID]


Edit = Callable[[dict[str, Any], Path, EphemeralCa], None]


def _set(path: str, value: Any) -> Edit:
    """An edit setting one field, e.g. `workloads.0.ip`."""

    def edit(content: dict[str, Any], _: Path, __: EphemeralCa) -> None:
        *parents, last = path.split(".")
        node: Any = content
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _replace_certificate(issue: Callable[[EphemeralCa], WorkloadCertificate]) -> Edit:
    def edit(content: dict[str, Any], directory: Path, ca: EphemeralCa) -> None:
        content["certificates"] = [write_credential(directory, "other", issue(ca))]

    return edit


def _mismatched_key(content: dict[str, Any], directory: Path, ca: EphemeralCa) -> None:
    other = write_credential(directory, "other", ca.issue(SERVER_ID, now=NOW))
    content["certificates"][0]["key"] = other["key"]


def _garbage_key(content: dict[str, Any], directory: Path, _: EphemeralCa) -> None:
    (directory / "garbage.pem").write_text("not a key")
    content["certificates"][0]["key"] = "garbage.pem"


def _duplicate_certificate(content: dict[str, Any], directory: Path, ca: EphemeralCa) -> None:
    content["certificates"].append(write_credential(directory, "again", ca.issue(CLIENT_ID, now=NOW)))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("trustDomian", "typo.local"), "trustDomian: unknown field"),
        (_set("trustDomain", "Bad Domain"), "trustDomain: trust domain 'Bad Domain' may hold only"),
        (_set("trustBundle", "missing.pem"), "trustBundle: cannot read"),
        (_set("workloads", {"name": "x"}), "workloads: expected a list"),
        (_set("workloads.0.servicAccount", "x"), "workloads[0].servicAccount: unknown field"),
        (_set("workloads.0.ip", "10.244.1.300"), "workloads[0].ip: not an IP address"),
        (_set("workloads.0.ips", ["10.244.1.6"]), "workloads[0]: give exactly one of `ip` and `ips`"),
        (_set("workloads.1.nodeIP", None), "workloads[1].nodeIP: expected a non-empty string"),
        (_set("workloads.0.enrolled", "yes"), "workloads[0].enrolled: expected true or false"),
        (_set("workloads.1.namedPorts", {"echo": 0}), "workloads[1].namedPorts.echo: not a port number"),
        (_set("workloads.2.ips", []), "workloads[2].ips: must name at least one address"),
        (_set("workloads.2.ips", ["10.244.1.5"]), "workloads[2]: address 10.244.1.5 is also workloads[0]'s"),
        (_set("workloads.2.name", "server"), "workloads[2].name: demo/server is also workloads[1]"),
        (
            _set("services.0.spec.ports", [{"port": 70000}]),
            "services[0]: Service demo/server: spec.ports[0].port: port out of range",
        ),
        (_set("policies.0.kind", "Sidecar"), "policies[0].kind: expected one of AuthorizationPolicy"),
        (
            _set("policies.1.spec", {"mtls": {"mode": "SOMETIMES"}}),
            "policies[1]: PeerAuthentication demo/strict: spec.mtls.mode: expected one of",
        ),
        (_set("certificates.0.chian", "client.pem"), "certificates[0].chian: unknown field"),
        (_set("certificates.0.chain", "nowhere.pem"), "certificates[0].chain: cannot read"),
        (_garbage_key, "certificates[0].key: {dir}/garbage.pem: not an unencrypted PEM private key"),
        (
            _mismatched_key,
            "certificates[0]: {dir}/client.pem with {dir}/other-key.pem: workload certificate for",
        ),
        (
            _duplicate_certificate,
            f"certificates[1].chain: {{dir}}/again.pem: a second certificate for {CLIENT_ID}",
        ),
        (
            _replace_certificate(lambda ca: ca.issue("spiffe://elsewhere.local/ns/demo/sa/client", now=NOW)),
            "certificates[0].chain: {dir}/other.pem: names spiffe://elsewhere.local/ns/demo/sa/client,"
            " outside trust domain cluster.local",
        ),
        (
            _replace_certificate(lambda ca: ca.issue_expired(CLIENT_ID)),
            "certificates[0].chain: {dir}/other.pem: valid only",
        ),
        (
            _replace_certificate(lambda _: EphemeralCa.create(now=NOW).issue(CLIENT_ID, now=NOW)),
            "certificates[0].chain: {dir}/other.pem: is not issued by a root of the trust bundle",
        ),
    ],
)
def test_an_invalid_file_is_refused_naming_the_file_and_field(
    tmp_path: Path, ca: EphemeralCa, edit: Edit, expected: str
) -> None:
    content = document(tmp_path, ca)
    edit(content, tmp_path, ca)
    path = write(tmp_path, content)
    with pytest.raises(StaticConfigError) as refused:
        load(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert expected.format(dir=tmp_path) in str(refused.value)


def test_a_file_that_is_not_yaml_or_missing_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("workloads: [unclosed\n")
    with pytest.raises(StaticConfigError, match=r"broken\.yaml: not valid YAML or JSON"):
        load(broken)
    with pytest.raises(StaticConfigError, match=r"absent\.yaml: cannot read: No such file"):
        load(tmp_path / "absent.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- just a list\n")
    with pytest.raises(StaticConfigError, match=r"list\.yaml: \(top level\): expected an object"):
        load(listed)


def test_certificates_are_checked_against_the_load_time(tmp_path: Path, ca: EphemeralCa) -> None:
    path = write(tmp_path, document(tmp_path, ca))
    later = NOW + timedelta(days=3650)
    with pytest.raises(StaticConfigError, match=r"certificates\[0\]\.chain: .* valid only from"):
        load_static_config(path, version=1, now=later, hbone_port=15008)
