"""The enrolment rule: which pods get their traffic captured and tunnelled, and why.

Same convention as Istio ambient: label `istio.io/dataplane-mode=ambient` on the pod or its namespace
enrols; the pod label `istio.io/dataplane-mode=none` opts a pod out. Pods on the host network and the
agent's own pods are never enrolled.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from agent.state.model import selector_matches

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"


class Enrolment(enum.StrEnum):
    """The outcome of the enrolment rule for one pod, with its reason."""

    BY_POD_LABEL = "enrolled: the pod is labelled istio.io/dataplane-mode=ambient"
    BY_NAMESPACE_LABEL = "enrolled: the namespace is labelled istio.io/dataplane-mode=ambient"
    NOT_LABELLED = "not enrolled: neither the pod nor its namespace is labelled for ambient"
    OPTED_OUT = "not enrolled: the pod is labelled istio.io/dataplane-mode=none"
    HOST_NETWORK = "not enrolled: the pod uses the host network"
    EXCLUDED = "not enrolled: the pod is one of the agent's own"

    @property
    def enrolled(self) -> bool:
        """Whether the pod is enrolled."""
        return self in (Enrolment.BY_POD_LABEL, Enrolment.BY_NAMESPACE_LABEL)


def enrolment(
    *,
    pod_labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    host_network: bool,
    exclude: Mapping[str, str] | None = None,
) -> Enrolment:
    """Applies the enrolment rule.

    `exclude` is a label selector for the agent's own pods (Kubernetes semantics: an empty selector
    matches every pod; None excludes nothing).
    """
    if host_network:
        return Enrolment.HOST_NETWORK
    if exclude is not None and selector_matches(exclude, pod_labels):
        return Enrolment.EXCLUDED
    pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == OPT_OUT:
        return Enrolment.OPTED_OUT
    if pod_mode == AMBIENT:
        return Enrolment.BY_POD_LABEL
    if namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT:
        return Enrolment.BY_NAMESPACE_LABEL
    return Enrolment.NOT_LABELLED
