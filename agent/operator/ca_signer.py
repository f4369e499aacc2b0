"""The CA's work on one CertificateSigningRequest: gather the facts, decide, approve and sign or deny.

The facts come from the API server (the agent pod the requester's token is bound to, and whether a
pod with the requested service account is scheduled on its node); the decision is
`ca_decision.decide`. Writes carry the CSR's resourceVersion, so when two replicas race on one CSR
the loser gets a conflict, re-reads, and finds it already answered. Each outcome is posted as an
Event on the CSR.
"""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization

from agent.identity.ca import CertificateAuthority, sign_leaf
from agent.identity.certificates import CertificateError
from agent.identity.spiffe import SpiffeId
from agent.operator.ca_decision import (
    Approve,
    CsrStage,
    Decision,
    Deny,
    SigningPolicy,
    csr_stage,
    decide,
    requested_identity,
    requesting_pod_name,
)
from agent.operator.events import event_object, involved_object
from agent.operator.rest import ApiClient, ApiResponse, ApiUnreachable

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
COMPONENT = "ambient-agent-ca"
_CONFLICT_RETRIES = 3


class SignerApiError(RuntimeError):
    """The API server refused a read or write the CA needed for one CSR (other than a conflict)."""


def _condition(kind: str, reason: str, message: str, now: datetime) -> JsonObject:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp,
        "lastTransitionTime": stamp,
    }


def with_condition(csr: JsonObject, condition: JsonObject) -> JsonObject:
    """A copy of `csr` with `condition` added to its status (for `/approval` or `/status`)."""
    updated = copy.deepcopy(csr)
    status = updated.setdefault("status", {})
    status["conditions"] = [*(status.get("conditions") or []), condition]
    return updated


def with_certificate(csr: JsonObject, chain_pem: bytes) -> JsonObject:
    """A copy of `csr` carrying the issued chain in `status.certificate`."""
    updated = copy.deepcopy(csr)
    updated.setdefault("status", {})["certificate"] = base64.b64encode(chain_pem).decode("ascii")
    return updated


def csr_event(
    csr: JsonObject, decision: Decision, *, namespace: str, instance: str, now: datetime
) -> JsonObject:
    """The Event recording `decision` on `csr`."""
    approved = isinstance(decision, Approve)
    return event_object(
        involved_object(csr, api_version="certificates.k8s.io/v1", kind="CertificateSigningRequest"),
        namespace=namespace,
        event_type="Normal" if approved else "Warning",
        reason="Issued" if approved else "Denied",
        message=decision.message if isinstance(decision, Approve) else decision.reason,
        component=COMPONENT,
        instance=instance,
        now=now,
    )


