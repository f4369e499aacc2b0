"""The node agent's `CertificateIssuer` on the Kubernetes CSR API, and its trust bundle reader.

`issue` creates a CertificateSigningRequest for signer `ambient-agent.dev/spiffe` with the agent's
own (pod-bound) credentials, watches it until the CA issues or denies it or the wait runs out, and
deletes it in every case, so finished requests do not pile up. `trust_bundles` reads the CA's bundle
ConfigMap and follows it with a single-object watch (RBAC: `get` and `watch` on that one ConfigMap).
API errors become `IssueFailed` values; nothing here raises for an expected failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from agent.identity.certificates import CertificateError, TrustBundle
from agent.identity.manager import Issued, IssueDenied, IssueFailed, IssueOutcome
from agent.identity.spiffe import SpiffeId
from agent.operator.ca_decision import SIGNER_NAME, conditions
from agent.operator.ca_signer import CSR_PATH
from agent.operator.ca_store import BUNDLE_KEY
from agent.operator.rest import ApiClient, ApiResponse, ApiUnreachable
from agent.operator.watch import Bookmark, ObjectEvent
from agent.retry import Backoff

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

NODE_LABEL = "ambient-agent.dev/node"
"""Label on each CSR naming the node whose agent created it (for people and cleanup scripts)."""

REQUESTED_USAGES = ("digital signature", "server auth", "client auth")
"""What a workload certificate is for: both ends of mutual TLS."""

_WATCH_SECONDS = 60


def csr_object(spiffe_id: SpiffeId, csr_pem: bytes, node_name: str) -> JsonObject:
    """The CertificateSigningRequest object asking for `spiffe_id`."""
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {
            "generateName": f"{spiffe_id.namespace}.{spiffe_id.service_account}."[:200],
            "labels": {NODE_LABEL: node_name},
        },
        "spec": {
            "request": base64.b64encode(csr_pem).decode("ascii"),
            "signerName": SIGNER_NAME,
            "usages": list(REQUESTED_USAGES),
        },
    }


def csr_answer(csr: JsonObject) -> Issued | IssueDenied | None:
    """The CA's answer recorded on `csr`, or None while it is still pending (or approved, unsigned)."""
    name = (csr.get("metadata") or {}).get("name", "?")
    present = conditions(csr)
    for kind in ("Denied", "Failed"):
        if kind in present:
            return IssueDenied(present[kind].get("message") or f"CertificateSigningRequest {name}: {kind}")
    certificate = (csr.get("status") or {}).get("certificate")
    if not certificate:
        return None
    try:
        return Issued(base64.b64decode(certificate, validate=True))
    except (binascii.Error, ValueError):
        return IssueDenied(f"CertificateSigningRequest {name}: status.certificate is not base64")


def bundle_from_configmap(configmap: JsonObject) -> TrustBundle | str:
    """The trust bundle a ConfigMap publishes, or why it holds none."""
    name = (configmap.get("metadata") or {}).get("name", "?")
    pem = (configmap.get("data") or {}).get(BUNDLE_KEY)
    if not pem:
        return f"ConfigMap {name} has no {BUNDLE_KEY}"
    try:
        return TrustBundle.from_pem(pem)
    except CertificateError as error:
        return f"ConfigMap {name}: {error}"


