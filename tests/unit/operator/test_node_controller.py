"""The node control plane's settings, what its reporter keeps of each local pod, and the reporter's
failed writes counted as reconcile errors (against a stand-in for the API server's `pods/status`, or
none at all).

The reporter's writes and kopf's watches run against the real API server in
tests/e2e/test_control_plane.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.observability.metrics import AgentMetrics
from agent.operator.kubeapi import ApiAccess
from agent.operator.node_controller import (
    _STOP_GRACE_S,
    ENROLMENT_RECONCILER,
    ControlPlaneSettings,
    EnrolmentReporter,
    NodeController,
    local_pod_view,
    operator_settings,
)
from agent.operator.rest import ApiClient
from agent.operator.status import REDIRECTION_ANNOTATION, NodeState, has_redirection
from agent.retry import Backoff
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


# Failed reports are counted in `ambient_agent_reconcile_errors`.

SERVED = NodeState(
    captured=frozenset({ip_address("10.1.0.5")}),
    certified=frozenset({"spiffe://cluster.local/ns/default/sa/web"}),
)
"""The data-plane side serves `web-1` (pod_dict's): the reporter sets its annotation."""


class PodStatusApi:
    """Stands in for the API server's `pods/status`: answers every PATCH with `status` (the pod with
    the patch applied when 200) and keeps the patches."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.patches: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_patch("/api/v1/namespaces/{namespace}/pods/{name}/status", self._patch)
        return app

    async def _patch(self, request: web.Request) -> web.Response:
        patch = await request.json()
        self.patches.append(patch)
        if self.status != 200:
            return web.json_response({"kind": "Status", "message": "no"}, status=self.status)
        pod = pod_dict("web-1", labels={"app": "web"})
        pod["metadata"]["annotations"] = patch["metadata"]["annotations"]
        return web.json_response(pod)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def report_served_pod(server: str, metrics: AgentMetrics, until: Callable[[], bool]) -> None:
    """Runs a reporter whose one pod is served until `until` holds (at most 10 s)."""
    async with ApiClient(ApiAccess(server=server)) as api:
        reporter = EnrolmentReporter(
            api,
            ControlPlaneSettings(node_name="node-a", instance="agent-a"),
            lambda _: AMBIENT,
            metrics,
            backoff=Backoff(base_s=0.01, cap_s=0.01),
        )
        reporter.pod_changed(pod_dict("web-1", labels={"app": "web"}))
        reporter.node_state(SERVED)
        running = asyncio.create_task(reporter.run())
        try:
            async with asyncio.timeout(10):
                while not until():
                    await asyncio.sleep(0.01)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def enrolment_errors(metrics: AgentMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "ambient_agent_reconcile_errors_total", {"reconciler": ENROLMENT_RECONCILER}
    )
    return value or 0.0


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("status", [403, 500])
async def test_a_status_patch_the_api_server_refuses_counts_as_a_reconcile_error(status: int) -> None:
    api = PodStatusApi(status)
    metrics = AgentMetrics()
    async with TestServer(api.app()) as server:
        await report_served_pod(url(server), metrics, lambda: enrolment_errors(metrics) >= 2)
    assert len(api.patches) >= 2  # each failed attempt counted, and retried
    assert api.patches[0]["metadata"]["annotations"] == {REDIRECTION_ANNOTATION: "enabled"}


async def test_an_unreachable_api_server_counts_as_a_reconcile_error() -> None:
    metrics = AgentMetrics()
    unreachable = f"http://127.0.0.1:{closed_port()}"
    await report_served_pod(unreachable, metrics, lambda: enrolment_errors(metrics) >= 1)


async def test_a_status_patch_that_succeeds_counts_no_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.operator.node_controller")
    api = PodStatusApi(200)
    metrics = AgentMetrics()

    def annotated() -> bool:  # logged once the reporter has taken the API server's answer
        return any(f"set {REDIRECTION_ANNOTATION}" in record.getMessage() for record in caplog.records)

    async with TestServer(api.app()) as server:
        await report_served_pod(url(server), metrics, annotated)
    assert len(api.patches) == 1
    assert enrolment_errors(metrics) == 0


async def test_a_control_plane_cut_off_from_the_api_server_still_stops_when_asked() -> None:
    # kopf keeps retrying a request to an unreachable API server instead of heeding its stop flag:
    # the controller must end it rather than hang the node's shutdown.
    controller = NodeController(
        ApiAccess(server=f"http://127.0.0.1:{closed_port()}"),
        ControlPlaneSettings(node_name="node-a", instance="agent-a"),
        publish=lambda _: None,
        metrics=AgentMetrics(),
    )
    controller.start()
    await asyncio.sleep(0.5)  # kopf is up and failing to reach the API server
    controller.stop()
    await asyncio.wait_for(controller.wait_finished(), _STOP_GRACE_S + 3)
