"""`ambient-agent ca` settings: flags over environment over defaults, and invalid values named."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.operator.ca_settings import ca_settings_from, parse_duration
from agent.settings import SettingsError


@pytest.mark.parametrize(
    ("text", "duration"),
    [
        ("3600", timedelta(hours=1)),
        ("90s", timedelta(seconds=90)),
        ("1.5s", timedelta(seconds=1.5)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
    ],
)
def test_durations_read_with_units(text: str, duration: timedelta) -> None:
    assert parse_duration("leaf_lifetime", text) == duration


@pytest.mark.parametrize("text", ["", "h", "-5s", "5 hours", "1e3"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(SettingsError, match=r"^leaf_lifetime: not a duration"):
        parse_duration("leaf_lifetime", text)


def test_defaults() -> None:
    settings = ca_settings_from({})
    assert settings.namespace == "ambient-system"
    assert settings.secret_name == "ambient-agent-ca"
    assert settings.bundle_configmap == "ambient-agent-trust-bundle"
    assert settings.signing.trust_domain == "cluster.local"
    assert settings.signing.agent_username == "system:serviceaccount:ambient-system:ambient-agent"
    assert settings.signing.leaf_lifetime == settings.signing.max_lifetime == timedelta(hours=24)
    assert settings.kubeconfig is None
    assert settings.instance


def test_environment_fills_what_flags_leave_out() -> None:
    env = {
        "POD_NAMESPACE": "mesh",
        "POD_NAME": "ca-7d9f",
        "AMBIENT_TRUST_DOMAIN": "example.org",
        "AMBIENT_LEAF_LIFETIME": "1h",
        "AMBIENT_MAX_LIFETIME": "12h",
        "AMBIENT_AGENT_SERVICE_ACCOUNT": "mesh/node-agent",
    }
    settings = ca_settings_from(env, leaf_lifetime="30m", kubeconfig="/etc/kubeconfig")
    assert settings.namespace == "mesh"
    assert settings.instance == "ca-7d9f"
    assert settings.signing.trust_domain == "example.org"
    assert settings.signing.leaf_lifetime == timedelta(minutes=30)
    assert settings.signing.max_lifetime == timedelta(hours=12)
    assert settings.signing.agent_username == "system:serviceaccount:mesh:node-agent"
    assert settings.kubeconfig == "/etc/kubeconfig"


def test_agent_service_account_defaults_to_the_cas_namespace() -> None:
    assert ca_settings_from({}, namespace="mesh").signing.agent_namespace == "mesh"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"agent_service_account": "ambient-agent"}, "agent_service_account: expected <namespace>/<name>"),
        ({"agent_service_account": "Bad_NS/agent"}, "agent_service_account: not a valid Kubernetes name"),
        ({"namespace": "Ambient"}, "namespace: not a valid Kubernetes name"),
        ({"trust_domain": "Cluster.Local"}, "trust_domain: trust domain 'Cluster.Local' may hold only"),
        ({"leaf_lifetime": "2d", "max_lifetime": "1d"}, "max_lifetime: 1 day, 0:00:00 is shorter than"),
    ],
)
def test_invalid_values_are_refused_naming_the_setting(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match="^" + message):
        ca_settings_from({}, **flags)


def test_invalid_environment_number_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^AMBIENT_BUNDLE_CHECK_INTERVAL: not a number"):
        ca_settings_from({"AMBIENT_BUNDLE_CHECK_INTERVAL": "soon"})
