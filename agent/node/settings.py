"""Settings of the `ambient-agent node` process, built once at start from flags and environment.

Flags win over environment variables, which win over the defaults; the node name may also come from
the static configuration file (`nodeName`), last. Every value is checked here, so a typo fails at
start with a `SettingsError` naming the flag or variable, never half-way through a node's life. The
variables are listed in docs/static-config.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

from agent.hbone.config import hbone_settings_from_env
from agent.observability.accesslog import LogFormat
from agent.proxy.config import DataPlaneSettings
from agent.settings import (
    NodeSettings,
    PortSettings,
    SettingsError,
    float_from_env,
    int_from_env,
    redirect_settings_from_env,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
"""Accepted values of `--log-level`."""

EventLoop = Literal["auto", "asyncio"]
"""`auto`: uvloop when installed, else asyncio's own loop; `asyncio`: always asyncio's own loop."""


@dataclass(frozen=True)
class LogSettings:
    """What the process logs and how."""

    level: str = "info"
    """Application log level: debug, info, warning or error. The access log is written at every level."""

    format: LogFormat = "text"
    """`text` (one `key=value` line per event) or `json` (one object per line, for log collectors)."""

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise SettingsError(f"log.level: expected one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        if self.format not in get_args(LogFormat):
            raise SettingsError(f"log.format: expected text or json, got {self.format!r}")

    @property
    def logging_level(self) -> int:
        """The `logging` module's number for `level`."""
        return logging.getLevelNamesMapping()[self.level.upper()]


@dataclass(frozen=True)
class StaticConfigSettings:
    """Where the static configuration comes from and how changes to it are noticed."""

    path: Path
    """The static configuration file (YAML or JSON)."""

    poll_interval_s: float = 2.0
    """Seconds between checks of the file and the certificate files it names for changes; a change is
    applied like SIGHUP: read again, and swapped in if valid."""

    def __post_init__(self) -> None:
        if not 0 < self.poll_interval_s < float("inf"):
            raise SettingsError(
                "static_config.poll_interval_s: must be a positive number of seconds,"
                f" got {self.poll_interval_s}"
            )


@dataclass(frozen=True)
class NodeProcessSettings:
    """Everything `ambient-agent node` runs with."""

    node: NodeSettings
    """Node name, trust domain, ports and capture."""

    dataplane: DataPlaneSettings
    """The HBONE data plane (its ports and upstream mark are the node's)."""

    log: LogSettings
    """Logging."""

    static_config: StaticConfigSettings
    """The static configuration file."""

    event_loop: EventLoop = "auto"
    """Which event loop runs the process: `auto` (uvloop when installed) or `asyncio` (to rule the loop
    out when debugging, or to compare the two)."""

    def __post_init__(self) -> None:
        if self.event_loop not in get_args(EventLoop):
            raise SettingsError(f"event_loop: expected auto or asyncio, got {self.event_loop!r}")


