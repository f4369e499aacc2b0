"""Real TLS handshakes between the agent's contexts, in memory (ssl.MemoryBIO pairs, no sockets),
and the SPIFFE check of the peer that follows every handshake."""

from __future__ import annotations

import ssl
import types
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa
from agent.identity.tls import (
    ALPN_HBONE,
    PeerCertificateInvalid,
    PeerIdentityMismatch,
    PeerVerified,
    PeerWithoutUriSan,
    client_context,
    server_context,
    verify_peer,
)

CLIENT = SpiffeId("cluster.local", "shop", "cart")
SERVER = SpiffeId("cluster.local", "shop", "payments")


@dataclass
class Link:
    """Both ends of one in-memory TLS connection, and the error each end saw, if any."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    wires: tuple[tuple[ssl.MemoryBIO, ssl.MemoryBIO], tuple[ssl.MemoryBIO, ssl.MemoryBIO]]
    client_error: ssl.SSLError | None = None
    server_error: ssl.SSLError | None = None

    def carry(self) -> None:
        """Moves every byte either end has written to the other end."""
        for source, sink in self.wires:
            sink.write(source.read())


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> Link:
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    link = Link(
        client=client_ctx.wrap_bio(client_in, client_out, server_side=False, server_hostname=None),
        server=server_ctx.wrap_bio(server_in, server_out, server_side=True),
        wires=((client_out, server_in), (server_out, client_in)),
    )
    client_done = server_done = False
    for _ in range(10):  # a TLS 1.3 handshake needs three flights; the rest is slack
        if not (client_done or link.client_error):
            try:
                link.client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as error:
                link.client_error = error
        if not (server_done or link.server_error):
            try:
                link.server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as error:
                link.server_error = error
        link.carry()
    if client_done and link.server_error:
        # A TLS 1.3 client finishes before the server judges its certificate: the refusal reaches
        # it as an alert on its first read.
        try:
            link.client.read(1024)
        except ssl.SSLError as error:
            link.client_error = error
    return link


@pytest.fixture
def client_cert(ca: EphemeralCa) -> WorkloadCertificate:
    return ca.issue(CLIENT)


@pytest.fixture
def server_cert(ca: EphemeralCa) -> WorkloadCertificate:
    return ca.issue(SERVER)


def _error_text(error: ssl.SSLError | None) -> str:
    assert error is not None, "expected this side to fail"
    return str(error)


def test_mutual_tls13_with_h2_between_two_identities_of_one_root(
    ca: EphemeralCa, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> None:
    server_ctx = server_context(server_cert, ca.bundle)
    sni_seen: list[str | None] = []
    server_ctx.sni_callback = lambda _obj, name, _ctx: sni_seen.append(name)

    link = handshake(client_context(client_cert, ca.bundle), server_ctx)

    assert (link.client_error, link.server_error) == (None, None)
    for side in (link.client, link.server):
        assert side.version() == "TLSv1.3"
        assert side.selected_alpn_protocol() == ALPN_HBONE == "h2"
    assert sni_seen == [None]
    assert verify_peer(link.client.getpeercert(binary_form=True), SERVER) == PeerVerified(SERVER)
    assert verify_peer(link.server.getpeercert(binary_form=True), {CLIENT}) == PeerVerified(CLIENT)
    link.client.write(b"ping")
    link.carry()
    assert link.server.read(1024) == b"ping"


def test_tls_objects_call_openssl_without_python_wrappers(
    ca: EphemeralCa, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> None:
    link = handshake(client_context(client_cert, ca.bundle), server_context(server_cert, ca.bundle))
    for side in (link.client, link.server):
        for method in (side.read, side.write, side.pending):
            assert isinstance(method, types.BuiltinMethodType), method
    buffer = bytearray(16)
    assert link.client.write(b"ping") == 4
    link.carry()
    assert link.server.pending() == 0  # nothing decrypted before the read asks
    assert link.server.read(len(buffer), buffer) == 4
    assert bytes(buffer[:4]) == b"ping"
    with pytest.raises(ssl.SSLWantReadError):
        link.server.read(len(buffer), buffer)


def test_a_client_without_a_certificate_is_refused(ca: EphemeralCa, server_cert: WorkloadCertificate) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.bundle.to_pem().decode("ascii"))
    anonymous.set_alpn_protocols(["h2"])

    link = handshake(anonymous, server_context(server_cert, ca.bundle))

    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in _error_text(link.server_error)
    assert "CERTIFICATE_REQUIRED" in _error_text(link.client_error)


def test_a_client_certificate_from_another_root_is_refused(
    ca: EphemeralCa, other_ca: EphemeralCa, server_cert: WorkloadCertificate
) -> None:
    intruder = other_ca.issue(CLIENT)
    link = handshake(client_context(intruder, ca.bundle), server_context(server_cert, ca.bundle))
    assert "CERTIFICATE_VERIFY_FAILED" in _error_text(link.server_error)
    assert "UNKNOWN_CA" in _error_text(link.client_error)


def test_a_server_certificate_from_another_root_is_refused(
    ca: EphemeralCa, other_ca: EphemeralCa, client_cert: WorkloadCertificate
) -> None:
    impostor = other_ca.issue(SERVER)
    link = handshake(client_context(client_cert, ca.bundle), server_context(impostor, other_ca.bundle))
    assert "CERTIFICATE_VERIFY_FAILED" in _error_text(link.client_error)
    assert "UNKNOWN_CA" in _error_text(link.server_error)


def test_an_expired_server_certificate_is_refused(ca: EphemeralCa, client_cert: WorkloadCertificate) -> None:
    link = handshake(
        client_context(client_cert, ca.bundle), server_context(ca.issue_expired(SERVER), ca.bundle)
    )
    assert "certificate has expired" in _error_text(link.client_error)


def test_a_tls12_client_is_refused(
    ca: EphemeralCa, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> None:
    old_client = client_context(client_cert, ca.bundle)
    old_client.minimum_version = old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    link = handshake(old_client, server_context(server_cert, ca.bundle))
    assert "UNSUPPORTED_PROTOCOL" in _error_text(link.server_error)


def test_the_server_selects_no_protocol_but_h2(
    ca: EphemeralCa, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> None:
    http11_client = client_context(client_cert, ca.bundle)
    http11_client.set_alpn_protocols(["http/1.1"])
    link = handshake(http11_client, server_context(server_cert, ca.bundle))
    # OpenSSL completes such a handshake without ALPN; the caller must check the selection.
    assert link.server.selected_alpn_protocol() is None


def test_peer_verification_flags_the_wrong_identity(
    ca: EphemeralCa, client_cert: WorkloadCertificate, server_cert: WorkloadCertificate
) -> None:
    link = handshake(client_context(client_cert, ca.bundle), server_context(server_cert, ca.bundle))
    expected = SpiffeId("cluster.local", "shop", "ledger")
    outcome = verify_peer(link.client.getpeercert(binary_form=True), expected)
    assert outcome == PeerIdentityMismatch(frozenset({expected}), SERVER)
    assert isinstance(outcome, PeerIdentityMismatch)
    assert outcome.reason == (
        "peer is spiffe://cluster.local/ns/shop/sa/payments, expected spiffe://cluster.local/ns/shop/sa/ledger"
    )


def test_a_trusted_leaf_in_another_trust_domain_is_the_wrong_identity(
    ca: EphemeralCa, client_cert: WorkloadCertificate
) -> None:
    foreign = SpiffeId("evil.example", "shop", "payments")
    link = handshake(client_context(client_cert, ca.bundle), server_context(ca.issue(foreign), ca.bundle))
    assert link.client_error is None
    assert verify_peer(link.client.getpeercert(binary_form=True), SERVER) == PeerIdentityMismatch(
        frozenset({SERVER}), foreign
    )


def test_a_bundle_with_two_roots_trusts_both(
    ca: EphemeralCa, other_ca: EphemeralCa, client_cert: WorkloadCertificate
) -> None:
    rotating = TrustBundle((ca.authority.certificate, other_ca.authority.certificate))
    server_on_new_root = other_ca.issue(SERVER)
    link = handshake(client_context(client_cert, rotating), server_context(server_on_new_root, rotating))
    assert (link.client_error, link.server_error) == (None, None)


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def test_any_of_several_acceptable_identities_verifies(server_cert: WorkloadCertificate) -> None:
    acceptable = [SpiffeId("cluster.local", "shop", "ledger"), SERVER]
    assert verify_peer(_der(server_cert.leaf), acceptable) == PeerVerified(SERVER)


@pytest.mark.parametrize(
    ("names", "ca_flag", "reason"),
    [
        pytest.param(
            [x509.UniformResourceIdentifier(str(SERVER)), x509.UniformResourceIdentifier(str(CLIENT))],
            False,
            "peer certificate: certificate has 2 URI subject alternative names, not one",
            id="two URI SANs",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://cluster.local")],
            False,
            "peer certificate: 'spiffe://cluster.local':"
            " path must be exactly /ns/<namespace>/sa/<service account>",
            id="no workload path",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier(str(SERVER))],
            False,
            f"peer {SERVER}: certificate has no key usage extension",
            id="no key usage",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier(str(SERVER))],
            True,
            f"peer {SERVER}: certificate is a CA certificate (basicConstraints CA=true), not a leaf",
            id="CA certificate",
        ),
    ],
)
def test_certificates_that_are_no_svid_leaf_are_invalid(
    ca: EphemeralCa, names: list[x509.GeneralName], ca_flag: bool, reason: str
) -> None:
    certificate = ca.issue_malformed(names, ca=ca_flag)
    assert verify_peer(_der(certificate), SERVER) == PeerCertificateInvalid(reason)


@pytest.mark.parametrize("names", [[], [x509.DNSName("payments.shop.svc")]], ids=["no SAN", "DNS SAN only"])
def test_certificates_without_uri_san_are_flagged(ca: EphemeralCa, names: list[x509.GeneralName]) -> None:
    outcome = verify_peer(_der(ca.issue_malformed(names)), SERVER)
    assert outcome == PeerWithoutUriSan()
    assert outcome.reason == "peer certificate has no URI SAN, so it names no SPIFFE identity"


@pytest.mark.parametrize(
    ("der", "reason"),
    [(None, "peer presented no certificate"), (b"\x30\x03junk", "peer certificate is not DER X.509")],
)
def test_missing_or_unreadable_certificates_are_invalid(der: bytes | None, reason: str) -> None:
    assert verify_peer(der, SERVER) == PeerCertificateInvalid(reason)
