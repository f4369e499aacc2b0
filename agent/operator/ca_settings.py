"""Settings of `ambient-agent ca`: a frozen dataclass built once at start from flags over environment.

Each value comes from its flag, else its environment variable, else the default; invalid values raise
`SettingsError` naming the setting, so a typo in the Deployment fails at start.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.operator.ca_decision import SigningPolicy
from agent.settings import SettingsError, float_from_env

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def parse_duration(name: str, text: str) -> timedelta:
    """`90`, `90s`, `15m`, `24h` or `7d` as a duration; raises `SettingsError` naming `name`."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise SettingsError(f"{name}: not a duration (e.g. 3600, 90s, 15m, 24h, 7d): {text!r}")
    return timedelta(seconds=float(match["number"]) * _UNIT_SECONDS[match["unit"]])


def object_name(name: str, value: str) -> str:
    """`value` when it is a valid Kubernetes object name (a DNS label); else `SettingsError` naming `name`."""
    if not _DNS_LABEL.fullmatch(value):
        raise SettingsError(f"{name}: not a valid Kubernetes name: {value!r}")
    return value


@dataclass(frozen=True)
class CaSettings:
    """Everything `ambient-agent ca` needs."""

    namespace: str
    """Namespace of the CA's Secret and of the trust bundle ConfigMap (downward API `POD_NAMESPACE`)."""

    signing: SigningPolicy
    """Who may obtain certificates, in which trust domain, for how long."""

    kubeconfig: str | None = None
    """Kubeconfig to use; None: `$KUBECONFIG`, else the pod's service-account mount."""

    secret_name: str = "ambient-agent-ca"
    """Secret holding the root key and certificate (created on first start)."""

    bundle_configmap: str = "ambient-agent-trust-bundle"
    """ConfigMap in which the trust bundle (root certificates, PEM) is published for the agents."""

    event_namespace: str = "default"
    """Namespace of the Events about CSRs (cluster-scoped objects' events go to `default`, as
    client-go's recorder does, so `kubectl describe csr` shows them)."""

    bundle_check_interval: float = 60.0
    """Seconds between checks that the trust bundle ConfigMap still holds what it should."""

    instance: str = field(default_factory=socket.gethostname)
    """This replica's name in Events (`reportingInstance`): the pod name (`POD_NAME`), else the host name."""

    def __post_init__(self) -> None:
        object_name("namespace", self.namespace)
        object_name("secret_name", self.secret_name)
        object_name("bundle_configmap", self.bundle_configmap)
        object_name("event_namespace", self.event_namespace)
        if not 0 < self.bundle_check_interval < float("inf"):
            raise SettingsError(
                "bundle_check_interval: must be a positive number of seconds,"
                f" got {self.bundle_check_interval}"
            )
        if not self.instance:
            raise SettingsError("instance: must not be empty")


def ca_settings_from(
    env: Mapping[str, str] | None = None,
    *,
    namespace: str | None = None,
    trust_domain: str | None = None,
    leaf_lifetime: str | None = None,
    max_lifetime: str | None = None,
    agent_service_account: str | None = None,
    kubeconfig: str | None = None,
) -> CaSettings:
    """Builds `CaSettings` from flags (None: not given), then environment variables, then defaults."""
    env = os.environ if env is None else env
    namespace = object_name("namespace", namespace or env.get("POD_NAMESPACE") or "ambient-system")
    account = (
        agent_service_account or env.get("AMBIENT_AGENT_SERVICE_ACCOUNT") or f"{namespace}/ambient-agent"
    )
    agent_namespace, slash, agent_name = account.partition("/")
    if not slash:
        raise SettingsError(f"agent_service_account: expected <namespace>/<name>, got {account!r}")
    leaf = leaf_lifetime or env.get("AMBIENT_LEAF_LIFETIME") or "24h"
    signing = SigningPolicy(
        trust_domain=trust_domain or env.get("AMBIENT_TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN,
        agent_namespace=object_name("agent_service_account", agent_namespace),
        agent_service_account=agent_name,
        leaf_lifetime=parse_duration("leaf_lifetime", leaf),
        # Unset, the cap is the default lifetime: requests may shorten their certificates, not extend them.
        max_lifetime=parse_duration("max_lifetime", max_lifetime or env.get("AMBIENT_MAX_LIFETIME") or leaf),
    )
    return CaSettings(
        namespace=namespace,
        signing=signing,
        kubeconfig=kubeconfig,
        bundle_check_interval=float_from_env(env, "AMBIENT_BUNDLE_CHECK_INTERVAL", 60.0),
        instance=env.get("POD_NAME") or socket.gethostname(),
    )
