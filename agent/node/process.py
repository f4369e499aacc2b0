"""The node process in static-configuration mode: start-up, reload, drain and exit.

Start-up order matters for the traffic of pods already running: the observability servers first
(readiness says what is still missing), then the data plane's listeners, and only then the capture
rules, so nothing is captured before something accepts it. Ready once the listeners are bound and the
rules installed.

SIGHUP, or a change to the configuration file or any file it names, reads the configuration again;
a valid one is swapped in (snapshot, certificates, enrolled pod IPs), an invalid one is logged and
the one in use stays. SIGTERM, SIGINT or the admin `/quitquitquit` make the node not ready, drain
the data plane, and exit 0.

The capture rules are left installed on exit (ARCHITECTURE.md section 2): while the agent is down,
captured connections are refused rather than sent in plaintext, and a restarted agent takes over
its listeners seamlessly. `ambient-agent cleanup` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from agent.node.config import StaticConfig, StaticConfigError, load_static_config
from agent.node.credentials import StaticCredentials
from agent.node.settings import NodeProcessSettings
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
from agent.observability.accesslog import AccessLog, AccessOutput
from agent.observability.metrics import AgentMetrics
from agent.observability.servers import AdminProviders, Readiness
from agent.proxy.dataplane import DataPlane
from agent.redirect.ruleset import PodIp

log = logging.getLogger(__name__)

FileState = tuple[int, int, int] | None
"""(inode, size, modification time in ns) of a file, or None when it cannot be read."""


def local_pod_ips(config: StaticConfig, node_name: str) -> frozenset[PodIp]:
    """Every address of the enrolled workloads on `node_name`: what capture must cover."""
    addresses, _ = enrolled_here(config.snapshot, node_name)
    return addresses


def files_state(paths: Iterable[Path]) -> dict[Path, FileState]:
    """What a change check compares: editors replace files (new inode), tools rewrite them in place."""

    def state(path: Path) -> FileState:
        try:
            info = path.stat()
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    return {path: state(path) for path in paths}


class NodeProcess:
    """One `ambient-agent node` run on a static configuration."""

    def __init__(
        self,
        settings: NodeProcessSettings,
        config: StaticConfig,
        *,
        access_output: AccessOutput | None = None,
    ) -> None:
        """`access_output`: where access lines go (default: records of the access logger)."""
        self._settings = settings
        self._config = config
        self._node_name = settings.node.node_name
        self.metrics = AgentMetrics()
        self.readiness = Readiness()
        self.readiness.require(LISTENERS_BOUND, RULES_INSTALLED)
        self._credentials = StaticCredentials(config.trust_bundle, config.certificates)
        self._dataplane = DataPlane(
            settings.dataplane,
            config.snapshot,
            self._credentials,
            self.metrics,
            AccessLog(settings.log.format, output=access_output),
            self._node_name,
        )
        self._redirect = capture_loop(settings.node.redirect, settings.node.ports, self.metrics)
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()

    async def run(self) -> int:
        """Runs until told to stop; the exit status (0 after a drain, 1 when a part failed)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        self._announce(self._config)
        runners: list[web.AppRunner] = []
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
                await self._dataplane.start()
            except OSError as error:  # a port in use, or no CAP_NET_ADMIN for the listeners
                log.error("cannot start: %s", error)
                return 1
            self.readiness.satisfy(LISTENERS_BOUND)
            self._redirect.enrol(local_pod_ips(self._config, self._node_name))
            long_running = [
                asyncio.create_task(self._redirect.run(), name="redirect-reconcile"),
                asyncio.create_task(self._watch_config(), name="static-config-watch"),
            ]
            status = await serve_until_stopped(
                long_running,
                [asyncio.create_task(await_rules(self._redirect, self.readiness), name="readiness-rules")],
                stop=self._stop,
                readiness=self.readiness,
                dataplane=self._dataplane,
                drain_deadline_s=self._settings.dataplane.drain_deadline_s,
            )
        finally:
            for runner in runners:
                await runner.cleanup()
        log.info("stopped; capture rules stay installed (run `ambient-agent cleanup` to remove them)")
        return status

    def config_dump(self) -> dict[str, object]:
        """The admin `/config_dump`: the data plane's dump plus where its inputs came from."""
        return {
            **self._dataplane.config_dump(),
            "source": {
                "static_config": str(self._config.path),
                "files": [str(p) for p in self._config.files],
            },
            "redirect": redirect_dump(self._redirect.status),
        }

    async def _request_drain(self) -> None:
        self._stop.set()

    async def _watch_config(self) -> None:
        interval = self._settings.static_config.poll_interval_s
        seen = files_state(self._config.files)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_requested.wait(), interval)
            requested = self._reload_requested.is_set()
            self._reload_requested.clear()
            current = files_state(self._config.files)
            if requested or current != seen:
                log.info("reloading %s (%s)", self._config.path, "SIGHUP" if requested else "files changed")
                self._reload()
                current = files_state(self._config.files)
            seen = current

    def _reload(self) -> None:
        current = self._config
        try:
            config = load_static_config(
                current.path,
                version=current.snapshot.version + 1,
                now=datetime.now(UTC),
                hbone_port=self._settings.node.ports.inbound_hbone,
            )
        except StaticConfigError as error:
            self._reload_failed(str(error))
            return
        if config.snapshot.mesh.trust_domain != current.snapshot.mesh.trust_domain:
            self._reload_failed(
                f"{config.path}: trustDomain: changed from {current.snapshot.mesh.trust_domain}"
                f" to {config.snapshot.mesh.trust_domain}; restart the agent to change it"
            )
            return
        if config.node_name != current.node_name:
            self._reload_failed(
                f"{config.path}: nodeName: changed from {current.node_name} to {config.node_name};"
                " restart the agent to serve another node"
            )
            return
        self._config = config
        self._credentials.replace(config.trust_bundle, config.certificates)
        self._dataplane.update_snapshot(config.snapshot)
        self._redirect.enrol(local_pod_ips(config, self._node_name))
        self._announce(config)

    def _reload_failed(self, reason: str) -> None:
        self.metrics.reconcile_errors.labels("static-config").inc()
        log.error("configuration not reloaded, the one in use stays: %s", reason)

    def _announce(self, config: StaticConfig) -> None:
        snapshot = config.snapshot
        local = snapshot.workloads_on_node(self._node_name)
        log.info(
            "configuration version %d from %s: %d workloads (%d on this node, %d enrolled), %d service ports,"
            " %d certificates",
            snapshot.version,
            config.path,
            len({id(w) for w in snapshot.workloads_by_ip.values()}),
            len(local),
            sum(w.enrolled for w in local),
            len(snapshot.services_by_address),
            len(config.certificates),
        )
        for identity in config.missing_certificates(self._node_name):
            log.warning("no certificate for %s: connections to and from its local pods will fail", identity)
