"""Node settings come from flags over environment over defaults, and bad values fail naming the setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.node.settings import (
    NodeProcessSettings,
    add_node_arguments,
    early_settings,
    node_process_settings,
)
from agent.settings import SettingsError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_with_only_the_configuration_file() -> None:
    log, static_config, ports = early_settings(parse("--config", "mesh.yaml"), {})
    assert (log.level, log.format) == ("info", "text")
    assert (static_config.path, static_config.poll_interval_s) == (Path("mesh.yaml"), 2.0)
    assert (ports.outbound, ports.inbound_plaintext, ports.inbound_hbone) == (15001, 15006, 15008)


def test_flags_win_over_the_environment() -> None:
    env = {
        "AMBIENT_CONFIG": "from-env.yaml",
        "AMBIENT_LOG_LEVEL": "DEBUG",
        "AMBIENT_LOG_FORMAT": "json",
        "AMBIENT_CONFIG_POLL_INTERVAL": "7",
        "AMBIENT_PORT_METRICS": "9090",
    }
    log, static_config, ports = early_settings(parse(), env)
    assert (log.level, log.format, static_config.path) == ("debug", "json", Path("from-env.yaml"))
    assert (static_config.poll_interval_s, ports.metrics) == (7.0, 9090)
    log, static_config, _ = early_settings(
        parse(
            "--config",
            "flag.yaml",
            "--log-level",
            "error",
            "--log-format",
            "text",
            "--config-poll-interval",
            "1",
        ),
        env,
    )
    assert (log.level, log.format, static_config.path, static_config.poll_interval_s) == (
        "error",
        "text",
        Path("flag.yaml"),
        1.0,
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {}, "static_config.path: required (flag --config or env AMBIENT_CONFIG)"),
        (("--config", "x"), {"AMBIENT_LOG_LEVEL": "loud"}, "log.level: expected one of debug, info"),
        (("--config", "x"), {"AMBIENT_LOG_FORMAT": "xml"}, "log.format: expected text or json, got 'xml'"),
        (("--config", "x"), {"AMBIENT_CONFIG_POLL_INTERVAL": "0"}, "static_config.poll_interval_s: must be"),
        (
            ("--config", "x"),
            {"AMBIENT_PORT_ADMIN": "15020"},
            "ports.metrics: 15020 is already used by ports.admin",
        ),
        (("--config", "x"), {"AMBIENT_PORT_OUTBOUND": "lots"}, "AMBIENT_PORT_OUTBOUND: not an integer"),
    ],
)
def test_invalid_early_settings_name_the_setting(
    argv: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        early_settings(parse(*argv), env)
    assert message in str(refused.value)


def complete(
    argv: tuple[str, ...], env: dict[str, str], file_node_name: str | None = "from-file"
) -> NodeProcessSettings:
    log, static_config, ports = early_settings(parse("--config", "x", *argv), env)
    return node_process_settings(
        parse("--config", "x", *argv),
        log=log,
        static_config=static_config,
        ports=ports,
        file_node_name=file_node_name,
        trust_domain="example.org",
        env=env,
    )


def test_the_node_name_comes_from_the_flag_then_the_environment_then_the_file() -> None:
    assert complete(("--node-name", "flag"), {"NODE_NAME": "env"}).node.node_name == "flag"
    assert complete((), {"NODE_NAME": "env"}).node.node_name == "env"
    assert complete((), {}).node.node_name == "from-file"
    with pytest.raises(SettingsError, match="node_name: required"):
        complete((), {}, file_node_name=None)


def test_the_data_plane_gets_the_node_ports_mark_and_its_own_variables() -> None:
    env = {
        "AMBIENT_PORT_INBOUND_HBONE": "16008",
        "AMBIENT_UPSTREAM_MARK": "0x600",
        "AMBIENT_HBONE_STREAM_WINDOW": "1048576",
        "AMBIENT_CONNECT_TIMEOUT": "2.5",
        "AMBIENT_DRAIN_DEADLINE": "0",
        "AMBIENT_LISTEN_IPV6": "true",
    }
    settings = complete((), env)
    dataplane = settings.dataplane
    assert settings.node.trust_domain == "example.org"
    assert dataplane.ports is settings.node.ports
    assert (dataplane.ports.inbound_hbone, dataplane.upstream_mark) == (16008, 0x600)
    assert (dataplane.hbone.stream_window, dataplane.connect_timeout_s, dataplane.drain_deadline_s) == (
        1048576,
        2.5,
        0.0,
    )
    assert dataplane.listen_ipv6
    assert settings.event_loop == "auto"
    assert complete((), {"AMBIENT_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AMBIENT_CONNECT_TIMEOUT": "-1"}, "connect_timeout_s: must be a positive number"),
        ({"AMBIENT_HBONE_MAX_FRAME_SIZE": "10"}, "hbone.max_frame_size: must be"),
        ({"AMBIENT_UPSTREAM_MARK": "0x111"}, "redirect.upstream_mark: must not match capture_mark"),
        ({"AMBIENT_LISTEN_IPV6": "maybe"}, "AMBIENT_LISTEN_IPV6: expected true or false, got 'maybe'"),
        ({"AMBIENT_EVENT_LOOP": "tokio"}, "event_loop: expected auto or asyncio, got 'tokio'"),
    ],
)
def test_invalid_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        complete((), env)
    assert message in str(refused.value)
