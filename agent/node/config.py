"""The static configuration file: a small mesh described in one YAML (or JSON) file.

It is how the data plane runs without a control plane, and how people try it alone. The file names
the trust domain, optionally this node, the workloads (pods) with their addresses and nodes, Services
and `security.istio.io` policies as Kubernetes objects, the trust bundle file and the certificate
files of the identities this node serves. It is read into the same `Snapshot` the control plane
builds (`agent.state.build_snapshot`; Kubernetes objects through the `agent.state.kube` parsers) plus
the certificates, so the data plane cannot tell the two sources apart. Relative paths are relative to
the file's directory. Every error names the file and the field. The format is in
docs/static-config.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.certificates import CertificateError, TrustBundle, WorkloadCertificate
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, trust_domain_problem
from agent.state import (
    AuthorizationPolicy,
    IPAddress,
    MeshConfig,
    ParseError,
    PeerAuthentication,
    Service,
    Snapshot,
    Workload,
    build_snapshot,
    enrolment,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_service,
)

_TOP_FIELDS = frozenset(
    {
        "trustDomain",
        "rootNamespace",
        "nodeName",
        "trustBundle",
        "certificates",
        "workloads",
        "services",
        "policies",
    }
)
_WORKLOAD_FIELDS = frozenset(
    {
        "name",
        "namespace",
        "serviceAccount",
        "ip",
        "ips",
        "node",
        "nodeIP",
        "labels",
        "enrolled",
        "ready",
        "namedPorts",
    }
)
_CERTIFICATE_FIELDS = frozenset({"chain", "key"})
_POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
_T = TypeVar("_T")


class StaticConfigError(ValueError):
    """The static configuration cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class StaticConfig:
    """One reading of the static configuration file and the files it names."""

    path: Path
    """The configuration file."""

    node_name: str | None
    """`nodeName` from the file, if it has one (flag `--node-name` and env `NODE_NAME` take precedence,
    so one file can serve every node)."""

    snapshot: Snapshot
    """Workloads, services and policies, as the control plane would publish them."""

    trust_bundle: TrustBundle
    """The roots peers' certificates must lead to."""

    certificates: Mapping[str, WorkloadCertificate]
    """Workload certificates by SPIFFE ID (the URI SAN of each leaf)."""

    files: tuple[Path, ...]
    """Every file read: the configuration, the bundle and the certificate files. A change to any of them
    is a reason to read the configuration again."""

    def missing_certificates(self, node_name: str) -> list[str]:
        """Identities of enrolled workloads on `node_name` that have no certificate here, sorted.

        Connections to or from such a workload fail (never in plaintext); the node warns about them.
        """
        trust_domain = self.snapshot.mesh.trust_domain
        wanted = {
            workload.spiffe_id(trust_domain)
            for workload in self.snapshot.workloads_on_node(node_name)
            if workload.enrolled
        }
        return sorted(wanted - self.certificates.keys())


