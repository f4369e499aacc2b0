"""Kubernetes Event objects the agent's processes post (core `v1` Events, as `kubectl describe` shows).

One builder for every Event: the CA records its CSR decisions, the node agent what stops a pod's
enrolment and what it cannot enforce in a policy. Pure: the callers post the objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

JsonObject = dict[str, Any]

EventType = Literal["Normal", "Warning"]


def involved_object(obj: Mapping[str, Any], *, api_version: str, kind: str) -> JsonObject:
    """The `involvedObject` reference to `obj` (name, namespace when namespaced, uid)."""
    metadata = obj.get("metadata") or {}
    reference: JsonObject = {"apiVersion": api_version, "kind": kind, "name": metadata.get("name")}
    if metadata.get("namespace"):
        reference["namespace"] = metadata["namespace"]
    if metadata.get("uid"):
        reference["uid"] = metadata["uid"]
    return reference


def event_object(
    involved: Mapping[str, Any],
    *,
    namespace: str,
    event_type: EventType,
    reason: str,
    message: str,
    component: str,
    instance: str,
    now: datetime,
    name: str | None = None,
) -> JsonObject:
    """An Event about `involved` (an `involvedObject` reference) in `namespace`.

    With `name`, the Event has that exact name, so several reporters of the same fact create it once
    (the others get 409 Conflict); otherwise the server generates one from the object's name.
    """
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    metadata: JsonObject = {"namespace": namespace}
    if name is None:
        metadata["generateName"] = f"{involved.get('name') or 'object'}."
    else:
        metadata["name"] = name
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": metadata,
        "involvedObject": dict(involved),
        "type": event_type,
        "reason": reason,
        "message": message,
        "source": {"component": component, "host": instance},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
