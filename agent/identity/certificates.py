"""Certificate material the agent holds: trust bundles and workload certificates (X.509-SVIDs).

Owns the PEM round trips of both and the X.509-SVID leaf rules every presented certificate must keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.spiffe import InvalidSpiffeId, SpiffeId

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""Key types a workload certificate may certify (the CA accepts ECDSA P-256 and RSA >= 2048)."""

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""Private halves of `PublicKey`."""


class CertificateError(ValueError):
    """Certificate material is malformed or inconsistent; the message says what and why."""


def load_pem_certificates(data: bytes | str, what: str) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM text, in order; raises `CertificateError` naming `what` was read."""
    try:
        raw = data.encode("ascii") if isinstance(data, str) else data
        return tuple(x509.load_pem_x509_certificates(raw))
    except (ValueError, UnicodeEncodeError):
        raise CertificateError(f"{what}: no PEM certificate found, or one is malformed") from None


def certificates_to_pem(certificates: tuple[x509.Certificate, ...]) -> bytes:
    """The certificates as concatenated PEM blocks, in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def private_key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of `key`; only ever kept in memory or in a Kubernetes Secret."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca


def leaf_problem(certificate: x509.Certificate) -> str | None:
    """Why `certificate` may not authenticate a workload (X.509-SVID section 5.2), or None if it may."""
    try:
        if _is_ca(certificate):
            return "certificate is a CA certificate (basicConstraints CA=true), not a leaf"
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "certificate has no key usage extension"
    except ValueError as error:
        return f"certificate extensions cannot be parsed: {error}"
    if usage.key_cert_sign or usage.crl_sign:
        return "certificate may sign certificates or CRLs (keyCertSign/cRLSign), so it is not a leaf"
    if not usage.digital_signature:
        return "certificate's key usage lacks digitalSignature"
    return None


@dataclass(frozen=True)
class TrustBundle:
    """The root certificates a peer's chain must lead to; more than one during a root rotation."""

    roots: tuple[x509.Certificate, ...]
    """Trusted CA certificates, in publication order."""

    def __post_init__(self) -> None:
        if not self.roots:
            raise CertificateError("trust bundle: holds no certificate")
        for root in self.roots:
            if not _is_ca(root):
                raise CertificateError(
                    f"trust bundle: {root.subject.rfc4514_string() or 'certificate'} is not a CA certificate"
                )

    @classmethod
    def from_pem(cls, data: bytes | str) -> TrustBundle:
        """Reads one or more PEM root certificates (e.g. the bundle ConfigMap's value)."""
        return cls(load_pem_certificates(data, "trust bundle"))

    def to_pem(self) -> bytes:
        """The roots as concatenated PEM blocks: what the CA publishes and `ssl` loads."""
        return certificates_to_pem(self.roots)


def _leaf_spiffe_id(chain: tuple[x509.Certificate, ...]) -> SpiffeId:
    if not chain:
        raise CertificateError("workload certificate: empty chain")
    try:
        return SpiffeId.from_certificate(chain[0])
    except InvalidSpiffeId as error:
        raise CertificateError(f"workload certificate: {error}") from None


@dataclass(frozen=True)
class WorkloadCertificate:
    """A workload's X.509-SVID chain with its private key: what it presents in mutual TLS."""

    spiffe_id: SpiffeId
    """The identity named by the leaf's URI SAN."""

    key: PrivateKey
    """The leaf's private key; lives in memory only."""

    chain: tuple[x509.Certificate, ...]
    """The leaf first, then any intermediates up to (not including) a root in the trust bundle."""

    def __post_init__(self) -> None:
        named = _leaf_spiffe_id(self.chain)
        if named != self.spiffe_id:
            raise CertificateError(f"workload certificate: leaf names {named}, expected {self.spiffe_id}")
        if problem := leaf_problem(self.leaf):
            raise CertificateError(f"workload certificate: {problem}")
        if self.leaf.public_key() != self.key.public_key():
            raise CertificateError(f"workload certificate for {self.spiffe_id}: key does not match the leaf")

    @classmethod
    def from_pem(cls, chain_pem: bytes | str, key: PrivateKey) -> WorkloadCertificate:
        """Pairs a PEM chain (e.g. a CSR's `status.certificate`) with the key the CSR was made from."""
        chain = load_pem_certificates(chain_pem, "workload certificate")
        return cls(_leaf_spiffe_id(chain), key, chain)

    @property
    def leaf(self) -> x509.Certificate:
        """The certificate naming the workload."""
        return self.chain[0]

    # Cached: the data plane checks the end of validity on every new connection, and cryptography
    # builds a new datetime from the certificate's bytes on every read.

    @cached_property
    def not_before(self) -> datetime:
        """Start of the leaf's validity (UTC)."""
        return self.leaf.not_valid_before_utc

    @cached_property
    def not_after(self) -> datetime:
        """End of the leaf's validity (UTC)."""
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        """The chain as PEM, leaf first."""
        return certificates_to_pem(self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, for loading into an in-memory TLS context."""
        return private_key_to_pem(self.key)
