"""Workload identity end to end on the local cluster: the real API server authenticates each node's
agent by a token bound to its agent pod, `ambient-agent ca` runs with its own service account and the
project's RBAC, and the node's certificate manager (driven by the test, with that node's agent token)
obtains, renews and drops certificates through the CSR API.

Proved here: a node gets certificates for the service accounts of its own pods and for nothing else;
requests from a non-agent user (denied, not ignored, so the requester sees why), from an unbound token,
or malformed, are denied with the reason; renewal happens before expiry, a CA outage during a renewal
keeps the old certificate in use, and the CA recovers; a restarted CA keeps its root and republishes
the bundle; two CA replicas starting together agree on one root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.csr import build_csr, generate_key
from agent.identity.manager import CertificateManager, NotHosted, NotReady
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import PeerVerified, verify_peer
from agent.observability.metrics import AgentMetrics
from agent.operator.ca_decision import POD_NAME_EXTRA, POD_UID_EXTRA, SIGNER_NAME
from agent.operator.ca_store import BUNDLE_KEY, ROOT_CERTIFICATE_KEY, load_or_create_root
from agent.operator.csr_client import NODE_LABEL, KubernetesCsrIssuer
from agent.operator.kubeapi import load_api_access
from agent.operator.rest import ApiClient
from agent.proxy.credentials import TlsContexts
from agent.retry import Backoff
from tests.e2e.cluster import Cluster
from tests.e2e.cluster.agents import (
    AGENT_NAMESPACE,
    AgentCredentials,
    CaProcess,
    agent_credentials,
    install_identity_rbac,
    request_token,
    write_token_kubeconfig,
)

SHOP = "shop-identity"
CART = SpiffeId("cluster.local", SHOP, "cart")
DB = SpiffeId("cluster.local", SHOP, "db")
SECRET = "ambient-agent-ca"
BUNDLE = "ambient-agent-trust-bundle"
AGENT_USER = "system:serviceaccount:ambient-system:ambient-agent"
CA_USER = "system:serviceaccount:ambient-system:ambient-agent-ca"


@pytest.fixture(scope="module")
def rbac(cluster: Cluster) -> None:
    install_identity_rbac(cluster)


@pytest.fixture(scope="module")
def agents(cluster: Cluster, rbac: None) -> Iterator[dict[str, AgentCredentials]]:
    credentials = {node.name: agent_credentials(cluster, node) for node in cluster.nodes}
    yield credentials
    for agent in credentials.values():
        cluster.delete_pod(agent.pod)


@pytest.fixture(scope="module")
def workloads(cluster: Cluster) -> Iterator[None]:
    """`cart` runs on node-1 only, `db` on node-2 only."""
    pods = [
        cluster.create_pod("cart", namespace=SHOP, node=cluster.nodes[0], service_account="cart"),
        cluster.create_pod("db", namespace=SHOP, node=cluster.nodes[1], service_account="db"),
    ]
    yield
    for pod in pods:
        cluster.delete_pod(pod)


@pytest.fixture(scope="module")
def ca(cluster: Cluster, rbac: None) -> Iterator[CaProcess]:
    process = CaProcess(cluster, cluster.nodes[0])
    process.start()
    yield process
    process.stop()


def certificates_api(kubeconfig: Path) -> k8s.CertificatesV1Api:
    return k8s.CertificatesV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))


def csr_body(request_pem: bytes, signer: str = SIGNER_NAME) -> k8s.V1CertificateSigningRequest:
    return k8s.V1CertificateSigningRequest(
        metadata=k8s.V1ObjectMeta(generate_name="e2e."),
        spec=k8s.V1CertificateSigningRequestSpec(
            request=base64.b64encode(request_pem).decode(),
            signer_name=signer,
            usages=["digital signature", "server auth", "client auth"],
        ),
    )


def wait_answered(cluster: Cluster, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """The CSR (as a dict) once the CA put a condition on it."""
    api = k8s.CertificatesV1Api(cluster.api_client)
    deadline = time.monotonic() + timeout
    while True:
        csr = api.read_certificate_signing_request(name).to_dict()
        if (csr.get("status") or {}).get("conditions"):
            return csr
        assert time.monotonic() < deadline, f"CSR {name} was not answered: {csr}"
        time.sleep(0.2)


def denial(csr: dict[str, Any]) -> str:
    conditions = {c["type"]: c for c in csr["status"]["conditions"]}
    assert set(conditions) == {"Denied"}, conditions
    assert csr["status"].get("certificate") is None
    return str(conditions["Denied"]["message"])


def ca_event_posted(cluster: Cluster, reason: str, message_start: str, timeout: float = 10.0) -> bool:
    """Whether the CA posts (within `timeout`: it does so right after answering) a CSR Event with
    `reason` and a message starting with `message_start`."""
    deadline = time.monotonic() + timeout
    while True:
        events = cluster.core.list_namespaced_event(
            "default", field_selector=f"involvedObject.kind=CertificateSigningRequest,reason={reason}"
        ).items
        if any(
            e.source.component == "ambient-agent-ca" and e.message.startswith(message_start) for e in events
        ):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@contextlib.asynccontextmanager
async def node_agent(
    credentials: AgentCredentials, *, issue_timeout: float = 30.0, metrics: AgentMetrics | None = None
) -> AsyncIterator[CertificateManager]:
    """The node's certificate manager on the Kubernetes CSR adapter, with that node's agent token."""

    def observe(spiffe_id: SpiffeId, not_after: datetime | None) -> None:
        if metrics is None:
            return
        if not_after is None:
            metrics.certificate_expiry.remove(str(spiffe_id))
        else:
            metrics.certificate_expiry.labels(str(spiffe_id)).set(not_after.timestamp())

    async with ApiClient(load_api_access(str(credentials.kubeconfig))) as api:
        issuer = KubernetesCsrIssuer(
            api, node_name=credentials.node.name, bundle_namespace=AGENT_NAMESPACE, bundle_configmap=BUNDLE
        )
        manager = CertificateManager(
            issuer,
            issue_timeout=issue_timeout,
            backoff=Backoff(base_s=0.5, cap_s=2.0),
            on_expiry=observe,
        )
        async with manager:
            yield manager


def published_root(cluster: Cluster) -> x509.Certificate:
    secret = cluster.core.read_namespaced_secret(SECRET, AGENT_NAMESPACE)
    return x509.load_pem_x509_certificate(base64.b64decode(secret.data[ROOT_CERTIFICATE_KEY]))


def published_bundle(cluster: Cluster) -> TrustBundle:
    configmap = cluster.core.read_namespaced_config_map(BUNDLE, AGENT_NAMESPACE)
    return TrustBundle.from_pem(configmap.data[BUNDLE_KEY])


@dataclass(frozen=True)
class TlsLink:
    """One live mutual-TLS connection over loopback to an echo server."""

    server_serial: int
    """Serial of the certificate the server presented."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def echo(self, data: bytes) -> bytes:
        """Sends `data` and reads back as many bytes."""
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 10)