class _Invalid(Exception):
    """Internal: a field is wrong; turned into a `StaticConfigError` naming the file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


def load_static_config(path: Path, *, version: int, now: datetime, hbone_port: int) -> StaticConfig:
    """Reads `path` and the files it names into a `StaticConfig`.

    `version` and `now` become the snapshot's version and creation time; `now` also checks that the
    certificates are valid. `hbone_port` is where every node's agent accepts HBONE. Raises
    `StaticConfigError`.
    """
    try:
        document = yaml.safe_load(path.read_bytes())
    except OSError as error:
        raise StaticConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise StaticConfigError(f"{path}: not valid YAML or JSON: {error}") from None
    try:
        return _config(path, _mapping(document, "(top level)"), version, now, hbone_port)
    except _Invalid as error:
        raise StaticConfigError(f"{path}: {error}") from None


def _config(
    path: Path, document: Mapping[str, object], version: int, now: datetime, hbone_port: int
) -> StaticConfig:
    _known_fields(document, _TOP_FIELDS, "")
    trust_domain = _str(document.get("trustDomain", DEFAULT_TRUST_DOMAIN), "trustDomain")
    if problem := trust_domain_problem(trust_domain):
        raise _Invalid("trustDomain", problem)
    node_name = document.get("nodeName")
    if node_name is not None:
        node_name = _str(node_name, "nodeName")
    base = path.parent
    bundle_path = _path(base, document.get("trustBundle"), "trustBundle")
    try:
        bundle = TrustBundle.from_pem(_read(bundle_path, "trustBundle"))
    except CertificateError as error:
        raise _Invalid("trustBundle", f"{bundle_path}: {error}") from None

    certificates: dict[str, WorkloadCertificate] = {}
    files = [path, bundle_path]
    for index, entry in enumerate(_list(document.get("certificates"), "certificates")):
        where = f"certificates[{index}]"
        certificate, chain_path, key_path = _certificate(
            base, entry, where, bundle=bundle, trust_domain=trust_domain, now=now
        )
        identity = str(certificate.spiffe_id)
        if identity in certificates:
            raise _Invalid(f"{where}.chain", f"{chain_path}: a second certificate for {identity}")
        certificates[identity] = certificate
        files += [chain_path, key_path]

    workloads = [
        _workload(entry, f"workloads[{index}]")
        for index, entry in enumerate(_list(document.get("workloads"), "workloads"))
    ]
    _check_unique(workloads)
    services = [
        _parsed(parse_service(_mapping(entry, f"services[{index}]")), f"services[{index}]", Service)
        for index, entry in enumerate(_list(document.get("services"), "services"))
    ]
    authorization_policies: list[AuthorizationPolicy] = []
    peer_authentications: list[PeerAuthentication] = []
    for index, entry in enumerate(_list(document.get("policies"), "policies")):
        where = f"policies[{index}]"
        policy = _mapping(entry, where)
        match policy.get("kind"):
            case "AuthorizationPolicy":
                authorization_policies.append(
                    _parsed(parse_authorization_policy(policy), where, AuthorizationPolicy)
                )
            case "PeerAuthentication":
                peer_authentications.append(
                    _parsed(parse_peer_authentication(policy), where, PeerAuthentication)
                )
            case other:
                raise _Invalid(f"{where}.kind", f"expected one of {', '.join(_POLICY_KINDS)}, got {other!r}")

    snapshot = build_snapshot(
        version=version,
        created_at=now.timestamp(),
        workloads=workloads,
        services=services,
        authorization_policies=authorization_policies,
        peer_authentications=peer_authentications,
        mesh=MeshConfig(
            trust_domain=trust_domain,
            root_namespace=_str(document.get("rootNamespace", MeshConfig().root_namespace), "rootNamespace"),
            hbone_port=hbone_port,
        ),
    )
    return StaticConfig(
        path=path,
        node_name=node_name,
        snapshot=snapshot,
        trust_bundle=bundle,
        certificates=certificates,
        files=tuple(dict.fromkeys(files)),
    )


# Readers for the file's values: each names the field it reads.


def _mapping(value: object, field: str) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _Invalid(field, f"expected an object with string keys, got {type(value).__name__}")
    return value


def _list(value: object, field: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(field, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(field, f"expected a non-empty string, got {value!r}")
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(field, f"expected true or false, got {value!r}")
    return value


def _ip(value: object, field: str) -> IPAddress:
    try:
        return ip_address(_str(value, field))
    except ValueError:
        raise _Invalid(field, f"not an IP address: {value!r}") from None


def _known_fields(obj: Mapping[str, object], known: frozenset[str], where: str) -> None:
    """Refuses fields the format does not have: a misspelt optional field would otherwise be ignored."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise _Invalid(
            f"{where}.{unknown[0]}" if where else unknown[0],
            f"unknown field; expected one of {', '.join(sorted(known))}",
        )


def _path(base: Path, value: object, field: str) -> Path:
    return base / _str(value, field)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _Invalid(field, f"cannot read {path}: {error.strerror or error}") from None


def _parsed(result: _T | ParseError, field: str, expected: type[_T]) -> _T:
    if isinstance(result, ParseError):
        raise _Invalid(field, str(result))
    assert isinstance(result, expected)
    return result


# Workloads.


