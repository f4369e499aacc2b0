"""Cluster-wide discovery: watched objects in, immutable routing snapshots out.

`ClusterIndex` holds what the lean watchers (`agent.operator.watch`) report, already parsed into
`agent.state` values as each change arrives and fed to an `agent.state.SnapshotBuilder`, so building
the next snapshot costs what changed since the last one, not the cluster (the first sync of 50,000
pods builds everything once). A namespace's labels decide its pods' enrolment, so a namespace change
re-decides only that namespace's pods. `Discovery` runs one watcher per kind and publishes a new
snapshot after each burst of changes (a short batching window keeps a 1,000-pod rollout from
building 1,000 snapshots).

The pod trim keeps exactly the fields `agent.state.kube.parse_pod` reads; everything else of a pod
(most of its 4.6 KB) is dropped as it arrives, and the trimmed pod itself once parsed. Pods with
equal label maps, port maps or node IPs share one object of each, and the heap's free pages go back
to the system after the first sync (memory figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from agent.operator.kubeapi import ApiAccess
from agent.operator.watch import (
    Deleted,
    JsonObject,
    Listed,
    ListWatcher,
    Upserted,
    WatchChange,
    WatchedResource,
)
from agent.state import (
    AuthorizationPolicy,
    IPAddress,
    MeshConfig,
    ParseError,
    PeerAuthentication,
    Service,
    Snapshot,
    SnapshotBuilder,
    Workload,
    enrolment,
    parse_authorization_policy,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)

log = logging.getLogger(__name__)

_Parsed = TypeVar("_Parsed", Service, AuthorizationPolicy, PeerAuthentication)

PODS = "/api/v1/pods"
SERVICES = "/api/v1/services"
NAMESPACES = "/api/v1/namespaces"
AUTHORIZATION_POLICIES = "/apis/security.istio.io/v1/authorizationpolicies"
PEER_AUTHENTICATIONS = "/apis/security.istio.io/v1/peerauthentications"


def _pick(obj: Mapping[str, Any], *keys: str) -> JsonObject:
    return {key: obj[key] for key in keys if key in obj}


def _shared(value: Any) -> Any:
    """One string object for text that thousands of pods repeat (namespaces, nodes, labels): 50,000
    decoded pods would otherwise hold 50,000 copies of each."""
    return sys.intern(value) if isinstance(value, str) else value


_SHARED_VALUES_LIMIT = 100_000
"""Distinct label sets, port maps and node IPs remembered for sharing; past it the memory starts
afresh (pods already indexed keep theirs), so unique values (a label written per change) cannot
grow it forever."""


@dataclass
class _SharedValues:
    """One object for each distinct label map, named-port map and node IP that pods repeat: the
    pods of a deployment have equal ones, which would otherwise cost ~0.4 KB per pod."""

    _mappings: dict[tuple[tuple[str, str | int], ...], Mapping[str, Any]] = field(default_factory=dict)
    _ips: dict[IPAddress, IPAddress] = field(default_factory=dict)

    def workload(self, workload: Workload) -> Workload:
        """`workload` with its label map, port map and node IP replaced by equal shared ones."""
        if len(self._mappings) + len(self._ips) > _SHARED_VALUES_LIMIT:
            self._mappings.clear()
            self._ips.clear()
        labels = self._mappings.setdefault(tuple(workload.labels.items()), workload.labels)
        ports = self._mappings.setdefault(tuple(workload.named_ports.items()), workload.named_ports)
        node_ip = self._ips.setdefault(workload.node_ip, workload.node_ip)
        if labels is workload.labels and ports is workload.named_ports and node_ip is workload.node_ip:
            return workload
        return replace(workload, labels=labels, named_ports=ports, node_ip=node_ip)


def _release_free_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc `malloc_trim`): decoding the first
    LIST leaves tens of MB free but held in the heap (docs/benchmarks.md). A no-op without glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def trim_pod(pod: JsonObject) -> JsonObject:
    """The fields of a pod that routing and enrolment read."""
    spec, status = pod.get("spec", {}), pod.get("status", {})
    containers = [
        {"ports": [{k: _shared(v) for k, v in port.items()} for port in container["ports"]]}
        for container in spec.get("containers", ())
        if container.get("ports")
    ]
    ready = [c for c in status.get("conditions", ()) if c.get("type") == "Ready"]
    metadata = _pick(pod.get("metadata", {}), "name", "namespace", "uid", "labels")
    if isinstance(labels := metadata.get("labels"), dict):
        metadata["labels"] = {_shared(key): _shared(value) for key, value in labels.items()}
    return {
        "metadata": {**metadata, "namespace": _shared(metadata.get("namespace"))},
        "spec": {
            **{
                key: _shared(value)
                for key, value in _pick(
                    spec, "nodeName", "serviceAccountName", "serviceAccount", "hostNetwork"
                ).items()
            },
            "containers": containers,
        },
        "status": {**_pick(status, "phase", "podIP", "podIPs", "hostIP"), "conditions": ready},
    }


def trim_namespace(namespace: JsonObject) -> JsonObject:
    """A namespace's name and labels (its labels decide its pods' enrolment)."""
    return {"metadata": _pick(namespace.get("metadata", {}), "name", "labels")}


def trim_whole(obj: JsonObject) -> JsonObject:
    """Services and policies are small and read whole, minus bookkeeping fields."""
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": metadata}


@dataclass
class ClusterIndex:
    """The parsed cluster state; `apply` one watch change at a time, `snapshot` when needed."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Trust domain, root namespace and HBONE port stamped into every snapshot."""

    exclude: Mapping[str, str] | None = None
    """Labels of the agent's own pods, which are never enrolled."""

    on_parse_error: Callable[[ParseError], None] = lambda error: log.warning("ignoring %s", error)
    """Told about every object that could not be read (the operator turns them into Events)."""

    _builder: SnapshotBuilder = field(init=False)
    _keys: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Keys of the services and policies held, by watched path (what a relist may have to remove)."""
    _namespace_labels: dict[str, Mapping[str, str]] = field(default_factory=dict)
    _shared_values: _SharedValues = field(default_factory=_SharedValues)
    _version: int = 0

    def __post_init__(self) -> None:
        self._builder = SnapshotBuilder(self.mesh)

    def apply(self, change: WatchChange) -> None:
        """Folds one watch change into the index."""
        builder = self._builder
        match change.path:
            case path if path == PODS:
                self._apply_pods(change)
            case path if path == NAMESPACES:
                self._apply_namespaces(change)
            case path if path == SERVICES:
                self._apply_parsed(change, parse_service, builder.put_service, builder.remove_service)
            case path if path == AUTHORIZATION_POLICIES:
                self._apply_parsed(
                    change,
                    parse_authorization_policy,
                    builder.put_authorization_policy,
                    builder.remove_authorization_policy,
                )
            case path if path == PEER_AUTHENTICATIONS:
                self._apply_parsed(
                    change,
                    parse_peer_authentication,
                    builder.put_peer_authentication,
                    builder.remove_peer_authentication,
                )
            case other:
                raise ValueError(f"no index for watched path {other}")
        self._version += 1

    def snapshot(self, created_at: float) -> Snapshot:
        """An immutable snapshot of everything indexed so far (built from the changes since the last)."""
        return self._builder.snapshot(version=self._version, created_at=created_at)

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """The labels of `namespace` as indexed (empty when unknown): what its pods' enrolment reads."""
        return self._namespace_labels.get(namespace, {})

    def _apply_pods(self, change: WatchChange) -> None:
        match change:
            case Listed(keys=keys):
                for key in self._builder.workload_keys() - keys:
                    self._builder.remove_workload(key)
            case Upserted(key=key, obj=pod):
                self._put_pod(key, pod)
            case Deleted(key=key):
                self._builder.remove_workload(key)

    def _put_pod(self, key: str, pod: JsonObject) -> None:
        labels = self._namespace_labels.get(_namespace_of(key), {})
        parsed = parse_pod(pod, namespace_labels=labels, exclude=self.exclude)
        if isinstance(parsed, Workload):
            self._builder.put_workload(key, self._shared_values.workload(parsed))
            return
        self._builder.remove_workload(key)
        if isinstance(parsed, ParseError):
            self.on_parse_error(parsed)

    def _apply_namespaces(self, change: WatchChange) -> None:
        match change:
            case Listed(keys=names):
                changed = self._namespace_labels.keys() - names
                for name in changed:
                    del self._namespace_labels[name]
            case Upserted(key=name, obj=obj):
                labels = obj.get("metadata", {}).get("labels") or {}
                changed = set() if self._namespace_labels.get(name) == labels else {name}
                self._namespace_labels[name] = labels
            case Deleted(key=name):
                changed = {name} if self._namespace_labels.pop(name, None) is not None else set()
        for name in changed:
            self._reenrol(name)

    def _reenrol(self, namespace: str) -> None:
        """Re-decides the enrolment of `namespace`'s pods: the only part of a pod its namespace sets."""
        labels = self.namespace_labels(namespace)
        for key in self._builder.workload_keys(namespace):
            workload = self._builder.workload_by_key(key)
            if workload is None:
                continue
            enrolled = enrolment(
                pod_labels=workload.labels,
                namespace_labels=labels,
                host_network=workload.host_network,
                exclude=self.exclude,
            ).enrolled
            if enrolled != workload.enrolled:
                self._builder.put_workload(key, replace(workload, enrolled=enrolled))

    def _apply_parsed(
        self,
        change: WatchChange,
        parse: Callable[[Mapping[str, object]], _Parsed | ParseError],
        put: Callable[[str, _Parsed], None],
        remove: Callable[[str], None],
    ) -> None:
        held = self._keys[change.path]

        def forget(key: str) -> None:
            held.discard(key)
            remove(key)

        def parse_and_put(key: str, obj: JsonObject) -> None:
            parsed = parse(obj)
            if isinstance(parsed, ParseError):
                forget(key)
                self.on_parse_error(parsed)
            else:
                held.add(key)
                put(key, parsed)

        match change:
            case Listed(keys=keys):
                for key in held - keys:
                    forget(key)
            case Upserted(key=key, obj=obj):
                parse_and_put(key, obj)
            case Deleted(key=key):
                forget(key)


