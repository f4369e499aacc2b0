"""What the node agent reports on Kubernetes objects: pod enrolment status and policy warnings.

The agent reports the actual state of a pod's enrolment as Istio ambient does: the annotation
`ambient.istio.io/redirection: enabled`, written through `pods/status`, once the pod's addresses are in
the installed capture rules and a certificate for its identity is ready; removed when the pod is
released. A pod that asks for enrolment and cannot have it (host network, one of the agent's own), or
whose capture or certificate failed, gets a Warning Event saying why. A policy the agent cannot read,
or whose HTTP-only fields it cannot enforce, gets a Warning Event too.

Everything here is pure: the inputs are the objects as the API server has them, the namespace's
labels, and the `NodeState` the data-plane side reports; the outputs are decisions and the JSON of
patches and Events. `agent.operator.node_controller` does the I/O.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.operator.events import event_object, involved_object
from agent.state import (
    IPAddress,
    ParseError,
    Workload,
    enrolment,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_pod,
    spiffe_id,
)
from agent.state.policy import PolicyKind

JsonObject = dict[str, Any]

REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
"""The pod annotation reporting that the pod's traffic is captured and tunnelled (Istio's name)."""

REDIRECTION_ENABLED = "enabled"
"""Its value while the pod is enrolled and served."""

COMPONENT = "ambient-agent"
"""`source.component` of the node agent's Events."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeState:
    """What the data-plane side of this node has actually set up, as last reported."""

    captured: frozenset[IPAddress] | None
    """Pod addresses the installed capture rules cover; None until the rules were first installed."""

    capture_error: str | None = None
    """Why the last attempt to install the rules failed; None after a success."""

    certified: frozenset[str] = frozenset()
    """SPIFFE IDs with a valid certificate now."""

    certificate_errors: Mapping[str, str] = field(default_factory=dict, hash=False)
    """SPIFFE IDs wanted here without a valid certificate whose last request failed, and why."""


class ProblemReason(enum.StrEnum):
    """The `reason` of a Warning Event, as `kubectl describe` and event selectors show it."""

    NOT_ENROLLABLE = "NotEnrollable"
    """The pod asks for enrolment (by label) but is never enrolled (host network, agent's own pod)."""

    CAPTURE_FAILED = "CaptureFailed"
    """The capture rules for the pod could not be installed."""

    CERTIFICATE_UNAVAILABLE = "CertificateUnavailable"
    """No certificate could be had for the pod's identity."""

    INVALID_POLICY = "InvalidPolicy"
    """A policy object could not be read; it is not enforced."""

    UNSUPPORTED_POLICY_FIELDS = "UnsupportedPolicyFields"
    """A policy uses fields a node agent cannot enforce at L4."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the user must hear about an object, as a Warning Event."""

    reason: ProblemReason
    message: str


@dataclass(frozen=True, slots=True)
class PodStatus:
    """What the agent reports on one of its node's pods."""

    redirection: bool | None
    """Whether the redirection annotation must be present; None: leave it as it is, because capture
    or the certificate is still being set up (a restarting agent must not flap the annotation)."""

    problem: Problem | None = None
    """Why the pod is not (or no longer) served, when something failed."""


LEAVE_AS_IS = PodStatus(redirection=None)


def has_redirection(pod: Mapping[str, Any]) -> bool:
    """Whether the pod carries `ambient.istio.io/redirection: enabled`."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED


def pod_status(
    pod: Mapping[str, Any],
    *,
    namespace_labels: Mapping[str, str],
    exclude: Mapping[str, str] | None,
    trust_domain: str,
    state: NodeState | None,
) -> PodStatus:
    """What to report on `pod` (one of this node's pods, as the API server has it).

    The pod counts as enrolled by the same rule and the same namespace labels as the data plane's
    snapshot; it is reported served only when the capture rules cover all its addresses and its
    identity has a valid certificate.
    """
    parsed = parse_pod(pod, namespace_labels=namespace_labels, exclude=exclude)
    if not isinstance(parsed, Workload):
        # No address yet, or finished: nothing runs that could be served. Unreadable pods are
        # reported by discovery, which reads the same fields.
        return LEAVE_AS_IS
    outcome = enrolment(
        pod_labels=parsed.labels,
        namespace_labels=namespace_labels,
        host_network=parsed.host_network,
        exclude=exclude,
    )
    if not outcome.enrolled:
        asked = enrolment(pod_labels=parsed.labels, namespace_labels=namespace_labels, host_network=False)
        if asked.enrolled:
            message = f"labelled istio.io/dataplane-mode=ambient (itself or its namespace), but {outcome}"
            return PodStatus(False, Problem(ProblemReason.NOT_ENROLLABLE, message))
        return PodStatus(False)
    if state is None or state.captured is None:
        return LEAVE_AS_IS
    identity = spiffe_id(trust_domain, parsed.namespace, parsed.service_account)
    if identity in state.certificate_errors:
        message = f"no certificate for {identity}: {state.certificate_errors[identity]}"
        return PodStatus(False, Problem(ProblemReason.CERTIFICATE_UNAVAILABLE, message))
    captured = all(ip in state.captured for ip in parsed.ips)
    if not captured and state.capture_error is not None:
        message = f"the capture rules for {', '.join(map(str, parsed.ips))} failed: {state.capture_error}"
        return PodStatus(False, Problem(ProblemReason.CAPTURE_FAILED, message))
    if captured and identity in state.certified:
        return PodStatus(True)
    return LEAVE_AS_IS


def redirection_patch(enabled: bool) -> JsonObject:
    """The JSON merge patch (for `pods/<name>/status`) that sets or removes the annotation."""
    return {"metadata": {"annotations": {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED if enabled else None}}}


POLICY_API_VERSION = "security.istio.io/v1"
"""The version the policy Events name (the one discovery watches)."""


def policy_problem(kind: PolicyKind, policy: Mapping[str, Any]) -> Problem | None:
    """What the user must hear about a policy object: unreadable, or partly unenforceable; else None."""
    if kind is PolicyKind.AUTHORIZATION_POLICY:
        parsed = parse_authorization_policy(policy)
        if isinstance(parsed, ParseError):
            return Problem(ProblemReason.INVALID_POLICY, f"not enforced: {parsed.message}")
        if parsed.warning is not None:
            return Problem(ProblemReason.UNSUPPORTED_POLICY_FIELDS, parsed.warning)
        return None
    peer = parse_peer_authentication(policy)
    if isinstance(peer, ParseError):
        return Problem(ProblemReason.INVALID_POLICY, f"not enforced: {peer.message}")
    return None


def problem_event(
    obj: Mapping[str, Any], problem: Problem, *, api_version: str, kind: str, instance: str, now: datetime
) -> JsonObject:
    """The Warning Event telling `problem` on `obj` (a pod of this node, or a policy).

    The Event's name comes from the object's uid and generation and the message: every node's agent
    sees every policy, so the first to report creates the Event and the others get 409 Conflict, and a
    restarted agent does not repeat what it said; a changed spec (generation) or message is new.
    """
    metadata = obj.get("metadata") or {}
    facts = (metadata.get("uid"), metadata.get("generation"), problem.message)
    digest = hashlib.sha256("\0".join(map(str, facts)).encode()).hexdigest()[:16]
    return event_object(
        involved_object(obj, api_version=api_version, kind=kind),
        namespace=str(metadata.get("namespace")),
        event_type="Warning",
        reason=problem.reason,
        message=problem.message,
        component=COMPONENT,
        instance=instance,
        now=now,
        name=f"{str(metadata.get('name'))[:200]}.{digest}",
    )
