"""The node agent's control plane, on a thread and event loop of its own so it never stalls the data plane.

Two watchers with different jobs (ARCHITECTURE.md section 5):

- `Discovery`, the lean LIST + WATCH, holds the cluster-wide index and publishes routing snapshots;
- kopf, embedded, standalone, with `@kopf.on.event` handlers only (they write nothing on the objects
  they watch), follows this node's pods (server-side field selector `spec.nodeName`) and the two
  policy kinds, the per-node work kopf's per-object machinery suits.

`EnrolmentReporter` keeps each local pod's redirection annotation (through `pods/status`) and Warning
Events in step with what the data-plane side reports (`NodeState`); `PolicyReporter` posts a Warning
Event on each policy the agent cannot read or fully enforce. The decisions are `agent.operator.status`.

Namespaces are not watched by kopf a second time: whether a pod's namespace enrols it is read from
discovery's index, the same labels the data plane's snapshot was built from, so the annotation never
disagrees with the data plane about a namespace, and a restarting agent cannot see a pod before its
namespace.

The data-plane side talks to this thread only through thread-safe hand-offs: snapshots go out through
the `publish` callback (called on this thread), `NodeState` comes in through `report`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import itertools
import logging
import random
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from agent.observability.metrics import AgentMetrics
from agent.operator.discovery import ClusterIndex, Discovery, trim_pod
from agent.operator.kopf_login import register_login
from agent.operator.kubeapi import ApiAccess
from agent.operator.rest import ApiClient, ApiUnreachable
from agent.operator.status import (
    POLICY_API_VERSION,
    REDIRECTION_ANNOTATION,
    NodeState,
    Problem,
    ProblemReason,
    has_redirection,
    pod_status,
    policy_problem,
    problem_event,
    redirection_patch,
)
from agent.retry import Backoff
from agent.settings import SettingsError
from agent.state import MeshConfig, Snapshot
from agent.state.policy import PolicyKind

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
PodKey = tuple[str, str]

AGENT_POD_LABELS: Mapping[str, str] = {"app.kubernetes.io/name": "ambient-agent"}
"""The labels the chart gives the agent's own pods (node agents and CA)."""

ENROLMENT_RECONCILER = "enrolment-status"
"""`reconciler` label of `ambient_agent_reconcile_errors` for failed status patches and Events."""

_STOP_GRACE_S = 2.0
"""How long kopf gets to stop its watchers once asked, before it is cancelled. It stops within
milliseconds when the API server answers, but keeps retrying a request to an unreachable one
instead of stopping; its handlers only react to events, so cancelling leaves nothing half done."""