@contextlib.asynccontextmanager
async def mutual_tls(
    contexts: TlsContexts, server: WorkloadCertificate, client: WorkloadCertificate, bundle: TrustBundle
) -> AsyncIterator[TlsLink]:
    """A live mutual-TLS connection over loopback, its SSL contexts taken from `contexts` as the data
    plane takes them (one per identity, rebuilt when the certificate is renewed). Both sides check the
    other's SPIFFE ID as HBONE does; the server echoes what it reads."""
    loop = asyncio.get_running_loop()
    peers: asyncio.Future[PeerVerified | object] = loop.create_future()
    served: asyncio.Future[None] = loop.create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        peers.set_result(verify_peer(peer, client.spiffe_id))
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            served.set_result(None)

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=contexts.server(server, bundle))
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=contexts.client(client, bundle), server_hostname=None
        )
        try:
            presented = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert verify_peer(presented, server.spiffe_id) == PeerVerified(server.spiffe_id)
            assert await asyncio.wait_for(peers, 10) == PeerVerified(client.spiffe_id)
            yield TlsLink(x509.load_der_x509_certificate(presented).serial_number, reader, writer)
        finally:
            writer.close()
            if peers.done():  # the server is echoing: let it see the end of the stream
                await asyncio.wait_for(served, 10)
    finally:
        listener.close()
        await listener.wait_closed()


