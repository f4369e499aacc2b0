"""Settings validate at construction and name the offending setting."""

from __future__ import annotations

import pytest

from agent.settings import (
    NodeSettings,
    PortSettings,
    RedirectSettings,
    SettingsError,
    redirect_settings_from_env,
)


def test_defaults_match_ztunnel_ports() -> None:
    ports = PortSettings()
    assert (ports.outbound, ports.inbound_plaintext, ports.inbound_hbone) == (15001, 15006, 15008)
    assert (ports.admin, ports.metrics, ports.readiness) == (15000, 15020, 15021)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"outbound": 0}, "ports.outbound"),
        ({"metrics": 70000}, "ports.metrics"),
        ({"readiness": 15001}, "ports.readiness"),
    ],
)
def test_bad_ports_are_named(kwargs: dict[str, int], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        PortSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"table_name": "bad name"}, "redirect.table_name"),
        ({"table_name": "1abc"}, "redirect.table_name"),
        ({"capture_mark": 0}, "redirect.capture_mark"),
        ({"capture_mark": 0x1111}, "redirect.capture_mark"),
        ({"upstream_mark": 0x111}, "redirect.upstream_mark"),
        ({"route_table": 254}, "redirect.route_table"),
        ({"rule_priority": 32766}, "redirect.rule_priority"),
        ({"drift_check_interval": 0.0}, "redirect.drift_check_interval"),
        ({"drift_check_interval": float("nan")}, "redirect.drift_check_interval"),
        ({"retry_initial_delay": -1.0}, "redirect.retry_initial_delay"),
        ({"retry_max_delay": float("inf")}, "redirect.retry_max_delay"),
        ({"retry_initial_delay": 5.0, "retry_max_delay": 1.0}, "redirect.retry_initial_delay"),
    ],
)
def test_bad_redirect_settings_are_named(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        RedirectSettings(**kwargs)  # type: ignore[arg-type]


def test_redirect_settings_from_env_reads_hex_and_decimal() -> None:
    settings = redirect_settings_from_env({"AMBIENT_CAPTURE_MARK": "0x222", "AMBIENT_ROUTE_TABLE": "101"})
    assert settings.capture_mark == 0x222
    assert settings.route_table == 101
    assert settings.table_name == RedirectSettings().table_name


def test_redirect_settings_from_env_reads_seconds() -> None:
    settings = redirect_settings_from_env(
        {
            "AMBIENT_DRIFT_CHECK_INTERVAL": "1.5",
            "AMBIENT_RETRY_INITIAL_DELAY": "0.1",
            "AMBIENT_RETRY_MAX_DELAY": "2",
        }
    )
    assert (settings.drift_check_interval, settings.retry_initial_delay, settings.retry_max_delay) == (
        1.5,
        0.1,
        2.0,
    )


def test_redirect_settings_from_env_names_bad_number() -> None:
    with pytest.raises(SettingsError, match="AMBIENT_DRIFT_CHECK_INTERVAL"):
        redirect_settings_from_env({"AMBIENT_DRIFT_CHECK_INTERVAL": "soon"})


def test_redirect_settings_from_env_names_bad_integer() -> None:
    with pytest.raises(SettingsError, match="AMBIENT_ROUTE_TABLE"):
        redirect_settings_from_env({"AMBIENT_ROUTE_TABLE": "one hundred"})


def test_node_settings_need_a_node_name() -> None:
    with pytest.raises(SettingsError, match="node_name"):
        NodeSettings(node_name="")
