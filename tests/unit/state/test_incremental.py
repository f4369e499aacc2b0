"""The incremental builder publishes exactly what `build_snapshot` builds from the same objects."""

from __future__ import annotations

import pickle
from dataclasses import replace
from ipaddress import ip_address

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.state.incremental import SnapshotBuilder
from agent.state.model import Address, PortProtocol, Service, ServicePort, Workload
from agent.state.persistent import REMOVED, ShardedMap
from agent.state.policy import Action, AuthorizationPolicy, MtlsMode, PeerAuthentication
from agent.state.snapshot import Endpoint, Snapshot, build_snapshot
from tests.unit.state.factories import service, workload

NAMESPACES = ("a", "b")
POD_IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3", "fd00::1")
CLUSTER_IPS = ("10.96.0.1", "10.96.0.2", "fd00:96::1")
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y"]), max_size=2)


def reference(builder: SnapshotBuilder, snapshot: Snapshot) -> Snapshot:
    return build_snapshot(
        version=snapshot.version,
        created_at=snapshot.created_at,
        workloads=builder.workloads(),
        services=builder.services(),
        authorization_policies=builder.authorization_policies(),
        peer_authentications=builder.peer_authentications(),
        mesh=builder.mesh,
    )


def at(ip: str, port: int) -> Address:
    return Address(ip_address(ip), port)


# Random change sequences.

keys = st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(["p0", "p1", "p2", "p3", "p4"]))


@st.composite
def workloads(draw: st.DrawFn) -> tuple[str, Workload]:
    namespace, name = draw(keys)
    ips = draw(st.lists(st.sampled_from(POD_IPS), min_size=1, max_size=2, unique=True))
    pod = Workload(
        name=name,
        namespace=namespace,
        service_account="sa",
        ips=tuple(ip_address(ip) for ip in ips),
        node=draw(st.sampled_from(["node-a", "node-b"])),
        node_ip=ip_address("10.0.0.1"),
        labels=draw(LABELS),
        named_ports=draw(st.sampled_from([{}, {"http": 8080}, {"http": 9090}])),
        enrolled=draw(st.booleans()),
        ready=draw(st.booleans()),
        host_network=draw(st.integers(0, 5)) == 0,
    )
    return f"{namespace}/{name}", pod


@st.composite
def services(draw: st.DrawFn) -> tuple[str, Service]:
    namespace = draw(st.sampled_from(NAMESPACES))
    name = draw(st.sampled_from(["s0", "s1", "s2"]))
    ports = draw(
        st.lists(
            st.builds(
                ServicePort,
                port=st.sampled_from([80, 443]),
                target_port=st.sampled_from([80, 8080, "http"]),
                protocol=st.sampled_from([PortProtocol.TCP, PortProtocol.TCP, PortProtocol.UDP]),
            ),
            min_size=1,
            max_size=2,
        )
    )
    svc = Service(
        namespace=namespace,
        name=name,
        cluster_ips=tuple(
            ip_address(ip)
            for ip in draw(st.lists(st.sampled_from(CLUSTER_IPS), min_size=1, max_size=2, unique=True))
        ),
        ports=tuple(ports),
        selector=draw(st.one_of(st.none(), LABELS)),
        publish_not_ready_addresses=draw(st.booleans()),
    )
    return f"{namespace}/{name}", svc


@st.composite
def authorization_policies(draw: st.DrawFn) -> tuple[str, AuthorizationPolicy]:
    namespace, name = draw(st.sampled_from(NAMESPACES)), draw(st.sampled_from(["z", "m", "b"]))
    policy = AuthorizationPolicy(namespace=namespace, name=name, action=draw(st.sampled_from(Action)))
    return f"{namespace}/{name}", policy


@st.composite
def peer_authentications(draw: st.DrawFn) -> tuple[str, PeerAuthentication]:
    namespace, name = draw(st.sampled_from(NAMESPACES)), draw(st.sampled_from(["z", "m"]))
    policy = PeerAuthentication(namespace=namespace, name=name, mode=draw(st.sampled_from(MtlsMode)))
    return f"{namespace}/{name}", policy


def joined(key: tuple[str, str]) -> str:
    return "/".join(key)


changes = st.one_of(
    st.tuples(st.just("put_workload"), workloads()),
    st.tuples(st.just("remove_workload"), keys.map(joined)),
    st.tuples(st.just("put_service"), services()),
    st.tuples(
        st.just("remove_service"),
        st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(["s0", "s1", "s2"])).map(joined),
    ),
    st.tuples(st.just("put_authorization_policy"), authorization_policies()),
    st.tuples(st.just("remove_authorization_policy"), st.sampled_from(["a/z", "a/m", "b/b"])),
    st.tuples(st.just("put_peer_authentication"), peer_authentications()),
    st.tuples(st.just("remove_peer_authentication"), st.sampled_from(["a/z", "b/m"])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(changes, st.booleans()), max_size=40))
def test_every_snapshot_equals_a_full_build_of_the_same_objects(
    steps: list[tuple[tuple[str, object], bool]],
) -> None:
    """Each step is a change, then (when its flag says so) a snapshot; a snapshot ends every run."""
    builder = SnapshotBuilder()
    published: list[tuple[Snapshot, Snapshot]] = []
    for version, ((operation, argument), publish) in enumerate(steps):
        if isinstance(argument, tuple):
            getattr(builder, operation)(*argument)
        else:
            getattr(builder, operation)(argument)
        if publish or version == len(steps) - 1:
            snapshot = builder.snapshot(version=version, created_at=float(version))
            expected = reference(builder, snapshot)
            assert snapshot == expected
            published.append((snapshot, expected))
    # Snapshots already handed out never change.
    for snapshot, expected in published:
        assert snapshot == expected