def _workload(entry: object, where: str) -> Workload:
    spec = _mapping(entry, where)
    _known_fields(spec, _WORKLOAD_FIELDS, where)
    if ("ip" in spec) == ("ips" in spec):
        raise _Invalid(where, "give exactly one of `ip` and `ips`")
    if "ip" in spec:
        ips: tuple[IPAddress, ...] = (_ip(spec["ip"], f"{where}.ip"),)
    else:
        ips = tuple(
            _ip(value, f"{where}.ips[{index}]")
            for index, value in enumerate(_list(spec["ips"], f"{where}.ips"))
        )
        if not ips:
            raise _Invalid(f"{where}.ips", "must name at least one address")
    labels = {
        key: _str(value, f"{where}.labels.{key}")
        for key, value in _mapping(spec.get("labels"), f"{where}.labels").items()
    }
    enrolled = (
        _bool(spec["enrolled"], f"{where}.enrolled")
        if "enrolled" in spec
        else enrolment(pod_labels=labels, namespace_labels={}, host_network=False).enrolled
    )
    named_ports = {}
    for name, port in _mapping(spec.get("namedPorts"), f"{where}.namedPorts").items():
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise _Invalid(f"{where}.namedPorts.{name}", f"not a port number: {port!r}")
        named_ports[name] = port
    return Workload(
        name=_str(spec.get("name"), f"{where}.name"),
        namespace=_str(spec.get("namespace", "default"), f"{where}.namespace"),
        service_account=_str(spec.get("serviceAccount", "default"), f"{where}.serviceAccount"),
        ips=ips,
        node=_str(spec.get("node"), f"{where}.node"),
        node_ip=_ip(spec.get("nodeIP"), f"{where}.nodeIP"),
        labels=labels,
        named_ports=named_ports,
        enrolled=enrolled,
        ready=_bool(spec.get("ready", True), f"{where}.ready"),
    )


def _check_unique(workloads: list[Workload]) -> None:
    names: dict[tuple[str, str], int] = {}
    owners: dict[IPAddress, int] = {}
    for index, workload in enumerate(workloads):
        key = (workload.namespace, workload.name)
        if key in names:
            raise _Invalid(f"workloads[{index}].name", f"{key[0]}/{key[1]} is also workloads[{names[key]}]")
        names[key] = index
        for ip in workload.ips:
            if ip in owners:
                raise _Invalid(f"workloads[{index}]", f"address {ip} is also workloads[{owners[ip]}]'s")
            owners[ip] = index


# Certificates.


def _certificate(
    base: Path, entry: object, where: str, *, bundle: TrustBundle, trust_domain: str, now: datetime
) -> tuple[WorkloadCertificate, Path, Path]:
    spec = _mapping(entry, where)
    _known_fields(spec, _CERTIFICATE_FIELDS, where)
    chain_path = _path(base, spec.get("chain"), f"{where}.chain")
    key_path = _path(base, spec.get("key"), f"{where}.key")
    chain_pem = _read(chain_path, f"{where}.chain")
    key = _private_key(_read(key_path, f"{where}.key"), f"{where}.key", key_path)
    try:
        certificate = WorkloadCertificate.from_pem(chain_pem, key)
    except CertificateError as error:
        raise _Invalid(where, f"{chain_path} with {key_path}: {error}") from None
    field = f"{where}.chain"
    if certificate.spiffe_id.trust_domain != trust_domain:
        raise _Invalid(
            field, f"{chain_path}: names {certificate.spiffe_id}, outside trust domain {trust_domain}"
        )
    if not certificate.not_before <= now <= certificate.not_after:
        raise _Invalid(
            field,
            f"{chain_path}: valid only from {certificate.not_before.isoformat()}"
            f" to {certificate.not_after.isoformat()}",
        )
    if not _leads_to(certificate.chain, bundle):
        raise _Invalid(field, f"{chain_path}: is not issued by a root of the trust bundle")
    return certificate, chain_path, key_path


def _private_key(data: bytes, field: str, path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _Invalid(field, f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise _Invalid(field, f"{path}: an ECDSA or RSA key is required, got {type(key).__name__}")
    return key


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _leads_to(chain: tuple[x509.Certificate, ...], bundle: TrustBundle) -> bool:
    """Whether each certificate is signed by the next and the last by a root of `bundle`.

    The TLS handshake verifies chains in full; this only catches a certificate file paired with the
    wrong bundle at start, where the error can still name the files.
    """
    links = all(_issued_by(child, parent) for child, parent in itertools.pairwise(chain))
    return links and any(_issued_by(chain[-1], root) for root in bundle.roots)
