"""`ambient-agent node` in Kubernetes mode: the data plane, capture and identities fed by the control plane.

The control plane (`agent.operator.node_controller`) runs on a thread and event loop of its own and
hands over finished snapshots. On this, the data plane's loop, each snapshot is swapped into the data
plane, and the node's enrolled pods decide the capture rules (their addresses) and the identities the
certificate manager keeps (their service accounts). What the data-plane side has actually set up goes
back to the control plane as a `NodeState`, from which it reports enrolment on the pods.

Start-up order: the HTTP endpoints, the data plane's listeners, then the control plane. Capture is
reconciled only after the first full sync: capture rules left by a previous agent stay as they are
until this one knows which pods are enrolled (connections meanwhile are refused, never sent in
plaintext). Ready once listeners are bound, the first sync is done and the rules are installed. When
the API server is unreachable the watchers retry with backoff and everything keeps running on the last
snapshot and the certificates held. SIGTERM, SIGINT or `/quitquitquit` drain the data plane and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from aiohttp import web

from agent.identity.certificates import TrustBundle, WorkloadCertificate
from agent.identity.manager import BundleUnavailable, CertificateManager, IdentityStatus, NotHosted, NotReady
from agent.identity.spiffe import InvalidSpiffeId, SpiffeId
from agent.node.settings import (
    EventLoop,
    LogSettings,
    dataplane_settings_from_env,
    port_settings_from_env,
)
from agent.node.shared import (
    LISTENERS_BOUND,
    RULES_INSTALLED,
    await_rules,
    capture_loop,
    enrolled_here,
    redirect_dump,
    serve_until_stopped,
    start_endpoints,
)
from agent.observability.accesslog import AccessLog, AccessOutput, LogFormat
from agent.observability.metrics import AgentMetrics
from agent.observability.servers import AdminProviders, Readiness
from agent.operator.ca_settings import object_name
from agent.operator.csr_client import KubernetesCsrIssuer
from agent.operator.kubeapi import ApiAccess
from agent.operator.node_controller import AGENT_POD_LABELS, ControlPlaneSettings, NodeController
from agent.operator.rest import ApiClient
from agent.operator.status import NodeState
from agent.proxy.credentials import CredentialUnavailable
from agent.proxy.dataplane import DataPlane, DataPlaneSettings
from agent.redirect.reconciler import RedirectStatus
from agent.redirect.ruleset import PodIp
from agent.settings import (
    NodeSettings,
    SettingsError,
    float_from_env,
    redirect_settings_from_env,
)
from agent.state import MeshConfig, Snapshot

log = logging.getLogger(__name__)

FIRST_SYNC = "first-sync"
"""Readiness condition: the control plane has listed every watched kind once."""

CERTIFICATES_RECONCILER = "certificates"
"""`reconciler` label of `ambient_agent_reconcile_errors` for failed certificate requests."""

_STATE_REPORT_INTERVAL_S = 0.2
"""How often what the data-plane side has set up is compared with what the control plane last heard."""

_CONTROL_PLANE_STOP_S = 5.0
"""How long a stopping node waits for the control plane's thread to finish."""


@dataclass(frozen=True)
class KubernetesSettings:
    """Where the agent finds the API server, the CA's trust bundle, and itself."""

    kubeconfig: str | None = None
    """Kubeconfig to use; None: `$KUBECONFIG`, else the pod's service-account mount."""

    agent_namespace: str = "ambient-system"
    """The agent's namespace (downward API `POD_NAMESPACE`): where the CA publishes the trust bundle."""

    trust_bundle_configmap: str = "ambient-agent-trust-bundle"
    """The ConfigMap holding the trust bundle (the CA's `bundle_configmap`)."""

    pod_name: str = field(default_factory=socket.gethostname)
    """This agent's pod (downward API `POD_NAME`), named in its Events."""

    exclude_labels: Mapping[str, str] = field(default_factory=lambda: dict(AGENT_POD_LABELS), hash=False)
    """`matchLabels` of the agent's own pods (node agents and CA), which are never enrolled."""

    root_namespace: str = "istio-system"
    """Policies in this namespace without a selector apply to the whole mesh (Istio's root namespace)."""

    certificate_timeout_s: float = 30.0
    """How long one certificate request waits for the CA before it is retried."""

    def __post_init__(self) -> None:
        object_name("kubernetes.agent_namespace", self.agent_namespace)
        object_name("kubernetes.trust_bundle_configmap", self.trust_bundle_configmap)
        object_name("kubernetes.root_namespace", self.root_namespace)
        if not self.pod_name:
            raise SettingsError("kubernetes.pod_name: must not be empty")
        if not 0 < self.certificate_timeout_s < float("inf"):
            raise SettingsError(
                "kubernetes.certificate_timeout_s: must be a positive number of seconds,"
                f" got {self.certificate_timeout_s}"
            )


