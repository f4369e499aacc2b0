"""The agent's CSR objects ask for exactly a workload certificate, and the CA's answer is read from the
CSR (issued chain, or the denial's own message) and from the bundle ConfigMap."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from aiohttp import web

from agent.identity.csr import CsrAccepted, build_csr, generate_key, validate_csr
from agent.identity.manager import Issued, IssueDenied
from agent.identity.spiffe import SpiffeId
from agent.identity.testing import EphemeralCa
from agent.operator.ca_decision import GRANTED_USAGES, SIGNER_NAME
from agent.operator.ca_signer import CSR_PATH
from agent.operator.ca_store import BUNDLE_KEY
from agent.operator.csr_client import (
    NODE_LABEL,
    KubernetesCsrIssuer,
    bundle_from_configmap,
    csr_answer,
    csr_object,
)
from agent.operator.kubeapi import ApiAccess
from agent.operator.rest import ApiClient

CART = SpiffeId("cluster.local", "shop", "cart")


@pytest.fixture
def ca() -> EphemeralCa:
    return EphemeralCa.create()


def test_csr_object_asks_for_the_identity_with_this_signer() -> None:
    pem = build_csr(generate_key(), CART)
    obj = csr_object(CART, pem, "node-1")
    assert obj["metadata"] == {"generateName": "shop.cart.", "labels": {NODE_LABEL: "node-1"}}
    assert obj["spec"]["signerName"] == SIGNER_NAME
    assert set(obj["spec"]["usages"]) <= GRANTED_USAGES
    assert "expirationSeconds" not in obj["spec"]
    validation = validate_csr(base64.b64decode(obj["spec"]["request"]), "cluster.local")
    assert isinstance(validation, CsrAccepted)
    assert validation.spiffe_id == CART


def answered(*conditions: dict[str, str], certificate: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": list(conditions)}
    if certificate is not None:
        status["certificate"] = certificate
    return {"metadata": {"name": "shop.cart.x7k2p"}, "status": status}


@pytest.mark.parametrize(
    ("csr", "answer"),
    [
        pytest.param({"metadata": {"name": "x"}}, None, id="pending"),
        pytest.param(answered({"type": "Approved", "message": "ok"}), None, id="approved, not yet issued"),
        pytest.param(
            answered({"type": "Approved"}, certificate=base64.b64encode(b"PEM").decode()),
            Issued(b"PEM"),
            id="issued",
        ),
        pytest.param(
            answered({"type": "Denied", "message": "no pod with service account shop/db on node-1"}),
            IssueDenied("no pod with service account shop/db on node-1"),
            id="denied with the CA's reason",
        ),
        pytest.param(
            answered({"type": "Approved"}, {"type": "Failed", "message": "signer refused"}),
            IssueDenied("signer refused"),
            id="failed",
        ),
        pytest.param(
            answered({"type": "Denied"}),
            IssueDenied("CertificateSigningRequest shop.cart.x7k2p: Denied"),
            id="denied without a message",
        ),
        pytest.param(
            answered({"type": "Approved"}, certificate="***"),
            IssueDenied("CertificateSigningRequest shop.cart.x7k2p: status.certificate is not base64"),
            id="garbled certificate",
        ),
    ],
)
def test_answers_are_read_from_the_csr(csr: dict[str, Any], answer: Issued | IssueDenied | None) -> None:
    assert csr_answer(csr) == answer


def test_bundle_is_read_from_the_configmap(ca: EphemeralCa) -> None:
    configmap = {"metadata": {"name": "bundle"}, "data": {BUNDLE_KEY: ca.bundle.to_pem().decode()}}
    assert bundle_from_configmap(configmap) == ca.bundle


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({}, "ConfigMap bundle has no roots.pem"),
        ({BUNDLE_KEY: "not pem"}, "ConfigMap bundle: trust bundle: no PEM certificate found"),
    ],
)
def test_a_configmap_without_a_bundle_says_why(data: dict[str, str], problem: str) -> None:
    result = bundle_from_configmap({"metadata": {"name": "bundle"}, "data": data})
    assert isinstance(result, str)
    assert result.startswith(problem)


class SlowCsrApi:
    """Stands in for the API server's CSR resource: holds each create until `release` is set (the
    CSR counts as stored from the moment the request arrived), and records deletions."""

    def __init__(self) -> None:
        self.created = asyncio.Event()
        self.release = asyncio.Event()
        self.deleted: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CSR_PATH, self._create)
        app.router.add_delete(CSR_PATH + "/{name}", self._delete)
        return app

    async def _create(self, request: web.Request) -> web.Response:
        csr = await request.json()
        self.created.set()
        await self.release.wait()
        csr["metadata"]["name"] = csr["metadata"]["generateName"] + "x1"
        return web.json_response(csr, status=201)

    async def _delete(self, request: web.Request) -> web.Response:
        self.deleted.append(request.match_info["name"])
        return web.json_response({"kind": "Status", "status": "Success"})


async def test_a_request_given_up_on_while_being_created_leaves_no_csr_behind() -> None:
    api = SlowCsrApi()
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with ApiClient(ApiAccess(server=f"http://127.0.0.1:{port}")) as client:
            issuer = KubernetesCsrIssuer(
                client, node_name="node-1", bundle_namespace="ambient-system", bundle_configmap="bundle"
            )
            request = asyncio.create_task(issuer.issue(CART, build_csr(generate_key(), CART), timeout=30))
            async with asyncio.timeout(10):
                await api.created.wait()
                request.cancel()  # the identity was dropped while the POST was on its way
                api.release.set()
                with pytest.raises(asyncio.CancelledError):
                    await request
        assert api.deleted == ["shop.cart.x1"]
    finally:
        await runner.cleanup()
