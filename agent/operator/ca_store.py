"""Where the CA keeps its root (a Secret) and publishes its trust bundle (a ConfigMap).

The root is created once, by whichever replica gets there first: each replica creates the Secret only
if it is absent and, on a conflict, reads the one the other replica stored, so two replicas starting
together end up with one root. An existing Secret is never overwritten, even when unreadable: that
would silently replace the cluster's root. The bundle holds the current root and the still-valid
roots listed under `retired-roots.crt` in the Secret, so during a root rotation certificates from
either root stay trusted.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime
from typing import Any

from agent.identity.ca import CertificateAuthority, create_root
from agent.identity.certificates import CertificateError, TrustBundle, load_pem_certificates
from agent.operator.rest import ApiClient, ApiResponse

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

ROOT_CERTIFICATE_KEY = "root.crt"
"""Secret key of the current root certificate (PEM)."""

ROOT_KEY_KEY = "root.key"
"""Secret key of the current root's private key (PKCS#8 PEM)."""

RETIRED_ROOTS_KEY = "retired-roots.crt"
"""Optional Secret key: earlier roots (PEM) still trusted until they expire, during a root rotation."""

BUNDLE_KEY = "roots.pem"
"""ConfigMap key of the published trust bundle (PEM roots)."""

_LABELS = {"app.kubernetes.io/name": "ambient-agent", "app.kubernetes.io/component": "ca"}
_CONFLICT_RETRIES = 5


class CaStoreError(RuntimeError):
    """The Secret or ConfigMap could not be read or written (other than by a lost race)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def root_secret(authority: CertificateAuthority, namespace: str, name: str) -> JsonObject:
    """The Secret object that stores `authority`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": _LABELS},
        "type": "Opaque",
        "data": {
            ROOT_CERTIFICATE_KEY: _b64(authority.certificate_pem()),
            ROOT_KEY_KEY: _b64(authority.key_pem()),
        },
    }


def _secret_value(secret: JsonObject, key: str) -> bytes | None:
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError(f"Secret key {key}: not base64") from None


def authority_from_secret(secret: JsonObject) -> CertificateAuthority:
    """The root stored in `secret`; raises `CertificateError` saying what is missing or malformed."""
    certificate, key = _secret_value(secret, ROOT_CERTIFICATE_KEY), _secret_value(secret, ROOT_KEY_KEY)
    if certificate is None or key is None:
        raise CertificateError(f"the Secret lacks {ROOT_CERTIFICATE_KEY} or {ROOT_KEY_KEY}")
    return CertificateAuthority.from_pem(certificate, key)


def published_bundle(secret: JsonObject, authority: CertificateAuthority, now: datetime) -> TrustBundle:
    """The roots agents must trust: the current one, then each retired root not yet expired."""
    roots = [authority.certificate]
    retired = _secret_value(secret, RETIRED_ROOTS_KEY)
    if retired:
        for root in load_pem_certificates(retired, f"Secret key {RETIRED_ROOTS_KEY}"):
            if root.not_valid_after_utc > now and root not in roots:
                roots.append(root)
    return TrustBundle(tuple(roots))


def bundle_configmap(bundle: TrustBundle, namespace: str, name: str) -> JsonObject:
    """The ConfigMap object that publishes `bundle`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": _LABELS},
        "data": {BUNDLE_KEY: bundle.to_pem().decode("ascii")},
    }


def _failed(what: str, response: ApiResponse) -> CaStoreError:
    return CaStoreError(f"{what}: {response.message}")


async def load_or_create_root(
    api: ApiClient, namespace: str, name: str, trust_domain: str, now: datetime
) -> tuple[CertificateAuthority, JsonObject]:
    """The root from Secret `namespace/name`, creating and storing a new one if there is none yet.

    Returns the root and the Secret it came from. Raises `CaStoreError` if the Secret exists but holds
    no usable root, or the API server refuses; `ApiUnreachable` if it cannot be reached.
    """
    path = f"/api/v1/namespaces/{namespace}/secrets"
    for _ in range(_CONFLICT_RETRIES):
        read = await api.request("GET", f"{path}/{name}")
        if read.ok:
            try:
                return authority_from_secret(read.body), read.body
            except CertificateError as error:
                raise CaStoreError(
                    f"Secret {namespace}/{name} holds no usable CA root ({error}); it is left as is:"
                    " fix or delete it"
                ) from None
        if read.status != 404:
            raise _failed(f"reading Secret {namespace}/{name}", read)
        authority = create_root(trust_domain, now=now)
        created = await api.request("POST", path, body=root_secret(authority, namespace, name))
        if created.ok:
            log.info("created a new CA root for %s in Secret %s/%s", trust_domain, namespace, name)
            return authority, created.body
        if created.status != 409:
            raise _failed(f"creating Secret {namespace}/{name}", created)
        log.info("another replica created Secret %s/%s first; using its root", namespace, name)
    raise CaStoreError(f"Secret {namespace}/{name}: kept conflicting after {_CONFLICT_RETRIES} attempts")


async def publish_bundle(api: ApiClient, bundle: TrustBundle, namespace: str, name: str) -> bool:
    """Makes ConfigMap `namespace/name` hold exactly `bundle`; True if it had to be written.

    Raises `CaStoreError` if the API server refuses, `ApiUnreachable` if it cannot be reached.
    """
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    desired = bundle_configmap(bundle, namespace, name)
    for _ in range(_CONFLICT_RETRIES):
        read = await api.request("GET", f"{path}/{name}")
        if read.status == 404:
            written = await api.request("POST", path, body=desired)
        elif read.ok:
            if read.body.get("data") == desired["data"]:
                return False
            updated = {**read.body, "data": desired["data"]}
            written = await api.request("PUT", f"{path}/{name}", body=updated)
        else:
            raise _failed(f"reading ConfigMap {namespace}/{name}", read)
        if written.ok:
            log.info(
                "published the trust bundle (%d root(s)) in ConfigMap %s/%s",
                len(bundle.roots),
                namespace,
                name,
            )
            return True
        if written.status != 409:
            raise _failed(f"writing ConfigMap {namespace}/{name}", written)
    raise CaStoreError(f"ConfigMap {namespace}/{name}: kept conflicting after {_CONFLICT_RETRIES} attempts")
