"""The agent's settings: grouped frozen dataclasses built once at start from flags and environment.

Every field carries a docstring. Invalid values fail at start with a `SettingsError` that names the
setting, so a typo in a DaemonSet's env never turns into a half-working node.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the setting and the value."""


def _port(name: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}: port must be 1-65535, got {value}")
    return value


@dataclass(frozen=True)
class PortSettings:
    """The agent's listening ports (the same numbers as Istio's ztunnel, on purpose)."""

    outbound: int = 15001
    """Outbound capture: connections from enrolled local pods, redirected by TPROXY."""

    inbound_plaintext: int = 15006
    """Inbound capture of plaintext connections from non-mesh clients to enrolled local pods."""

    inbound_hbone: int = 15008
    """Inbound HBONE: mutual-TLS HTTP/2 CONNECT tunnels from other agents."""

    admin: int = 15000
    """Admin endpoint (config dump, connections, logging); bound to loopback only."""

    metrics: int = 15020
    """Prometheus `/metrics`."""

    readiness: int = 15021
    """Readiness probe `/healthz/ready`."""

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _port(f"ports.{f.name}", value)
            if value in seen:
                raise SettingsError(f"ports.{f.name}: {value} is already used by ports.{seen[value]}")
            seen[value] = f.name


@dataclass(frozen=True)
class RedirectSettings:
    """How the node's traffic is captured: the agent's nftables table and its policy routing."""

    table_name: str = "ambient_agent"
    """Name of the agent's own `inet` nftables table; nothing outside it is ever touched."""

    capture_mark: int = 0x111
    """Packet mark set on captured packets; the ip rule routes marked packets to the local table."""

    capture_mask: int = 0xFFF
    """Mask applied when matching `capture_mark` in the ip rule."""

    upstream_mark: int = 0x539
    """`SO_MARK` of the agent's own upstream sockets, so they are never captured again."""

    route_table: int = 100
    """Policy-routing table holding `local 0.0.0.0/0 dev lo` (and `::/0` for IPv6)."""

    rule_priority: int = 32000
    """Priority of the agent's `ip rule`; below `main` (32766) so captured packets are local."""

    drift_check_interval: float = 5.0
    """Seconds between full comparisons of the installed table, rules, routes and sysctls with the
    desired state; whatever was deleted or changed behind the agent's back is restored within this."""

    retry_initial_delay: float = 0.5
    """Seconds before the first retry of a failed reconcile; each further failure doubles the delay."""

    retry_max_delay: float = 30.0
    """Upper bound of the retry delay, so a node whose kernel state keeps failing is retried steadily."""

    def __post_init__(self) -> None:
        if not self.table_name.replace("_", "").isalnum() or not self.table_name[:1].isalpha():
            raise SettingsError(
                f"redirect.table_name: must start with a letter and hold only letters, digits, '_';"
                f" got {self.table_name!r}"
            )
        for name in ("capture_mark", "capture_mask", "upstream_mark"):
            value = getattr(self, name)
            if not 0 < value <= 0xFFFFFFFF:
                raise SettingsError(f"redirect.{name}: must be a 32-bit non-zero mark, got {value:#x}")
        if self.capture_mark & ~self.capture_mask:
            raise SettingsError(
                f"redirect.capture_mark: {self.capture_mark:#x} has bits outside capture_mask"
                f" {self.capture_mask:#x}"
            )
        if self.upstream_mark & self.capture_mask == self.capture_mark:
            raise SettingsError("redirect.upstream_mark: must not match capture_mark under capture_mask")
        if not 1 <= self.route_table <= 0xFFFFFFFF or self.route_table in (253, 254, 255):
            raise SettingsError(
                f"redirect.route_table: must be a table number other than default/main/local,"
                f" got {self.route_table}"
            )
        if not 1 <= self.rule_priority < 32766:
            raise SettingsError(f"redirect.rule_priority: must be 1-32765, got {self.rule_priority}")
        for name in ("drift_check_interval", "retry_initial_delay", "retry_max_delay"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise SettingsError(f"redirect.{name}: must be a positive number of seconds, got {value}")
        if self.retry_initial_delay > self.retry_max_delay:
            raise SettingsError(
                f"redirect.retry_initial_delay: {self.retry_initial_delay} exceeds retry_max_delay"
                f" {self.retry_max_delay}"
            )


@dataclass(frozen=True)
class NodeSettings:
    """Everything `ambient-agent node` needs, grouped by concern."""

    node_name: str
    """The Kubernetes node this agent serves (downward API `spec.nodeName`)."""

    trust_domain: str = "cluster.local"
    """SPIFFE trust domain of workload identities."""

    ports: PortSettings = field(default_factory=PortSettings)
    """Listening ports."""

    redirect: RedirectSettings = field(default_factory=RedirectSettings)
    """Traffic capture."""

    def __post_init__(self) -> None:
        if not self.node_name:
            raise SettingsError("node_name: required (flag --node-name or env NODE_NAME)")
        if not self.trust_domain or "/" in self.trust_domain:
            raise SettingsError(f"trust_domain: not a valid SPIFFE trust domain: {self.trust_domain!r}")


def int_from_env(env: Mapping[str, str], name: str, default: int) -> int:
    """Reads an integer setting (decimal or 0x-hex) from `env`, naming the variable on error."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw, 0)
    except ValueError:
        raise SettingsError(f"{name}: not an integer: {raw!r}") from None


def float_from_env(env: Mapping[str, str], name: str, default: float) -> float:
    """Reads a number setting (e.g. seconds) from `env`, naming the variable on error."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}: not a number: {raw!r}") from None


def redirect_settings_from_env(env: Mapping[str, str] | None = None) -> RedirectSettings:
    """Builds `RedirectSettings` from `AMBIENT_*` environment variables over the defaults."""
    env = os.environ if env is None else env
    d = RedirectSettings()
    return RedirectSettings(
        table_name=env.get("AMBIENT_NFT_TABLE", d.table_name),
        capture_mark=int_from_env(env, "AMBIENT_CAPTURE_MARK", d.capture_mark),
        capture_mask=int_from_env(env, "AMBIENT_CAPTURE_MASK", d.capture_mask),
        upstream_mark=int_from_env(env, "AMBIENT_UPSTREAM_MARK", d.upstream_mark),
        route_table=int_from_env(env, "AMBIENT_ROUTE_TABLE", d.route_table),
        rule_priority=int_from_env(env, "AMBIENT_RULE_PRIORITY", d.rule_priority),
        drift_check_interval=float_from_env(env, "AMBIENT_DRIFT_CHECK_INTERVAL", d.drift_check_interval),
        retry_initial_delay=float_from_env(env, "AMBIENT_RETRY_INITIAL_DELAY", d.retry_initial_delay),
        retry_max_delay=float_from_env(env, "AMBIENT_RETRY_MAX_DELAY", d.retry_max_delay),
    )