@dataclass(frozen=True)
class KubernetesNodeSettings:
    """Everything `ambient-agent node` runs with in Kubernetes mode."""

    node: NodeSettings
    """Node name, trust domain, ports and capture."""

    dataplane: DataPlaneSettings
    """The HBONE data plane (its ports and upstream mark are the node's)."""

    log: LogSettings
    """Logging."""

    kubernetes: KubernetesSettings
    """API server access, the trust bundle, the agent's own pods."""

    event_loop: EventLoop = "auto"
    """Which event loop runs the data plane: `auto` (uvloop when installed) or `asyncio`."""

    @property
    def control_plane(self) -> ControlPlaneSettings:
        """The control plane's settings, from these."""
        return ControlPlaneSettings(
            node_name=self.node.node_name,
            mesh=MeshConfig(
                trust_domain=self.node.trust_domain,
                root_namespace=self.kubernetes.root_namespace,
                hbone_port=self.node.ports.inbound_hbone,
            ),
            exclude=self.kubernetes.exclude_labels,
            instance=self.kubernetes.pod_name,
        )


def labels_from_env(env: Mapping[str, str], name: str, default: Mapping[str, str]) -> Mapping[str, str]:
    """Reads `key=value,key=value` labels, naming the variable on error."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    labels = {}
    for item in raw.split(","):
        key, equals, value = item.strip().partition("=")
        if not equals or not key:
            raise SettingsError(f"{name}: expected key=value[,key=value...], got {raw!r}")
        labels[key] = value
    return labels


def kubernetes_node_settings(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> KubernetesNodeSettings:
    """The settings of Kubernetes mode from flags over environment variables over defaults."""
    env = os.environ if env is None else env
    ports = port_settings_from_env(env)
    redirect = redirect_settings_from_env(env)
    defaults = KubernetesSettings()
    return KubernetesNodeSettings(
        node=NodeSettings(
            node_name=args.node_name or env.get("NODE_NAME") or "",
            trust_domain=env.get("AMBIENT_TRUST_DOMAIN") or "cluster.local",
            ports=ports,
            redirect=redirect,
        ),
        dataplane=dataplane_settings_from_env(env, ports=ports, upstream_mark=redirect.upstream_mark),
        log=LogSettings(
            level=(args.log_level or env.get("AMBIENT_LOG_LEVEL") or "info").lower(),
            format=cast(LogFormat, args.log_format or env.get("AMBIENT_LOG_FORMAT") or "text"),
        ),
        kubernetes=KubernetesSettings(
            kubeconfig=args.kubeconfig,
            agent_namespace=env.get("POD_NAMESPACE") or defaults.agent_namespace,
            trust_bundle_configmap=env.get("AMBIENT_TRUST_BUNDLE_CONFIGMAP")
            or defaults.trust_bundle_configmap,
            pod_name=env.get("POD_NAME") or defaults.pod_name,
            exclude_labels=labels_from_env(env, "AMBIENT_EXCLUDE_LABELS", defaults.exclude_labels),
            root_namespace=env.get("AMBIENT_ROOT_NAMESPACE") or defaults.root_namespace,
            certificate_timeout_s=float_from_env(
                env, "AMBIENT_CERTIFICATE_TIMEOUT", defaults.certificate_timeout_s
            ),
        ),
        event_loop=cast(EventLoop, env.get("AMBIENT_EVENT_LOOP") or "auto"),
    )


class ManagedCredentials:
    """The data plane's `CredentialSource` over the certificate manager."""

    def __init__(self, manager: CertificateManager) -> None:
        self._manager = manager
        self._bundle: TrustBundle | None = None

    async def credential(
        self, identity: str, timeout_s: float
    ) -> WorkloadCertificate | CredentialUnavailable:
        """The certificate of `identity`, waiting up to `timeout_s` for the bundle and the certificate."""
        try:
            spiffe_id = SpiffeId.parse(identity)
        except InvalidSpiffeId as error:
            return CredentialUnavailable(f"not a workload identity: {error}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        bundle = await self._manager.trust_bundle(timeout_s)
        if isinstance(bundle, BundleUnavailable):
            return CredentialUnavailable(bundle.reason)
        self._bundle = bundle
        certificate = await self._manager.credential(spiffe_id, max(0.0, deadline - loop.time()))
        if isinstance(certificate, NotHosted | NotReady):
            return CredentialUnavailable(certificate.reason)
        return certificate

    def trust_bundle(self) -> TrustBundle:
        """The bundle read along with the last certificate handed out (the data plane asks after one)."""
        if self._bundle is None:
            raise RuntimeError("trust_bundle() asked before any credential() succeeded")
        return self._bundle


def node_state(
    redirect: RedirectStatus, identities: Mapping[SpiffeId, IdentityStatus], now: datetime
) -> NodeState:
    """What the data-plane side has set up, for the control plane's enrolment status."""
    certified = frozenset(
        str(spiffe_id)
        for spiffe_id, status in identities.items()
        if status.not_after is not None and now < status.not_after
    )
    return NodeState(
        captured=redirect.synced_pods,
        capture_error=redirect.last_error,
        certified=certified,
        certificate_errors={
            str(spiffe_id): status.last_error
            for spiffe_id, status in identities.items()
            if str(spiffe_id) not in certified and status.failures and status.last_error
        },
    )


class KubernetesNodeProcess:
    """One `ambient-agent node` run against the Kubernetes API."""

    def __init__(
        self,
        settings: KubernetesNodeSettings,
        access: ApiAccess,
        *,
        access_output: AccessOutput | None = None,
    ) -> None:
        """`access_output`: where access lines go (default: records of the access logger)."""
        self._settings = settings
        self._access = access
        self._access_output = access_output
        self._node_name = settings.node.node_name
        self.metrics = AgentMetrics()
        self.readiness = Readiness()
        self.readiness.require(LISTENERS_BOUND, FIRST_SYNC, RULES_INSTALLED)
        self._redirect = capture_loop(settings.node.redirect, settings.node.ports, self.metrics)
        self._controller = NodeController(
            access, settings.control_plane, publish=self._snapshot_published, metrics=self.metrics
        )
        self._stop = asyncio.Event()
        self._synced = asyncio.Event()
        self._inbox: Snapshot | None = None
        self._inbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dataplane: DataPlane | None = None
        self._certificates: CertificateManager | None = None
        self._enrolled: frozenset[PodIp] | None = None

    async def run(self) -> int:
        """Runs until told to stop; the exit status (0 after a drain, 1 when a part failed)."""
        self._loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._stop.set)
        kubernetes = self._settings.kubernetes
        async with ApiClient(self._access) as api:
            issuer = KubernetesCsrIssuer(
                api,
                node_name=self._node_name,
                bundle_namespace=kubernetes.agent_namespace,
                bundle_configmap=kubernetes.trust_bundle_configmap,
            )
            async with CertificateManager(
                issuer,
                issue_timeout=kubernetes.certificate_timeout_s,
                on_expiry=self._certificate_expiry,
                on_failure=self._certificate_failed,
            ) as certificates:
                self._certificates = certificates
                return await self._serve(certificates)

    async def _serve(self, certificates: CertificateManager) -> int:
        dataplane = DataPlane(
            self._settings.dataplane,
            Snapshot(version=0, created_at=0.0),
            ManagedCredentials(certificates),
            self.metrics,
            AccessLog(self._settings.log.format, output=self._access_output),
            self._node_name,
        )
        self._dataplane = dataplane
        runners: list[web.AppRunner] = []
        control_plane_started = False
        try:
            try:
                await start_endpoints(
                    self._settings.node.ports,
                    listen_ipv6=self._settings.dataplane.listen_ipv6,
                    metrics=self.metrics,
                    readiness=self.readiness,
                    admin=AdminProviders(self.config_dump, self._request_drain),
                    runners=runners,
                )
                await dataplane.start()
            except OSError as error:  # a port in use, or no CAP_NET_ADMIN for the listeners
                log.error("cannot start: %s", error)
                return 1
            self.readiness.satisfy(LISTENERS_BOUND)
            self._controller.start()
            control_plane_started = True
            long_running = [
                asyncio.create_task(self._capture(), name="redirect-reconcile"),
                asyncio.create_task(self._report_state(certificates), name="node-state-report"),
                asyncio.create_task(self._controller.wait_finished(), name="control-plane"),
            ]
            status = await serve_until_stopped(
                long_running,
                [asyncio.create_task(self._await_rules(), name="readiness-rules")],
                stop=self._stop,
                readiness=self.readiness,
                dataplane=dataplane,
                drain_deadline_s=self._settings.dataplane.drain_deadline_s,
            )
        finally:
            if control_plane_started:
                self._controller.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._controller.wait_finished(), _CONTROL_PLANE_STOP_S)
            for runner in runners:
                await runner.cleanup()
        log.info("stopped; capture rules stay installed (run `ambient-agent cleanup` to remove them)")
        return status

    def config_dump(self) -> dict[str, object]:
        """The admin `/config_dump`: the data plane's dump plus capture and identities."""
        identities = {} if self._certificates is None else self._certificates.status()
        return {
            **({} if self._dataplane is None else self._dataplane.config_dump()),
            "source": {"kubernetes": self._access.server, "synced": self._synced.is_set()},
            "redirect": redirect_dump(self._redirect.status),
            "identities": {
                str(spiffe_id): {
                    "not_after": None if status.not_after is None else status.not_after.isoformat(),
                    "renewal_due": None if status.renewal_due is None else status.renewal_due.isoformat(),
                    "failures": status.failures,
                    "last_error": status.last_error,
                }
                for spiffe_id, status in sorted(identities.items())
            },
        }

    async def _request_drain(self) -> None:
        self._stop.set()

    # -- snapshots from the control plane's thread --------------------------------------------------

    def _snapshot_published(self, snapshot: Snapshot) -> None:
        """Called on the control plane's thread; only the newest pending snapshot is applied."""
        with self._inbox_lock:
            wake = self._inbox is None
            self._inbox = snapshot
        if wake and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the node is gone
                self._loop.call_soon_threadsafe(self._apply_snapshot)

    def _apply_snapshot(self) -> None:
        with self._inbox_lock:
            snapshot, self._inbox = self._inbox, None
        if snapshot is None or self._dataplane is None or self._certificates is None:
            return
        self._dataplane.update_snapshot(snapshot)
        addresses, identities = enrolled_here(snapshot, self._node_name)
        self._certificates.set_wanted(identities)
        self._redirect.enrol(addresses)
        if addresses != self._enrolled:
            self._enrolled = addresses
            log.info(
                "snapshot %d: %d workloads; capturing %d address(es) of enrolled pods on this node;"
                " identities: %s",
                snapshot.version,
                len({id(w) for w in snapshot.workloads_by_ip.values()}),
                len(addresses),
                ", ".join(sorted(str(identity) for identity in identities)) or "none",
            )
        if not self._synced.is_set():
            self._synced.set()
            self.readiness.satisfy(FIRST_SYNC)
            log.info("first sync done: snapshot %d", snapshot.version)

    # -- long-running tasks ------------------------------------------------------------------------

    async def _capture(self) -> None:
        # The rules a previous agent left stay untouched until this one knows the enrolled pods.
        await self._synced.wait()
        await self._redirect.run()

    async def _await_rules(self) -> None:
        await self._synced.wait()
        await await_rules(self._redirect, self.readiness)

    async def _report_state(self, certificates: CertificateManager) -> None:
        reported: NodeState | None = None
        while True:
            state = node_state(self._redirect.status, certificates.status(), datetime.now(UTC))
            if state != reported:
                self._controller.report(state)
                reported = state
            await asyncio.sleep(_STATE_REPORT_INTERVAL_S)

    # -- observers ---------------------------------------------------------------------------------

    def _certificate_expiry(self, spiffe_id: SpiffeId, not_after: datetime | None) -> None:
        if not_after is None:
            with contextlib.suppress(KeyError):  # dropped before any certificate was issued
                self.metrics.certificate_expiry.remove(str(spiffe_id))
        else:
            self.metrics.certificate_expiry.labels(str(spiffe_id)).set(not_after.timestamp())

    def _certificate_failed(self, _: SpiffeId, __: str) -> None:
        self.metrics.reconcile_errors.labels(CERTIFICATES_RECONCILER).inc()
