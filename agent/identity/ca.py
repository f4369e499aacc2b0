"""The workload CA's certificate logic: creating its root and signing validated requests into X.509-SVIDs.

Pure functions over keys and times; `ambient-agent ca` adds the Kubernetes side (Secret, CSR API).
Profiles follow the X.509-SVID spec: the root is a signing certificate carrying the trust domain's
SPIFFE ID, a leaf names exactly one workload and can never sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.certificates import (
    CertificateError,
    PublicKey,
    load_pem_certificates,
    private_key_to_pem,
)
from agent.identity.spiffe import SpiffeId, trust_domain_problem

DEFAULT_ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=5)
"""How far a certificate's notBefore is backdated, so peers whose clocks lag still accept it."""

_KEY_USAGE_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*flags: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{flag: flag in flags for flag in _KEY_USAGE_FLAGS})


def _backdate(lifetime: timedelta) -> timedelta:
    # A tenth of the lifetime at most, so a short-lived certificate's half life stays in the future.
    return min(CLOCK_SKEW_ALLOWANCE, lifetime / 10)


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's root key and self-signed certificate (kept only in the CA's Secret)."""

    key: ec.EllipticCurvePrivateKey
    """The root's private key."""

    certificate: x509.Certificate
    """The self-signed root certificate, published in the trust bundle."""

    def __post_init__(self) -> None:
        if self.certificate.public_key() != self.key.public_key():
            raise CertificateError("CA: key does not match the root certificate")

    @classmethod
    def from_pem(cls, certificate_pem: bytes | str, key_pem: bytes | str) -> CertificateAuthority:
        """Loads a root stored by `certificate_pem()` / `key_pem()` (e.g. from the CA's Secret)."""
        certificates = load_pem_certificates(certificate_pem, "CA certificate")
        if len(certificates) != 1:
            raise CertificateError(f"CA certificate: expected one certificate, found {len(certificates)}")
        try:
            key = serialization.load_pem_private_key(
                key_pem.encode("ascii") if isinstance(key_pem, str) else key_pem, password=None
            )
        except (ValueError, TypeError, UnicodeEncodeError):
            raise CertificateError("CA key: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"CA key: expected an ECDSA key, found {type(key).__name__}")
        return cls(key, certificates[0])

    def certificate_pem(self) -> bytes:
        """The root certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The root key as unencrypted PKCS#8 PEM, for the CA's Secret only."""
        return private_key_to_pem(self.key)


def create_root(
    trust_domain: str, *, now: datetime, lifetime: timedelta = DEFAULT_ROOT_LIFETIME
) -> CertificateAuthority:
    """A new self-signed ECDSA P-256 root for `trust_domain`, valid from about `now` for `lifetime`."""
    if problem := trust_domain_problem(trust_domain):
        raise ValueError(problem)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ambient-agent workload root CA"),
        ]
    )
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _backdate(lifetime))
        .not_valid_after(now + lifetime)
        # path length 0: the root signs leaves directly; an intermediate would need a new root.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(key_id, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id), critical=False)
        # X.509-SVID 3.2: a signing certificate should carry its trust domain's ID (no path).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, certificate)


def _leaf_validity(
    ca: CertificateAuthority, *, now: datetime, lifetime: timedelta, requested_lifetime: timedelta | None
) -> tuple[datetime, datetime]:
    if requested_lifetime is not None:
        lifetime = min(lifetime, requested_lifetime)
    if lifetime <= timedelta(0):
        raise ValueError(f"leaf lifetime must be positive, got {lifetime}")
    root_expiry = ca.certificate.not_valid_after_utc
    if root_expiry <= now:
        raise CertificateError(f"CA: the root certificate expired at {root_expiry.isoformat()}")
    return now - _backdate(lifetime), min(now + lifetime, root_expiry)


def sign_leaf(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    requested_lifetime: timedelta | None = None,
) -> x509.Certificate:
    """Signs an X.509-SVID leaf for a validated request (`CsrAccepted`'s ID and key).

    Valid for `lifetime`, shortened to `requested_lifetime` and to the root's expiry, from a
    little before `now` (clock skew); raises `CertificateError` once the root has expired. The subject
    is empty, so the URI SAN is critical (RFC 5280 4.2.1.6).
    """
    not_before, not_after = _leaf_validity(
        ca, now=now, lifetime=lifetime, requested_lifetime=requested_lifetime
    )
    # X.509-SVID 4.3: keyEncipherment only makes sense for RSA keys.
    rsa_usage = ("key_encipherment",) if isinstance(public_key, rsa.RSAPublicKey) else ()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature", *rsa_usage), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            # Lets verifiers pick the right root while old and new roots share a name.
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True
        )
        .sign(ca.key, hashes.SHA256())
    )
