"""SPIFFE IDs of Kubernetes workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

Owns the `SpiffeId` value, its strict parser, and reading the ID out of an X.509 certificate. Parsing is
strict on purpose: an ID is compared as a whole by the data plane and the CA, so two spellings of one
identity must never both parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

DEFAULT_TRUST_DOMAIN = "cluster.local"

_SCHEME = "spiffe://"
_MAX_ID_LENGTH = 2048
_MAX_TRUST_DOMAIN_LENGTH = 255
# The SPIFFE ID spec: trust domains hold only lowercase letters, digits, '.', '-' and '_'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
# Kubernetes: a namespace is an RFC 1123 label, a service account name an RFC 1123 subdomain.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_DNS_LABEL)
_SERVICE_ACCOUNT = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_MAX_NAMESPACE_LENGTH = 63
_MAX_SERVICE_ACCOUNT_LENGTH = 253


class InvalidSpiffeId(ValueError):
    """Text or a certificate does not carry a valid workload SPIFFE ID; the message says why."""


class MissingUriSan(InvalidSpiffeId):
    """A certificate has no URI subject alternative name at all, so it names no SPIFFE ID."""


def trust_domain_problem(trust_domain: str) -> str | None:
    """Why `trust_domain` is not a valid SPIFFE trust domain name, or None when it is."""
    if not trust_domain:
        return "trust domain is empty"
    if len(trust_domain) > _MAX_TRUST_DOMAIN_LENGTH:
        return f"trust domain is longer than {_MAX_TRUST_DOMAIN_LENGTH} characters"
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        return f"trust domain {trust_domain!r} may hold only lowercase letters, digits, '.', '-' and '_'"
    return None


def _name_problem(kind: str, value: str, pattern: re.Pattern[str], max_length: int) -> str | None:
    if not value:
        return f"{kind} is empty"
    if len(value) > max_length:
        return f"{kind} {value!r} is longer than {max_length} characters"
    if not pattern.fullmatch(value):
        return f"{kind} {value!r} is not a valid Kubernetes name"
    return None


@dataclass(frozen=True, order=True)
class SpiffeId:
    """The identity of one Kubernetes service account in one trust domain."""

    trust_domain: str
    """SPIFFE trust domain, e.g. `cluster.local`."""

    namespace: str
    """Kubernetes namespace of the service account."""

    service_account: str
    """Kubernetes service account name."""

    def __post_init__(self) -> None:
        problem = (
            trust_domain_problem(self.trust_domain)
            or _name_problem("namespace", self.namespace, _NAMESPACE, _MAX_NAMESPACE_LENGTH)
            or _name_problem(
                "service account", self.service_account, _SERVICE_ACCOUNT, _MAX_SERVICE_ACCOUNT_LENGTH
            )
        )
        if problem:
            raise InvalidSpiffeId(problem)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parses `spiffe://<trust domain>/ns/<ns>/sa/<sa>`; raises `InvalidSpiffeId` saying why not."""
        if len(text) > _MAX_ID_LENGTH:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {_MAX_ID_LENGTH} characters")
        if not text.startswith(_SCHEME):
            raise InvalidSpiffeId(f"{text!r} does not start with {_SCHEME!r}")
        trust_domain, slash, path = text[len(_SCHEME) :].partition("/")
        if problem := trust_domain_problem(trust_domain):
            raise InvalidSpiffeId(f"{text!r}: {problem}")
        segments = path.split("/") if slash else []
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidSpiffeId(f"{text!r}: path must be exactly /ns/<namespace>/sa/<service account>")
        try:
            return cls(trust_domain, segments[1], segments[3])
        except InvalidSpiffeId as error:
            raise InvalidSpiffeId(f"{text!r}: {error}") from None

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> SpiffeId:
        """The ID in the certificate's one URI SAN (X.509-SVID: exactly one); raises `InvalidSpiffeId`."""
        try:
            extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            raise MissingUriSan("certificate has no subject alternative names") from None
        except ValueError as error:
            raise InvalidSpiffeId(f"certificate extensions cannot be parsed: {error}") from None
        uris = extension.value.get_values_for_type(x509.UniformResourceIdentifier)
        if not uris:
            raise MissingUriSan("certificate has no URI subject alternative name")
        if len(uris) > 1:
            raise InvalidSpiffeId(f"certificate has {len(uris)} URI subject alternative names, not one")
        return cls.parse(uris[0])