def _namespace_of(key: str) -> str:
    return key.partition("/")[0]


class Discovery:
    """Watches pods, namespaces, services and the policy kinds; publishes snapshots in batches."""

    def __init__(
        self,
        access: ApiAccess,
        index: ClusterIndex,
        publish: Callable[[Snapshot], None],
        *,
        batch_s: float = 0.05,
        watch_policies: bool = True,
    ) -> None:
        self._index = index
        self._publish = publish
        self._batch_s = batch_s
        self._dirty = asyncio.Event()
        resources = [
            WatchedResource(PODS, trim_pod),
            WatchedResource(NAMESPACES, trim_namespace),
            WatchedResource(SERVICES, trim_whole),
        ]
        if watch_policies:
            resources += [
                WatchedResource(AUTHORIZATION_POLICIES, trim_whole),
                WatchedResource(PEER_AUTHENTICATIONS, trim_whole),
            ]
        self._watchers = [ListWatcher(access, resource, self._changed) for resource in resources]

    def _changed(self, change: WatchChange) -> None:
        self._index.apply(change)
        self._dirty.set()

    @property
    def synced(self) -> bool:
        """Every watched kind has been listed at least once."""
        return all(watcher.synced.is_set() for watcher in self._watchers)

    async def run(self) -> None:
        """Runs the watchers and publishes a snapshot after each batch of changes, forever."""
        async with asyncio.TaskGroup() as tasks:
            for watcher in self._watchers:
                tasks.create_task(watcher.run(), name=f"watch {watcher.path}")
            tasks.create_task(self._publish_loop(), name="publish snapshots")

    async def _publish_loop(self) -> None:
        frozen = False
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._batch_s)
            self._dirty.clear()
            if self.synced:
                self._publish(self._index.snapshot(created_at=time.time()))
                if not frozen:
                    # The first sync leaves ~8 long-lived objects per pod (400,000 for 50,000 pods);
                    # a full cyclic collection scanning them stalls this loop ~130 ms, and far more
                    # on a busy node (docs/benchmarks.md). Freezing them once keeps collections to
                    # what comes later; they are still freed by reference counting.
                    gc.freeze()
                    _release_free_heap()
                    frozen = True
