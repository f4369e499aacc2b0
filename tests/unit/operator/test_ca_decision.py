"""The CA approves only well-formed requests from an agent pod whose node hosts the identity, and every
denial says exactly why."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.certificates import PrivateKey
from agent.identity.csr import build_csr, generate_key
from agent.identity.spiffe import SpiffeId
from agent.operator.ca_decision import (
    POD_NAME_EXTRA,
    POD_UID_EXTRA,
    SIGNER_NAME,
    Approve,
    CsrStage,
    Deny,
    SigningPolicy,
    csr_stage,
    decide,
    requested_identity,
    requesting_pod_name,
)
from agent.settings import SettingsError

POLICY = SigningPolicy(
    trust_domain="cluster.local",
    agent_namespace="ambient-system",
    agent_service_account="ambient-agent",
    leaf_lifetime=timedelta(hours=24),
    max_lifetime=timedelta(hours=48),
)
AGENT_USER = "system:serviceaccount:ambient-system:ambient-agent"
CART = SpiffeId("cluster.local", "shop", "cart")
AGENT_POD_UID = "6f1c0f1e-0000-4000-8000-000000000001"
KEY = generate_key()


def pem_request(spiffe_id: SpiffeId = CART) -> bytes:
    return build_csr(KEY, spiffe_id)


def custom_request(*names: x509.GeneralName, key: PrivateKey = KEY) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_csr(
    request: bytes | str | None = None,
    *,
    username: str = AGENT_USER,
    pod_name: str | None = "ambient-agent-x1",
    pod_uid: str | None = AGENT_POD_UID,
    usages: tuple[str, ...] = ("digital signature", "server auth", "client auth"),
    signer: str = SIGNER_NAME,
    **spec: Any,
) -> dict[str, Any]:
    extra = {}
    if pod_name is not None:
        extra[POD_NAME_EXTRA] = [pod_name]
    if pod_uid is not None:
        extra[POD_UID_EXTRA] = [pod_uid]
    raw = pem_request() if request is None else request
    encoded = raw if isinstance(raw, str) else base64.b64encode(raw).decode()
    return {
        "metadata": {"name": "shop.cart.abcde"},
        "spec": {
            "request": encoded,
            "signerName": signer,
            "usages": list(usages),
            "username": username,
            "extra": extra,
            **spec,
        },
    }


def agent_pod(**changes: Any) -> dict[str, Any]:
    pod = {
        "metadata": {"name": "ambient-agent-x1", "namespace": "ambient-system", "uid": AGENT_POD_UID},
        "spec": {"serviceAccountName": "ambient-agent", "nodeName": "node-1"},
        "status": {"phase": "Running"},
    }
    for path, value in changes.items():
        section, field = path.split("__")
        pod[section][field] = value
    return pod


def test_agent_pod_on_a_hosting_node_is_approved_for_the_default_lifetime() -> None:
    decision = decide(make_csr(), agent_pod(), True, POLICY)
    assert isinstance(decision, Approve)
    assert decision.spiffe_id == CART
    assert decision.public_key == KEY.public_key()
    assert decision.node == "node-1"
    assert decision.lifetime == timedelta(hours=24)
    assert decision.message == f"issued {CART} to the agent on node node-1, valid for 1 day, 0:00:00"


@pytest.mark.parametrize(
    ("seconds", "lifetime"),
    [
        pytest.param(3600, timedelta(hours=1), id="shorter than the default"),
        pytest.param(36 * 3600, timedelta(hours=36), id="longer than the default, under the cap"),
        pytest.param(1_000_000, timedelta(hours=48), id="capped"),
    ],
)
def test_requested_lifetime_is_honoured_up_to_the_cap(seconds: int, lifetime: timedelta) -> None:
    decision = decide(make_csr(expirationSeconds=seconds), agent_pod(), True, POLICY)
    assert isinstance(decision, Approve)
    assert decision.lifetime == lifetime


DENIALS = [
    pytest.param(
        make_csr(username="admin"),
        agent_pod(),
        "requested by 'admin'; only the node agents' service account"
        " system:serviceaccount:ambient-system:ambient-agent may request workload certificates",
        id="not the agent user",
    ),
    pytest.param(
        make_csr(username="system:serviceaccount:ambient-system:default"),
        agent_pod(),
        "requested by 'system:serviceaccount:ambient-system:default'; only the node agents'",
        id="another service account of the agent namespace",
    ),
    pytest.param(
        make_csr(pod_name=None, pod_uid=None),
        None,
        "the requester's token is not bound to a pod (no user extra authentication.kubernetes.io/pod-name)",
        id="token not bound to a pod",
    ),
    pytest.param(
        make_csr(),
        None,
        "agent pod ambient-system/ambient-agent-x1, to which the requester's token is bound, does not exist",
        id="agent pod gone",
    ),
    pytest.param(
        make_csr(pod_uid="another-uid"),
        agent_pod(),
        f"the requester's token is bound to pod uid 'another-uid', but agent pod"
        f" ambient-system/ambient-agent-x1 has uid '{AGENT_POD_UID}'",
        id="agent pod replaced since the token was issued",
    ),
    pytest.param(
        make_csr(pod_uid=None),
        agent_pod(),
        "the requester's token is bound to pod uid None",
        id="no pod uid in the token",
    ),
    pytest.param(
        make_csr(),
        agent_pod(spec__serviceAccountName="default"),
        "agent pod ambient-system/ambient-agent-x1 runs as service account 'default', not the agents'",
        id="agent pod runs as another service account",
    ),
    pytest.param(
        make_csr(),
        agent_pod(status__phase="Pending"),
        "agent pod ambient-system/ambient-agent-x1 is Pending, not Running",
        id="agent pod not running",
    ),
    pytest.param(
        make_csr(),
        agent_pod(spec__nodeName=None),
        "agent pod ambient-system/ambient-agent-x1 is not scheduled on a node",
        id="agent pod not scheduled",
    ),
    pytest.param(
        make_csr(usages=("digital signature", "cert sign")),
        agent_pod(),
        "request asks for key usages ['cert sign']; this signer grants only",
        id="usage beyond a workload certificate",
    ),
    pytest.param(
        make_csr("not base64!"),
        agent_pod(),
        "spec.request is not base64",
        id="request not base64",
    ),
    pytest.param(
        make_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n-----END CERTIFICATE REQUEST-----\n"),
        agent_pod(),
        "request is not a PEM certificate signing request",
        id="request not a CSR",
    ),
    pytest.param(
        make_csr(custom_request(x509.DNSName("cart.shop.svc"))),
        agent_pod(),
        "request carries a DNS name SAN (cart.shop.svc); only one URI SAN is allowed",
        id="DNS SAN",
    ),
    pytest.param(
        make_csr(
            custom_request(
                x509.UniformResourceIdentifier(str(CART)),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/db"),
            )
        ),
        agent_pod(),
        "request has 2 URI SANs; exactly one is allowed",
        id="two URI SANs",
    ),
    pytest.param(
        make_csr(pem_request(SpiffeId("other.example", "shop", "cart"))),
        agent_pod(),
        "spiffe://other.example/ns/shop/sa/cart is outside this signer's trust domain 'cluster.local'",
        id="foreign trust domain",
    ),
    pytest.param(
        make_csr(custom_request()),
        agent_pod(),
        "request has no subject alternative name",
        id="no SAN",
    ),
    pytest.param(
        make_csr(expirationSeconds=0),
        agent_pod(),
        "spec.expirationSeconds must be a positive number of seconds, got 0",
        id="zero lifetime",
    ),
    pytest.param(
        make_csr(),
        agent_pod(),
        "no pod with service account shop/cart is scheduled on node node-1, so its agent may not hold"
        " spiffe://cluster.local/ns/shop/sa/cart",
        id="node does not host the service account",
    ),
]


@pytest.mark.parametrize(("csr", "pod", "reason"), DENIALS)
def test_denials_say_exactly_why(csr: dict[str, Any], pod: dict[str, Any] | None, reason: str) -> None:
    # The node "hosts" the identity in every case but the last, which is the only check left to fail.
    hosted = not reason.startswith("no pod with service account")
    decision = decide(csr, pod, hosted, POLICY)
    assert isinstance(decision, Deny)
    assert decision.reason.startswith(reason), decision.reason


def test_a_request_with_an_rsa_key_of_2048_bits_is_approved() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    request = custom_request(x509.UniformResourceIdentifier(str(CART)), key=rsa_key)
    assert isinstance(decide(make_csr(request), agent_pod(), True, POLICY), Approve)


def test_a_request_on_another_curve_is_denied() -> None:
    p384_key = ec.generate_private_key(ec.SECP384R1())
    request = custom_request(x509.UniformResourceIdentifier(str(CART)), key=p384_key)
    decision = decide(make_csr(request), agent_pod(), True, POLICY)
    assert isinstance(decision, Deny)
    assert decision.reason.startswith("key is ECDSA on curve secp384r1")


def with_conditions(*kinds: str, certificate: str | None = None) -> dict[str, Any]:
    csr = make_csr()
    csr["status"] = {"conditions": [{"type": kind, "status": "True"} for kind in kinds]}
    if certificate:
        csr["status"]["certificate"] = certificate
    return csr


@pytest.mark.parametrize(
    ("csr", "stage"),
    [
        pytest.param(make_csr(), CsrStage.PENDING, id="new"),
        pytest.param(
            make_csr(signer="kubernetes.io/kube-apiserver-client"), CsrStage.NOT_OURS, id="other signer"
        ),
        pytest.param(with_conditions("Approved"), CsrStage.APPROVED, id="approved, not issued"),
        pytest.param(with_conditions("Approved", certificate="LS0t"), CsrStage.FINISHED, id="issued"),
        pytest.param(with_conditions("Denied"), CsrStage.FINISHED, id="denied"),
        pytest.param(with_conditions("Approved", "Failed"), CsrStage.FINISHED, id="failed"),
    ],
)
def test_stage_tells_what_is_left_to_do(csr: dict[str, Any], stage: CsrStage) -> None:
    assert csr_stage(csr) is stage


def test_lookups_name_the_agent_pod_and_the_identity_only_for_the_agent_user() -> None:
    assert requesting_pod_name(make_csr(), POLICY) == "ambient-agent-x1"
    assert requesting_pod_name(make_csr(username="admin"), POLICY) is None
    assert requested_identity(make_csr(), POLICY) == CART
    assert requested_identity(make_csr(custom_request()), POLICY) is None
    assert requested_identity(make_csr("%%%"), POLICY) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trust_domain": "Bad/Domain"}, "trust_domain: trust domain 'Bad/Domain' may hold only"),
        ({"agent_service_account": ""}, "agent_service_account: needs a namespace and a name"),
        ({"leaf_lifetime": timedelta(0)}, "leaf_lifetime: must be positive"),
        ({"max_lifetime": timedelta(hours=1)}, "max_lifetime: 1:00:00 is shorter than leaf_lifetime"),
    ],
)
def test_invalid_policies_are_refused_naming_the_setting(changes: dict[str, Any], message: str) -> None:
    values = {
        "trust_domain": "cluster.local",
        "agent_namespace": "ambient-system",
        "agent_service_account": "ambient-agent",
        "leaf_lifetime": timedelta(hours=24),
        "max_lifetime": timedelta(hours=24),
        **changes,
    }
    with pytest.raises(SettingsError, match="^" + message.replace("(", r"\(")):
        SigningPolicy(**values)