def test_a_token_bound_to_the_agent_pod_reaches_csrs_as_the_pod_extra(
    cluster: Cluster, agents: dict[str, AgentCredentials]
) -> None:
    # Another signer's name: this CSR is for reading the requester's identity, not for signing.
    credentials = agents[cluster.nodes[0].name]
    api = certificates_api(credentials.kubeconfig)
    created = api.create_certificate_signing_request(
        csr_body(build_csr(generate_key(), CART), signer="e2e.example/probe")
    )
    try:
        spec = (
            k8s.CertificatesV1Api(cluster.api_client)
            .read_certificate_signing_request(created.metadata.name)
            .spec
        )
        assert spec.username == AGENT_USER
        assert spec.extra[POD_NAME_EXTRA] == [credentials.pod.name]
        assert spec.extra[POD_UID_EXTRA] == [credentials.pod.uid]
    finally:
        api.delete_certificate_signing_request(created.metadata.name)


ACCESS = [
    # (user, verb, group, resource, subresource, name, namespace, allowed)
    (AGENT_USER, "create", "certificates.k8s.io", "certificatesigningrequests", "", "", "", True),
    (AGENT_USER, "get", "certificates.k8s.io", "certificatesigningrequests", "", "x", "", True),
    (AGENT_USER, "list", "certificates.k8s.io", "certificatesigningrequests", "", "", "", True),
    (AGENT_USER, "watch", "certificates.k8s.io", "certificatesigningrequests", "", "", "", True),
    (AGENT_USER, "delete", "certificates.k8s.io", "certificatesigningrequests", "", "x", "", True),
    (AGENT_USER, "update", "certificates.k8s.io", "certificatesigningrequests", "approval", "x", "", False),
    (AGENT_USER, "update", "certificates.k8s.io", "certificatesigningrequests", "status", "x", "", False),
    (AGENT_USER, "sign", "certificates.k8s.io", "signers", "", SIGNER_NAME, "", False),
    (AGENT_USER, "get", "", "configmaps", "", BUNDLE, AGENT_NAMESPACE, True),
    (AGENT_USER, "watch", "", "configmaps", "", BUNDLE, AGENT_NAMESPACE, True),
    (AGENT_USER, "get", "", "configmaps", "", "other", AGENT_NAMESPACE, False),
    (AGENT_USER, "update", "", "configmaps", "", BUNDLE, AGENT_NAMESPACE, False),
    (AGENT_USER, "get", "", "secrets", "", SECRET, AGENT_NAMESPACE, False),
    (AGENT_USER, "watch", "", "pods", "", "", "", True),
    (CA_USER, "watch", "certificates.k8s.io", "certificatesigningrequests", "", "", "", True),
    (CA_USER, "update", "certificates.k8s.io", "certificatesigningrequests", "approval", "x", "", True),
    (CA_USER, "update", "certificates.k8s.io", "certificatesigningrequests", "status", "x", "", True),
    (CA_USER, "create", "certificates.k8s.io", "certificatesigningrequests", "", "", "", False),
    (CA_USER, "delete", "certificates.k8s.io", "certificatesigningrequests", "", "x", "", False),
    (CA_USER, "approve", "certificates.k8s.io", "signers", "", SIGNER_NAME, "", True),
    (CA_USER, "sign", "certificates.k8s.io", "signers", "", SIGNER_NAME, "", True),
    (CA_USER, "sign", "certificates.k8s.io", "signers", "", "kubernetes.io/kube-apiserver-client", "", False),
    (CA_USER, "get", "", "secrets", "", SECRET, AGENT_NAMESPACE, True),
    (CA_USER, "create", "", "secrets", "", "", AGENT_NAMESPACE, True),
    (CA_USER, "update", "", "secrets", "", SECRET, AGENT_NAMESPACE, False),
    (CA_USER, "get", "", "secrets", "", "other", AGENT_NAMESPACE, False),
    (CA_USER, "get", "", "secrets", "", SECRET, "default", False),
    (CA_USER, "update", "", "configmaps", "", BUNDLE, AGENT_NAMESPACE, True),
    (CA_USER, "update", "", "configmaps", "", "other", AGENT_NAMESPACE, False),
    (CA_USER, "create", "", "events", "", "", "default", True),
    (CA_USER, "get", "", "pods", "", "ambient-agent-node-1", AGENT_NAMESPACE, True),
    (CA_USER, "list", "", "pods", "", "", SHOP, True),
    (CA_USER, "delete", "", "pods", "", "x", SHOP, False),
]


