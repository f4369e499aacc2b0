"""Mutual TLS for HBONE: SSL contexts for one workload identity, and the SPIFFE check of the peer.

Both sides run TLS 1.3 only, offer ALPN `h2` only, require the peer's certificate, and trust only the
CA's bundle. Hostnames play no part (the client sends no SNI): after the handshake the caller checks
the peer's URI SAN against the SPIFFE ID it expects with `verify_peer`, and checks that
`selected_alpn_protocol()` is `h2` (OpenSSL completes a handshake without ALPN when the peer offers
none we accept).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from agent.identity.certificates import TrustBundle, WorkloadCertificate, leaf_problem
from agent.identity.spiffe import InvalidSpiffeId, MissingUriSan, SpiffeId

ALPN_HBONE = "h2"


class _DirectSslObject(ssl.SSLObject):
    """`ssl.SSLObject` whose `read`, `write` and `pending` are OpenSSL's own methods, not wrappers.

    An asyncio TLS transport calls these for every record, and at least twice per received record
    (the second read ends in SSLWantReadError). `ssl.SSLObject`'s versions are Python functions
    that only pass their arguments on to the `_ssl` object; binding the `_ssl` methods on the
    instance removes a Python frame from each call, and the traceback entry the exception of each
    read that finds nothing more picks up on its way out. Same results and errors; `read` needs its
    size (OpenSSL's has no default of 1024), which every TLS transport passes.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _DirectSslObject:
        # `_create` is how `SSLContext.wrap_bio` builds its object (typeshed leaves it and `_sslobj` out).
        self: _DirectSslObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        native = self._sslobj  # type: ignore[attr-defined]
        vars(self).update(read=native.read, write=native.write, pending=native.pending)
        return self


def _load_credential(context: ssl.SSLContext, credential: WorkloadCertificate) -> None:
    # `ssl` loads a certificate and key only from a file path. A memfd is an anonymous file in this
    # process's memory: the key never reaches a disk, no directory holds it, and it vanishes with
    # its descriptor even if the process dies mid-way. A temporary file in a 0700 directory, deleted
    # after loading, would give none of that for certain (disk-backed /tmp, leftovers on a crash).
    fd = os.memfd_create("ambient-agent-credential", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as memory_file:
            memory_file.write(credential.chain_pem() + credential.key_pem())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _mutual_tls_context(
    credential: WorkloadCertificate, bundle: TrustBundle, *, server_side: bool
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # SPIFFE names workloads by URI SAN: see `verify_peer`
    context.verify_mode = ssl.CERT_REQUIRED
    # Refuse certificates that break RFC 5280 where OpenSSL is otherwise lenient.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=bundle.to_pem().decode("ascii"))
    context.set_alpn_protocols([ALPN_HBONE])
    context.sslobject_class = _DirectSslObject
    _load_credential(context, credential)
    return context


def server_context(credential: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    """The context an inbound HBONE connection to `credential`'s workload is served with."""
    context = _mutual_tls_context(credential, bundle, server_side=True)
    # HBONE clients pool connections instead of resuming sessions: tickets would be work for nothing.
    context.num_tickets = 0
    return context


def client_context(credential: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
    """The context an outbound HBONE connection from `credential`'s workload is opened with.

    Wrap with `server_hostname=None`: no SNI, the server picks its identity by destination address.
    """
    return _mutual_tls_context(credential, bundle, server_side=False)


@dataclass(frozen=True)
class PeerVerified:
    """The peer's certificate names one of the expected identities."""

    spiffe_id: SpiffeId
    """The peer's identity."""


@dataclass(frozen=True)
class PeerIdentityMismatch:
    """The peer is a valid workload, but not one we meant to talk to."""

    expected: frozenset[SpiffeId]
    """Identities that would have been accepted."""

    actual: SpiffeId
    """The identity the peer's certificate names."""

    @property
    def reason(self) -> str:
        """One sentence for logs and errors."""
        wanted = " or ".join(sorted(str(spiffe_id) for spiffe_id in self.expected))
        return f"peer is {self.actual}, expected {wanted}"


@dataclass(frozen=True)
class PeerWithoutUriSan:
    """The peer's certificate has no URI SAN, so it names no SPIFFE identity."""

    @property
    def reason(self) -> str:
        """One sentence for logs and errors."""
        return "peer certificate has no URI SAN, so it names no SPIFFE identity"


@dataclass(frozen=True)
class PeerCertificateInvalid:
    """The peer's certificate is missing, unreadable, or not a usable X.509-SVID leaf."""

    reason: str
    """What is wrong with it."""


PeerVerification = PeerVerified | PeerIdentityMismatch | PeerWithoutUriSan | PeerCertificateInvalid


def verify_peer(peer_der: bytes | None, expected: SpiffeId | Iterable[SpiffeId]) -> PeerVerification:
    """Checks a handshake peer's leaf (`getpeercert(binary_form=True)`) against the expected identities.

    The chain was verified against the trust bundle during the handshake; this adds the SPIFFE
    checks that X.509 path validation does not make (X.509-SVID section 5.2).
    """
    acceptable = frozenset([expected] if isinstance(expected, SpiffeId) else expected)
    if peer_der is None:
        return PeerCertificateInvalid("peer presented no certificate")
    try:
        certificate = x509.load_der_x509_certificate(peer_der)
    except ValueError:
        return PeerCertificateInvalid("peer certificate is not DER X.509")
    try:
        actual = SpiffeId.from_certificate(certificate)
    except MissingUriSan:
        return PeerWithoutUriSan()
    except InvalidSpiffeId as error:
        return PeerCertificateInvalid(f"peer certificate: {error}")
    if problem := leaf_problem(certificate):
        return PeerCertificateInvalid(f"peer {actual}: {problem}")
    if actual not in acceptable:
        return PeerIdentityMismatch(acceptable, actual)
    return PeerVerified(actual)