class CsrSigner:
    """Answers this signer's CSRs; `handle` is called for every CSR event."""

    def __init__(
        self,
        api: ApiClient,
        authority: CertificateAuthority,
        policy: SigningPolicy,
        *,
        event_namespace: str,
        instance: str,
        now: Callable[[], datetime],
    ) -> None:
        self._api = api
        self._authority = authority
        self._policy = policy
        self._event_namespace = event_namespace
        self._instance = instance
        self._now = now

    async def handle(self, csr: JsonObject) -> None:
        """Decides and answers `csr` if it is this signer's and still unanswered; logs what it did.

        Never raises for an API failure: the CSR stays pending and its agent retries with a new one.
        """
        name = (csr.get("metadata") or {}).get("name", "?")
        try:
            for _ in range(_CONFLICT_RETRIES):
                stage = csr_stage(csr)
                if stage in (CsrStage.NOT_OURS, CsrStage.FINISHED):
                    return
                decision = await self._decide(csr)
                reread = await self._answer(csr, stage, decision)
                if reread is None:
                    await self._record(csr, decision)
                    return
                csr = reread
            log.warning("CSR %s kept changing under us; leaving it for its next event", name)
        except (ApiUnreachable, SignerApiError, CertificateError) as error:
            log.warning("CSR %s left unanswered: %s", name, error)

    async def _decide(self, csr: JsonObject) -> Decision:
        pod_name = requesting_pod_name(csr, self._policy)
        pod = await self._agent_pod(pod_name) if pod_name else None
        spiffe_id = requested_identity(csr, self._policy)
        node = ((pod or {}).get("spec") or {}).get("nodeName")
        hosted = False
        if node and spiffe_id is not None:
            hosted = await self._node_hosts(str(node), spiffe_id)
        return decide(csr, pod, hosted, self._policy)

    async def _agent_pod(self, name: str) -> JsonObject | None:
        path = f"/api/v1/namespaces/{self._policy.agent_namespace}/pods/{quote(name, safe='')}"
        response = await self._api.request("GET", path)
        if response.status == 404:
            return None
        return self._ok(f"reading agent pod {self._policy.agent_namespace}/{name}", response)

    async def _node_hosts(self, node: str, spiffe_id: SpiffeId) -> bool:
        """Whether a pod of `spiffe_id`'s service account is scheduled on `node` and not finished."""
        selector = ",".join(
            [
                f"spec.nodeName={node}",
                f"spec.serviceAccountName={spiffe_id.service_account}",
                "status.phase!=Succeeded",
                "status.phase!=Failed",
            ]
        )
        response = await self._api.request(
            "GET",
            f"/api/v1/namespaces/{spiffe_id.namespace}/pods",
            query={"fieldSelector": selector, "limit": "1"},
        )
        listed = self._ok(
            f"listing pods of {spiffe_id.namespace}/{spiffe_id.service_account} on {node}", response
        )
        return bool(listed.get("items"))

    async def _answer(self, csr: JsonObject, stage: CsrStage, decision: Decision) -> JsonObject | None:
        """Writes the decision; None when done, or the re-read CSR after a conflict."""
        name = csr["metadata"]["name"]
        now = self._now()
        if isinstance(decision, Deny):
            if stage is CsrStage.APPROVED:
                # Someone approved it, but this signer will not sign it: mark it Failed instead.
                failed = with_condition(csr, _condition("Failed", "SignerRefused", decision.reason, now))
                return await self._write(name, "status", failed)
            denied = with_condition(csr, _condition("Denied", "AgentMayNotHold", decision.reason, now))
            return await self._write(name, "approval", denied)
        if stage is CsrStage.PENDING:
            approved = with_condition(
                csr, _condition("Approved", "AgentHostsIdentity", decision.message, now)
            )
            response = await self._api.request("PUT", f"{CSR_PATH}/{name}/approval", body=approved)
            if response.status == 409:
                return await self._reread(name)
            csr = self._ok(f"approving CSR {name}", response)
        leaf = sign_leaf(
            self._authority, decision.spiffe_id, decision.public_key, now=now, lifetime=decision.lifetime
        )
        issued = with_certificate(csr, leaf.public_bytes(serialization.Encoding.PEM))
        return await self._write(name, "status", issued)

    async def _write(self, name: str, subresource: str, body: JsonObject) -> JsonObject | None:
        response = await self._api.request("PUT", f"{CSR_PATH}/{name}/{subresource}", body=body)
        if response.status == 409:
            return await self._reread(name)
        self._ok(f"updating CSR {name}/{subresource}", response)
        return None

    async def _reread(self, name: str) -> JsonObject:
        response = await self._api.request("GET", f"{CSR_PATH}/{name}")
        if response.status == 404:
            # Deleted meanwhile (its agent gave up): an empty object is not this signer's, so `handle` stops.
            return {}
        return self._ok(f"reading CSR {name}", response)

    async def _record(self, csr: JsonObject, decision: Decision) -> None:
        name = csr["metadata"]["name"]
        if isinstance(decision, Approve):
            log.info("CSR %s: %s", name, decision.message)
        else:
            log.info("CSR %s denied: %s", name, decision.reason)
        event = csr_event(
            csr, decision, namespace=self._event_namespace, instance=self._instance, now=self._now()
        )
        try:
            response = await self._api.request(
                "POST", f"/api/v1/namespaces/{self._event_namespace}/events", body=event
            )
        except ApiUnreachable as error:
            log.warning("could not post the event for CSR %s: %s", name, error)
            return
        if not response.ok:
            log.warning("could not post the event for CSR %s: %s", name, response.message)

    @staticmethod
    def _ok(what: str, response: ApiResponse) -> JsonObject:
        if not response.ok:
            raise SignerApiError(f"{what}: {response.message}")
        return response.body