class KubernetesCsrIssuer:
    """Certificates from the CA through the CSR API, with the agent's own API credentials."""

    def __init__(
        self,
        api: ApiClient,
        *,
        node_name: str,
        bundle_namespace: str,
        bundle_configmap: str,
        backoff: Backoff | None = None,
    ) -> None:
        self._api = api
        self._node_name = node_name
        self._bundle_namespace = bundle_namespace
        self._bundle_configmap = bundle_configmap
        self._backoff = backoff or Backoff(base_s=1.0, cap_s=30.0)

    async def issue(self, spiffe_id: SpiffeId, csr_pem: bytes, *, timeout: float) -> IssueOutcome:
        """Creates the CSR, waits up to `timeout` seconds for the CA's answer, then deletes the CSR."""
        name: str | None = None
        try:
            async with asyncio.timeout(timeout):
                created = await self._create(csr_object(spiffe_id, csr_pem, self._node_name))
                if not created.ok:
                    return IssueFailed(
                        f"creating a CertificateSigningRequest for {spiffe_id}: {created.message}"
                    )
                name = str(created.body["metadata"]["name"])
                return await self._answer(name, created.body)
        except TimeoutError:
            return IssueFailed(f"the CA did not answer CertificateSigningRequest {name} within {timeout:g}s")
        except ApiUnreachable as error:
            return IssueFailed(f"the API server is unreachable: {error}")
        finally:
            if name is not None:
                await self._delete(name)

    async def _create(self, csr: JsonObject) -> ApiResponse:
        """POSTs `csr`. A caller that gives up meanwhile (cancelled: its identity was dropped, or
        its wait ran out) leaves no CSR behind: the API server may have stored it already, so the
        answer is still awaited and what it names deleted before the cancellation goes on."""
        post = asyncio.ensure_future(self._api.request("POST", CSR_PATH, body=csr))
        try:
            return await asyncio.shield(post)
        except asyncio.CancelledError:
            with contextlib.suppress(ApiUnreachable):
                created = await post
                if created.ok:
                    await self._delete(str(created.body["metadata"]["name"]))
            raise

    async def _answer(self, name: str, csr: JsonObject) -> Issued | IssueDenied | IssueFailed:
        """Follows CSR `name` until it is answered (the caller bounds the wait)."""
        while True:
            if (answer := csr_answer(csr)) is not None:
                return answer
            version = str(csr["metadata"].get("resourceVersion", ""))
            query = {
                "fieldSelector": f"metadata.name={name}",
                "resourceVersion": version,
                "timeoutSeconds": str(_WATCH_SECONDS),
            }
            async with contextlib.aclosing(self._api.watch(CSR_PATH, query)) as events:
                async for event in events:
                    if isinstance(event, ApiResponse):
                        if event.status != 410:
                            return IssueFailed(f"watching CertificateSigningRequest {name}: {event.message}")
                        break
                    if isinstance(event, ObjectEvent):
                        if event.kind == "DELETED":
                            return IssueFailed(
                                f"CertificateSigningRequest {name} was deleted before the CA answered"
                            )
                        if (answer := csr_answer(event.obj)) is not None:
                            return answer
                    elif not isinstance(event, Bookmark):
                        break  # expired or broken stream: read the object again
            reread = await self._api.request("GET", f"{CSR_PATH}/{name}")
            if reread.status == 404:
                return IssueFailed(f"CertificateSigningRequest {name} was deleted before the CA answered")
            if not reread.ok:
                return IssueFailed(f"reading CertificateSigningRequest {name}: {reread.message}")
            csr = reread.body

    async def _delete(self, name: str) -> None:
        try:
            response = await self._api.request("DELETE", f"{CSR_PATH}/{name}")
        except ApiUnreachable as error:
            log.warning("could not delete CertificateSigningRequest %s: %s", name, error)
            return
        if not response.ok and response.status != 404:
            log.warning("could not delete CertificateSigningRequest %s: %s", name, response.message)

    async def trust_bundles(self) -> AsyncIterator[TrustBundle]:
        """The bundle ConfigMap's content now, then on each change; retries with backoff forever.

        A deleted or malformed ConfigMap does not withdraw the last bundle: trust stays as it was until
        the CA publishes a valid one again.
        """
        last: TrustBundle | None = None
        attempt = 0
        while True:
            try:
                async with contextlib.aclosing(self._follow_bundle_configmap()) as configmaps:
                    async for configmap in configmaps:
                        bundle = bundle_from_configmap(configmap)
                        if isinstance(bundle, str):
                            log.warning("ignoring the published trust bundle: %s", bundle)
                            continue
                        attempt = 0
                        if bundle != last:
                            last = bundle
                            yield bundle
                continue  # the server ended the watch: read again at once
            except _BundleReadFailed as failure:
                problem = str(failure)
            except ApiUnreachable as error:
                problem = f"the API server is unreachable: {error}"
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.warning("trust bundle not read (%s); retrying in %.1fs", problem, delay)
            await asyncio.sleep(delay)

    async def _follow_bundle_configmap(self) -> AsyncGenerator[JsonObject, None]:
        """The ConfigMap as read, then as each watch event shows it, until the watch ends."""
        namespace, name = self._bundle_namespace, self._bundle_configmap
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        read = await self._api.request("GET", f"{path}/{name}")
        if not read.ok:
            raise _BundleReadFailed(f"reading ConfigMap {namespace}/{name}: {read.message}")
        yield read.body
        query = {
            "fieldSelector": f"metadata.name={name}",
            "resourceVersion": str(read.body["metadata"].get("resourceVersion", "")),
            "timeoutSeconds": "300",
        }
        async with contextlib.aclosing(self._api.watch(path, query)) as events:
            async for event in events:
                if isinstance(event, ApiResponse):
                    if event.status == 410:
                        return
                    raise _BundleReadFailed(f"watching ConfigMap {namespace}/{name}: {event.message}")
                if isinstance(event, ObjectEvent):
                    if event.kind == "DELETED":
                        log.warning(
                            "trust bundle ConfigMap %s/%s was deleted; keeping the last bundle",
                            namespace,
                            name,
                        )
                    else:
                        yield event.obj
                elif not isinstance(event, Bookmark):
                    return  # expired or broken stream: read again


class _BundleReadFailed(Exception):
    """The bundle ConfigMap could not be read or watched; the message says why."""
