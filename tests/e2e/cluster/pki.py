"""The cluster's certificates, service-account signing key and kubeconfigs, made with `cryptography`.

One CA signs the API server's serving certificate and the client certificates (admin in
`system:masters`, the controller-manager and the scheduler under their built-in RBAC users). A CA of
its own signs etcd's certificate and the API server's etcd client certificate, as kubeadm does, so
that no cluster client certificate opens etcd. The service-account key signs and verifies tokens,
so TokenRequest and bound tokens work.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.cluster.layout import CLUSTER_DOMAIN, FIRST_SERVICE_IP

_VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ClientCredentials:
    """Paths of a client certificate and its key, both PEM."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPki:
    """Paths of everything `issue_cluster_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    apiserver_cert: Path
    apiserver_key: Path
    service_account_key: Path
    service_account_public_key: Path
    etcd_ca_cert: Path
    etcd: ClientCredentials
    """etcd's certificate and key, for clients and its peer port alike."""
    apiserver_etcd_client: ClientCredentials
    admin: ClientCredentials
    controller_manager: ClientCredentials
    scheduler: ClientCredentials


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _Issuer:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def new_ca(cls, common_name: str) -> _Issuer:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName] | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def issue_cluster_pki(pki_dir: Path, apiserver_ips: list[str]) -> ClusterPki:
    """Creates a fresh CA, serving and client certificates and the service-account key in `pki_dir`."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca = _Issuer.new_ca("ambient-e2e-ca")
    _write_cert(pki_dir / "ca.crt", ca.cert)
    _write_key(pki_dir / "ca.key", ca.key)
    etcd_ca = _Issuer.new_ca("ambient-e2e-etcd-ca")
    _write_cert(pki_dir / "etcd-ca.crt", etcd_ca.cert)

    dns_names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
    ]
    ips = ["127.0.0.1", FIRST_SERVICE_IP, *apiserver_ips]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert, key = ca.issue(_name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans)
    _write_cert(pki_dir / "apiserver.crt", cert)
    _write_key(pki_dir / "apiserver.key", key)

    def written(file_stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> ClientCredentials:
        credentials = ClientCredentials(pki_dir / f"{file_stem}.crt", pki_dir / f"{file_stem}.key")
        _write_cert(credentials.cert, cert)
        _write_key(credentials.key, key)
        return credentials

    def client(file_stem: str, user: str, group: str | None) -> ClientCredentials:
        return written(file_stem, *ca.issue(_name(user, group), ExtendedKeyUsageOID.CLIENT_AUTH))

    etcd_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    etcd_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    service_account_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki_dir / "service-account.key", service_account_key)
    (pki_dir / "service-account.pub").write_bytes(
        service_account_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ClusterPki(
        ca_cert=pki_dir / "ca.crt",
        ca_key=pki_dir / "ca.key",
        apiserver_cert=pki_dir / "apiserver.crt",
        apiserver_key=pki_dir / "apiserver.key",
        service_account_key=pki_dir / "service-account.key",
        service_account_public_key=pki_dir / "service-account.pub",
        etcd_ca_cert=pki_dir / "etcd-ca.crt",
        etcd=written("etcd", *etcd_ca.issue(_name("etcd"), etcd_usages, etcd_sans)),
        apiserver_etcd_client=written(
            "apiserver-etcd-client",
            *etcd_ca.issue(_name("kube-apiserver-etcd-client"), ExtendedKeyUsageOID.CLIENT_AUTH),
        ),
        admin=client("admin", "admin", "system:masters"),
        controller_manager=client("controller-manager", "system:kube-controller-manager", None),
        scheduler=client("scheduler", "system:kube-scheduler", None),
    )


def write_kubeconfig(path: Path, server: str, ca_cert: Path, credentials: ClientCredentials) -> None:
    """Writes a self-contained kubeconfig (certificates embedded) for one user and one server."""

    def embedded(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "ambient-e2e",
                "cluster": {"server": server, "certificate-authority-data": embedded(ca_cert)},
            }
        ],
        "users": [
            {
                "name": "user",
                "user": {
                    "client-certificate-data": embedded(credentials.cert),
                    "client-key-data": embedded(credentials.key),
                },
            }
        ],
        "contexts": [{"name": "ambient-e2e", "context": {"cluster": "ambient-e2e", "user": "user"}}],
        "current-context": "ambient-e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
