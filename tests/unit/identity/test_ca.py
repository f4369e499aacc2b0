"""The CA's root and leaves follow the X.509-SVID profile, chain to the root, and have capped lifetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.ca import (
    CLOCK_SKEW_ALLOWANCE,
    CertificateAuthority,
    create_root,
    sign_leaf,
)
from agent.identity.certificates import CertificateError, private_key_to_pem
from agent.identity.csr import CsrAccepted, build_csr, generate_key, validate_csr
from agent.identity.rotation import renewal_time
from agent.identity.spiffe import SpiffeId

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CART = SpiffeId("cluster.local", "shop", "cart")


@pytest.fixture
def root() -> CertificateAuthority:
    return create_root("cluster.local", now=NOW)


ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def _extension(certificate: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return certificate.extensions.get_extension_for_class(kind)


def _verified_chain(
    root: CertificateAuthority, leaf: x509.Certificate, at: datetime
) -> list[x509.Certificate]:
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root.certificate]))
        .time(at)
        .build_client_verifier()
    )
    return verifier.verify(leaf, []).chain


def test_root_is_a_p256_signing_certificate_for_the_trust_domain(root: CertificateAuthority) -> None:
    certificate = root.certificate
    assert isinstance(root.key.curve, ec.SECP256R1)
    assert certificate.issuer == certificate.subject
    assert certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"
    constraints = _extension(certificate, x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = _extension(certificate, x509.KeyUsage)
    assert usage.critical
    assert (usage.value.key_cert_sign, usage.value.crl_sign, usage.value.digital_signature) == (
        True,
        True,
        False,
    )
    assert _extension(
        certificate, x509.SubjectKeyIdentifier
    ).value == x509.SubjectKeyIdentifier.from_public_key(root.key.public_key())
    assert list(_extension(certificate, x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier("spiffe://cluster.local")
    ]
    assert certificate.not_valid_before_utc == NOW - CLOCK_SKEW_ALLOWANCE
    assert certificate.not_valid_after_utc == NOW + timedelta(days=3650)


def test_root_needs_a_valid_trust_domain() -> None:
    with pytest.raises(ValueError, match="may hold only lowercase letters"):
        create_root("Cluster.Local", now=NOW)


def test_a_validated_csr_is_signed_into_an_svid_leaf_that_chains_to_the_root(
    root: CertificateAuthority,
) -> None:
    key = generate_key()
    accepted = validate_csr(build_csr(key, CART), "cluster.local")
    assert isinstance(accepted, CsrAccepted)

    leaf = sign_leaf(root, accepted.spiffe_id, accepted.public_key, now=NOW)

    assert _verified_chain(root, leaf, NOW) == [leaf, root.certificate]
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root.certificate.subject
    assert leaf.public_key() == key.public_key()
    san = _extension(leaf, x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/cart")]
    constraints = _extension(leaf, x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = _extension(leaf, x509.KeyUsage)
    assert usage.critical
    flags = (usage.value.digital_signature, usage.value.key_encipherment, usage.value.key_cert_sign)
    assert flags == (True, False, False)
    assert not usage.value.crl_sign
    assert list(_extension(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert (
        _extension(leaf, x509.AuthorityKeyIdentifier).value.key_identifier
        == _extension(root.certificate, x509.SubjectKeyIdentifier).value.key_identifier
    )
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW_ALLOWANCE
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)


def test_rsa_leaves_may_also_encipher_keys(root: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = sign_leaf(root, CART, key.public_key(), now=NOW)
    usage = _extension(leaf, x509.KeyUsage).value
    assert (usage.digital_signature, usage.key_encipherment) == (True, True)


def test_a_leaf_from_another_root_does_not_verify(root: CertificateAuthority) -> None:
    other = create_root("cluster.local", now=NOW)
    leaf = sign_leaf(other, CART, generate_key().public_key(), now=NOW)
    with pytest.raises(verification.VerificationError):
        _verified_chain(root, leaf, NOW)


@pytest.mark.parametrize(
    ("lifetime", "requested", "root_lifetime", "expected_lifetime"),
    [
        pytest.param(timedelta(hours=24), None, timedelta(days=3650), timedelta(hours=24), id="default"),
        pytest.param(
            timedelta(hours=24), timedelta(hours=1), timedelta(days=3650), timedelta(hours=1), id="request"
        ),
        pytest.param(
            timedelta(hours=24), timedelta(days=7), timedelta(days=3650), timedelta(hours=24), id="capped"
        ),
        pytest.param(timedelta(hours=24), None, timedelta(hours=2), timedelta(hours=2), id="root expiry"),
    ],
)
def test_leaf_lifetime_is_capped_by_the_request_and_the_root(
    lifetime: timedelta, requested: timedelta | None, root_lifetime: timedelta, expected_lifetime: timedelta
) -> None:
    ca = create_root("cluster.local", now=NOW, lifetime=root_lifetime)
    leaf = sign_leaf(
        ca, CART, generate_key().public_key(), now=NOW, lifetime=lifetime, requested_lifetime=requested
    )
    assert leaf.not_valid_after_utc == NOW + expected_lifetime


def test_short_lived_leaves_are_backdated_by_a_tenth_so_renewal_stays_ahead(
    root: CertificateAuthority,
) -> None:
    leaf = sign_leaf(root, CART, generate_key().public_key(), now=NOW, lifetime=timedelta(seconds=20))
    assert leaf.not_valid_before_utc == NOW - timedelta(seconds=2)
    assert renewal_time(leaf.not_valid_before_utc, leaf.not_valid_after_utc) == NOW + timedelta(seconds=9)


def test_an_expired_root_signs_nothing() -> None:
    ca = create_root("cluster.local", now=NOW, lifetime=timedelta(hours=1))
    with pytest.raises(CertificateError, match="root certificate expired"):
        sign_leaf(ca, CART, generate_key().public_key(), now=NOW + timedelta(hours=2))


def test_a_non_positive_lifetime_is_a_programming_error(root: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="lifetime must be positive"):
        sign_leaf(root, CART, generate_key().public_key(), now=NOW, requested_lifetime=timedelta(0))


def test_the_authority_round_trips_through_pem(root: CertificateAuthority) -> None:
    loaded = CertificateAuthority.from_pem(root.certificate_pem(), root.key_pem().decode("ascii"))
    assert loaded.certificate == root.certificate
    assert loaded.key.private_numbers() == root.key.private_numbers()


ROOT_A = create_root("cluster.local", now=NOW)
ROOT_B = create_root("cluster.local", now=NOW)
RSA_KEY_PEM = private_key_to_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.mark.parametrize(
    ("certificate_pem", "key_pem", "message"),
    [
        pytest.param(
            b"junk", ROOT_A.key_pem(), "CA certificate: no PEM certificate found", id="no certificate"
        ),
        pytest.param(
            ROOT_A.certificate_pem() * 2,
            ROOT_A.key_pem(),
            "CA certificate: expected one certificate, found 2",
            id="two certificates",
        ),
        pytest.param(
            ROOT_A.certificate_pem(), b"junk", "CA key: not an unencrypted PEM private key", id="bad key"
        ),
        pytest.param(
            ROOT_A.certificate_pem(), RSA_KEY_PEM, "CA key: expected an ECDSA key, found", id="RSA key"
        ),
        pytest.param(
            ROOT_A.certificate_pem(),
            ROOT_B.key_pem(),
            "CA: key does not match the root certificate",
            id="other key",
        ),
    ],
)
def test_a_broken_stored_authority_is_refused(certificate_pem: bytes, key_pem: bytes, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        CertificateAuthority.from_pem(certificate_pem, key_pem)