def test_the_rbac_manifests_grant_exactly_what_identity_needs(cluster: Cluster, rbac: None) -> None:
    authorization = k8s.AuthorizationV1Api(cluster.api_client)
    wrong = []
    for user, verb, group, resource, subresource, name, namespace, allowed in ACCESS:
        review = k8s.V1SubjectAccessReview(
            spec=k8s.V1SubjectAccessReviewSpec(
                user=user,
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{AGENT_NAMESPACE}",
                    "system:authenticated",
                ],
                resource_attributes=k8s.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=resource,
                    subresource=subresource or None,
                    name=name or None,
                    namespace=namespace or None,
                ),
            )
        )
        if authorization.create_subject_access_review(review).status.allowed != allowed:
            expected = "should be allowed" if allowed else "should be refused"
            wrong.append((user, verb, resource, subresource, name, namespace, expected))
    assert wrong == []


async def leftover_csrs(cluster: Cluster, within: float = 10.0) -> list[str]:
    """The agents' CSRs still stored after up to `within` seconds (an attempt being answered deletes
    its own CSR once it has read the answer)."""
    api = k8s.CertificatesV1Api(cluster.api_client)
    deadline = time.monotonic() + within
    while True:
        names = [
            c.metadata.name for c in api.list_certificate_signing_request(label_selector=NODE_LABEL).items
        ]
        if not names or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.2)


async def test_a_node_gets_certificates_for_its_own_pods_service_accounts_only(
    cluster: Cluster, agents: dict[str, AgentCredentials], workloads: None, ca: CaProcess
) -> None:
    node_1, node_2 = (agents[n.name] for n in cluster.nodes)
    metrics = AgentMetrics()
    async with node_agent(node_1, metrics=metrics) as agent_1, node_agent(node_2) as agent_2:
        agent_1.set_wanted([CART, DB])
        agent_2.set_wanted([DB])
        cart = await agent_1.credential(CART, timeout=30)
        db = await agent_2.credential(DB, timeout=30)
        assert isinstance(cart, WorkloadCertificate), cart
        assert isinstance(db, WorkloadCertificate), db
        assert (cart.spiffe_id, db.spiffe_id) == (CART, DB)

        refused = await agent_1.credential(DB, timeout=30)
        assert isinstance(refused, NotReady)
        assert (
            f"the CA denied the request: no pod with service account {SHOP}/db is scheduled on node"
            f" {node_1.node.name}, so its agent may not hold {DB}"
        ) in refused.reason

        bundle = await agent_1.trust_bundle(timeout=10)
        assert bundle == published_bundle(cluster) == TrustBundle((published_root(cluster),))
        cart.leaf.verify_directly_issued_by(bundle.roots[0])
        async with mutual_tls(TlsContexts(), db, cart, bundle) as link:
            assert link.server_serial == db.leaf.serial_number

        gauge = metrics.registry.get_sample_value(
            "ambient_agent_certificate_expiry_timestamp_seconds", {"identity": str(CART)}
        )
        assert gauge == cart.not_after.timestamp()

        # Each answered CSR is deleted by the agent once read; the decisions stay as Events. Node 1
        # stops asking for the identity it is denied first: its retries would keep a CSR in flight.
        agent_1.set_wanted([CART])
        assert await leftover_csrs(cluster) == []
        assert ca_event_posted(cluster, "Issued", f"issued {CART} to the agent on node node-1")
        assert ca_event_posted(cluster, "Denied", f"no pod with service account {SHOP}/db")

        agent_1.set_wanted([])
        assert await agent_1.credential(CART, timeout=0) == NotHosted(CART)
        assert (
            metrics.registry.get_sample_value(
                "ambient_agent_certificate_expiry_timestamp_seconds", {"identity": str(CART)}
            )
            is None
        )