def bool_from_env(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Reads a yes/no setting (`true`/`false`, `1`/`0`, `yes`/`no`), naming the variable on error."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def port_settings_from_env(env: Mapping[str, str]) -> PortSettings:
    """`PortSettings` from `AMBIENT_PORT_*` variables over the defaults."""
    d = PortSettings()
    return PortSettings(
        outbound=int_from_env(env, "AMBIENT_PORT_OUTBOUND", d.outbound),
        inbound_plaintext=int_from_env(env, "AMBIENT_PORT_INBOUND_PLAINTEXT", d.inbound_plaintext),
        inbound_hbone=int_from_env(env, "AMBIENT_PORT_INBOUND_HBONE", d.inbound_hbone),
        admin=int_from_env(env, "AMBIENT_PORT_ADMIN", d.admin),
        metrics=int_from_env(env, "AMBIENT_PORT_METRICS", d.metrics),
        readiness=int_from_env(env, "AMBIENT_PORT_READINESS", d.readiness),
    )


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ambient-agent node`; each falls back to its environment variable."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the static configuration file (env AMBIENT_CONFIG); see docs/static-config.md."
        " Without one the agent runs in Kubernetes mode",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="Kubernetes mode: the kubeconfig (default: $KUBECONFIG, else the pod's service account)",
    )
    parser.add_argument(
        "--node-name",
        metavar="NAME",
        help="the node this agent serves (env NODE_NAME; else the file's nodeName)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="env AMBIENT_LOG_LEVEL (default info)")
    parser.add_argument(
        "--log-format", choices=get_args(LogFormat), help="env AMBIENT_LOG_FORMAT (default text)"
    )
    parser.add_argument(
        "--config-poll-interval",
        type=float,
        metavar="SECONDS",
        help="how often to check the configuration files for changes"
        " (env AMBIENT_CONFIG_POLL_INTERVAL, default 2)",
    )


def early_settings(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> tuple[LogSettings, StaticConfigSettings, PortSettings]:
    """What is needed before the configuration file is read: logging, the file, and the ports."""
    env = os.environ if env is None else env
    config = args.config or env.get("AMBIENT_CONFIG")
    if not config:
        raise SettingsError("static_config.path: required (flag --config or env AMBIENT_CONFIG)")
    log = LogSettings(
        level=(args.log_level or env.get("AMBIENT_LOG_LEVEL") or "info").lower(),
        format=cast(LogFormat, args.log_format or env.get("AMBIENT_LOG_FORMAT") or "text"),
    )
    poll_interval = args.config_poll_interval
    static_config = StaticConfigSettings(
        path=Path(config),
        poll_interval_s=(
            float_from_env(env, "AMBIENT_CONFIG_POLL_INTERVAL", StaticConfigSettings.poll_interval_s)
            if poll_interval is None
            else poll_interval
        ),
    )
    return log, static_config, port_settings_from_env(env)


def node_process_settings(
    args: argparse.Namespace,
    *,
    log: LogSettings,
    static_config: StaticConfigSettings,
    ports: PortSettings,
    file_node_name: str | None,
    trust_domain: str,
    env: Mapping[str, str] | None = None,
) -> NodeProcessSettings:
    """The complete settings, once the configuration file has given its node name and trust domain."""
    env = os.environ if env is None else env
    redirect = redirect_settings_from_env(env)
    node = NodeSettings(
        node_name=args.node_name or env.get("NODE_NAME") or file_node_name or "",
        trust_domain=trust_domain,
        ports=ports,
        redirect=redirect,
    )
    return NodeProcessSettings(
        node=node,
        dataplane=dataplane_settings_from_env(env, ports=ports, upstream_mark=redirect.upstream_mark),
        log=log,
        static_config=static_config,
        event_loop=cast(EventLoop, env.get("AMBIENT_EVENT_LOOP") or "auto"),
    )


def dataplane_settings_from_env(
    env: Mapping[str, str], *, ports: PortSettings, upstream_mark: int
) -> DataPlaneSettings:
    """`DataPlaneSettings` from `AMBIENT_*` variables over the defaults, for the given ports and mark."""
    d = DataPlaneSettings(ports=ports, upstream_mark=upstream_mark, hbone=hbone_settings_from_env(env))
    return DataPlaneSettings(
        ports=ports,
        upstream_mark=upstream_mark,
        hbone=d.hbone,
        listen_ipv6=bool_from_env(env, "AMBIENT_LISTEN_IPV6", d.listen_ipv6),
        connect_timeout_s=float_from_env(env, "AMBIENT_CONNECT_TIMEOUT", d.connect_timeout_s),
        credential_wait_s=float_from_env(env, "AMBIENT_CREDENTIAL_WAIT", d.credential_wait_s),
        pool_idle_timeout_s=float_from_env(env, "AMBIENT_POOL_IDLE_TIMEOUT", d.pool_idle_timeout_s),
        keepalive_interval_s=float_from_env(env, "AMBIENT_KEEPALIVE_INTERVAL", d.keepalive_interval_s),
        drain_deadline_s=float_from_env(env, "AMBIENT_DRAIN_DEADLINE", d.drain_deadline_s),
    )
