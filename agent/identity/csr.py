"""Workload keys and certificate signing requests: the agent builds them, the CA validates them.

Validation is a pure function returning `CsrAccepted` or `CsrRejected`; a rejection's reason is the
exact sentence the CA writes into the CSR's Denied condition, so it names what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.certificates import PublicKey
from agent.identity.spiffe import InvalidSpiffeId, SpiffeId

MIN_RSA_BITS = 2048

_KEY_POLICY = f"only ECDSA P-256 or RSA of at least {MIN_RSA_BITS} bits is accepted"
# The CA writes its own values for these, so a request may carry them harmlessly.
_OVERRIDDEN_EXTENSIONS = (x509.KeyUsage, x509.ExtendedKeyUsage, x509.SubjectKeyIdentifier)
_GENERAL_NAME_KINDS: dict[type[x509.GeneralName], str] = {
    x509.DNSName: "a DNS name",
    x509.IPAddress: "an IP address",
    x509.RFC822Name: "an email address",
    x509.DirectoryName: "a directory name",
    x509.RegisteredID: "a registered ID",
    x509.OtherName: "an otherName",
}


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, in memory only."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> bytes:
    """A PEM CSR with an empty subject and exactly the SPIFFE ID as a (critical) URI SAN."""
    # RFC 5280 4.2.1.6: with an empty subject the SAN extension is critical.
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))])
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CsrAccepted:
    """The request is well formed: it may be signed for `spiffe_id` (if the requester may hold it)."""

    spiffe_id: SpiffeId
    """The identity the request asks for."""

    public_key: PublicKey
    """The key to certify."""


@dataclass(frozen=True)
class CsrRejected:
    """The request must not be signed."""

    reason: str
    """One sentence saying exactly what is wrong, for the CSR's Denied condition and the logs."""


CsrValidation = CsrAccepted | CsrRejected


def _accepted_key(key: object) -> PublicKey | str:
    """The key if the policy allows it, else why not."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return key
        return f"key is ECDSA on curve {key.curve.name}; {_KEY_POLICY}"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return key
        return f"key is RSA of {key.key_size} bits; {_KEY_POLICY}"
    return f"key type {type(key).__name__} is not allowed; {_KEY_POLICY}"


def _extension_problem(extension: x509.Extension[x509.ExtensionType]) -> str | None:
    value = extension.value
    if isinstance(value, (x509.SubjectAlternativeName, *_OVERRIDDEN_EXTENSIONS)):
        return None
    if isinstance(value, x509.BasicConstraints):
        return "request asks for a CA certificate (basicConstraints CA=true)" if value.ca else None
    name = "" if isinstance(value, x509.UnrecognizedExtension) else f"{type(value).__name__} "
    return f"request asks for extension {name}({extension.oid.dotted_string}), which this signer never issues"


def _requested_spiffe_id(names: list[x509.GeneralName], trust_domain: str) -> SpiffeId | str:
    for name in names:
        if not isinstance(name, x509.UniformResourceIdentifier):
            kind = _GENERAL_NAME_KINDS.get(type(name), f"a {type(name).__name__}")
            return f"request carries {kind} SAN ({name.value}); only one URI SAN is allowed"
    if len(names) != 1:
        return f"request has {len(names)} URI SANs; exactly one is allowed"
    try:
        spiffe_id = SpiffeId.parse(names[0].value)
    except InvalidSpiffeId as error:
        return f"URI SAN is not a workload SPIFFE ID: {error}"
    if spiffe_id.trust_domain != trust_domain:
        return f"{spiffe_id} is outside this signer's trust domain {trust_domain!r}"
    return spiffe_id


def validate_csr(pem: bytes | str, trust_domain: str) -> CsrValidation:
    """Checks a PEM CSR for signing in `trust_domain`: format, proof of possession, key, SAN, extensions.

    The subject is not checked: the CA issues every leaf with an empty subject, so nothing in the
    request's subject can reach a certificate.
    """
    try:
        request = x509.load_pem_x509_csr(pem.encode("ascii") if isinstance(pem, str) else pem)
    except (ValueError, UnicodeEncodeError):
        return CsrRejected("request is not a PEM certificate signing request")
    try:
        signed = request.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        signed = False
    if not signed:
        return CsrRejected("request signature does not verify with its own key")
    try:
        key = _accepted_key(request.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return CsrRejected("request key cannot be read")
    if isinstance(key, str):
        return CsrRejected(key)
    try:
        extensions = list(request.extensions)
    except (ValueError, x509.DuplicateExtension) as error:
        return CsrRejected(f"request extensions cannot be parsed: {error}")
    for extension in extensions:
        if problem := _extension_problem(extension):
            return CsrRejected(problem)
    sans = [e.value for e in extensions if isinstance(e.value, x509.SubjectAlternativeName)]
    if not sans:
        return CsrRejected("request has no subject alternative name; it needs one URI SAN with the SPIFFE ID")
    outcome = _requested_spiffe_id(list(sans[0]), trust_domain)
    if isinstance(outcome, str):
        return CsrRejected(outcome)
    return CsrAccepted(outcome, key)
