"""`ambient-agent node`: settings and configuration are read and checked, then the node process runs.

Anything wrong in the flags, the environment or the configuration files stops the start with one
line naming the setting or the file and field, and exit status 2. The process runs on uvloop when it
is installed (the `speed` extra), on asyncio's own loop otherwise or when `AMBIENT_EVENT_LOOP=asyncio`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from agent.node.config import StaticConfigError, load_static_config
from agent.node.logs import configure_logging
from agent.node.process import NodeProcess
from agent.node.settings import EventLoop, NodeProcessSettings, early_settings, node_process_settings
from agent.settings import SettingsError

log = logging.getLogger(__name__)

CONFIGURATION_ERROR_EXIT = 2
"""Exit status when a setting or the configuration file is invalid (the message says which)."""


def run_node(args: argparse.Namespace) -> int:
    """Runs the node agent until SIGTERM/SIGINT or `/quitquitquit`; its exit status."""
    try:
        log_settings, static_config, ports = early_settings(args)
    except SettingsError as error:
        print(f"ambient-agent node: {error}", file=sys.stderr)
        return CONFIGURATION_ERROR_EXIT
    configure_logging(log_settings.level, log_settings.format)
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
        return await NodeProcess(settings, config).run()

    loop_factory = _loop_factory(settings.event_loop)
    log.info(
        "ambient-agent node %s starting: %s; loop %s",
        settings.node.node_name,
        _describe(settings),
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


def _describe(settings: NodeProcessSettings) -> str:
    ports = settings.node.ports
    return (
        f"outbound :{ports.outbound}, inbound plaintext :{ports.inbound_plaintext},"
        f" HBONE :{ports.inbound_hbone}, metrics :{ports.metrics}, readiness :{ports.readiness},"
        f" admin 127.0.0.1:{ports.admin}"
    )
