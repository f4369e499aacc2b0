"""Istio-compatible TCP metrics, and the agent's own gauges, on a private Prometheus registry.

Users bring Istio's dashboards and alerts, so names and labels are Istio's exactly
(`istio_tcp_connections_opened_total`, ... with the standard label set; "unknown" where a value is
missing). The byte pump must not pay a Prometheus call per chunk: a live connection keeps plain
integer byte counts (`TrackedConnection.sent` / `.received`), and the collector adds the live counts
to the folded totals of closed connections at scrape time. Counters therefore move while a long
connection is open, stay monotonic when it closes, and cost nothing between scrapes.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__

UNKNOWN = "unknown"

Reporter = Literal["source", "destination"]
SecurityPolicy = Literal["mutual_tls", "unknown"]


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """What the metrics know of one side of a connection; empty strings become "unknown"."""

    workload: str = ""
    """Workload name (the owning Deployment's name when known, else the pod's)."""

    namespace: str = ""
    """Namespace of the workload."""

    principal: str = ""
    """SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/sleep`."""

    app: str = ""
    """The pod's `app` (or `app.kubernetes.io/name`) label."""

    version: str = ""
    """The pod's `version` (or `app.kubernetes.io/version`) label."""

    canonical_service: str = ""
    """`service.istio.io/canonical-name`, else the app, else the workload name."""

    canonical_revision: str = ""
    """`service.istio.io/canonical-revision`, else the version, else "latest"."""

    cluster: str = ""
    """Cluster ID of the workload."""


@dataclass(frozen=True, slots=True)
class ServiceLabels:
    """The Service a connection was addressed to, if it was addressed to one."""

    host: str = ""
    """`name.namespace.svc.<domain>`."""

    name: str = ""
    """Service name."""

    namespace: str = ""
    """Service namespace."""


@dataclass(frozen=True, slots=True)
class TcpLabels:
    """The complete Istio label set of one connection, as one hashable key."""

    reporter: Reporter
    """Which agent reports: the source's node or the destination's."""

    source: PeerLabels
    """The connecting side."""

    destination: PeerLabels
    """The accepting side."""

    service: ServiceLabels = field(default_factory=ServiceLabels)
    """The addressed Service, if any."""

    security_policy: SecurityPolicy = "unknown"
    """`mutual_tls` when the connection was carried in HBONE, else `unknown`."""

    response_flags: str = "-"
    """Envoy-style response flags: "-" for none; e.g. `UF` upstream failure, `UH` no healthy upstream."""

    _hash: int = field(init=False, repr=False, compare=False)
    """The hash, computed once: a connection's labels key several counters, and the generated
    hash of a nested dataclass rebuilds and hashes every field's tuple on each lookup."""

    def __post_init__(self) -> None:
        key = (
            self.reporter,
            self.source,
            self.destination,
            self.service,
            self.security_policy,
            self.response_flags,
        )
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def values(self) -> tuple[str, ...]:
        """Label values in the order of `LABEL_NAMES`."""
        return (
            self.reporter,
            *_peer_values(self.source),
            *_peer_values(self.destination),
            _known(self.service.host),
            _known(self.service.name),
            _known(self.service.namespace),
            "tcp",
            self.response_flags or "-",
            self.security_policy,
        )


def _known(value: str) -> str:
    return value or UNKNOWN


def _peer_values(peer: PeerLabels) -> tuple[str, ...]:
    canonical_service = peer.canonical_service or peer.app or peer.workload
    canonical_revision = peer.canonical_revision or peer.version or "latest"
    return (
        _known(peer.workload),
        _known(peer.namespace),
        _known(peer.principal),
        _known(peer.app),
        _known(peer.version),
        _known(canonical_service),
        canonical_revision,
        _known(peer.cluster),
    )


_PEER_FIELDS = (
    "workload",
    "workload_namespace",
    "principal",
    "app",
    "version",
    "canonical_service",
    "canonical_revision",
    "cluster",
)
LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    *(f"source_{name}" for name in _PEER_FIELDS),
    *(f"destination_{name}" for name in _PEER_FIELDS),
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
"""Istio's standard TCP metric labels, in the order `TcpLabels.values()` yields them."""


@dataclass(slots=True, eq=False)
class TrackedConnection:
    """One live connection's labels and byte counts; the pump adds to `sent`/`received` directly."""

    labels: TcpLabels
    """The connection's metric labels."""

    id: int
    """Process-unique connection number (for the admin connection table)."""

    started: float = field(default_factory=time.monotonic)
    """`time.monotonic()` when it opened."""

    sent: int = 0
    """Bytes sent towards the destination so far (Istio: sent by the source)."""

    received: int = 0
    """Bytes received from the destination so far."""


class TcpMetrics(Collector):
    """The `istio_tcp_*` counters, fed by `opened` / `closed` and live byte counts."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._live: dict[int, TrackedConnection] = {}
        self._opened: defaultdict[TcpLabels, int] = defaultdict(int)
        self._closed: defaultdict[TcpLabels, int] = defaultdict(int)
        self._failed: defaultdict[TcpLabels, int] = defaultdict(int)
        self._sent: defaultdict[TcpLabels, int] = defaultdict(int)
        self._received: defaultdict[TcpLabels, int] = defaultdict(int)
        self._opened_keys: dict[TcpLabels, TcpLabels] = {}

    def opened(self, labels: TcpLabels) -> TrackedConnection:
        """Counts a new connection and returns the handle the pump updates."""
        labels = self._interned(labels)
        connection = TrackedConnection(labels, next(self._ids))
        self._live[connection.id] = connection
        self._opened[labels] += 1
        return connection

    def failed(self, labels: TcpLabels) -> None:
        """Counts a connection that could not be established (denied, refused, no route)."""
        self._failed[labels] += 1

    def _interned(self, labels: TcpLabels) -> TcpLabels:
        """The one instance of each label set that has counted something.

        A connection's labels key five counters. An equal but distinct instance costs a full
        comparison (its nested label dataclasses rebuilt as tuples, field by field) on every one of
        those lookups; the interned one is found by identity. Label sets never leave the counters,
        so this keeps no more than the counters do.
        """
        return self._opened_keys.setdefault(labels, labels)

    def closed(self, connection: TrackedConnection) -> None:
        """Folds a finished connection's bytes into the totals; idempotent per connection."""
        if self._live.pop(connection.id, None) is None:
            return
        self._closed[connection.labels] += 1
        self._sent[connection.labels] += connection.sent
        self._received[connection.labels] += connection.received

    def live(self) -> list[TrackedConnection]:
        """The open connections, oldest first."""
        return list(self._live.values())

    def collect(self) -> Iterator[Metric]:
        sent, received = defaultdict(int, self._sent), defaultdict(int, self._received)
        for connection in self._live.values():
            sent[connection.labels] += connection.sent
            received[connection.labels] += connection.received
        yield _counter("istio_tcp_connections_opened", "TCP connections opened.", self._opened)
        yield _counter("istio_tcp_connections_closed", "TCP connections closed.", self._closed)
        yield _counter("istio_tcp_connections_failed", "TCP connections that failed to open.", self._failed)
        yield _counter("istio_tcp_sent_bytes", "Bytes sent from source to destination.", sent)
        yield _counter("istio_tcp_received_bytes", "Bytes sent from destination to source.", received)
        open_sockets = GaugeMetricFamily(
            "istio_open_sockets", "TCP connections open now.", labels=list(LABEL_NAMES)
        )
        live_counts: defaultdict[TcpLabels, int] = defaultdict(int)
        for connection in self._live.values():
            live_counts[connection.labels] += 1
        for labels, count in live_counts.items():
            open_sockets.add_metric(labels.values(), count)
        yield open_sockets


def _counter(name: str, documentation: str, samples: dict[TcpLabels, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=list(LABEL_NAMES))
    for labels, value in samples.items():
        family.add_metric(labels.values(), value)
    return family


class AgentMetrics:
    """Every metric the agent exposes on `/metrics`, on one registry owned by this object."""

    def __init__(self, component: str = "ambient-agent") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tcp = TcpMetrics()
        self.registry.register(self.tcp)
        self.build = Gauge("istio_build", "Build information.", ["component", "tag"], registry=self.registry)
        self.build.labels(component, __version__).set(1)
        self.certificate_expiry = Gauge(
            "ambient_agent_certificate_expiry_timestamp_seconds",
            "Not-after time of the certificate in use per workload identity (Unix seconds).",
            ["identity"],
            registry=self.registry,
        )
        self.snapshot_timestamp = Gauge(
            "ambient_agent_snapshot_timestamp_seconds",
            "When the routing snapshot in use was built (Unix seconds); age = now - this.",
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "ambient_agent_reconcile_errors",
            "Failed reconcile attempts per reconciler"
            " (redirection, certificates, enrolment-status, static-config).",
            ["reconciler"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text exposition format served on `/metrics`."""
        return generate_latest(self.registry)