def test_requests_outside_the_rules_are_denied_saying_why(
    cluster: Cluster, agents: dict[str, AgentCredentials], workloads: None, ca: CaProcess
) -> None:
    agent = certificates_api(agents[cluster.nodes[0].name].kubeconfig)
    admin = k8s.CertificatesV1Api(cluster.api_client)
    unbound_token = request_token(cluster, AGENT_NAMESPACE, "ambient-agent")
    unbound = certificates_api(
        write_token_kubeconfig(
            cluster.layout.state_dir / "unbound-agent.kubeconfig",
            cluster.api_server,
            cluster.layout.pki_dir / "ca.crt",
            unbound_token,
        )
    )
    key = generate_key()
    dns_san = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("cart.shop.svc")]), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cases = [
        (admin, build_csr(key, CART), "requested by 'admin'; only the node agents' service account"),
        (unbound, build_csr(key, CART), "the requester's token is not bound to a pod"),
        (agent, dns_san, "request carries a DNS name SAN (cart.shop.svc); only one URI SAN is allowed"),
        (
            agent,
            build_csr(key, SpiffeId("evil.example", SHOP, "cart")),
            "spiffe://evil.example/ns/shop-identity/sa/cart is outside this signer's trust domain",
        ),
    ]
    foreign = admin.create_certificate_signing_request(
        csr_body(build_csr(key, CART), signer="e2e.example/other")
    )
    names = [api.create_certificate_signing_request(csr_body(pem)).metadata.name for api, pem, _ in cases]
    try:
        for name, (_, _, reason) in zip(names, cases, strict=True):
            message = denial(wait_answered(cluster, name))
            assert message.startswith(reason), message
            assert ca_event_posted(cluster, "Denied", message)
        # Another signer's request is never touched.
        assert admin.read_certificate_signing_request(foreign.metadata.name).status.conditions is None
    finally:
        for name in [*names, foreign.metadata.name]:
            admin.delete_certificate_signing_request(name)