@dataclass(frozen=True)
class ControlPlaneSettings:
    """What the node's control plane watches and how it reports."""

    node_name: str
    """This node: kopf follows the pods whose `spec.nodeName` it is."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Trust domain, root namespace and HBONE port stamped into every snapshot."""

    exclude: Mapping[str, str] = field(default_factory=lambda: dict(AGENT_POD_LABELS), hash=False)
    """`matchLabels` of the agent's own pods, which are never enrolled."""

    instance: str = field(default_factory=socket.gethostname)
    """This agent in its Events (`reportingInstance`): its pod name."""

    snapshot_batch_s: float = 0.05
    """Seconds discovery gathers changes before publishing a snapshot, so a rollout of many pods
    builds a few snapshots rather than one per pod."""

    def __post_init__(self) -> None:
        if not self.node_name:
            raise SettingsError("control_plane.node_name: required")
        if not self.instance:
            raise SettingsError("control_plane.instance: must not be empty")
        if not 0 < self.snapshot_batch_s < float("inf"):
            raise SettingsError(
                "control_plane.snapshot_batch_s: must be a positive number of seconds,"
                f" got {self.snapshot_batch_s}"
            )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def local_pod_view(pod: Mapping[str, Any]) -> JsonObject:
    """What the reporter keeps of one of this node's pods: discovery's fields, uid, generation, and
    the redirection annotation."""
    metadata = pod.get("metadata") or {}
    kept = copy.deepcopy(trim_pod(dict(pod)))
    kept["metadata"]["generation"] = metadata.get("generation")
    annotation = (metadata.get("annotations") or {}).get(REDIRECTION_ANNOTATION)
    if annotation is not None:
        kept["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: annotation}
    return kept


class EnrolmentReporter:
    """Reports on this node's pods: the redirection annotation and Warning Events, kept in step."""

    def __init__(
        self,
        api: ApiClient,
        settings: ControlPlaneSettings,
        namespace_labels: Callable[[str], Mapping[str, str]],
        metrics: AgentMetrics,
        *,
        backoff: Backoff | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._api = api
        self._settings = settings
        self._namespace_labels = namespace_labels
        self._metrics = metrics
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self._now = now
        self._pods: dict[PodKey, JsonObject] = {}
        self._state: NodeState | None = None
        self._dirty: set[PodKey] = set()
        self._wake = asyncio.Event()
        self._reported: dict[str, set[ProblemReason]] = {}
        """Problems already posted as Events, by pod uid, while they last."""

    def pod_changed(self, pod: Mapping[str, Any]) -> None:
        """A pod of this node was listed, added or modified."""
        view = local_pod_view(pod)
        key = _pod_key(view)
        self._pods[key] = view
        self._mark({key})

    def pod_deleted(self, pod: Mapping[str, Any]) -> None:
        """A pod of this node is gone."""
        metadata = pod.get("metadata") or {}
        self._pods.pop(_pod_key(pod), None)
        self._reported.pop(str(metadata.get("uid")), None)

    def node_state(self, state: NodeState) -> None:
        """The data-plane side reports what it has set up."""
        if state != self._state:
            self._state = state
            self.recheck_all()

    def recheck_all(self) -> None:
        """Something every pod's status depends on changed (a snapshot, the node state)."""
        self._mark(set(self._pods))

    def _mark(self, keys: set[PodKey]) -> None:
        self._dirty |= keys
        self._wake.set()

    async def run(self) -> None:
        """Brings each changed pod's annotation and Events in line, retrying failures with backoff."""
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._dirty = self._dirty, set()
            failed = {key for key in sorted(pending) if not await self._reconcile(key)}
            if not failed:
                failures = 0
                continue
            self._mark(failed)
            delay = self._backoff.delay(failures)
            failures += 1
            log.warning("status of %d pod(s) not reported; retrying in %.1fs", len(failed), delay)
            await asyncio.sleep(delay)

    async def _reconcile(self, key: PodKey) -> bool:
        """Reports on one pod; False when a write failed and must be retried."""
        pod = self._pods.get(key)
        if pod is None:
            return True
        status = pod_status(
            pod,
            namespace_labels=self._namespace_labels(key[0]),
            exclude=self._settings.exclude,
            trust_domain=self._settings.mesh.trust_domain,
            state=self._state,
        )
        done = True
        if status.redirection is not None and status.redirection != has_redirection(pod):
            done = await self._patch(key, pod, status.redirection)
        uid = str(pod["metadata"].get("uid"))
        if status.problem is None:
            if status.redirection is not None:
                self._reported.pop(uid, None)
        elif status.problem.reason not in self._reported.setdefault(uid, set()):
            if await self._post(pod, status.problem):
                self._reported[uid].add(status.problem.reason)
            else:
                done = False
        return done

    async def _patch(self, key: PodKey, pod: JsonObject, enabled: bool) -> bool:
        namespace, name = key
        patch = redirection_patch(enabled)
        # With the uid, a pod recreated under the same name refuses the patch (422, uid immutable)
        # instead of getting this one's status; it is retried once kopf reports the new pod.
        patch["metadata"]["uid"] = pod["metadata"].get("uid")
        try:
            response = await self._api.request(
                "PATCH",
                f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                body=patch,
                content_type="application/merge-patch+json",
            )
        except ApiUnreachable as error:
            return self._failed(f"pod {namespace}/{name}: {error}")
        if response.status == 404:
            return True  # gone: kopf reports the deletion
        if not response.ok:
            return self._failed(f"patching pod {namespace}/{name}/status: {response.message}")
        log.info("pod %s/%s: %s %s", namespace, name, "set" if enabled else "removed", REDIRECTION_ANNOTATION)
        if key in self._pods:
            self._pods[key] = local_pod_view(response.body)
        return True

    async def _post(self, pod: JsonObject, problem: Problem) -> bool:
        namespace, name = _pod_key(pod)
        log.warning("pod %s/%s: %s: %s", namespace, name, problem.reason, problem.message)
        event = problem_event(
            pod, problem, api_version="v1", kind="Pod", instance=self._settings.instance, now=self._now()
        )
        try:
            response = await self._api.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
        except ApiUnreachable as error:
            return self._failed(f"event on pod {namespace}/{name}: {error}")
        if response.ok or response.status == 409:
            return True
        return self._failed(f"posting an event on pod {namespace}/{name}: {response.message}")

    def _failed(self, what: str) -> bool:
        self._metrics.reconcile_errors.labels(ENROLMENT_RECONCILER).inc()
        log.warning("enrolment status: %s", what)
        return False


def _pod_key(pod: Mapping[str, Any]) -> PodKey:
    metadata = pod.get("metadata") or {}
    return (str(metadata.get("namespace")), str(metadata.get("name")))


class PolicyReporter:
    """Posts one Warning Event per policy generation the agent cannot read or fully enforce."""

    def __init__(self, api: ApiClient, instance: str, *, now: Callable[[], datetime] = _utc_now) -> None:
        self._api = api
        self._instance = instance
        self._now = now
        self._reported: set[str] = set()
        """Names of the Events already posted (or found posted by another node's agent)."""

    async def policy_changed(self, kind: PolicyKind, policy: Mapping[str, Any]) -> None:
        """A policy was listed, added or modified."""
        problem = policy_problem(kind, policy)
        if problem is None:
            return
        event = problem_event(
            policy,
            problem,
            api_version=POLICY_API_VERSION,
            kind=kind,
            instance=self._instance,
            now=self._now(),
        )
        name, namespace = event["metadata"]["name"], event["metadata"]["namespace"]
        if name in self._reported:
            return
        log.warning("%s %s/%s: %s", kind, namespace, policy["metadata"].get("name"), problem.message)
        try:
            response = await self._api.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
        except ApiUnreachable as error:
            # kopf lists the policy again after the outage; the Event is posted then.
            log.warning("could not post the event on %s %s: %s", kind, name, error)
            return
        if response.ok or response.status == 409:
            self._reported.add(name)
        else:
            log.warning("could not post the event on %s %s: %s", kind, name, response.message)


class _EndlessBackoffs:
    """kopf's retry delays for API requests, never exhausted: kopf stops the whole operator when a
    watch's retries run out, and an API server outage must never stop the agent. Re-iterable (kopf
    iterates once per request); past the first steps the delays are jittered, so a fleet of agents
    does not reconnect in step."""

    def __init__(self, first: tuple[float, ...] = (1, 1, 2, 3, 5, 8), cap_s: float = 30.0) -> None:
        self._first = first
        self._cap_s = cap_s
        self._rng = random.Random()

    def __iter__(self) -> Iterator[float]:
        later = (self._rng.uniform(self._cap_s / 2, self._cap_s) for _ in itertools.count())
        return itertools.chain(self._first, later)


def operator_settings(node_name: str) -> kopf.OperatorSettings:
    """kopf's settings for the node: standalone, this node's pods only, retrying the API forever."""
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = _EndlessBackoffs()
    settings.peering.standalone = True
    # The agent posts its own Events; kopf's would repeat its log lines on every pod.
    settings.posting.enabled = False
    # No watch on CRDs (nor the RBAC for it): the policy kinds are looked up once, at start.
    settings.scanning.disabled = True
    settings.watching.field_selectors["v1", "pods"] = f"spec.nodeName={node_name}"
    return settings


def _policy_handler(policies: PolicyReporter, kind: PolicyKind) -> Callable[..., Awaitable[None]]:
    async def policy_event(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") != "DELETED":
            await policies.policy_changed(kind, event["object"])

    return policy_event


def _registry(access: ApiAccess, pods: EnrolmentReporter, policies: PolicyReporter) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register_login(registry, access)

    @kopf.on.event("v1", "pods", registry=registry)
    async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") == "DELETED":
            pods.pod_deleted(event["object"])
        else:
            pods.pod_changed(event["object"])

    for kind, plural in (
        (PolicyKind.AUTHORIZATION_POLICY, "authorizationpolicies"),
        (PolicyKind.PEER_AUTHENTICATION, "peerauthentications"),
    ):
        kopf.on.event("security.istio.io", "v1", plural, registry=registry, id=f"{plural}-event")(
            _policy_handler(policies, kind)
        )
    return registry


class ControlPlaneStopped(RuntimeError):
    """A part of the control plane ended on its own; the message names it."""


class NodeController:
    """Discovery, kopf and the reporters, on their own thread and event loop."""

    def __init__(
        self,
        access: ApiAccess,
        settings: ControlPlaneSettings,
        *,
        publish: Callable[[Snapshot], None],
        metrics: AgentMetrics,
    ) -> None:
        self._access = access
        self._settings = settings
        self._publish = publish
        self._metrics = metrics
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._reporter: EnrolmentReporter | None = None
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        """Completes when the control plane has stopped: after `stop`, or with what ended it (await it
        with `wait_finished`: an asyncio wrapper would cancel it when cancelled itself)."""

    def start(self) -> None:
        """Starts the control-plane thread; returns once it accepts `report` and `stop`."""
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            # kopf logs every handled event at INFO ("Handler ... succeeded").
            logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        threading.Thread(target=self._thread_main, name="control-plane", daemon=True).start()
        self._started.wait()

    def report(self, state: NodeState) -> None:
        """Hands the data-plane side's state to the enrolment reporter; callable from any thread."""
        self._call_soon(lambda reporter: reporter.node_state(state))

    def stop(self) -> None:
        """Asks the control plane to stop; callable from any thread. `finished` completes once it has."""
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopping.set)

    def _call_soon(self, action: Callable[[EnrolmentReporter], None]) -> None:
        reporter = self._reporter
        if self._loop is not None and reporter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(action, reporter)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:
            self.finished.set_exception(error)
        else:
            self.finished.set_result(None)
        finally:
            self._started.set()

    async def wait_finished(self) -> None:
        """Waits (on any event loop) until the control plane has stopped; raises what ended it.
        Cancelling the wait leaves the control plane alone."""
        await asyncio.shield(asyncio.wrap_future(self.finished))

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        settings = self._settings
        async with ApiClient(self._access) as api:
            index = ClusterIndex(mesh=settings.mesh, exclude=settings.exclude)
            reporter = EnrolmentReporter(api, settings, index.namespace_labels, self._metrics)
            policies = PolicyReporter(api, settings.instance)

            def published(snapshot: Snapshot) -> None:
                self._publish(snapshot)
                reporter.recheck_all()

            discovery = Discovery(self._access, index, published, batch_s=settings.snapshot_batch_s)
            self._loop, self._reporter = asyncio.get_running_loop(), reporter
            self._started.set()
            kopf_stop = asyncio.Event()
            operator = asyncio.create_task(
                kopf.operator(
                    registry=_registry(self._access, reporter, policies),
                    settings=operator_settings(settings.node_name),
                    standalone=True,
                    clusterwide=True,
                    stop_flag=kopf_stop,
                ),
                name="kopf",
            )
            others = [
                asyncio.create_task(discovery.run(), name="discovery"),
                asyncio.create_task(reporter.run(), name="enrolment status"),
            ]
            stopping = asyncio.create_task(self._stopping.wait(), name="stop request")
            running: set[asyncio.Task[Any]] = {operator, stopping, *others}
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            kopf_stop.set()
            for task in others:
                task.cancel()
            await asyncio.wait([operator, *others], timeout=_STOP_GRACE_S)
            operator.cancel()
            stopping.cancel()
            for task in done - {stopping}:
                failure = None if task.cancelled() else task.exception()
                raise ControlPlaneStopped(f"{task.get_name()} ended unexpectedly") from failure
