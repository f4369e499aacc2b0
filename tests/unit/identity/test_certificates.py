"""Trust bundles and workload certificates round-trip through PEM and refuse inconsistent material."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity.certificates import CertificateError, TrustBundle, WorkloadCertificate
from agent.identity.csr import generate_key
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa

CART = "spiffe://cluster.local/ns/shop/sa/cart"


def test_a_bundle_of_two_roots_round_trips_through_pem(ca: EphemeralCa, other_ca: EphemeralCa) -> None:
    bundle = TrustBundle((ca.authority.certificate, other_ca.authority.certificate))
    assert TrustBundle.from_pem(bundle.to_pem()) == bundle
    assert TrustBundle.from_pem(bundle.to_pem().decode("ascii")) == bundle


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        pytest.param(b"", "trust bundle: no PEM certificate found, or one is malformed", id="empty"),
        pytest.param("not pem", "trust bundle: no PEM certificate found, or one is malformed", id="garbage"),
    ],
)
def test_an_unreadable_bundle_is_refused(pem: bytes | str, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        TrustBundle.from_pem(pem)


def test_a_bundle_holds_only_ca_certificates(ca: EphemeralCa) -> None:
    with pytest.raises(CertificateError, match="trust bundle: certificate is not a CA certificate"):
        TrustBundle.from_pem(ca.issue(CART).chain_pem())
    with pytest.raises(CertificateError, match="trust bundle: holds no certificate"):
        TrustBundle(())


def test_a_workload_certificate_pairs_a_pem_chain_with_its_key(ca: EphemeralCa) -> None:
    issued = ca.issue(CART)
    loaded = WorkloadCertificate.from_pem(issued.chain_pem().decode("ascii"), issued.key)
    assert loaded == issued
    assert loaded.spiffe_id == SpiffeId.parse(CART)
    assert (loaded.not_before, loaded.not_after) == (
        issued.leaf.not_valid_before_utc,
        issued.leaf.not_valid_after_utc,
    )
    assert b"BEGIN PRIVATE KEY" in loaded.key_pem()


def test_a_certificate_with_another_key_is_refused(ca: EphemeralCa) -> None:
    with pytest.raises(CertificateError, match="key does not match the leaf"):
        WorkloadCertificate.from_pem(ca.issue(CART).chain_pem(), generate_key())


def test_the_named_identity_must_be_the_leafs(ca: EphemeralCa) -> None:
    issued = ca.issue(CART)
    with pytest.raises(
        CertificateError, match=f"leaf names {CART}, expected spiffe://cluster.local/ns/shop/sa/x"
    ):
        WorkloadCertificate(SpiffeId("cluster.local", "shop", "x"), issued.key, issued.chain)


@pytest.mark.parametrize(
    ("names", "ca_flag", "message"),
    [
        pytest.param(
            [], False, "workload certificate: certificate has no subject alternative names", id="no SAN"
        ),
        pytest.param(
            [x509.UniformResourceIdentifier(CART)],
            True,
            "workload certificate: certificate is a CA certificate",
            id="CA certificate",
        ),
    ],
)
def test_a_chain_whose_leaf_is_no_svid_is_refused(
    ca: EphemeralCa, names: list[x509.GeneralName], ca_flag: bool, message: str
) -> None:
    certificate = ca.issue_malformed(names, ca=ca_flag)
    with pytest.raises(CertificateError, match=message):
        WorkloadCertificate.from_pem(certificate.public_bytes(serialization.Encoding.PEM), generate_key())


def test_an_empty_chain_is_refused() -> None:
    with pytest.raises(CertificateError, match="workload certificate: empty chain"):
        WorkloadCertificate(SpiffeId.parse(CART), generate_key(), ())
