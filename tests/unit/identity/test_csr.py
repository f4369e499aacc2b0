"""The agent's CSRs pass the CA's checks; every kind of bad request is rejected with its exact reason."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.csr import CsrAccepted, CsrRejected, build_csr, generate_key, validate_csr
from agent.identity.spiffe import SpiffeId

CART = SpiffeId("cluster.local", "shop", "cart")
AGENT_KEY = generate_key()
KEY_POLICY = "only ECDSA P-256 or RSA of at least 2048 bits is accepted"

RequestKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _request(
    key: RequestKey,
    names: Sequence[x509.GeneralName] = (x509.UniformResourceIdentifier(str(CART)),),
    extensions: Sequence[x509.ExtensionType] = (),
    subject: x509.Name | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_the_agents_csr_is_accepted() -> None:
    key = generate_key()
    pem = build_csr(key, CART)
    request = x509.load_pem_x509_csr(pem)
    assert request.subject == x509.Name([])
    san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/cart")]
    assert validate_csr(pem, "cluster.local") == CsrAccepted(CART, key.public_key())
    assert validate_csr(pem.decode("ascii"), "cluster.local") == CsrAccepted(CART, key.public_key())


def test_generated_keys_are_fresh_p256_keys() -> None:
    first, second = generate_key(), generate_key()
    assert isinstance(first.curve, ec.SECP256R1)
    assert first.private_numbers() != second.private_numbers()


def test_rsa_2048_is_accepted() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert validate_csr(_request(rsa_key), "cluster.local") == CsrAccepted(CART, rsa_key.public_key())


def test_tolerated_extensions_and_a_subject_do_not_matter() -> None:
    pem = _request(
        AGENT_KEY,
        extensions=[
            x509.BasicConstraints(ca=False, path_length=None),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        ],
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cart")]),
    )
    assert validate_csr(pem, "cluster.local") == CsrAccepted(CART, AGENT_KEY.public_key())


def _tampered_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


GOOD_URI = _uri(str(CART))


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        pytest.param(b"", "request is not a PEM certificate signing request", id="empty"),
        pytest.param(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
            "request is not a PEM certificate signing request",
            id="garbage",
        ),
        pytest.param("\u00e9", "request is not a PEM certificate signing request", id="non-ascii"),
        pytest.param(
            _tampered_signature(_request(AGENT_KEY)),
            "request signature does not verify with its own key",
            id="bad signature",
        ),
        pytest.param(
            _request(ec.generate_private_key(ec.SECP384R1())),
            f"key is ECDSA on curve secp384r1; {KEY_POLICY}",
            id="P-384 key",
        ),
        pytest.param(
            _request(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            f"key is RSA of 1024 bits; {KEY_POLICY}",
            id="RSA 1024 key",
        ),
        pytest.param(
            _request(ed25519.Ed25519PrivateKey.generate()),
            f"key type Ed25519PublicKey is not allowed; {KEY_POLICY}",
            id="Ed25519 key",
        ),
        pytest.param(
            _request(AGENT_KEY, names=()),
            "request has no subject alternative name; it needs one URI SAN with the SPIFFE ID",
            id="no SAN",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[GOOD_URI, x509.DNSName("cart.shop.svc")]),
            "request carries a DNS name SAN (cart.shop.svc); only one URI SAN is allowed",
            id="extra DNS SAN",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[x509.IPAddress(ipaddress.ip_address("10.0.0.1")), GOOD_URI]),
            "request carries an IP address SAN (10.0.0.1); only one URI SAN is allowed",
            id="IP SAN",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[GOOD_URI, x509.RFC822Name("a@b.c")]),
            "request carries an email address SAN (a@b.c); only one URI SAN is allowed",
            id="email SAN",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[GOOD_URI, _uri("spiffe://cluster.local/ns/shop/sa/admin")]),
            "request has 2 URI SANs; exactly one is allowed",
            id="two URI SANs",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[_uri("spiffe://cluster.local/ns/shop")]),
            "URI SAN is not a workload SPIFFE ID: 'spiffe://cluster.local/ns/shop':"
            " path must be exactly /ns/<namespace>/sa/<service account>",
            id="not a workload ID",
        ),
        pytest.param(
            _request(AGENT_KEY, names=[_uri("spiffe://evil.example/ns/shop/sa/cart")]),
            "spiffe://evil.example/ns/shop/sa/cart is outside this signer's trust domain 'cluster.local'",
            id="other trust domain",
        ),
        pytest.param(
            _request(AGENT_KEY, extensions=[x509.BasicConstraints(ca=True, path_length=None)]),
            "request asks for a CA certificate (basicConstraints CA=true)",
            id="CA requested",
        ),
        pytest.param(
            _request(
                AGENT_KEY,
                extensions=[
                    x509.NameConstraints(permitted_subtrees=[x509.DNSName("x")], excluded_subtrees=None)
                ],
            ),
            "request asks for extension NameConstraints (2.5.29.30), which this signer never issues",
            id="name constraints",
        ),
        pytest.param(
            _request(
                AGENT_KEY,
                extensions=[
                    x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
                ],
            ),
            "request asks for extension (1.3.6.1.4.1.99999.1), which this signer never issues",
            id="unknown extension",
        ),
    ],
)
def test_bad_requests_are_rejected_with_their_exact_reason(pem: bytes | str, reason: str) -> None:
    assert validate_csr(pem, "cluster.local") == CsrRejected(reason)
