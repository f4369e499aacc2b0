"""The node control plane's settings and what its reporter keeps of each local pod.

The reporter's writes and kopf's watches run against the real API server in
tests/e2e/test_control_plane.py.
"""

from __future__ import annotations

import itertools

import pytest

from agent.operator.node_controller import ControlPlaneSettings, local_pod_view, operator_settings
from agent.operator.status import REDIRECTION_ANNOTATION, has_redirection
from agent.settings import SettingsError
from agent.state import parse_pod
from tests.unit.state.factories import pod_dict

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_the_local_view_of_a_pod_keeps_what_status_reads() -> None:
    pod = pod_dict("web-1", labels={"app": "web"})
    pod["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: "enabled", "big": "x" * 4000}
    pod["metadata"]["managedFields"] = [{"manager": "kubelet"}] * 20
    pod["metadata"]["generation"] = 3
    view = local_pod_view(pod)
    assert parse_pod(view, namespace_labels=AMBIENT) == parse_pod(pod, namespace_labels=AMBIENT)
    assert has_redirection(view)
    assert view["metadata"]["annotations"] == {REDIRECTION_ANNOTATION: "enabled"}
    assert (view["metadata"]["uid"], view["metadata"]["generation"]) == ("uid-web-1", 3)
    view["metadata"]["labels"]["changed"] = "yes"
    assert "changed" not in pod["metadata"]["labels"]  # a copy: kopf's body is left alone


def test_a_pod_without_the_annotation_has_none_in_its_view() -> None:
    assert not has_redirection(local_pod_view(pod_dict("web-1")))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"node_name": ""}, "control_plane.node_name"),
        ({"instance": ""}, "control_plane.instance"),
        ({"snapshot_batch_s": 0.0}, "control_plane.snapshot_batch_s"),
    ],
)
def test_bad_control_plane_settings_fail_naming_the_setting(overrides: dict[str, object], named: str) -> None:
    arguments: dict[str, object] = {"node_name": "node-1", **overrides}
    with pytest.raises(SettingsError, match=named):
        ControlPlaneSettings(**arguments)  # type: ignore[arg-type]


def test_kopf_follows_this_nodes_pods_alone_and_never_gives_up_on_the_api_server() -> None:
    settings = operator_settings("node-7")
    assert settings.peering.standalone
    assert not settings.posting.enabled
    [selector] = settings.watching.field_selectors.values()
    assert selector == "spec.nodeName=node-7"
    # Iterated afresh for every request, and never exhausted: an outage must not stop the operator.
    for _ in range(2):
        delays = list(itertools.islice(settings.networking.error_backoffs, 200))
        assert len(delays) == 200
        assert delays[:3] == [1, 1, 2]
        assert all(15.0 <= delay <= 30.0 for delay in delays[10:])
