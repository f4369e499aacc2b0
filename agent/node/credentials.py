"""Workload certificates and the trust bundle from the static configuration's files.

The data plane's `CredentialSource` for static mode: what the files held at the last (re)load, swapped
whole on reload. There is nothing to wait for: an identity without a certificate, or whose
certificate has expired since it was read, is unavailable at once (never a plaintext fallback).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.proxy.credentials import CredentialUnavailable


class StaticCredentials:
    """Certificates by SPIFFE ID and the trust bundle, as last read from files."""

    def __init__(self, bundle: TrustBundle, certificates: Mapping[str, WorkloadCertificate]) -> None:
        self._bundle = bundle
        self._certificates = dict(certificates)

    def replace(self, bundle: TrustBundle, certificates: Mapping[str, WorkloadCertificate]) -> None:
        """Uses a new reading of the files from now on (connections already open keep theirs)."""
        self._bundle = bundle
        self._certificates = dict(certificates)

    async def credential(
        self, identity: str, timeout_s: float
    ) -> WorkloadCertificate | CredentialUnavailable:
        """The certificate for `identity` (a SPIFFE ID), or why there is none; `timeout_s` is unused."""
        certificate = self._certificates.get(identity)
        if certificate is None:
            return CredentialUnavailable(f"{identity}: the static configuration has no certificate for it")
        if certificate.not_after <= datetime.now(UTC):
            return CredentialUnavailable(
                f"{identity}: its certificate expired at {certificate.not_after.isoformat()}"
            )
        return certificate

    def trust_bundle(self) -> TrustBundle:
        """The roots peers' certificates must lead to."""
        return self._bundle
