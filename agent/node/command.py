"""`ambient-agent node`: settings and configuration are read and checked, then the node process runs.

With a static configuration file (`--config` or `AMBIENT_CONFIG`) the node runs on it alone
(`agent.node.process`); without one it runs in Kubernetes mode (`agent.node.kube`), with API access
from `--kubeconfig`, `$KUBECONFIG` or the pod's service-account mount.

Anything wrong in the flags, the environment or the configuration files stops the start with one
line naming the setting or the file and field, and exit status 2. The process runs on uvloop when it
is installed (the `speed` extra), on asyncio's own loop otherwise or when `AMBIENT_EVENT_LOOP=asyncio`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from agent.node.config import StaticConfigError, load_static_config
from agent.node.logs import configure_logging
from agent.node.process import NodeProcess
from agent.node.settings import EventLoop, early_settings, node_process_settings
from agent.settings import PortSettings, SettingsError

log = logging.getLogger(__name__)

CONFIGURATION_ERROR_EXIT = 2
"""Exit status when a setting or the configuration file is invalid (the message says which)."""


def run_node(args: argparse.Namespace) -> int:
    """Runs the node agent until SIGTERM/SIGINT or `/quitquitquit`; its exit status."""
    if not (args.config or os.environ.get("AMBIENT_CONFIG")):
        return _run_kubernetes_node(args)
    try:
        log_settings, static_config, ports = early_settings(args)
    except SettingsError as error:
        print(f"ambient-agent node: {error}", file=sys.stderr)
        return CONFIGURATION_ERROR_EXIT
    access_output = configure_logging(log_settings.level, log_settings.format)
    try:
        config = load_static_config(
            static_config.path, version=1, now=datetime.now(UTC), hbone_port=ports.inbound_hbone
        )
        settings = node_process_settings(
            args,
            log=log_settings,
            static_config=static_config,
            ports=ports,
            file_node_name=config.node_name,
            trust_domain=config.snapshot.mesh.trust_domain,
        )
    except (SettingsError, StaticConfigError) as error:
        log.error("not started: %s", error)
        return CONFIGURATION_ERROR_EXIT

    async def node() -> int:
        return await NodeProcess(settings, config, access_output=access_output).run()

    loop_factory = _loop_factory(settings.event_loop)
    log.info(
        "ambient-agent node %s starting: %s; loop %s",
        settings.node.node_name,
        _describe(settings.node.ports),
        "asyncio" if loop_factory is None else "uvloop",
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(node())


def _loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when `choice` allows it and it is installed; None: asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return loop_factory


def _run_kubernetes_node(args: argparse.Namespace) -> int:
    # Imported here: static mode runs without kopf and the Kubernetes clients.
    from agent.node.kube import KubernetesNodeProcess, kubernetes_node_settings
    from agent.operator.kubeapi import ApiAccessError, load_api_access

    try:
        settings = kubernetes_node_settings(args)
    except SettingsError as error:
        print(f"ambient-agent node: {error}", file=sys.stderr)
        return CONFIGURATION_ERROR_EXIT
    access_output = configure_logging(settings.log.level, settings.log.format)
    try:
        access = load_api_access(settings.kubernetes.kubeconfig)
    except ApiAccessError as error:
        log.error("not started: %s", error)
        return CONFIGURATION_ERROR_EXIT

    async def node() -> int:
        return await KubernetesNodeProcess(settings, access, access_output=access_output).run()

    loop_factory = _loop_factory(settings.event_loop)
    log.info(
        "ambient-agent node %s starting in Kubernetes mode (API server %s): %s; loop %s",
        settings.node.node_name,
        access.server,
        _describe(settings.node.ports),
        "asyncio" if loop_factory is None else "uvloop",
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(node())


def _describe(ports: PortSettings) -> str:
    return (
        f"outbound :{ports.outbound}, inbound plaintext :{ports.inbound_plaintext},"
        f" HBONE :{ports.inbound_hbone}, metrics :{ports.metrics}, readiness :{ports.readiness},"
        f" admin 127.0.0.1:{ports.admin}"
    )
