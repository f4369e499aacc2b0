"""What the data plane needs from the identity side, and the TLS contexts it builds from it.

`CredentialSource` is the seam to whatever holds workload certificates (the static config loader,
the certificate manager): the data plane asks it for an identity's certificate when a connection
needs one, and never falls back to plaintext. `TlsContexts` keeps one server and one client SSL
context per identity, rebuilt only when the certificate or the bundle object changes (building one
loads the key and the bundle: far too slow per connection).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Protocol

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import client_context, server_context


@dataclass(frozen=True, slots=True)
class CredentialUnavailable:
    """No certificate can be had for an identity (not hosted here, not issued in time, expired)."""

    reason: str
    """One sentence for logs and the access log's error field."""


class CredentialSource(Protocol):
    """Where the data plane gets workload certificates and the trust bundle.

    Return the same `WorkloadCertificate` object until it is renewed, and the same `TrustBundle`
    object until it changes: the data plane caches one TLS context per identity and rebuilds it
    only when the object it was built from is replaced.
    """

    async def credential(
        self, identity: str, timeout_s: float
    ) -> WorkloadCertificate | CredentialUnavailable:
        """The valid certificate of `identity` (a SPIFFE ID URI), waiting up to `timeout_s` for one."""
        ...

    def trust_bundle(self) -> TrustBundle:
        """The roots peers' certificates must chain to."""
        ...


@dataclass(frozen=True, slots=True)
class _Built:
    credential: WorkloadCertificate
    bundle: TrustBundle
    context: ssl.SSLContext


class TlsContexts:
    """SSL contexts by identity and side, current with the certificates they were built from."""

    def __init__(self) -> None:
        self._built: dict[tuple[bool, SpiffeId], _Built] = {}

    def server(self, credential: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
        """The context serving HBONE to `credential`'s workload."""
        return self._context(credential, bundle, server_side=True)

    def client(self, credential: WorkloadCertificate, bundle: TrustBundle) -> ssl.SSLContext:
        """The context dialling HBONE on behalf of `credential`'s workload."""
        return self._context(credential, bundle, server_side=False)

    def in_use(self) -> list[WorkloadCertificate]:
        """The certificates presented by current contexts, one per identity."""
        by_identity = {built.credential.spiffe_id: built.credential for built in self._built.values()}
        return [by_identity[identity] for identity in sorted(by_identity)]

    def _context(
        self, credential: WorkloadCertificate, bundle: TrustBundle, *, server_side: bool
    ) -> ssl.SSLContext:
        key = (server_side, credential.spiffe_id)
        built = self._built.get(key)
        if built is None or built.credential is not credential or built.bundle is not bundle:
            make = server_context if server_side else client_context
            built = _Built(credential, bundle, make(credential, bundle))
            self._built[key] = built
        return built.context