async def test_renewal_before_expiry_survives_a_ca_outage(
    cluster: Cluster, agents: dict[str, AgentCredentials], workloads: None, ca: CaProcess
) -> None:
    ca.stop()
    short_lived = CaProcess(cluster, cluster.nodes[0], ["--leaf-lifetime", "40s"])
    short_lived.start()
    try:
        async with node_agent(agents[cluster.nodes[0].name], issue_timeout=2) as agent:
            agent.set_wanted([CART])
            first = await agent.credential(CART, timeout=30)
            assert isinstance(first, WorkloadCertificate), first
            assert first.not_after - first.not_before <= timedelta(seconds=45)
            bundle = await agent.trust_bundle(timeout=10)
            assert isinstance(bundle, TrustBundle), bundle

            async def watch_until(done: Any, limit: datetime) -> WorkloadCertificate:
                """Polls the data plane's view until `done(cert)`; it must never lack a valid cert."""
                while True:
                    current = await agent.credential(CART, timeout=0)
                    assert isinstance(current, WorkloadCertificate), f"no certificate in use: {current}"
                    if done(current):
                        return current
                    assert datetime.now(UTC) < limit, "timed out"
                    await asyncio.sleep(0.2)

            # The data plane's contexts: a connection opened after a renewal must present the new
            # certificate, and one opened before it must keep working through renewal and outage.
            contexts = TlsContexts()
            async with mutual_tls(contexts, first, first, bundle) as opened_first:
                assert opened_first.server_serial == first.leaf.serial_number
                second = await watch_until(
                    lambda c: c.leaf.serial_number != first.leaf.serial_number, first.not_after
                )
                assert datetime.now(UTC) < first.not_after, "renewed before expiry"
                async with mutual_tls(contexts, second, second, bundle) as opened_after_renewal:
                    assert opened_after_renewal.server_serial == second.leaf.serial_number

                    short_lived.stop()
                    await watch_until(lambda c: agent.status()[CART].failures >= 1, second.not_after)
                    assert str(agent.status()[CART].last_error).startswith("the CA did not answer")
                    assert (await agent.credential(CART, timeout=0)) is second, (
                        "the old certificate stays in use"
                    )
                    assert await opened_after_renewal.echo(b"during the outage") == b"during the outage"
                    assert (
                        await opened_first.echo(b"opened before the renewal") == b"opened before the renewal"
                    )

                    short_lived.start()
                    third = await watch_until(
                        lambda c: c.leaf.serial_number != second.leaf.serial_number, second.not_after
                    )
                    assert third.not_after > second.not_after
                    assert agent.status()[CART].failures == 0
                    async with mutual_tls(contexts, third, third, bundle) as opened_after_recovery:
                        assert opened_after_recovery.server_serial == third.leaf.serial_number
                    assert await opened_after_renewal.echo(b"after recovery") == b"after recovery"
    finally:
        short_lived.stop()
        ca.start()


async def test_a_restarted_ca_keeps_its_root_and_the_bundle_stays_published(
    cluster: Cluster, agents: dict[str, AgentCredentials], workloads: None, ca: CaProcess
) -> None:
    root = published_root(cluster)
    bundle = published_bundle(cluster)
    async with node_agent(agents[cluster.nodes[0].name]) as agent:
        assert await agent.trust_bundle(timeout=10) == bundle

        # Deleted while the CA runs: restored, and the agent keeps trusting the bundle meanwhile.
        cluster.core.delete_namespaced_config_map(BUNDLE, AGENT_NAMESPACE)
        deadline = time.monotonic() + 20
        while not cluster.core.list_namespaced_config_map(
            AGENT_NAMESPACE, field_selector=f"metadata.name={BUNDLE}"
        ).items:
            assert time.monotonic() < deadline, "the CA did not restore the bundle ConfigMap"
            await asyncio.sleep(0.2)
        assert published_bundle(cluster) == bundle
        assert await agent.trust_bundle(timeout=0) == bundle

        # Deleted while the CA is down: republished on start, from the same root.
        ca.stop()
        cluster.core.delete_namespaced_config_map(BUNDLE, AGENT_NAMESPACE)
        ca.start()
        assert published_root(cluster) == root
        assert published_bundle(cluster) == bundle

        agent.set_wanted([CART])
        after_restart = await agent.credential(CART, timeout=30)
        assert isinstance(after_restart, WorkloadCertificate), after_restart
        after_restart.leaf.verify_directly_issued_by(bundle.roots[0])
        assert await agent.trust_bundle(timeout=0) == bundle


async def test_two_replicas_starting_together_agree_on_one_root(cluster: Cluster, ca: CaProcess) -> None:
    ca.stop()
    cluster.core.delete_namespaced_secret(SECRET, AGENT_NAMESPACE)
    try:
        access = load_api_access(str(ca.kubeconfig))
        async with ApiClient(access) as first, ApiClient(access) as second:
            now = datetime.now(UTC)
            results = await asyncio.gather(
                load_or_create_root(first, AGENT_NAMESPACE, SECRET, "cluster.local", now),
                load_or_create_root(second, AGENT_NAMESPACE, SECRET, "cluster.local", now),
            )
        (one, _), (other, _) = results
        assert one.certificate == other.certificate == published_root(cluster)
    finally:
        ca.start()
    assert published_bundle(cluster) == TrustBundle((published_root(cluster),))
