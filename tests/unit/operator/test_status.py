"""What the node agent reports on its pods and on policies, decided from the objects and the node state."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any

import pytest

from agent.operator.status import (
    REDIRECTION_ANNOTATION,
    NodeState,
    PodStatus,
    Problem,
    ProblemReason,
    has_redirection,
    pod_status,
    policy_problem,
    problem_event,
    redirection_patch,
)
from agent.state.policy import PolicyKind
from tests.unit.state.factories import pod_dict, policy_dict

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
OPT_OUT = {"istio.io/dataplane-mode": "none"}
AGENT = {"app.kubernetes.io/name": "ambient-agent"}
IDENTITY = "spiffe://cluster.local/ns/default/sa/web"
NOW = datetime(2030, 1, 1, 12, tzinfo=UTC)

SERVED = NodeState(captured=frozenset({ip_address("10.1.0.5")}), certified=frozenset({IDENTITY}))
NOT_CAPTURED_YET = NodeState(captured=frozenset(), certified=frozenset({IDENTITY}))
NO_CERTIFICATE_YET = NodeState(captured=SERVED.captured)
CAPTURE_FAILED = NodeState(captured=frozenset(), capture_error="nft: Operation not permitted")
CERTIFICATE_DENIED = NodeState(
    captured=SERVED.captured,
    certificate_errors={IDENTITY: "the CA denied the request: no pod with service account default/web"},
)
BEFORE_FIRST_RULES = NodeState(captured=None, certified=frozenset({IDENTITY}))


def status_of(
    pod: dict[str, Any], state: NodeState | None, namespace_labels: dict[str, str] | None = None
) -> PodStatus:
    return pod_status(
        pod,
        namespace_labels=AMBIENT if namespace_labels is None else namespace_labels,
        exclude=AGENT,
        trust_domain="cluster.local",
        state=state,
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (SERVED, PodStatus(True)),
        # Still being set up: a restarting agent leaves what the previous one reported.
        (NOT_CAPTURED_YET, PodStatus(None)),
        (NO_CERTIFICATE_YET, PodStatus(None)),
        (BEFORE_FIRST_RULES, PodStatus(None)),
        (None, PodStatus(None)),
        (
            CAPTURE_FAILED,
            PodStatus(
                False,
                Problem(
                    ProblemReason.CAPTURE_FAILED,
                    "the capture rules for 10.1.0.5 failed: nft: Operation not permitted",
                ),
            ),
        ),
        (
            CERTIFICATE_DENIED,
            PodStatus(
                False,
                Problem(
                    ProblemReason.CERTIFICATE_UNAVAILABLE,
                    f"no certificate for {IDENTITY}: the CA denied the request:"
                    " no pod with service account default/web",
                ),
            ),
        ),
    ],
)
def test_an_enrolled_pod_is_reported_served_once_captured_and_certified(
    state: NodeState | None, expected: PodStatus
) -> None:
    assert status_of(pod_dict(), state) == expected


def test_every_address_of_a_dual_stack_pod_must_be_captured() -> None:
    pod = pod_dict()
    pod["status"]["podIPs"] = [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]
    assert status_of(pod, SERVED) == PodStatus(None)
    both = NodeState(
        captured=frozenset({ip_address("10.1.0.5"), ip_address("fd00::5")}), certified=SERVED.certified
    )
    assert status_of(pod, both) == PodStatus(True)


@pytest.mark.parametrize(
    ("pod", "namespace_labels"),
    [
        (pod_dict(), {}),  # nothing asks for enrolment: released
        (pod_dict(labels=OPT_OUT), AMBIENT),  # the pod opts out of its namespace's enrolment
    ],
)
def test_a_pod_not_enrolled_is_reported_released_without_a_problem(
    pod: dict[str, Any], namespace_labels: dict[str, str]
) -> None:
    assert status_of(pod, SERVED, namespace_labels) == PodStatus(False)


@pytest.mark.parametrize(
    ("pod", "why"),
    [
        (pod_dict(hostNetwork=True), "not enrolled: the pod uses the host network"),
        (pod_dict(labels=AGENT), "not enrolled: the pod is one of the agent's own"),
    ],
)
def test_a_pod_asking_for_enrolment_that_can_never_have_it_gets_a_problem(
    pod: dict[str, Any], why: str
) -> None:
    status = status_of(pod, SERVED)
    assert status.redirection is False
    assert status.problem == Problem(
        ProblemReason.NOT_ENROLLABLE,
        f"labelled istio.io/dataplane-mode=ambient (itself or its namespace), but {why}",
    )


def test_a_host_network_pod_nobody_enrols_is_no_problem() -> None:
    assert status_of(pod_dict(hostNetwork=True), SERVED, {}) == PodStatus(False)


@pytest.mark.parametrize(
    "pod",
    [
        pod_dict(ip=None),  # no address yet
        {**pod_dict(), "status": {**pod_dict()["status"], "phase": "Succeeded"}},
    ],
)
def test_a_pod_without_an_address_or_already_finished_is_left_as_it_is(pod: dict[str, Any]) -> None:
    assert status_of(pod, SERVED) == PodStatus(None)


def test_the_annotation_is_read_and_written_as_istio_names_it() -> None:
    pod = pod_dict()
    assert not has_redirection(pod)
    pod["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: "enabled"}
    assert has_redirection(pod)
    assert redirection_patch(True) == {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}
    # JSON merge patch: null removes the key.
    assert redirection_patch(False) == {"metadata": {"annotations": {REDIRECTION_ANNOTATION: None}}}


def unsupported_allow() -> dict[str, Any]:
    return policy_dict(
        "AuthorizationPolicy",
        {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]},
        name="web-get",
    )


def test_policies_with_http_only_fields_or_unreadable_are_problems() -> None:
    problem = policy_problem(PolicyKind.AUTHORIZATION_POLICY, unsupported_allow())
    assert problem is not None
    assert problem.reason is ProblemReason.UNSUPPORTED_POLICY_FIELDS
    assert "cannot enforce: methods" in problem.message

    invalid = policy_dict("PeerAuthentication", {"mtls": {"mode": "SOMETIMES"}})
    problem = policy_problem(PolicyKind.PEER_AUTHENTICATION, invalid)
    assert problem is not None
    assert problem.reason is ProblemReason.INVALID_POLICY
    assert problem.message.startswith("not enforced: spec.mtls.mode: expected one of")

    plain = policy_dict(
        "AuthorizationPolicy", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9"]}}]}]}
    )
    assert policy_problem(PolicyKind.AUTHORIZATION_POLICY, plain) is None
    strict = policy_dict("PeerAuthentication", {"mtls": {"mode": "STRICT"}})
    assert policy_problem(PolicyKind.PEER_AUTHENTICATION, strict) is None


def test_problem_events_are_named_by_object_generation_and_message() -> None:
    policy = unsupported_allow()
    policy["metadata"].update(uid="u-1", generation=1)
    problem = policy_problem(PolicyKind.AUTHORIZATION_POLICY, policy)
    assert problem is not None

    def event(obj: dict[str, Any], instance: str) -> dict[str, Any]:
        return problem_event(
            obj,
            problem,
            api_version="security.istio.io/v1",
            kind=PolicyKind.AUTHORIZATION_POLICY,
            instance=instance,
            now=NOW,
        )

    first = event(policy, "node-1-agent")
    assert first["involvedObject"] == {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "name": "web-get",
        "namespace": "default",
        "uid": "u-1",
    }
    assert (first["type"], first["reason"], first["message"]) == (
        "Warning",
        "UnsupportedPolicyFields",
        problem.message,
    )
    assert first["metadata"]["namespace"] == "default"
    assert first["reportingInstance"] == "node-1-agent"
    # Another node's agent names the same Event, so only one is created; a new spec is a new Event.
    assert event(policy, "node-2-agent")["metadata"]["name"] == first["metadata"]["name"]
    assert first["metadata"]["name"].startswith("web-get.")
    policy["metadata"]["generation"] = 2
    assert event(policy, "node-1-agent")["metadata"]["name"] != first["metadata"]["name"]