# Targeted cases.


def test_pod_moving_into_and_out_of_a_selector_updates_the_endpoints() -> None:
    builder = SnapshotBuilder()
    web = service("web", "10.96.0.10", (80, 8080))
    pod = workload("web-1", "10.1.0.9", labels={"app": "other"})
    builder.put_service("default/web", web)
    builder.put_workload("default/web-1", pod)
    assert builder.snapshot(version=1, created_at=0).service(at("10.96.0.10", 80)) == reference_target(
        builder
    )

    relabelled = replace(pod, labels={"app": "web"})
    builder.put_workload("default/web-1", relabelled)
    target = builder.snapshot(version=2, created_at=0).service(at("10.96.0.10", 80))
    assert target is not None
    assert target.endpoints == (Endpoint(relabelled, at("10.1.0.9", 8080)),)

    builder.put_workload("default/web-1", replace(relabelled, labels={"app": "web", "x": "y"}, ready=False))
    target = builder.snapshot(version=3, created_at=0).service(at("10.96.0.10", 80))
    assert target is not None
    assert target.endpoints == ()


def reference_target(builder: SnapshotBuilder) -> object:
    full = build_snapshot(version=0, created_at=0, workloads=builder.workloads(), services=builder.services())
    return full.service(at("10.96.0.10", 80))


def test_namespace_relabel_changes_the_workload_everywhere_it_is_published() -> None:
    builder = SnapshotBuilder()
    pod = workload("web-1", "10.1.0.9", labels={"app": "web"}, enrolled=False)
    builder.put_workload("default/web-1", pod)
    builder.put_service("default/web", service("web", "10.96.0.10", (80, 8080)))
    before = builder.snapshot(version=1, created_at=0)

    enrolled = replace(pod, enrolled=True)
    builder.put_workload("default/web-1", enrolled)
    after = builder.snapshot(version=2, created_at=0)

    assert after.workload(ip_address("10.1.0.9")) is enrolled
    assert after.workloads_on_node("node-a") == (enrolled,)
    target = after.service(at("10.96.0.10", 80))
    assert target is not None
    assert target.endpoints[0].workload is enrolled
    assert before.workloads_on_node("node-a") == (pod,)
    assert after == reference(builder, after)


def test_ip_reuse_hands_the_address_to_the_new_pod_and_back_when_it_leaves() -> None:
    builder = SnapshotBuilder()
    old = workload("old", "10.1.0.9", namespace="a", ready=True)
    new = workload("new", "10.1.0.9", namespace="b", ready=False)
    builder.put_workload("a/old", old)
    builder.put_workload("b/new", new)
    snapshot = builder.snapshot(version=1, created_at=0)
    assert snapshot.workload(ip_address("10.1.0.9")) is old
    assert snapshot.workloads_on_node("node-a") == (old,)

    builder.remove_workload("a/old")
    snapshot = builder.snapshot(version=2, created_at=0)
    assert snapshot.workload(ip_address("10.1.0.9")) is new
    assert snapshot.workloads_on_node("node-a") == (new,)

    builder.remove_workload("b/new")
    snapshot = builder.snapshot(version=3, created_at=0)
    assert snapshot.workload(ip_address("10.1.0.9")) is None
    assert snapshot.workloads_on_node("node-a") == ()


def test_deleted_service_leaves_its_addresses_to_a_service_that_shares_them() -> None:
    builder = SnapshotBuilder()
    builder.put_workload("default/web-1", workload("web-1", "10.1.0.9", labels={"app": "web"}))
    builder.put_service("default/first", service("first", "10.96.0.10", (80, 8080), selector={"app": "web"}))
    builder.put_service(
        "default/second", service("second", "10.96.0.10", (80, 9090), selector={"app": "web"})
    )
    target = builder.snapshot(version=1, created_at=0).service(at("10.96.0.10", 80))
    assert target is not None
    assert target.service.name == "second"

    builder.remove_service("default/second")
    target = builder.snapshot(version=2, created_at=0).service(at("10.96.0.10", 80))
    assert target is not None
    assert (target.service.name, target.endpoints[0].address) == ("first", at("10.1.0.9", 8080))

    builder.remove_service("default/first")
    snapshot = builder.snapshot(version=3, created_at=0)
    assert snapshot.service(at("10.96.0.10", 80)) is None
    assert len(snapshot.services_by_address) == 0


def test_an_unchanged_namespace_is_shared_with_the_previous_snapshot() -> None:
    builder = SnapshotBuilder()
    builder.put_workload("a/p", workload("p", "10.1.0.1", namespace="a", node="node-a"))
    builder.put_workload("b/q", workload("q", "10.1.0.2", namespace="b", node="node-b"))
    first = builder.snapshot(version=1, created_at=0)
    builder.put_workload("a/p", workload("p", "10.1.0.1", namespace="a", node="node-a", ready=False))
    second = builder.snapshot(version=2, created_at=0)
    assert second.workloads_on_node("node-b") is first.workloads_on_node("node-b")
    assert second.workloads_on_node("node-a") != first.workloads_on_node("node-a")


def test_sharded_map_updates_copy_and_pickle() -> None:
    empty: ShardedMap[str, int] = ShardedMap()
    one = empty.updated({"a": 1, "b": 2})
    two = one.updated({"a": REMOVED, "c": 3, "missing": REMOVED})
    assert (dict(empty), dict(one), dict(two)) == ({}, {"a": 1, "b": 2}, {"b": 2, "c": 3})
    assert (len(one), len(two), two.get("a"), two.get("a", 0), "c" in two) == (2, 2, None, 0, True)
    assert pickle.loads(pickle.dumps(two)) == two
    assert one.updated({}) is one
