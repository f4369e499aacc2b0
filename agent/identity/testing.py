"""A throwaway certificate authority for tests and demos; never used by the agent itself.

It signs through the product's own `create_root` and `sign_leaf`, so what it issues is exactly what
the real CA would, including the deliberately bad cases a peer must refuse: an expired leaf
(`issue_expired`), a leaf in another trust domain (`issue` with such an ID), and a leaf from a root
the peer does not trust (another `EphemeralCa`). Certificates that break the X.509-SVID rules, which
the product can never issue, come from `issue_malformed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.identity.ca import DEFAULT_LEAF_LIFETIME, CertificateAuthority, create_root, sign_leaf
from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.csr import generate_key
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId


@dataclass(frozen=True)
class EphemeralCa:
    """An in-memory root that issues workload certificates on demand."""

    authority: CertificateAuthority
    """The root key and certificate."""

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN, *, now: datetime | None = None) -> EphemeralCa:
        """A new root for `trust_domain`, valid from about `now` (default: the current time)."""
        return cls(create_root(trust_domain, now=now or datetime.now(UTC)))

    @property
    def bundle(self) -> TrustBundle:
        """A trust bundle holding only this root."""
        return TrustBundle((self.authority.certificate,))

    def issue(
        self,
        spiffe_id: SpiffeId | str,
        *,
        now: datetime | None = None,
        lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    ) -> WorkloadCertificate:
        """A fresh key and leaf for `spiffe_id` (any trust domain), valid from about `now`."""
        identity = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
        key = generate_key()
        leaf = sign_leaf(
            self.authority, identity, key.public_key(), now=now or datetime.now(UTC), lifetime=lifetime
        )
        return WorkloadCertificate(identity, key, (leaf,))

    def issue_expired(self, spiffe_id: SpiffeId | str) -> WorkloadCertificate:
        """A leaf for `spiffe_id` that expired an hour ago."""
        lifetime = timedelta(hours=1)
        return self.issue(spiffe_id, now=datetime.now(UTC) - 2 * lifetime, lifetime=lifetime)

    def issue_malformed(self, names: Sequence[x509.GeneralName], *, ca: bool = False) -> x509.Certificate:
        """A certificate signed by this root with exactly `names` as SANs (none: no SAN extension),
        marked a CA when `ca`: for showing that peers refuse what is not a one-ID X.509-SVID leaf.
        """
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.authority.certificate.subject)
            .public_key(generate_key().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + DEFAULT_LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        return builder.sign(self.authority.key, hashes.SHA256())
